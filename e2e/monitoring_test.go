package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/internal/dashshot"
	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/monitoring"
)

// promAddr is where the lab's Prometheus answers, in the client host's
// namespace.
const promAddr = "127.0.0.1:19090"

// TestMonitoringOnALab moves a VM under pings from h1 to h2 with every
// agent serving metrics on its underlay address, and checks that every
// metric the alerting rules and the dashboard (monitoring/) name is served
// by each running agent. With Prometheus installed, a real Prometheus in
// h3's namespace scrapes the agents every second and evaluates the rules;
// the test then runs every dashboard query over the run, checks what they
// show against the agents' own figures, and draws the dashboard from them
// (a PNG, written to $VMROAM_DASHBOARD_PNG if set; then Prometheus and
// rsvg-convert must be installed).
func TestMonitoringOnALab(t *testing.T) {
	l, m, c := migrationLab(t, 3, "--metrics-addr", "0.0.0.0:9474")
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	prom := startPrometheus(t, l, h3)
	start := time.Now() // the dashboard's range: from the first scrapes
	// scraped waits until Prometheus has n scrapes of every agent since
	// from (none to wait for without Prometheus).
	scraped := func(what string, from time.Time, n int) {
		t.Helper()
		if prom {
			waitScrapes(t, l, h3, what, from, n)
		}
	}

	p, err := l.StartPinger(c, vipM, 5*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	scraped("the state before the move", time.Now(), 3)
	cli(t, l, h1, "migrate", "suspend", vipM.String())
	scraped("the suspended VIP", time.Now(), 1)
	migrate(t, l, m, h2, 500*time.Millisecond, false)
	dst := waitMigrated(t, l, h2, vipM)
	eventually(t, 30*time.Second, "h1 counts the migration it handed over", func() error {
		if v, _ := scrape(t, l, h1).Value("vmroam_migrations_completed_total", "role", "source"); v != 1 {
			return fmt.Errorf("vmroam_migrations_completed_total{role=source} = %v", v)
		}
		return nil
	})
	scraped("the state after the move", time.Now(), 3)
	ps := p.Stop(2 * time.Second)
	t.Logf("pings (not this test's subject): %v; handover at h2 %v", ps, handover(dst))

	exprs, err := monitoring.Exprs()
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range l.Hosts {
		fams := scrape(t, l, h)
		n := 0
		for _, e := range exprs {
			names, err := monitoring.MetricNames(e.Query)
			if err != nil {
				t.Fatalf("%s: %v", e.Where, err)
			}
			for _, name := range names {
				n++
				if why := monitoring.Missing(fams, name); why != "" {
					t.Errorf("%s: %s names %s: %s", h.Name, e.Where, name, why)
				}
			}
		}
		t.Logf("%s serves all %d metric names of %d expressions", h.Name, n, len(exprs))
	}
	if !prom {
		return
	}
	// The alerts on the cache's counters must fire exactly when the
	// agents counted something, read again at each check.
	fire := func() map[string]bool {
		var dropped, lost float64
		for _, h := range l.Hosts {
			fams := scrape(t, l, h)
			dropped += fams.Sum("vmroam_cache_dropped_packets_total")
			lost += fams.Sum("vmroam_cache_unclaimed_packets_total")
		}
		return map[string]bool{"VmroamCacheDroppedPackets": dropped > 0, "VmroamCacheLostPackets": lost > 0}
	}
	checkPrometheus(t, l, h3, start, handover(dst).Seconds(), fire)
}

// waitScrapes waits until the Prometheus in h's namespace holds at least n
// samples of every agent's up taken since from.
func waitScrapes(t *testing.T, l *lab.Lab, h *lab.Host, what string, from time.Time, n int) {
	t.Helper()
	eventually(t, time.Duration(n)*time.Second+20*time.Second, "Prometheus scrapes "+what, func() error {
		var v struct {
			Result []struct {
				Metric map[string]string `json:"metric"`
				Value  [2]any            `json:"value"` // [unix seconds, "value"]
			} `json:"result"`
		}
		// The window ends now and starts just after from.
		win := max(time.Millisecond, time.Since(from)).Milliseconds()
		q := url.Values{"query": {fmt.Sprintf(`count_over_time(up{job="vmroam"}[%dms])`, win)}}
		if err := promAPI(l, h, "/api/v1/query", q, &v); err != nil {
			return err
		}
		got := map[string]int{}
		for _, r := range v.Result {
			c, _ := strconv.Atoi(fmt.Sprint(r.Value[1]))
			got[r.Metric["instance"]] = c
		}
		for _, o := range l.Hosts {
			if got[o.Name] < n {
				return fmt.Errorf("scrapes since %s: %v, want %d of each host", from.Format("15:04:05.000"), got, n)
			}
		}
		return nil
	})
}

// startPrometheus runs Prometheus in h's namespace, scraping every host's
// agent each second as job vmroam with the host's name as instance, and
// evaluating monitoring/'s rules. False if Prometheus is not installed
// (a failure with $VMROAM_DASHBOARD_PNG set: no dashboard without it).
func startPrometheus(t *testing.T, l *lab.Lab, h *lab.Host) bool {
	t.Helper()
	bin, err := exec.LookPath("prometheus")
	if err != nil {
		if os.Getenv("VMROAM_DASHBOARD_PNG") != "" {
			t.Fatalf("VMROAM_DASHBOARD_PNG is set, but prometheus is not installed (Debian package prometheus): %v", err)
		}
		t.Log("prometheus not installed (Debian package prometheus): only the agents' metrics are checked")
		return false
	}
	rules, err := filepath.Abs(filepath.Join("..", "monitoring", monitoring.RulesFile))
	if err != nil {
		t.Fatal(err)
	}
	var cfg strings.Builder
	fmt.Fprintf(&cfg, "global: {scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}\nrule_files: [%q]\nscrape_configs:\n  - job_name: vmroam\n    static_configs:\n", rules)
	for _, o := range l.Hosts {
		fmt.Fprintf(&cfg, "      - {targets: [%q], labels: {instance: %q}}\n", o.Underlay.String()+":9474", o.Name)
	}
	dir := filepath.Join(l.Dir, "prometheus")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd, err := l.Spawn(h.NS, filepath.Join(dir, "log"), bin, "--config.file="+cfgPath,
		"--storage.tsdb.path="+filepath.Join(dir, "data"), "--web.listen-address="+promAddr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Logf("---- Prometheus log ----\n%s", tail(string(b), 30))
		}
		cmd.Process.Kill()
		cmd.Wait()
	})
	eventually(t, 30*time.Second, "Prometheus scrapes every agent", func() error {
		var targets struct {
			ActiveTargets []struct {
				Health    string `json:"health"`
				LastError string `json:"lastError"`
				Labels    map[string]string
			} `json:"activeTargets"`
		}
		if err := promAPI(l, h, "/api/v1/targets", nil, &targets); err != nil {
			return err
		}
		up := 0
		for _, tg := range targets.ActiveTargets {
			if tg.Health == "up" {
				up++
			}
		}
		if up != len(l.Hosts) {
			return fmt.Errorf("%d of %d targets up: %+v", up, len(l.Hosts), targets.ActiveTargets)
		}
		return nil
	})
	return true
}

