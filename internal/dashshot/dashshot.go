// Package dashshot draws a picture of a dashboard from its queries'
// results: one chart per panel (lines for time series, a number for a
// stat), laid out on the dashboard's grid, as SVG written by hand. It is
// how the README's screenshot is made without a Grafana: the same queries,
// evaluated by a real Prometheus over a lab run.
package dashshot

import (
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/vmroam/vmroam/internal/palette"
)

// Point is one sample.
type Point struct {
	T time.Time
	V float64
}

// Series is one line of a panel: its legend and samples.
type Series struct {
	Name   string
	Points []Point
}

// Panel is a chart and where it sits on a 24-column grid (Grafana's
// gridPos: X, W in columns, Y, H in rows).
type Panel struct {
	Title      string
	Kind       string // "timeseries", "stat" or "row"
	Unit       string // Grafana's unit: "s", "bytes", "Bps", "percentunit", "short"
	X, Y, W, H int
	Series     []Series
}

// Dashboard is what Render draws.
type Dashboard struct {
	Title      string
	Subtitle   string
	Start, End time.Time
	Panels     []Panel
}

// Geometry: a grid column and row in pixels.
const (
	colW    = 60.0
	rowPx   = 30.0
	headerH = 56.0
	pad     = 8.0
)

// Render writes d as SVG to w.
func Render(w io.Writer, d Dashboard) error {
	rows := 0
	for _, p := range d.Panels {
		rows = max(rows, p.Y+p.H)
	}
	width, height := 24*colW, headerH+float64(rows)*rowPx+pad
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="DejaVu Sans, sans-serif">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="#111217"/>`+"\n")
	fmt.Fprintf(&b, `<text x="%.0f" y="26" font-size="18" fill="#e6e6e6">%s</text>`+"\n", pad, esc(d.Title))
	fmt.Fprintf(&b, `<text x="%.0f" y="46" font-size="12" fill="#9a9aa0">%s</text>`+"\n", pad, esc(d.Subtitle))
	for _, p := range d.Panels {
		x0, y0 := float64(p.X)*colW+pad/2, headerH+float64(p.Y)*rowPx
		pw, ph := float64(p.W)*colW-pad, float64(p.H)*rowPx-pad
		switch p.Kind {
		case "row":
			fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" font-size="14" font-weight="bold" fill="#d8d9da">%s</text>`+"\n", x0, y0+20, esc(p.Title))
			continue
		case "stat":
			stat(&b, p, x0, y0, pw, ph)
		default:
			chart(&b, p, d.Start, d.End, x0, y0, pw, ph)
		}
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	if err != nil {
		return fmt.Errorf("dashshot: %w", err)
	}
	return nil
}

func frame(b *strings.Builder, title string, x, y, w, h float64) {
	fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" rx="3" fill="#181b1f" stroke="#2c3235"/>`+"\n", x, y, w, h)
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="12" font-weight="bold" fill="#d8d9da">%s</text>`+"\n", x+8, y+17, esc(title))
}

// stat draws the last value of the panel's first series, red when above 0.
func stat(b *strings.Builder, p Panel, x, y, w, h float64) {
	frame(b, p.Title, x, y, w, h)
	v, ok := math.NaN(), false
	for _, s := range p.Series {
		for _, pt := range s.Points {
			if !math.IsNaN(pt.V) {
				v, ok = pt.V, true
			}
		}
		if ok {
			break
		}
	}
	text, color := "no data", "#9a9aa0"
	if ok {
		text, color = format(v, p.Unit), "#73bf69"
		if v > 0 {
			color = "#f2495c"
		}
	}
	fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="36" text-anchor="middle" fill="%s">%s</text>`+"\n", x+w/2, y+h/2+18, color, esc(text))
}

