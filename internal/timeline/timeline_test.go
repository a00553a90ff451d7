package timeline

import (
	"bytes"
	"encoding/xml"
	"errors"
	"image"
	"image/png"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/wgagent/control"
)

// counter builds a series from rates: packets per ms over [from, to) ms
// after the timeline's start.
type counter struct{ counts map[int]float64 }

func (c *counter) rate(from, to int, perMS float64) *counter {
	if c.counts == nil {
		c.counts = map[int]float64{}
	}
	for ms := from; ms < to; ms++ {
		c.counts[ms] += perMS
	}
	return c
}

func (c *counter) series(name string) control.TimelineSeries {
	first, last := math.MaxInt, -1
	for ms := range c.counts {
		first, last = min(first, ms), max(last, ms)
	}
	s := control.TimelineSeries{Name: name, First: first, Counts: make([]uint32, last-first+1)}
	acc := 0.0 // carry fractions, so that 12.5/ms gives 12 and 13 in turn
	for ms := first; ms <= last; ms++ {
		acc += c.counts[ms]
		n := math.Floor(acc)
		s.Counts[ms-first] = uint32(n)
		acc -= n
	}
	return s
}

// sample is a migration as the lab makes them, 12.5 packets/ms to the VM:
// suspended on h1, claimed by h2 28 ms later, flushed, senders switched to
// h2 at 60 ms, the VM up again at 520 ms, delivered paced at 1.5 times the
// rate until the backlog is gone, the source lingering 2 s.
func sample() (src, dst control.Migration) {
	t0 := time.Date(2026, 11, 26, 14, 3, 7, 0, time.UTC)
	at := func(ms float64) *time.Time {
		t := t0.Add(time.Duration(ms * float64(time.Millisecond)))
		return &t
	}
	src = control.Migration{
		ID: "100.100.20.1@4", VIP: "100.100.20.1", From: "h1", To: "h2", Epoch: 5, Role: "source",
		Suspend: at(0), Claim: at(28.2), FlushStart: at(29.1), FlushEnd: at(31.0), Done: at(2031.4),
		Cached: 750, Flushed: 350, Forwarded: 400, Dropped: map[string]uint64{},
		Timeline: &control.Timeline{Start: *at(0), Series: []control.TimelineSeries{
			(&counter{}).rate(0, 60, 12.5).series(control.SeriesCached),
			(&counter{}).rate(29, 31, 175).rate(31, 60, 12.5).series(control.SeriesFlushed),
		}},
	}
	dst = control.Migration{
		ID: "100.100.20.1@4", VIP: "100.100.20.1", From: "h1", To: "h2", Epoch: 5, Role: "destination",
		Claim: at(28), FlushStart: at(29.6), FlushEnd: at(31.5), CarrierUp: at(520), FirstDelivery: at(520.9), Done: at(2332),
		Activation: "carrier", Flushed: 350, Forwarded: 400, Held: 24650, Delivered: 25400, Dropped: map[string]uint64{},
		Timeline: &control.Timeline{Start: *at(27.5), Series: []control.TimelineSeries{
			(&counter{}).rate(33, 2004, 12.5).series(control.SeriesHeld),
			(&counter{}).rate(2, 4, 175).rate(4, 33, 12.5).series(control.SeriesReceived),
			(&counter{}).rate(493, 1534, 18.75).rate(1534, 2005, 12.5).series(control.SeriesDelivered),
		}},
	}
	return src, dst
}

func render(t *testing.T, sides ...control.Migration) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := Render(&b, sides...); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// element is an SVG element as the structure tests see it.
type element struct {
	name    string
	attrs   map[string]string
	text    string
	closeup int // the close-up it is in, counting from 1; 0 = the whole view
}

