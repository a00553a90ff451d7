// Package timeline draws one migration as an SVG picture: the packets per
// millisecond each host cached, flushed, held, received and delivered, on
// one time axis, with the migration's events (suspend, claim, flush,
// carrier, first delivery, done) marked. It reads what the control API
// returns for a migration (control.Migration with its Timeline) and writes
// the SVG by hand: no dependency, text escaped as XML.
package timeline

import (
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/vmroam/vmroam/internal/palette"
	"github.com/vmroam/vmroam/wgagent/control"
)

// Colors are the series' colours (Tableau 10), by series name.
var Colors = map[string]string{
	control.SeriesCached:    palette.Orange,
	control.SeriesFlushed:   palette.Purple,
	control.SeriesHeld:      palette.Blue,
	control.SeriesReceived:  palette.Red,
	control.SeriesDelivered: palette.Green,
}

// seriesOrder is the order series are drawn and listed in.
var seriesOrder = []string{control.SeriesCached, control.SeriesFlushed, control.SeriesHeld, control.SeriesReceived, control.SeriesDelivered}

// What a series means, for the legend.
var seriesWords = map[string]string{
	control.SeriesCached:    "cached",
	control.SeriesFlushed:   "flushed to the new host",
	control.SeriesHeld:      "held (came directly)",
	control.SeriesReceived:  "received from the old host",
	control.SeriesDelivered: "delivered to the VM",
}

// Geometry, in SVG user units (pixels at 100 %).
const (
	width      = 1200.0
	marginL    = 110.0 // lane names
	marginR    = 44.0  // the rate axis
	plotW      = width - marginL - marginR
	headerH    = 96.0
	captionH   = 26.0
	rowH       = 14.0 // a row of mark labels
	maxRows    = 4
	laneH      = 64.0 // one series of the whole migration
	laneGap    = 6.0
	panelGap   = 22.0
	axisH      = 30.0
	closeTopH  = 58.0 // above the close-ups: their section title
	closeGap   = 36.0 // between two close-ups: room for the rate axis
	closeLaneH = 26.0
	closeLaneG = 4.0
	closePanel = 12.0 // between the sides in a close-up
	footH      = 30.0
	charW      = 6.6 // mean advance of an 11 px sans-serif character
	labelFont  = 11.0
	markColour = "#555555"
)

// MaxSpan is the longest time a view of the drawing covers: an hour after
// its start, which is never before MaxSpan ahead of the origin (the
// suspend). A real migration takes seconds (the cache keeps packets 30 s
// by default); a record whose times lie years apart, corrupted or hostile,
// is drawn clipped to that hour, with a note saying so, rather than with
// the migration's seconds lost in one step of years. (A view's steps are
// at most half its width in pixels whatever the span: see newView.)
// Packets outside the whole view's hour are counted in its edge steps, as
// before; marks outside it are left out.
const MaxSpan = time.Hour

// rect is an area of the picture.
type rect struct{ x, y, w, h float64 }

// Render writes the SVG picture of one migration seen from one host, or
// from both when given both sides (the source's and the destination's
// control.Migration of one VIP). Times on the two hosts are taken to come
// from synchronised clocks.
func Render(w io.Writer, sides ...control.Migration) error {
	p, err := newPicture(sides)
	if err != nil {
		return err
	}
	var b strings.Builder
	p.draw(&b)
	_, err = io.WriteString(w, b.String())
	return err
}

// side is one host's account of the migration.
type side struct {
	m      control.Migration
	host   string
	series []string // names of the series its timeline holds, in seriesOrder
	totals map[string]uint64
}

// view is one time window of the picture: the whole migration, or a
// close-up of a few milliseconds.
type view struct {
	title        string  // "" for the whole migration
	left, width  float64 // where it is drawn across
	xmin, bucket float64 // ms after t0 at its left edge; ms per drawn step
	nb           int     // steps
	ytop         float64 // packets per ms at a lane's top (log scale)
	panels       []*panel
	axisY        float64 // where its time axis is
}

