package monitoring

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/vmroam/vmroam/internal/promtest"
	"github.com/vmroam/vmroam/wgagent/metrics"
)

func TestMetricNames(t *testing.T) {
	for _, c := range []struct {
		expr string
		want []string
	}{
		{`up`, []string{"up"}},
		{`vmroam_peers{state="dead"} > 0`, []string{"vmroam_peers"}},
		{`sum by (instance, le) (rate(x_bucket{instance=~"$instance",le!="+Inf"}[$__rate_interval]))`, []string{"x_bucket"}},
		{`histogram_quantile(0.99, sum without(pod) (increase(h_bucket[5m] offset 1h)))`, []string{"h_bucket"}},
		{`a / on(instance) group_left(peer) b unless c`, []string{"a", "b", "c"}},
		{`count by (peer) (max_over_time(s{x="{not(a) metric}"}[10m]) == 1)`, []string{"s"}},
		{"label_replace(m, \"dst\", \"$1\", 'src', `(.*)`) # a comment naming nothing\n + sum(n) by (job)", []string{"m", "n"}},
		{`topk(3, q) and bool r * 1e3 - 0x1f + .5`, []string{"q", "r"}},
		{`rate(a[1h30m:1m]) @ start() + ns:rule:rate5m + ${var} + vmroam_x`, []string{"a", "ns:rule:rate5m", "vmroam_x"}},
		{"sum\n  by (instance)\n  (increase(a[5m]))\n- sum by (instance) (increase(a[5m]))", []string{"a"}},
	} {
		got, err := MetricNames(c.expr)
		if err != nil || !slices.Equal(got, c.want) {
			t.Errorf("MetricNames(%q) = %q, %v; want %q", c.expr, got, err, c.want)
		}
	}
	for _, bad := range []string{`sum(rate(`, `a{x="}`, `1 + 2`, `a{x="1"`} {
		if got, err := MetricNames(bad); err == nil {
			t.Errorf("MetricNames(%q) = %q, want an error", bad, got)
		}
	}
}

// TestFiles checks what the rules and the dashboard promise operators:
// every alert has a severity, a summary and a description, and a case in
// the rules' unit tests where it fires; every panel query uses the
// datasource and host variables; the dashboard has a panel for peers
// down, session checks, lost packets, handover time, the cache, conflicts
// and refused records.
func TestFiles(t *testing.T) {
	rules, err := AlertRules()
	if err != nil {
		t.Fatal(err)
	}
	tested, err := firingCases()
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rules {
		if tested[r.Alert] == 0 {
			t.Errorf("%s: no case in %s where it fires", r.Alert, RulesTestFile)
		}
	}
	if len(rules) < 10 {
		t.Fatalf("%d alerting rules, want the full set", len(rules))
	}
	severities := map[string]bool{"critical": true, "warning": true, "info": true}
	seen := map[string]bool{}
	for _, r := range rules {
		if seen[r.Alert] {
			t.Errorf("alert %s twice", r.Alert)
		}
		seen[r.Alert] = true
		if !severities[r.Labels["severity"]] {
			t.Errorf("%s: severity %q", r.Alert, r.Labels["severity"])
		}
		if r.Annotations["summary"] == "" || r.Annotations["description"] == "" {
			t.Errorf("%s: no summary or description", r.Alert)
		}
		if !strings.Contains(r.Annotations["summary"]+r.Annotations["description"], "{{ $labels.") {
			t.Errorf("%s: summary and description name no host, peer or label", r.Alert)
		}
	}
	d, err := ParseDashboard()
	if err != nil {
		t.Fatal(err)
	}
	var vars []string
	for _, v := range d.Templating.List {
		vars = append(vars, v.Type+":"+v.Name)
	}
	if !slices.Contains(vars, "datasource:datasource") || !slices.Contains(vars, "query:instance") {
		t.Errorf("dashboard variables %v, want a datasource and an instance variable", vars)
	}
	titles := map[string]bool{}
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		titles[p.Title] = true
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			if tg.Datasource.UID != "${datasource}" {
				t.Errorf("panel %q/%s: datasource %q, want the variable", p.Title, tg.RefID, tg.Datasource.UID)
			}
			if !strings.Contains(tg.Expr, `instance=~"$instance"`) {
				t.Errorf("panel %q/%s: %q ignores the host variable", p.Title, tg.RefID, tg.Expr)
			}
		}
	}
	for _, want := range []string{"Peers down", "Session check failures", "Lost and dropped packets", "Handover time",
		"Cache bytes and cap", "Conflicts", "Refused records"} {
		if !titles[want] {
			t.Errorf("no panel %q", want)
		}
	}
}

