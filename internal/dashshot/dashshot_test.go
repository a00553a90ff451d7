package dashshot

import (
	"bytes"
	"encoding/xml"
	"io"
	"math"
	"strings"
	"testing"
	"time"
)

func TestRender(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	pts := func(vs ...float64) []Point {
		var out []Point
		for i, v := range vs {
			out = append(out, Point{T: t0.Add(time.Duration(i) * time.Second), V: v})
		}
		return out
	}
	d := Dashboard{Title: "vmroam <lab>", Start: t0, End: t0.Add(4 * time.Second), Panels: []Panel{
		{Title: "Row", Kind: "row", W: 24, H: 1},
		{Title: "Handover time", Kind: "timeseries", Unit: "s", Y: 1, W: 12, H: 8, Series: []Series{
			{Name: "h2 mean", Points: pts(math.NaN(), 0.003, 0.003, math.NaN(), math.NaN())},
			{Name: "h1 & h3", Points: pts(0, 1, math.Inf(1), 2, 3)},
		}},
		{Title: "Empty", Kind: "timeseries", X: 12, Y: 1, W: 12, H: 8},
		{Title: "Conflicts", Kind: "stat", Y: 9, W: 4, H: 6, Series: []Series{{Name: "c", Points: pts(0, 0, 2)}}},
	}}
	var buf bytes.Buffer
	if err := Render(&buf, d); err != nil {
		t.Fatal(err)
	}
	svg := buf.String()
	// Well-formed XML, text escaped.
	dec := xml.NewDecoder(strings.NewReader(svg))
	for {
		if _, err := dec.Token(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("not well-formed: %v\n%s", err, svg)
		}
	}
	for _, want := range []string{"vmroam &lt;lab&gt;", "h1 &amp; h3", "no data", ">2</text>", "Handover time"} {
		if !strings.Contains(svg, want) {
			t.Errorf("SVG lacks %q", want)
		}
	}
	// A gap (NaN, +Inf) lifts the pen: h2 has one segment of two points,
	// the other series two segments.
	var paths []string
	for _, l := range strings.Split(svg, "\n") {
		if strings.HasPrefix(l, "<path ") {
			paths = append(paths, l)
		}
	}
	if len(paths) != 2 {
		t.Fatalf("%d paths, want 2", len(paths))
	}
	for _, p := range paths {
		moves, lines := strings.Count(p, "M"), strings.Count(p, "L")
		if !(moves == 2 && lines == 2) && !(moves == 1 && lines == 1) {
			t.Errorf("path %s: %d moves and %d lines", p, moves, lines)
		}
	}
}

func TestFormat(t *testing.T) {
	for _, c := range []struct {
		v    float64
		unit string
		want string
	}{
		{0.0031, "s", "3.10 ms"}, {0.0000425, "s", "42.50 µs"}, {2, "s", "2 s"}, {0, "s", "0"},
		{1 << 30, "bytes", "1 GiB"}, {1536, "Bps", "1.50 KiB/s"}, {12, "bytes", "12 B"},
		{0.25, "percentunit", "25%"}, {7, "short", "7"}, {0.5, "", "0.50"},
	} {
		if got := format(c.v, c.unit); got != c.want {
			t.Errorf("format(%v, %q) = %q, want %q", c.v, c.unit, got, c.want)
		}
	}
	for _, c := range [][2]float64{{0.7, 1}, {1, 1}, {1.2, 2}, {3, 5}, {7, 10}, {0.0031, 0.005}} {
		if got := nice(c[0]); math.Abs(got-c[1]) > 1e-12 {
			t.Errorf("nice(%v) = %v, want %v", c[0], got, c[1])
		}
	}
}

// TestRenderDegenerate: values all negative, all zero, or a run of no
// length still draw on finite coordinates, the axis spanning 0.
func TestRenderDegenerate(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		name       string
		end        time.Time
		vs         []float64
		axisLabels []string
	}{
		{"all negative", t0.Add(2 * time.Second), []float64{-4, -2, -3}, []string{">-4</text>", ">0</text>"}},
		{"all zero", t0.Add(2 * time.Second), []float64{0, 0, 0}, []string{">0</text>", ">1</text>"}},
		{"start == end", t0, []float64{1, 2, 3}, []string{">0</text>", ">5</text>"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var pts []Point
			for i, v := range c.vs {
				pts = append(pts, Point{T: t0.Add(time.Duration(i) * time.Second), V: v})
			}
			d := Dashboard{Title: "t", Start: t0, End: c.end, Panels: []Panel{
				{Title: "p", Kind: "timeseries", Unit: "short", W: 24, H: 8, Series: []Series{{Name: "s", Points: pts}}},
			}}
			var buf bytes.Buffer
			if err := Render(&buf, d); err != nil {
				t.Fatal(err)
			}
			svg := buf.String()
			for _, bad := range []string{"NaN", "Inf"} {
				if strings.Contains(svg, bad) {
					t.Errorf("SVG has %s:\n%s", bad, svg)
				}
			}
			if !strings.Contains(svg, "<path ") {
				t.Error("no line drawn")
			}
			for _, want := range c.axisLabels {
				if !strings.Contains(svg, want) {
					t.Errorf("no axis label %q", want)
				}
			}
		})
	}
}