// panel is one side in one view.
type panel struct {
	side    *side
	marks   []mark
	rows    int     // of mark labels
	bandTop float64 // of the mark labels
	lanes   []rect  // one per series (one empty lane without any)
	values  [][]float64
}

type mark struct {
	name string
	at   float64 // ms after t0
	row  int
}

type picture struct {
	sides  []*side
	t0     time.Time
	t0What string
	main   *view
	closes []*view
	height float64
	// clipped says the record's times span more than MaxSpan, so the
	// drawing leaves some of it out.
	clipped bool
}

func newPicture(ms []control.Migration) (*picture, error) {
	switch len(ms) {
	case 0:
		return nil, errors.New("timeline: no migration to draw")
	case 1:
	case 2:
		if ms[0].VIP != ms[1].VIP {
			return nil, fmt.Errorf("timeline: the two sides are migrations of different VIPs (%s and %s)", ms[0].VIP, ms[1].VIP)
		}
		if ms[0].Role == ms[1].Role {
			return nil, fmt.Errorf("timeline: both sides are the %s of the migration; want one of each", ms[0].Role)
		}
	default:
		return nil, fmt.Errorf("timeline: %d sides given; a migration has two", len(ms))
	}
	p := &picture{}
	for _, m := range ms {
		s := &side{m: m, host: m.From, totals: map[string]uint64{}}
		if m.Role == "destination" {
			s.host = m.To
		}
		if s.host == "" {
			s.host = "this host"
		}
		if m.Timeline != nil {
			// Each name once, however many series carry it: a view bins
			// all of them into one lane.
			for _, name := range seriesOrder {
				for _, ts := range m.Timeline.Series {
					if ts.Name == name {
						if _, ok := s.totals[name]; !ok {
							s.series = append(s.series, name)
						}
						s.totals[name] += ts.Total()
					}
				}
			}
		}
		p.sides = append(p.sides, s)
	}
	if len(p.sides) == 2 && p.sides[0].m.Role == "destination" {
		p.sides[0], p.sides[1] = p.sides[1], p.sides[0] // the source on top
	}
	if err := p.pickOrigin(); err != nil {
		return nil, err
	}
	lo, hi := p.extent()
	if math.IsInf(lo, 0) || math.IsInf(hi, 0) || math.IsNaN(lo) || math.IsNaN(hi) {
		return nil, fmt.Errorf("timeline: the migration spans %v to %v ms", lo, hi)
	}
	p.main = p.newView("", marginL, plotW, lo, hi)
	w := (plotW - closeGap) / 2
	for _, c := range p.closeUps() {
		p.closes = append(p.closes, p.newView(c.title, marginL+float64(len(p.closes))*(w+closeGap), w, c.lo, c.hi))
	}
	// One rate scale for the whole view, one for the close-ups: a power of
	// ten above the highest rate.
	p.main.ytop = 10
	for _, v := range p.views() {
		for _, pn := range v.panels {
			for _, vals := range pn.values {
				for _, x := range vals {
					for v.ytop < x*1.1 {
						v.ytop = max(v.ytop*10, 10)
					}
				}
			}
		}
	}
	for _, v := range p.closes {
		v.ytop = max(v.ytop, p.closes[0].ytop, p.main.ytop)
		p.closes[0].ytop = v.ytop
	}
	p.layout()
	return p, nil
}

func (p *picture) views() []*view { return append([]*view{p.main}, p.closes...) }

// events lists a migration's marks in the order they happen.
func events(m control.Migration) []struct {
	name string
	at   *time.Time
} {
	up := "carrier up"
	if m.Activation != "" && m.Activation != "carrier" {
		up = "VM up (" + m.Activation + ")"
	}
	return []struct {
		name string
		at   *time.Time
	}{
		{"suspend", m.Suspend}, {"claim", m.Claim}, {"flush start", m.FlushStart}, {"flush end", m.FlushEnd},
		{up, m.CarrierUp}, {"1st delivery", m.FirstDelivery}, {"done", m.Done},
	}
}

