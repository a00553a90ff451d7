// Package monitoring holds what operators load into Prometheus and Grafana
// to watch vmroam agents (the alerting rules, their unit tests and the
// dashboard, as files beside this one) and reads the PromQL expressions
// out of them, so that tests check every metric they name is served.
package monitoring

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"go.yaml.in/yaml/v3"

	"github.com/vmroam/vmroam/internal/promtest"
)

// The files, as shipped.
var (
	//go:embed vmroam.rules.yml
	Rules []byte
	//go:embed vmroam-dashboard.json
	Dashboard []byte
)

// Files are the files' names in this folder.
const (
	RulesFile     = "vmroam.rules.yml"
	RulesTestFile = "vmroam.rules.test.yml"
	DashboardFile = "vmroam-dashboard.json"
)

// Expr is one PromQL expression and where it is.
type Expr struct {
	Where string // "rule VmroamPeerDead", "panel Handover time/B"
	Query string
}

// Rule is an alerting rule as the rules file states it.
type Rule struct {
	Alert       string            `yaml:"alert"`
	Expr        string            `yaml:"expr"`
	For         string            `yaml:"for"`
	Labels      map[string]string `yaml:"labels"`
	Annotations map[string]string `yaml:"annotations"`
}

// AlertRules parses the rules file.
func AlertRules() ([]Rule, error) {
	var f struct {
		Groups []struct {
			Name  string `yaml:"name"`
			Rules []Rule `yaml:"rules"`
		} `yaml:"groups"`
	}
	if err := yaml.Unmarshal(Rules, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", RulesFile, err)
	}
	var out []Rule
	for _, g := range f.Groups {
		out = append(out, g.Rules...)
	}
	return out, nil
}

// Panel is a dashboard panel with its queries (rows' nested panels too).
type Panel struct {
	Title   string `json:"title"`
	Type    string `json:"type"`
	Targets []struct {
		RefID      string `json:"refId"`
		Expr       string `json:"expr"`
		Legend     string `json:"legendFormat"`
		Datasource struct {
			UID string `json:"uid"`
		} `json:"datasource"`
	} `json:"targets"`
	Panels  []Panel `json:"panels"`
	GridPos struct {
		X, Y, W, H int
	} `json:"gridPos"`
	FieldConfig struct {
		Defaults struct {
			Unit string `json:"unit"`
		} `json:"defaults"`
	} `json:"fieldConfig"`
}

// DashboardSpec is the part of the dashboard the tests and the renderer read.
type DashboardSpec struct {
	Title      string  `json:"title"`
	Panels     []Panel `json:"panels"`
	Templating struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"` // a string, or {"query": ...}
		} `json:"list"`
	} `json:"templating"`
}