// promAPI GETs a Prometheus API path in h's namespace and decodes its data.
func promAPI(l *lab.Lab, h *lab.Host, path string, q url.Values, data any) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	u := "http://" + promAddr + path
	if q != nil {
		u += "?" + q.Encode()
	}
	body, err := l.HTTPGet(ctx, h.NS, u)
	if err != nil {
		return fmt.Errorf("%w: %s", err, bytes.TrimSpace(body))
	}
	var r struct {
		Status string          `json:"status"`
		Error  string          `json:"error"`
		Data   json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return fmt.Errorf("prometheus %s: %w", path, err)
	}
	if r.Status != "success" {
		return fmt.Errorf("prometheus %s: %s", path, r.Error)
	}
	return json.Unmarshal(r.Data, data)
}

// matrix is a range query's result.
type matrix []struct {
	Metric map[string]string `json:"metric"`
	Values [][2]any          `json:"values"` // [unix seconds, "value"]
}

// grafanaVars stands in for what Grafana puts into a query: every host,
// and the rate interval it picks for a 1 s scrape (4 scrapes).
func grafanaVars(q string, rng time.Duration) string {
	return strings.NewReplacer(`$instance`, `.*`, `$__rate_interval`, `4s`,
		`$__range`, strconv.Itoa(int(rng.Seconds()))+"s").Replace(q)
}