// firingCases counts, by alert, the cases of the rules' unit tests that
// expect it to fire.
func firingCases() (map[string]int, error) {
	b, err := os.ReadFile(RulesTestFile)
	if err != nil {
		return nil, err
	}
	var f struct {
		Tests []struct {
			AlertRuleTest []struct {
				Alertname string `yaml:"alertname"`
				ExpAlerts []any  `yaml:"exp_alerts"`
			} `yaml:"alert_rule_test"`
		} `yaml:"tests"`
	}
	if err := yaml.Unmarshal(b, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", RulesTestFile, err)
	}
	n := map[string]int{}
	for _, tc := range f.Tests {
		for _, c := range tc.AlertRuleTest {
			if len(c.ExpAlerts) > 0 {
				n[c.Alertname]++
			}
		}
	}
	return n, nil
}

// TestNamesAreDefined checks every metric the files name against the
// agent's metrics package (e2e's TestMonitoringOnALab checks running
// agents): a typo or a renamed metric fails here first.
func TestNamesAreDefined(t *testing.T) {
	m := metrics.New(fakeSource{})
	// Histograms and labelled counters appear once observed or labelled.
	m.MigrationEnded(metrics.Migration{Role: metrics.RoleDestination, Handover: 1})
	fams, err := m.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	served := promtest.ByName(fams)
	exprs, err := Exprs()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range exprs {
		names, err := MetricNames(e.Query)
		if err != nil {
			t.Errorf("%s: %v", e.Where, err)
			continue
		}
		for _, name := range names {
			n++
			if missing := Missing(served, name); missing != "" {
				t.Errorf("%s names %s: %s", e.Where, name, missing)
			}
		}
	}
	if n < len(exprs) {
		t.Fatalf("%d names in %d expressions", n, len(exprs))
	}
}

type fakeSource struct{}

func (fakeSource) Snapshot() (metrics.Snapshot, error) {
	return metrics.Snapshot{Peers: []metrics.Peer{{Name: "h2", State: "alive", Tunnel: true}}}, nil
}

func promtool(t *testing.T) string {
	t.Helper()
	p, err := exec.LookPath("promtool")
	if err != nil {
		t.Skip("promtool not installed (Debian package prometheus; scripts/install-deps.sh installs it)")
	}
	return p
}

func TestPromtoolCheckRules(t *testing.T) {
	out, err := exec.Command(promtool(t), "check", "rules", RulesFile).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool check rules %s: %v\n%s", RulesFile, err, out)
	}
	rules, _ := AlertRules()
	if want := "SUCCESS: " + strconv.Itoa(len(rules)) + " rules found"; !strings.Contains(string(out), want) {
		t.Errorf("promtool check rules says\n%s\nwant %q", out, want)
	}
}

// TestPromtoolTestRules runs the alerts' unit tests: synthetic series, and
// which alerts fire when, with which labels and text.
func TestPromtoolTestRules(t *testing.T) {
	out, err := exec.Command(promtool(t), "test", "rules", RulesTestFile).CombinedOutput()
	if err != nil {
		t.Fatalf("promtool test rules %s: %v\n%s", RulesTestFile, err, out)
	}
	if !strings.Contains(string(out), "SUCCESS") {
		t.Errorf("promtool test rules says\n%s", out)
	}
}