// chart draws the series as lines over [start, end], with a y axis from 0
// (or the lowest value, if below) to the highest, and a legend below.
func chart(b *strings.Builder, p Panel, start, end time.Time, x, y, w, h float64) {
	frame(b, p.Title, x, y, w, h)
	var shown []Series
	for _, s := range p.Series {
		if len(s.Points) > 0 {
			shown = append(shown, s)
		}
	}
	slices.SortStableFunc(shown, func(a, b Series) int { return strings.Compare(a.Name, b.Name) })
	legendRows := min(len(shown), 4)
	px, py := x+58, y+26
	pw, ph := w-58-10, h-26-22-float64(legendRows)*13
	lo, hi := 0.0, math.Inf(-1)
	for _, s := range shown {
		for _, pt := range s.Points {
			if !math.IsNaN(pt.V) && !math.IsInf(pt.V, 0) {
				lo, hi = math.Min(lo, pt.V), math.Max(hi, pt.V)
			}
		}
	}
	if len(shown) == 0 || math.IsInf(hi, -1) {
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="13" text-anchor="middle" fill="#9a9aa0">no data (none in this run)</text>`+"\n", x+w/2, y+h/2)
		return
	}
	// The axis spans 0 whatever the values' sign (all negative: it ends
	// at 0); nice takes only hi > 0.
	hi = math.Max(hi, 0)
	if hi <= lo {
		hi = lo + 1
	}
	if hi > 0 {
		hi = nice(hi)
	}
	span := end.Sub(start).Seconds()
	if span <= 0 { // Start == End: every point at the left edge
		span = 1
	}
	sx := func(t time.Time) float64 { return px + pw*t.Sub(start).Seconds()/span }
	sy := func(v float64) float64 { return py + ph - ph*(v-lo)/(hi-lo) }
	for i := 0; i <= 4; i++ {
		v := lo + (hi-lo)*float64(i)/4
		yy := sy(v)
		fmt.Fprintf(b, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#2c3235"/>`+"\n", px, yy, px+pw, yy)
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="10" text-anchor="end" fill="#9a9aa0">%s</text>`+"\n", px-4, yy+3, esc(format(v, p.Unit)))
	}
	for i := 0; i <= 4; i++ {
		t := start.Add(time.Duration(float64(end.Sub(start)) * float64(i) / 4))
		anchor := "middle" // the ends' labels stay inside the panel
		switch i {
		case 0:
			anchor = "start"
		case 4:
			anchor = "end"
		}
		fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="10" text-anchor="%s" fill="#9a9aa0">%s</text>`+"\n", sx(t), py+ph+12, anchor, t.UTC().Format("15:04:05"))
	}
	for i, s := range shown {
		color := palette.Tableau10[i%len(palette.Tableau10)]
		var path strings.Builder
		pen := false
		for _, pt := range s.Points {
			if math.IsNaN(pt.V) || math.IsInf(pt.V, 0) {
				pen = false
				continue
			}
			cmd := "L"
			if !pen {
				cmd = "M"
			}
			fmt.Fprintf(&path, "%s%.1f %.1f ", cmd, sx(pt.T), sy(pt.V))
			pen = true
		}
		fmt.Fprintf(b, `<path d="%s" fill="none" stroke="%s" stroke-width="1.5"/>`+"\n", strings.TrimSpace(path.String()), color)
		if i < legendRows {
			ly := py + ph + 26 + float64(i)*13
			name := s.Name
			if i == legendRows-1 && len(shown) > legendRows {
				name = fmt.Sprintf("%s (and %d more)", name, len(shown)-legendRows)
			}
			fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="10" height="3" fill="%s"/>`+"\n", px, ly-4, color)
			fmt.Fprintf(b, `<text x="%.1f" y="%.1f" font-size="10" fill="#c7d0d9">%s</text>`+"\n", px+14, ly, esc(name))
		}
	}
}

// nice rounds v up to 1, 2 or 5 times a power of ten.
func nice(v float64) float64 {
	e := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if v <= m*e {
			return m * e
		}
	}
	return 10 * e
}

// format writes v in the panel's unit.
func format(v float64, unit string) string {
	switch unit {
	case "s":
		switch a := math.Abs(v); {
		case a == 0:
			return "0"
		case a < 1e-3:
			return trim(v*1e6) + " µs"
		case a < 1:
			return trim(v*1e3) + " ms"
		}
		return trim(v) + " s"
	case "bytes", "Bps":
		suffix := ""
		if unit == "Bps" {
			suffix = "/s"
		}
		for _, u := range []struct {
			n string
			f float64
		}{{"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
			if math.Abs(v) >= u.f {
				return trim(v/u.f) + " " + u.n + suffix
			}
		}
		return trim(v) + " B" + suffix
	case "percentunit":
		return trim(v*100) + "%"
	}
	return trim(v)
}

func trim(v float64) string {
	if math.Abs(v) >= 100 || v == math.Trunc(v) {
		return strconv.FormatFloat(math.Round(v), 'f', -1, 64)
	}
	return strconv.FormatFloat(v, 'f', 2, 64)
}

func esc(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s))
	return b.String()
}