// pickOrigin sets t0: the suspend at the source, else the earliest event.
func (p *picture) pickOrigin() error {
	for _, s := range p.sides {
		if s.m.Suspend != nil {
			p.t0, p.t0What = *s.m.Suspend, "suspend on "+s.host
			return nil
		}
	}
	for _, s := range p.sides {
		for _, e := range events(s.m) {
			if e.at != nil && (p.t0.IsZero() || e.at.Before(p.t0)) {
				p.t0, p.t0What = *e.at, e.name+" on "+s.host
			}
		}
	}
	if p.t0.IsZero() {
		return errors.New("timeline: the migration has no recorded event to start the time axis at")
	}
	return nil
}

func (p *picture) ms(t time.Time) float64 { return float64(t.Sub(p.t0)) / float64(time.Millisecond) }

// extent is the time from the earliest to the latest event or packet.
func (p *picture) extent() (lo, hi float64) {
	lo, hi = 0, 1
	for _, s := range p.sides {
		for _, e := range events(s.m) {
			if e.at != nil {
				lo, hi = min(lo, p.ms(*e.at)), max(hi, p.ms(*e.at))
			}
		}
		if tl := s.m.Timeline; tl != nil {
			off := p.ms(tl.Start)
			for _, ts := range tl.Series {
				if len(ts.Counts) > 0 {
					lo = min(lo, off+float64(ts.First))
					hi = max(hi, off+float64(ts.First+len(ts.Counts)))
				}
			}
		}
	}
	return lo, hi + (hi-lo)*0.02 // a little room right of the last event
}

type window struct {
	title  string
	lo, hi float64
}

// closeUps are the moments worth a close look, where milliseconds count:
// the start of the flush (from the claim if it came shortly before; to its
// end unless it took long), and the VM resuming at its new host until its
// first packets are out.
func (p *picture) closeUps() []window {
	var out []window
	var fs, fe, claim []float64
	var up, first *time.Time
	for _, s := range p.sides {
		if s.m.FlushStart != nil && s.m.FlushEnd != nil {
			fs, fe = append(fs, p.ms(*s.m.FlushStart)), append(fe, p.ms(*s.m.FlushEnd))
		}
		if s.m.Claim != nil {
			claim = append(claim, p.ms(*s.m.Claim))
		}
		if s.m.Role == "destination" {
			up, first = s.m.CarrierUp, s.m.FirstDelivery
		}
	}
	if len(fs) > 0 {
		lo, hi := minOf(fs), maxOf(fe)
		if len(claim) > 0 && lo-minOf(claim) < 40 {
			lo = minOf(claim)
		}
		out = append(out, window{"the claim and the flush", lo - 3, min(hi+12, lo+120)})
	}
	if up != nil {
		lo, hi := p.ms(*up), p.ms(*up)
		if first != nil {
			hi = max(hi, p.ms(*first))
		}
		out = append(out, window{"the VM runs again: carrier to first delivery", lo - 5, hi + 25})
	}
	return out
}

func minOf(v []float64) float64 {
	m := v[0]
	for _, x := range v {
		m = min(m, x)
	}
	return m
}

func maxOf(v []float64) float64 {
	m := v[0]
	for _, x := range v {
		m = max(m, x)
	}
	return m
}