// ParseDashboard parses the dashboard. Rows' panels come flattened, in order.
func ParseDashboard() (DashboardSpec, error) {
	var d DashboardSpec
	if err := json.Unmarshal(Dashboard, &d); err != nil {
		return d, fmt.Errorf("%s: %w", DashboardFile, err)
	}
	var flat []Panel
	var walk func([]Panel)
	walk = func(ps []Panel) {
		for _, p := range ps {
			flat = append(flat, p)
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	d.Panels = flat
	return d, nil
}

// labelValues is Grafana's label_values(metric, label) variable query.
var labelValues = regexp.MustCompile(`^\s*label_values\(\s*(.+?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$`)

// Exprs lists every PromQL expression of the rules and the dashboard:
// alert expressions, panel queries, and the metric selectors of the
// dashboard's variables.
func Exprs() ([]Expr, error) {
	rules, err := AlertRules()
	if err != nil {
		return nil, err
	}
	var out []Expr
	for _, r := range rules {
		out = append(out, Expr{Where: "rule " + r.Alert, Query: r.Expr})
	}
	d, err := ParseDashboard()
	if err != nil {
		return nil, err
	}
	for _, p := range d.Panels {
		for _, t := range p.Targets {
			out = append(out, Expr{Where: "panel " + p.Title + "/" + t.RefID, Query: t.Expr})
		}
	}
	for _, v := range d.Templating.List {
		if v.Type != "query" {
			continue
		}
		q, _ := v.Query.(string)
		if m, ok := v.Query.(map[string]any); ok {
			q, _ = m["query"].(string)
		}
		sel := labelValues.FindStringSubmatch(q)
		if sel == nil {
			return nil, fmt.Errorf("%s: variable %s: query %q is not label_values(metric, label)", DashboardFile, v.Name, q)
		}
		out = append(out, Expr{Where: "variable " + v.Name, Query: sel[1]})
	}
	for _, e := range out {
		if strings.TrimSpace(e.Query) == "" {
			return nil, fmt.Errorf("%s: empty expression", e.Where)
		}
	}
	return out, nil
}

// PrometheusOwn are the series Prometheus makes for each scrape, which the
// rules may name though no agent serves them.
var PrometheusOwn = []string{"up"}

// Missing says why the metric name is not among served, the families of a
// scrape ("" if it is): a histogram's name_bucket, name_sum and
// name_count are served by its family name.
func Missing(served promtest.Families, name string) string {
	if slices.Contains(PrometheusOwn, name) || served[name] != nil {
		return ""
	}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(name, suf)
		if !ok || served[base] == nil {
			continue
		}
		switch served[base].GetType() {
		case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
			return ""
		case dto.MetricType_SUMMARY:
			if suf != "_bucket" {
				return ""
			}
		}
		return fmt.Sprintf("%s is a %s, without %s", base, served[base].GetType(), suf)
	}
	return "not served"
}

// Words of PromQL that are not metric names where they stand alone:
// aggregation operators (which may be followed by by/without before their
// parenthesis), set and comparison keywords, modifiers.
var keywords = map[string]bool{
	"sum": true, "min": true, "max": true, "avg": true, "group": true, "stddev": true, "stdvar": true,
	"count": true, "count_values": true, "bottomk": true, "topk": true, "quantile": true,
	"limitk": true, "limit_ratio": true,
	"and": true, "or": true, "unless": true, "bool": true, "offset": true, "atan2": true,
	"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true,
	"inf": true, "nan": true,
}

// labelLists are the keywords whose parenthesis holds label names.
var labelLists = map[string]bool{"by": true, "without": true, "on": true, "ignoring": true, "group_left": true, "group_right": true}

// MetricNames returns the metric names expr selects, sorted, each once. It
// reads PromQL as a tokenizer would: strings, label matchers {...},
// ranges [...], comments and Grafana's $variables are skipped; a word
// followed by "(" is a function; the parenthesis after by, without, on,
// ignoring, group_left and group_right holds labels, not metrics.
func MetricNames(expr string) ([]string, error) {
	var names []string
	s := expr
	i := 0
	// skipString skips the string that starts at i; it returns the index
	// past its closing quote.
	skipString := func(i int) (int, error) {
		q := s[i]
		for j := i + 1; j < len(s); j++ {
			switch {
			case s[j] == '\\' && q != '`':
				j++
			case s[j] == q:
				return j + 1, nil
			}
		}
		return 0, fmt.Errorf("unterminated string at %d in %q", i, expr)
	}
	// skipTo skips from the opening bracket at i to past its closing one,
	// strings included.
	skipTo := func(i int, open, close byte) (int, error) {
		depth := 0
		for j := i; j < len(s); {
			switch s[j] {
			case '"', '\'', '`':
				k, err := skipString(j)
				if err != nil {
					return 0, err
				}
				j = k
				continue
			case open:
				depth++
			case close:
				depth--
				if depth == 0 {
					return j + 1, nil
				}
			}
			j++
		}
		return 0, fmt.Errorf("unbalanced %c at %d in %q", open, i, expr)
	}
	isWordStart := func(c byte) bool { return c == '_' || c == ':' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' }
	isWord := func(c byte) bool { return isWordStart(c) || c >= '0' && c <= '9' }
	for i < len(s) {
		c := s[i]
		switch {
		case c == '"' || c == '\'' || c == '`':
			j, err := skipString(i)
			if err != nil {
				return nil, err
			}
			i = j
		case c == '{':
			j, err := skipTo(i, '{', '}')
			if err != nil {
				return nil, err
			}
			i = j
		case c == '[':
			j, err := skipTo(i, '[', ']')
			if err != nil {
				return nil, err
			}
			i = j
		case c == '#':
			for i < len(s) && s[i] != '\n' {
				i++
			}
		case c == '$': // a Grafana variable: $name or ${name}
			i++
			if i < len(s) && s[i] == '{' {
				j, err := skipTo(i, '{', '}')
				if err != nil {
					return nil, err
				}
				i = j
			}
			for i < len(s) && isWord(s[i]) {
				i++
			}
		case c >= '0' && c <= '9' || c == '.' && i+1 < len(s) && s[i+1] >= '0' && s[i+1] <= '9':
			// A number or a duration: 0.99, 1e3, 0x1f, 5m, 1h30m.
			for i < len(s) && (isWord(s[i]) || s[i] == '.') {
				i++
			}
		case isWordStart(c):
			j := i
			for j < len(s) && isWord(s[j]) {
				j++
			}
			w := s[i:j]
			k := j
			for k < len(s) && (s[k] == ' ' || s[k] == '\t' || s[k] == '\n' || s[k] == '\r') {
				k++
			}
			next := byte(0)
			if k < len(s) {
				next = s[k]
			}
			switch {
			case labelLists[strings.ToLower(w)] && next == '(':
				e, err := skipTo(k, '(', ')')
				if err != nil {
					return nil, err
				}
				j = e
			case keywords[strings.ToLower(w)]:
			case next == '(': // a function
			default:
				names = append(names, w)
			}
			i = j
		default:
			i++
		}
	}
	if len(names) == 0 {
		return nil, fmt.Errorf("no metric name in %q", expr)
	}
	slices.Sort(names)
	return slices.Compact(names), nil
}