// checkPrometheus checks what the lab's Prometheus made of the run: every
// rule evaluates, the alerts in fire() come to be firing exactly when
// their value is true, every dashboard query runs and shows data (but for
// those that keep only what is above 0), the handover panel shows h2's
// handover; then it draws the dashboard.
func checkPrometheus(t *testing.T, l *lab.Lab, h *lab.Host, start time.Time, handoverS float64, fire func() map[string]bool) {
	// Prometheus has scraped the migration's end.
	eventually(t, 20*time.Second, "Prometheus has h1's completed migration", func() error {
		var v struct {
			Result []struct {
				Value [2]any `json:"value"` // [unix seconds, "value"]
			} `json:"result"`
		}
		q := url.Values{"query": {`vmroam_migrations_completed_total{instance="h1",role="source"}`}}
		if err := promAPI(l, h, "/api/v1/query", q, &v); err != nil {
			return err
		}
		if len(v.Result) != 1 || v.Result[0].Value[1] != "1" {
			return fmt.Errorf("got %v", v.Result)
		}
		return nil
	})

	rules, err := monitoring.AlertRules()
	if err != nil {
		t.Fatal(err)
	}
	var (
		n      int
		firing []string
	)
	eventually(t, 30*time.Second, "every rule evaluates, the cache's alerts as the agents count", func() error {
		want := fire()
		var rs struct {
			Groups []struct {
				Rules []struct {
					Name      string `json:"name"`
					Health    string `json:"health"`
					LastError string `json:"lastError"`
					State     string `json:"state"`
				} `json:"rules"`
			} `json:"groups"`
		}
		if err := promAPI(l, h, "/api/v1/rules", nil, &rs); err != nil {
			return err
		}
		n, firing = 0, nil
		var errs []string
		for _, g := range rs.Groups {
			for _, r := range g.Rules {
				n++
				if r.Health != "ok" {
					errs = append(errs, fmt.Sprintf("rule %s: health %q: %s", r.Name, r.Health, r.LastError))
				}
				if r.State != "inactive" {
					firing = append(firing, r.Name+" "+r.State)
				}
				if w, ok := want[r.Name]; ok && w != (r.State == "firing") {
					errs = append(errs, fmt.Sprintf("alert %s is %s; the agents' counters say it should fire: %v", r.Name, r.State, w))
				}
			}
		}
		if n != len(rules) {
			errs = append(errs, fmt.Sprintf("Prometheus evaluates %d rules, the file has %d", n, len(rules)))
		}
		if len(errs) > 0 {
			return errors.New(strings.Join(errs, "; "))
		}
		return nil
	})
	t.Logf("Prometheus evaluated %d rules; not inactive: %v", n, firing)

	d, err := monitoring.ParseDashboard()
	if err != nil {
		t.Fatal(err)
	}
	end := time.Now()
	rng := end.Sub(start)
	shot := dashshot.Dashboard{Title: d.Title, Start: start, End: end,
		Subtitle: fmt.Sprintf("lab run of TestMonitoringOnALab, %s UTC: a VM moved from h1 to h2 under 5 ms pings from h3; queries of monitoring/%s evaluated by Prometheus", start.UTC().Format("2006-01-02 15:04"), monitoring.DashboardFile)}
	sawHandover := false
	for _, p := range d.Panels {
		sp := dashshot.Panel{Title: p.Title, Kind: p.Type, Unit: p.FieldConfig.Defaults.Unit, X: p.GridPos.X, Y: p.GridPos.Y, W: p.GridPos.W, H: p.GridPos.H}
		for _, tg := range p.Targets {
			points := 0
			q := url.Values{"query": {grafanaVars(tg.Expr, rng)}, "start": {unixTime(start)}, "end": {unixTime(end)}, "step": {"1"}}
			var res struct {
				Result matrix `json:"result"`
			}
			if err := promAPI(l, h, "/api/v1/query_range", q, &res); err != nil {
				t.Errorf("panel %q/%s: %v", p.Title, tg.RefID, err)
				continue
			}
			for _, s := range res.Result {
				ds := dashshot.Series{Name: legend(tg.Legend, s.Metric)}
				for _, v := range s.Values {
					sec, _ := v[0].(float64)
					f, _ := strconv.ParseFloat(fmt.Sprint(v[1]), 64)
					ds.Points = append(ds.Points, dashshot.Point{T: time.Unix(0, int64(sec*1e9)), V: f})
					points++
					if p.Title == "Handover time" && tg.RefID == "A" && s.Metric["instance"] == "h2" && math.Abs(f-handoverS) <= 1e-6*max(1, handoverS) {
						sawHandover = true
					}
				}
				sp.Series = append(sp.Series, ds)
			}
			if points == 0 && !quietInACleanRun(tg.Expr) {
				t.Errorf("panel %q/%s shows nothing over the run: %s", p.Title, tg.RefID, tg.Expr)
			}
		}
		shot.Panels = append(shot.Panels, sp)
	}
	if !sawHandover {
		t.Errorf("the handover panel never shows h2's handover of %v s", handoverS)
	}

	var svg bytes.Buffer
	if err := dashshot.Render(&svg, shot); err != nil {
		t.Fatal(err)
	}
	rsvg, err := exec.LookPath("rsvg-convert")
	if err != nil {
		if os.Getenv("VMROAM_DASHBOARD_PNG") != "" {
			t.Fatalf("VMROAM_DASHBOARD_PNG is set, but rsvg-convert is not installed (librsvg2-bin): %v", err)
		}
		t.Log("rsvg-convert not installed (librsvg2-bin): no PNG")
		return
	}
	png := filepath.Join(t.TempDir(), "dashboard.png")
	cmd := exec.Command(rsvg, "-o", png)
	cmd.Stdin = &svg
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("rsvg-convert: %v: %s", err, out)
	}
	b, err := os.ReadFile(png)
	if err != nil || !bytes.HasPrefix(b, []byte("\x89PNG")) {
		t.Fatalf("rsvg-convert wrote no PNG: %v", err)
	}
	if out := os.Getenv("VMROAM_DASHBOARD_PNG"); out != "" {
		if err := os.WriteFile(out, b, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s (%d bytes)", out, len(b))
	}
}

// quietInACleanRun reports whether a dashboard query may show nothing in a
// run where no peer is down and no packet is lost: it ends in a filter
// (`> 0`, `== 1`), keeping only the series that pass it.
func quietInACleanRun(expr string) bool { return filterRE.MatchString(expr) }

var filterRE = regexp.MustCompile(`(>|<|==|!=|>=|<=)\s*[0-9.]+\s*$`)

func unixTime(t time.Time) string { return strconv.FormatFloat(float64(t.UnixNano())/1e9, 'f', 3, 64) }

// legend fills a Grafana legend format ({{label}}) from a series' labels.
func legend(format string, labels map[string]string) string {
	out := format
	for k, v := range labels {
		out = strings.ReplaceAll(out, "{{"+k+"}}", v)
	}
	return out
}