// newView lays time lo..hi (ms after t0) across width: in steps of the
// smallest of 1, 2, 5, 10 ... ms that leaves at least two pixels each, so
// that a view has at most width/2 steps however long the span (a file
// from elsewhere may claim years); bins each side's series into those
// steps and places the marks.
func (p *picture) newView(title string, left, w, lo, hi float64) *view {
	v := &view{title: title, left: left, width: w}
	lim := float64(MaxSpan / time.Millisecond)
	if lo < -lim || hi > max(lo, -lim)+lim {
		p.clipped = true
	}
	lo = max(lo, -lim)
	hi = min(max(hi, lo), lo+lim)
	span := max(hi-lo, 1)
	v.bucket = niceStepF(span, w/2)
	v.xmin = math.Floor(lo/v.bucket) * v.bucket
	v.nb = max(int(math.Ceil((hi-v.xmin)/v.bucket)), 1)
	xmax := v.xmin + float64(v.nb)*v.bucket
	for _, s := range p.sides {
		pn := &panel{side: s}
		v.panels = append(v.panels, pn)
		if tl := s.m.Timeline; tl != nil {
			off := p.ms(tl.Start)
			for _, name := range s.series {
				vals := make([]float64, v.nb)
				for _, ts := range tl.Series {
					if ts.Name != name {
						continue
					}
					for j, c := range ts.Counts {
						// A bin goes where its middle is: its millisecond
						// need not start on one of the view's.
						k := int(math.Floor((off + float64(ts.First+j) + 0.5 - v.xmin) / v.bucket))
						if title == "" {
							k = min(max(k, 0), v.nb-1) // the whole view shows every packet
						}
						if k >= 0 && k < v.nb {
							vals[k] += float64(c)
						}
					}
				}
				for k := range vals {
					vals[k] /= v.bucket
				}
				pn.values = append(pn.values, vals)
			}
		}
		// Marks: each label in the first row where it overlaps no label
		// to its left.
		var ends []float64
		for _, e := range events(s.m) {
			if e.at == nil || p.ms(*e.at) < v.xmin || p.ms(*e.at) > xmax {
				continue
			}
			mk := mark{name: e.name, at: p.ms(*e.at), row: -1}
			x0, x1 := v.labelExtent(mk)
			for r := range ends {
				if ends[r]+6 <= x0 {
					mk.row = r
					break
				}
			}
			if mk.row < 0 {
				if len(ends) < maxRows {
					ends = append(ends, 0)
					mk.row = len(ends) - 1
				} else {
					mk.row = maxRows - 1 // crowded: overlap the last row
				}
			}
			ends[mk.row] = max(ends[mk.row], x1)
			pn.marks = append(pn.marks, mk)
		}
		pn.rows = max(len(ends), 1)
	}
	return v
}

func (v *view) x(ms float64) float64 {
	return v.left + (ms-v.xmin)/(float64(v.nb)*v.bucket)*v.width
}

// y maps packets per ms into lane r on the view's log scale (0 at the
// bottom).
func (v *view) y(r rect, rate float64) float64 {
	return r.y + r.h - math.Log10(1+rate)/math.Log10(1+v.ytop)*r.h
}

func (m mark) label() string { return m.name + " " + fmtMS(m.at) }

// labelExtent is where a mark's label lies: right of its line, or left of
// it near the view's right edge.
func (v *view) labelExtent(m mark) (x0, x1 float64) {
	x, w := v.x(m.at), float64(len([]rune(m.label())))*charW
	if x+4+w > v.left+v.width+marginR-4 {
		return x - 4 - w, x - 4
	}
	return x + 4, x + 4 + w
}

// layout places the views top to bottom: the whole migration, one panel
// per side, then the close-ups side by side, their lanes level.
func (p *picture) layout() {
	y := headerH
	for _, pn := range p.main.panels {
		y += captionH
		pn.bandTop = y
		y += float64(pn.rows)*rowH + 6
		for range max(len(pn.side.series), 1) {
			pn.lanes = append(pn.lanes, rect{p.main.left, y, p.main.width, laneH})
			y += laneH + laneGap
		}
		y += panelGap - laneGap
	}
	p.main.axisY = y - panelGap
	y = p.main.axisY + axisH
	if len(p.closes) > 0 {
		y += closeTopH
		for i := range p.sides {
			rows := 1
			for _, v := range p.closes {
				rows = max(rows, v.panels[i].rows)
			}
			for _, v := range p.closes {
				pn := v.panels[i]
				pn.bandTop = y
				ly := y + float64(rows)*rowH + 4
				for range max(len(pn.side.series), 1) {
					pn.lanes = append(pn.lanes, rect{v.left, ly, v.width, closeLaneH})
					ly += closeLaneH + closeLaneG
				}
			}
			y += float64(rows)*rowH + 4 + float64(max(len(p.sides[i].series), 1))*(closeLaneH+closeLaneG) - closeLaneG + closePanel
		}
		y -= closePanel
		for _, v := range p.closes {
			v.axisY = y
		}
		y += axisH
	}
	p.height = y + footH
}

