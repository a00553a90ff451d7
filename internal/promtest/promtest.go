// Package promtest reads Prometheus metrics in tests: it parses an
// exposition and finds the value of one series, so that tests check
// numbers, not the text format.
package promtest

import (
	"fmt"
	"io"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// Families are metric families by name.
type Families map[string]*dto.MetricFamily

// Parse reads a text exposition (what a /metrics endpoint serves).
func Parse(r io.Reader) (Families, error) {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return nil, fmt.Errorf("parse the exposition: %w", err)
	}
	return fams, nil
}

// ByName indexes what a prometheus.Gatherer returns.
func ByName(fams []*dto.MetricFamily) Families {
	out := Families{}
	for _, f := range fams {
		out[f.GetName()] = f
	}
	return out
}

// Value returns the value of the first series of family name whose labels
// include every pair in labels ("name", "value", ...): a counter's or
// gauge's value, a histogram's sample count. ok is false if there is none.
func (fs Families) Value(name string, labels ...string) (v float64, ok bool) {
next:
	for _, m := range fs[name].GetMetric() {
		have := map[string]string{}
		for _, lp := range m.GetLabel() {
			have[lp.GetName()] = lp.GetValue()
		}
		for i := 0; i+1 < len(labels); i += 2 {
			if have[labels[i]] != labels[i+1] {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue(), true
		case m.Gauge != nil:
			return m.GetGauge().GetValue(), true
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount()), true
		}
	}
	return 0, false
}

// Sum adds up the values of every series of a counter or gauge family.
func (fs Families) Sum(name string) (n float64) {
	for _, m := range fs[name].GetMetric() {
		n += m.GetCounter().GetValue() + m.GetGauge().GetValue()
	}
	return n
}