func parse(t *testing.T, svg []byte) []element {
	t.Helper()
	dec := xml.NewDecoder(bytes.NewReader(svg))
	var out []element
	var open []int // indexes into out of the elements open
	closeups, in := 0, 0
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("the SVG is not well-formed XML: %v", err)
		}
		switch tok := tok.(type) {
		case xml.StartElement:
			e := element{name: tok.Name.Local, attrs: map[string]string{}}
			for _, a := range tok.Attr {
				e.attrs[a.Name.Local] = a.Value
			}
			if e.attrs["class"] == "closeup" {
				closeups++
				in = closeups
			}
			e.closeup = in
			out = append(out, e)
			open = append(open, len(out)-1)
		case xml.EndElement:
			if out[open[len(open)-1]].attrs["class"] == "closeup" {
				in = 0
			}
			open = open[:len(open)-1]
		case xml.CharData:
			if len(open) > 0 {
				out[open[len(open)-1]].text += string(tok)
			}
		}
	}
	if len(out) == 0 || out[0].name != "svg" || out[0].attrs["xmlns"] != "http://www.w3.org/2000/svg" {
		t.Fatalf("the root is not an svg element: %+v", out[:min(len(out), 1)])
	}
	return out
}

func TestRenderStructure(t *testing.T) {
	src, dst := sample()
	els := parse(t, render(t, dst, src)) // either order: the source is drawn on top
	root := els[0]
	w, _ := strconv.ParseFloat(root.attrs["width"], 64)
	h, _ := strconv.ParseFloat(root.attrs["height"], 64)
	if w != width || h < 400 || root.attrs["viewBox"] != "0 0 "+root.attrs["width"]+" "+root.attrs["height"] {
		t.Errorf("svg size %q x %q, viewBox %q", root.attrs["width"], root.attrs["height"], root.attrs["viewBox"])
	}
	var roles, series, marks []string
	var title, summary string
	closeMarks := map[int][]string{}
	for _, e := range els {
		if e.closeup > 0 {
			if e.attrs["class"] == "mark" {
				closeMarks[e.closeup] = append(closeMarks[e.closeup], e.attrs["data-mark"])
			}
			continue
		}
		switch {
		case e.name == "title":
			title = e.text
		case e.attrs["class"] == "summary":
			summary += e.text + "\n"
		case e.attrs["class"] == "panel":
			roles = append(roles, e.attrs["data-host"]+"/"+e.attrs["data-role"])
		case e.attrs["class"] == "series":
			series = append(series, e.attrs["data-series"])
		case e.attrs["class"] == "mark":
			marks = append(marks, e.attrs["data-mark"])
		case e.name == "path":
			if d := e.attrs["d"]; !strings.HasPrefix(d, "M") || strings.Contains(d, "NaN") || strings.Contains(d, "Inf") {
				t.Errorf("bad path data %.80q", d)
			}
		}
	}
	if title != "Migration of 100.100.20.1 from h1 to h2" {
		t.Errorf("title %q", title)
	}
	for _, want := range []string{"VM paused 520.0 ms", "flush of 350 packets 1.90 ms", "handover (carrier up to 1st delivery) 0.90 ms", "total 2.332 s", "lost 0"} {
		if !strings.Contains(summary, want) {
			t.Errorf("summary %q does not say %q", summary, want)
		}
	}
	if strings.Join(roles, " ") != "h1/source h2/destination" {
		t.Errorf("panels %v, want the source's then the destination's", roles)
	}
	if strings.Join(series, " ") != "cached flushed held received delivered" {
		t.Errorf("series drawn: %v", series)
	}
	want := "suspend claim flush start flush end done claim flush start flush end carrier up 1st delivery done"
	if strings.Join(marks, " ") != want {
		t.Errorf("marks %q, want %q", strings.Join(marks, " "), want)
	}
	// Close-ups: the claim and flush on both hosts; the VM resuming.
	if got := strings.Join(closeMarks[1], " "); got != "claim flush start flush end claim flush start flush end" {
		t.Errorf("the flush's close-up marks %q", got)
	}
	if got := strings.Join(closeMarks[2], " "); got != "carrier up 1st delivery" || len(closeMarks) != 2 {
		t.Errorf("the resume's close-up marks %q; %d close-ups", got, len(closeMarks))
	}
}