func (p *picture) draw(b *strings.Builder) {
	fmt.Fprintf(b, `<svg xmlns="http://www.w3.org/2000/svg" width="%s" height="%s" viewBox="0 0 %s %s" font-family="DejaVu Sans, Helvetica, Arial, sans-serif" font-size="%s">`+"\n",
		num(width), num(p.height), num(width), num(p.height), num(labelFont))
	title := p.title()
	fmt.Fprintf(b, "<title>%s</title>\n", esc(title))
	fmt.Fprintf(b, `<rect width="100%%" height="100%%" fill="#ffffff"/>`+"\n")
	fmt.Fprintf(b, `<text class="title" x="%s" y="34" font-size="20" font-weight="bold" fill="#222222">%s</text>`+"\n", num(marginL), esc(title))
	if id := p.sides[0].m.ID; id != "" {
		fmt.Fprintf(b, `<text x="%s" y="34" font-size="12" fill="#888888" text-anchor="end">ID %s</text>`+"\n", num(width-marginR), esc(id))
	}
	for i, line := range p.summary() {
		fmt.Fprintf(b, `<text class="summary" x="%s" y="%s" font-size="13" fill="#444444">%s</text>`+"\n", num(marginL), num(58+float64(i)*19), esc(line))
	}
	for _, pn := range p.main.panels {
		p.drawPanel(b, p.main, pn)
	}
	what := "ms since the " + p.t0What
	if p.main.bucket > 1 {
		what += fmt.Sprintf(" · each step is the mean of %s ms", strconv.FormatFloat(p.main.bucket, 'f', -1, 64))
	}
	if p.clipped {
		what += fmt.Sprintf(" · clipped: the record's times span more than %g min", MaxSpan.Minutes())
	}
	p.drawTimeAxis(b, p.main, 12)
	fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="middle" font-size="12" fill="#444444">%s</text>`+"\n", num(marginL+plotW/2), num(p.main.axisY+axisH+4), esc(what))
	if len(p.closes) > 0 {
		top := p.main.axisY + axisH + closeTopH
		fmt.Fprintf(b, `<text x="%s" y="%s" font-size="14" font-weight="bold" fill="#222222">Close-ups</text>`+"\n", num(marginL), num(top-26))
		for _, v := range p.closes {
			fmt.Fprintf(b, `<g class="closeup">`+"\n")
			title := v.title
			if v.bucket > 1 {
				title += fmt.Sprintf(" (each step the mean of %s ms)", strconv.FormatFloat(v.bucket, 'f', -1, 64))
			}
			fmt.Fprintf(b, `<text x="%s" y="%s" font-size="12" fill="#444444">%s</text>`+"\n", num(v.left), num(top-9), esc(title))
			for _, pn := range v.panels {
				p.drawPanel(b, v, pn)
			}
			p.drawTimeAxis(b, v, 8)
			b.WriteString("</g>\n")
		}
		fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="middle" font-size="12" fill="#444444">%s</text>`+"\n", num(marginL+plotW/2), num(p.closes[0].axisY+axisH+4), esc("ms since the "+p.t0What))
	}
	b.WriteString("</svg>\n")
}

func (p *picture) title() string {
	from, to := "", ""
	for _, s := range p.sides {
		from, to = cmp(from, s.m.From), cmp(to, s.m.To)
	}
	t := "Migration of " + p.sides[0].m.VIP
	if from != "" {
		t += " from " + from
	}
	if to != "" {
		t += " to " + to
	}
	return t
}

