package promtest

import (
	"strings"
	"testing"
)

const exposition = `# TYPE requests_total counter
requests_total{code="200",method="get"} 7
requests_total{code="500",method="get"} 2
# TYPE temperature gauge
temperature 21.5
# TYPE latency_seconds histogram
latency_seconds_bucket{le="0.1"} 1
latency_seconds_bucket{le="+Inf"} 3
latency_seconds_sum 0.9
latency_seconds_count 3
`

func TestValueAndSum(t *testing.T) {
	fs, err := Parse(strings.NewReader(exposition))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
		ok     bool
	}{
		{"requests_total", []string{"code", "500"}, 2, true},
		{"requests_total", []string{"method", "get", "code", "200"}, 7, true},
		{"requests_total", []string{"code", "404"}, 0, false},
		{"temperature", nil, 21.5, true},
		{"latency_seconds", nil, 3, true},
		{"missing", nil, 0, false},
	} {
		if v, ok := fs.Value(c.name, c.labels...); v != c.want || ok != c.ok {
			t.Errorf("%s%v = %v, %v; want %v, %v", c.name, c.labels, v, ok, c.want, c.ok)
		}
	}
	if n := fs.Sum("requests_total"); n != 9 {
		t.Errorf("sum of requests_total %v, want 9", n)
	}
	if _, err := Parse(strings.NewReader("not an exposition {")); err == nil {
		t.Error("garbage parsed")
	}
}