func TestRenderOneSide(t *testing.T) {
	_, dst := sample()
	dst.Timeline = nil // an agent that kept none: marks only
	els := parse(t, render(t, dst))
	var pause, series int
	var said bool
	for _, e := range els {
		pause += btoi(e.attrs["class"] == "pause")
		series += btoi(e.attrs["class"] == "series")
		said = said || strings.Contains(e.text, "no timeline recorded")
		if e.name == "text" && strings.HasPrefix(e.text, "ms since") && !strings.Contains(e.text, "claim on h2") {
			t.Errorf("axis title %q: without the source, time counts from the claim", e.text)
		}
	}
	if pause != 0 || series != 0 || !said {
		t.Errorf("one side without timeline: %d pause shades, %d series, says so %v", pause, series, said)
	}
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func TestRenderEscapes(t *testing.T) {
	src, _ := sample()
	src.From = `h<1>&"x"`
	src.ID = `a]]></text><script>`
	els := parse(t, render(t, src))
	var ok, id bool
	for _, e := range els {
		ok = ok || e.name == "title" && e.text == `Migration of 100.100.20.1 from h<1>&"x" to h2`
		id = id || e.text == `ID a]]></text><script>`
		if e.name == "script" {
			t.Fatal("markup in a host name became an element")
		}
	}
	if !ok || !id {
		t.Errorf("odd names did not come back as text: title %v, id %v", ok, id)
	}
}

func TestRenderRefuses(t *testing.T) {
	src, dst := sample()
	other := dst
	other.VIP = "100.100.20.9"
	none := control.Migration{VIP: src.VIP, Role: "source"}
	for name, sides := range map[string][]control.Migration{
		"nothing":        nil,
		"three sides":    {src, dst, dst},
		"different VIPs": {src, other},
		"two sources":    {src, src},
		"no event":       {none},
	} {
		if err := Render(io.Discard, sides...); err == nil {
			t.Errorf("%s: rendered", name)
		}
	}
}

func TestBinning(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	done := t0.Add(100 * time.Millisecond)
	// 1 packet per ms for 100 ms, recorded from 10 ms after the suspend.
	m := control.Migration{VIP: "100.100.20.1", Role: "source", Suspend: &t0, Done: &done, Timeline: &control.Timeline{
		Start:  t0.Add(10 * time.Millisecond),
		Series: []control.TimelineSeries{(&counter{}).rate(0, 100, 1).series(control.SeriesCached)},
	}}
	p, err := newPicture([]control.Migration{m})
	if err != nil {
		t.Fatal(err)
	}
	if p.main.bucket != 1 || p.main.xmin != 0 {
		t.Fatalf("110 ms drawn in steps of %v ms from %v, want 1 from 0", p.main.bucket, p.main.xmin)
	}
	v := p.main.panels[0].values[0]
	for k := range v {
		want := 0.0
		if k >= 10 && k < 110 {
			want = 1
		}
		if v[k] != want {
			t.Fatalf("step %d: %v packets/ms, want %v", k, v[k], want)
		}
	}

	// Two seconds need coarser steps; the sum is kept.
	src, dst := sample()
	p, err = newPicture([]control.Migration{src, dst})
	if err != nil {
		t.Fatal(err)
	}
	if p.main.bucket != 5 || float64(p.main.nb)*p.main.bucket < 2332 {
		t.Errorf("2.33 s in %d steps of %v ms", p.main.nb, p.main.bucket)
	}
	for _, pn := range p.main.panels {
		for i, name := range pn.side.series {
			sum := 0.0
			for _, x := range pn.values[i] {
				sum += x * p.main.bucket
			}
			if math.Abs(sum-float64(pn.side.totals[name])) > 1e-6 {
				t.Errorf("%s: steps sum to %v packets, the series counted %d", name, sum, pn.side.totals[name])
			}
		}
	}

	// Close-ups, in 1 ms steps: the claims and the flush (28 to 31.5 ms),
	// and carrier up to first delivery (520 to 520.9 ms).
	if len(p.closes) != 2 {
		t.Fatalf("%d close-ups, want 2", len(p.closes))
	}
	for i, want := range [][2]float64{{25, 43.5}, {515, 545.9}} {
		v := p.closes[i]
		if v.bucket != 1 || v.xmin != math.Floor(want[0]) || v.xmin+float64(v.nb) < want[1] || float64(v.nb) > want[1]-want[0]+2 {
			t.Errorf("close-up %d: %d steps of %v ms from %v, want 1 ms steps over %v", i, v.nb, v.bucket, v.xmin, want)
		}
	}
	// A flush that takes long: its close-up shows the start, in 1 ms steps.
	slow := src
	end := slow.FlushStart.Add(700 * time.Millisecond)
	slow.FlushEnd = &end
	q, err := newPicture([]control.Migration{slow})
	if err != nil || len(q.closes) != 1 {
		t.Fatalf("a 700 ms flush: %v, want one close-up", err)
	}
	if c := q.closes[0]; c.bucket != 1 || c.nb > 130 {
		t.Errorf("a 700 ms flush's close-up: %d steps of %v ms, want at most 130 of 1", c.nb, c.bucket)
	}
	// The source flushed 175 packets in each of ms 29 and 30.
	if fl := p.closes[0].panels[0].values[1]; fl[29-25] != 175 || fl[30-25] != 175 || fl[31-25] != 12.5 && fl[31-25] != 12 && fl[31-25] != 13 {
		t.Errorf("flushed in the close-up: %v", fl)
	}
}

func TestFormats(t *testing.T) {
	for _, c := range []struct{ got, want string }{
		{count(0), "0"}, {count(999), "999"}, {count(1000), "1,000"}, {count(1234567), "1,234,567"},
		{fmtMS(0.9), "0.90 ms"}, {fmtMS(12.34), "12.3 ms"}, {fmtMS(-3), "-3.00 ms"}, {fmtMS(2031.4), "2.031 s"},
		{short(1), "1"}, {short(1000), "1k"}, {short(1e6), "1M"},
		{num(1.25), "1.3"}, {num(3), "3"},
	} {
		if c.got != c.want {
			t.Errorf("got %q, want %q", c.got, c.want)
		}
	}
	if s := niceStep(2100, 12); s != 200 {
		t.Errorf("ticks for 2.1 s every %v ms, want 200", s)
	}
}

// TestRenderPNG has rsvg-convert draw the picture and checks the pixels:
// the expected size, and each series' colour inside its host's plot (so
// that an empty or broken drawing fails).
func TestRenderPNG(t *testing.T) {
	conv, err := exec.LookPath("rsvg-convert")
	if err != nil {
		t.Skip("rsvg-convert not installed (Debian: librsvg2-bin; scripts/install-deps.sh installs it): cannot check the picture renders")
	}
	src, dst := sample()
	svg := render(t, src, dst)
	p, err := newPicture([]control.Migration{src, dst})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	in, out := filepath.Join(dir, "m.svg"), filepath.Join(dir, "m.png")
	if err := os.WriteFile(in, svg, 0o644); err != nil {
		t.Fatal(err)
	}
	if b, err := exec.Command(conv, "--background-color", "white", "-o", out, in).CombinedOutput(); err != nil {
		t.Fatalf("rsvg-convert: %v: %s", err, b)
	}
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	img, err := png.Decode(f)
	if err != nil {
		t.Fatalf("rsvg-convert's PNG does not decode: %v", err)
	}
	if b := img.Bounds(); b.Dx() != int(width) || b.Dy() != int(math.Round(p.height)) {
		t.Fatalf("PNG is %dx%d, want %vx%v", b.Dx(), b.Dy(), width, math.Round(p.height))
	}
	for _, v := range p.views() {
		for _, pn := range v.panels {
			for i, name := range pn.side.series {
				if slices.Max(pn.values[i]) == 0 {
					continue // nothing of it in this close-up
				}
				n := countColour(img, pn.lanes[i], Colors[name])
				t.Logf("%q %s/%s: %d pixels of %s", v.title, pn.side.host, name, n, Colors[name])
				if n < 20 {
					t.Errorf("%q: %s: only %d pixels of %s's colour %s in its lane", v.title, pn.side.host, n, name, Colors[name])
				}
				// And no other series' colour: each is in its own lane.
				for other, c := range Colors {
					if other != name && countColour(img, pn.lanes[i], c) > 0 {
						t.Errorf("%q: %s's %s lane shows %s's colour", v.title, pn.side.host, name, other)
					}
				}
			}
		}
	}
	if r, g, b, _ := img.At(2, 2).RGBA(); r>>8 != 255 || g>>8 != 255 || b>>8 != 255 {
		t.Errorf("background is not white: %d %d %d", r>>8, g>>8, b>>8)
	}
}

// countColour counts pixels in r within a few levels of the colour hex.
func countColour(img image.Image, r rect, hex string) int {
	c, _ := strconv.ParseUint(strings.TrimPrefix(hex, "#"), 16, 32)
	want := [3]int{int(c >> 16), int(c >> 8 & 0xff), int(c & 0xff)}
	n := 0
	for y := int(r.y) + 1; y < int(r.y+r.h)-1; y++ {
		for x := int(r.x) + 1; x < int(r.x+r.w)-1; x++ {
			cr, cg, cb, _ := img.At(x, y).RGBA()
			got := [3]int{int(cr >> 8), int(cg >> 8), int(cb >> 8)}
			near := true
			for i := range got {
				if d := got[i] - want[i]; d < -6 || d > 6 {
					near = false
				}
			}
			if near {
				n++
			}
		}
	}
	return n
}

// TestHostileSpan: a side whose events and series claim centuries apart
// still draws at most a view's width in steps, quickly.
func TestHostileSpan(t *testing.T) {
	src, dst := sample()
	far := time.Date(2262, 1, 1, 0, 0, 0, 0, time.UTC)
	dst.Done = &far
	dst.Timeline.Series = append(dst.Timeline.Series,
		control.TimelineSeries{Name: control.SeriesHeld, First: math.MaxInt64 - 1, Counts: []uint32{math.MaxUint32, 1}},
		control.TimelineSeries{Name: control.SeriesHeld, First: math.MinInt64, Counts: []uint32{1}})
	p, err := newPicture([]control.Migration{src, dst})
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range p.views() {
		if v.nb > int(v.width/2)+2 {
			t.Errorf("view %q: %d steps across %v px", v.title, v.nb, v.width)
		}
		for _, pn := range v.panels {
			if len(pn.values) > len(seriesOrder) {
				t.Errorf("view %q: %d lanes", v.title, len(pn.values))
			}
		}
	}
	var b strings.Builder
	if err := Render(&b, src, dst); err != nil || b.Len() > 1<<20 {
		t.Fatalf("%d bytes, %v", b.Len(), err)
	}
}

// TestRenderBounded draws records whose times lie centuries apart, and a
// series that claims to start at the far end of an int: each view keeps
// to MaxSpan and half its width in steps, the drawing takes little memory and says it is
// clipped, and an ordinary migration is not clipped.
func TestRenderBounded(t *testing.T) {
	src, dst := sample()
	far, past := src.Suspend.AddDate(200, 0, 0), src.Suspend.AddDate(-100, 0, 0)
	hostile := dst
	hostile.Claim, hostile.Done, hostile.CarrierUp = &past, &far, &past
	hostile.Timeline = &control.Timeline{Start: far, Series: []control.TimelineSeries{
		{Name: control.SeriesHeld, First: math.MaxInt - 3, Counts: []uint32{1, 2, 3}},
		{Name: control.SeriesDelivered, First: math.MinInt, Counts: []uint32{4}},
	}}
	for name, sides := range map[string][]control.Migration{
		"far destination": {src, hostile},
		"far alone":       {hostile},
	} {
		p, err := newPicture(sides)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		for _, v := range p.views() {
			if v.nb > int(v.width/2)+2 || float64(v.nb)*v.bucket > float64((MaxSpan+time.Minute)/time.Millisecond) {
				t.Errorf("%s: view %q has %d steps of %v ms", name, v.title, v.nb, v.bucket)
			}
		}
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		svg := render(t, sides...)
		runtime.ReadMemStats(&after)
		if n := after.TotalAlloc - before.TotalAlloc; n > 8<<20 {
			t.Errorf("%s: drawing allocated %d MiB", name, n>>20)
		}
		if !bytes.Contains(svg, []byte("clipped")) {
			t.Errorf("%s: the drawing does not say it is clipped", name)
		}
	}
	if svg := render(t, src, dst); bytes.Contains(svg, []byte("clipped")) {
		t.Error("an ordinary migration is drawn clipped")
	}
}