func cmp(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// summary is the header's two lines: timings, then what went wrong.
func (p *picture) summary() []string {
	var src, dst *control.Migration
	for _, s := range p.sides {
		if s.m.Role == "destination" {
			dst = &s.m
		} else {
			src = &s.m
		}
	}
	var timing []string
	if src != nil && dst != nil && src.Suspend != nil && dst.CarrierUp != nil {
		timing = append(timing, "VM paused "+fmtDur(dst.CarrierUp.Sub(*src.Suspend)))
	}
	for _, m := range []*control.Migration{src, dst} {
		if m != nil && m.FlushStart != nil && m.FlushEnd != nil {
			timing = append(timing, fmt.Sprintf("flush of %s packets %s", count(m.Flushed), fmtDur(m.FlushEnd.Sub(*m.FlushStart))))
			break
		}
	}
	if dst != nil && dst.CarrierUp != nil && dst.FirstDelivery != nil {
		timing = append(timing, "handover (carrier up to 1st delivery) "+fmtDur(dst.FirstDelivery.Sub(*dst.CarrierUp)))
	}
	var first, last time.Time
	for _, s := range p.sides {
		for _, e := range events(s.m) {
			if e.at != nil && (first.IsZero() || e.at.Before(first)) {
				first = *e.at
			}
		}
		if s.m.Done != nil && s.m.Done.After(last) {
			last = *s.m.Done
		}
	}
	if !last.IsZero() {
		timing = append(timing, "total "+fmtDur(last.Sub(first)))
	}
	var late, lost, dropped, forwarded uint64
	for _, s := range p.sides {
		late += s.m.Late
		lost += s.m.Lost
		forwarded = max(forwarded, s.m.Forwarded)
		for _, n := range s.m.Dropped {
			dropped += n
		}
	}
	problems := fmt.Sprintf("late (reordered) %s · lost %s · dropped %s · stragglers forwarded after the flush %s", count(late), count(lost), count(dropped), count(forwarded))
	for _, s := range p.sides {
		switch {
		case s.m.Aborted:
			problems += " · ABORTED on " + s.host
		case s.m.TimedOut:
			problems += " · TIMED OUT on " + s.host
		case s.m.State != "":
			problems += " · under way on " + s.host + " (" + string(s.m.State) + ")"
		}
	}
	if len(timing) == 0 {
		return []string{problems}
	}
	return []string{strings.Join(timing, " · "), problems}
}

// drawPanel draws one side in one view: its lanes, the series in them and
// the marks across them.
func (p *picture) drawPanel(b *strings.Builder, v *view, pn *panel) {
	s := pn.side
	whole := v.title == ""
	fmt.Fprintf(b, `<g class="panel" data-host="%s" data-role="%s">`+"\n", esc(s.host), esc(s.m.Role))
	if whole {
		role := s.m.Role
		switch role {
		case "source":
			role = "source (old host)"
		case "destination":
			role = "destination (new host)"
		}
		fmt.Fprintf(b, `<text x="%s" y="%s" font-size="14" font-weight="bold" fill="#222222">%s</text>`+"\n", num(marginL), num(pn.bandTop-10), esc(s.host+" · "+role))
	} else if v.left == marginL {
		fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="end" font-size="12" font-weight="bold" fill="#444444">%s</text>`+"\n", num(marginL-10), num(pn.bandTop+11), esc(s.host))
	}
	lanes := pn.lanes
	for i, lane := range lanes {
		fmt.Fprintf(b, `<rect x="%s" y="%s" width="%s" height="%s" fill="#fafafa" stroke="#c8c8c8"/>`+"\n", num(lane.x), num(lane.y), num(lane.w), num(lane.h))
		for _, t := range p.timeTicks(v, 12) {
			fmt.Fprintf(b, `<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#ececec"/>`+"\n", num(v.x(t)), num(lane.y), num(v.x(t)), num(lane.y+lane.h))
		}
		// Gridlines at powers of ten; a close-up's short lanes have only
		// their top labelled.
		for r := 1.0; r <= v.ytop; r *= 10 {
			y := v.y(lane, r)
			fmt.Fprintf(b, `<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#e4e4e4"/>`, num(lane.x), num(y), num(lane.x+lane.w), num(y))
			if whole {
				fmt.Fprintf(b, `<text x="%s" y="%s" font-size="10" fill="#777777">%s</text>`, num(lane.x+lane.w+5), num(y+4), esc(short(r)))
			} else if r*10 > v.ytop {
				fmt.Fprintf(b, `<text x="%s" y="%s" font-size="9" fill="#777777">%s</text>`, num(lane.x+lane.w+4), num(y+7), esc(short(r)))
			}
			b.WriteString("\n")
		}
		if i >= len(s.series) || v.left != marginL {
			continue
		}
		name := s.series[i]
		if whole {
			fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="end" font-size="13" font-weight="bold" fill="%s">%s</text>`, num(marginL-10), num(lane.y+lane.h/2-2), Colors[name], esc(name))
			fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="end" fill="#555555">%s</text>`+"\n", num(marginL-10), num(lane.y+lane.h/2+13), esc(count(s.totals[name])))
		} else {
			fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="end" font-size="10" fill="%s">%s</text>`+"\n", num(marginL-10), num(lane.y+lane.h/2+4), Colors[name], esc(name))
		}
	}
	area := rect{v.left, lanes[0].y, v.width, lanes[len(lanes)-1].y + lanes[len(lanes)-1].h - lanes[0].y}
	if whole {
		fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="end" font-size="10" fill="#777777">pkts/ms</text>`+"\n", num(width-4), num(area.y-5))
	}
	p.drawPause(b, v, area)
	if s.m.Timeline == nil && whole {
		fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="middle" font-size="13" fill="#999999">no timeline recorded on this host</text>`+"\n", num(area.x+area.w/2), num(area.y+area.h/2+4))
	}
	for i, vals := range pn.values {
		p.drawSeries(b, v, lanes[i], s.series[i], vals)
	}
	for _, mk := range pn.marks {
		x := v.x(mk.at)
		top := pn.bandTop + float64(mk.row)*rowH
		x0, _ := v.labelExtent(mk)
		fmt.Fprintf(b, `<g class="mark" data-mark="%s">`, esc(mk.name))
		fmt.Fprintf(b, `<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="%s" stroke-width="1" stroke-dasharray="4 3"/>`, num(x), num(top+2), num(x), num(area.y+area.h), markColour)
		fmt.Fprintf(b, `<text x="%s" y="%s" fill="#333333">%s</text></g>`+"\n", num(x0), num(top+11), esc(mk.label()))
	}
	b.WriteString("</g>\n")
}

// drawPause shades the time the VM was not running anywhere.
func (p *picture) drawPause(b *strings.Builder, v *view, r rect) {
	var from, to *time.Time
	for _, s := range p.sides {
		if s.m.Role == "source" && s.m.Suspend != nil {
			from = s.m.Suspend
		}
		if s.m.Role == "destination" && s.m.CarrierUp != nil {
			to = s.m.CarrierUp
		}
	}
	if from == nil || to == nil || !to.After(*from) {
		return
	}
	x0, x1 := max(v.x(p.ms(*from)), r.x), min(v.x(p.ms(*to)), r.x+r.w)
	if x1 <= x0 {
		return
	}
	fmt.Fprintf(b, `<rect class="pause" x="%s" y="%s" width="%s" height="%s" fill="#000000" fill-opacity="0.05"/>`+"\n", num(x0), num(r.y), num(x1-x0), num(r.h))
	if label := "VM paused " + fmtDur(to.Sub(*from)); v.title == "" && x1-x0 > float64(len(label))*charW+8 {
		fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="middle" font-style="italic" fill="#888888">%s</text>`+"\n", num((x0+x1)/2), num(r.y+15), esc(label))
	}
}

// drawSeries draws one series as steps, a translucent area under a line,
// broken where it counted nothing.
func (p *picture) drawSeries(b *strings.Builder, v *view, r rect, name string, vals []float64) {
	var area, line strings.Builder
	base := num(r.y + r.h)
	xAt := func(k int) string { return num(v.x(v.xmin + float64(k)*v.bucket)) }
	for k := 0; k < len(vals); {
		if vals[k] == 0 {
			k++
			continue
		}
		fmt.Fprintf(&area, "M%s %s", xAt(k), base)
		fmt.Fprintf(&line, "M%s %s", xAt(k), base)
		for ; k < len(vals) && vals[k] > 0; k++ {
			y := num(v.y(r, vals[k]))
			fmt.Fprintf(&area, "L%s %sL%s %s", xAt(k), y, xAt(k+1), y)
			fmt.Fprintf(&line, "L%s %sL%s %s", xAt(k), y, xAt(k+1), y)
		}
		fmt.Fprintf(&area, "L%s %sZ", xAt(k), base)
		fmt.Fprintf(&line, "L%s %s", xAt(k), base)
	}
	if line.Len() == 0 {
		return
	}
	c := Colors[name]
	fmt.Fprintf(b, `<g class="series" data-series="%s"><path d="%s" fill="%s" fill-opacity="0.22" stroke="none"/>`, esc(name), area.String(), c)
	fmt.Fprintf(b, `<path d="%s" fill="none" stroke="%s" stroke-width="2" stroke-linejoin="round"/></g>`+"\n", line.String(), c)
}

// timeTicks are round times across a view, at most n.
func (p *picture) timeTicks(v *view, n int) []float64 {
	span := float64(v.nb) * v.bucket
	step := niceStep(span, n)
	var ticks []float64
	for t := math.Ceil(v.xmin/step) * step; t <= v.xmin+span+1e-9; t += step {
		ticks = append(ticks, t)
	}
	return ticks
}

// niceStep is the smallest of 1, 2 or 5 times a power of ten (from 1 up)
// that cuts span into at most n steps.
func niceStep(span float64, n int) float64 { return niceStepF(span, float64(n)) }

// niceStepF is niceStep for a fractional n. span must be finite.
func niceStepF(span, n float64) float64 {
	for mag := 1.0; ; mag *= 10 {
		for _, f := range []float64{1, 2, 5} {
			if span/(f*mag) <= n || math.IsInf(mag, 0) {
				return f * mag
			}
		}
	}
}

func (p *picture) drawTimeAxis(b *strings.Builder, v *view, n int) {
	for _, t := range p.timeTicks(v, n) {
		x := v.x(t)
		fmt.Fprintf(b, `<line x1="%s" y1="%s" x2="%s" y2="%s" stroke="#888888"/>`, num(x), num(v.axisY), num(x), num(v.axisY+5))
		fmt.Fprintf(b, `<text x="%s" y="%s" text-anchor="middle" fill="#444444">%s</text>`+"\n", num(x), num(v.axisY+18), strconv.FormatFloat(t, 'f', -1, 64))
	}
}

// num formats a coordinate: one decimal at most.
func num(v float64) string { return strconv.FormatFloat(math.Round(v*10)/10, 'f', -1, 64) }

func esc(s string) string {
	var b strings.Builder
	xml.EscapeText(&b, []byte(s)) // writes to a strings.Builder cannot fail
	return b.String()
}

// short writes a power of ten for an axis: 1, 10, 100, 1k, 10k, 100k, 1M.
func short(v float64) string {
	switch {
	case v >= 1e6:
		return strconv.FormatFloat(v/1e6, 'f', -1, 64) + "M"
	case v >= 1e3:
		return strconv.FormatFloat(v/1e3, 'f', -1, 64) + "k"
	}
	return strconv.FormatFloat(v, 'f', -1, 64)
}

// count writes n with thousands separators.
func count(n uint64) string {
	s := strconv.FormatUint(n, 10)
	for i := len(s) - 3; i > 0; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// fmtMS writes a time on the axis, in ms after t0, with a precision that
// suits its size.
func fmtMS(ms float64) string {
	switch a := math.Abs(ms); {
	case a < 10:
		return strconv.FormatFloat(ms, 'f', 2, 64) + " ms"
	case a < 1000:
		return strconv.FormatFloat(ms, 'f', 1, 64) + " ms"
	}
	return strconv.FormatFloat(ms/1000, 'f', 3, 64) + " s"
}

func fmtDur(d time.Duration) string {
	return fmtMS(float64(d) / float64(time.Millisecond))
}
