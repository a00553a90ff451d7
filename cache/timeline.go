package cache

import (
	"sync/atomic"
	"time"
)

// Series names one count a Timeline keeps per millisecond.
type Series uint8

// The series of a migration: the source caches and flushes, the
// destination holds, receives and delivers.
const (
	SeriesNone      Series = iota // not recorded
	SeriesCached                  // source: reached the cache (about when the world sent it)
	SeriesFlushed                 // source: sent to the destination on the handover stream
	SeriesHeld                    // destination: reached this host directly and was held
	SeriesReceived                // destination: came in on the handover stream
	SeriesDelivered               // destination (or an abort's source): written to the VM
	numSeries
)

var seriesNames = [numSeries]string{"", "cached", "flushed", "held", "received", "delivered"}

func (s Series) String() string {
	if s < numSeries {
		return seriesNames[s]
	}
	return "series-?"
}

// TimelineWindow is how long after its start a Timeline keeps per-millisecond
// counts; later packets are only counted in total (TimelineSeries.Beyond).
// A migration that takes longer has timed out (the cache's max age is 30 s
// by default) or lingers.
const TimelineWindow = 60 * time.Second

// Bins are allocated a page at a time, on first use, so that a migration
// of a few seconds costs a few pages, not the whole window.
const (
	pageShift     = 10 // 1024 bins (4 KiB) per page
	pageBins      = 1 << pageShift
	windowBins    = int64(TimelineWindow / time.Millisecond)
	timelinePages = (windowBins + pageBins - 1) / pageBins
)

type timelinePage [pageBins]atomic.Uint32

// Timeline counts a migration's packets per millisecond since its start,
// per Series. Add is what the packet path calls: lock-free, an atomic
// increment into a bin, and no allocation except once per 1024 ms of a
// series. Safe for concurrent use; a nil *Timeline records nothing.
//
// Memory: about 2.8 KiB of page pointers, plus 4 KiB per series for every
// 1.024 s in which that series saw a packet (at most 240 KiB per series).
type Timeline struct {
	start  time.Time
	pages  [numSeries][timelinePages]atomic.Pointer[timelinePage]
	beyond [numSeries]atomic.Uint64
}

// NewTimeline returns an empty timeline whose bin 0 starts at start.
// start should carry a monotonic clock reading (time.Now does), so that
// bins are immune to wall clock steps.
func NewTimeline(start time.Time) *Timeline {
	return &Timeline{start: start}
}

// Start is when bin 0 begins.
func (t *Timeline) Start() time.Time { return t.start }

// Add counts one packet of series s at now. A packet before the start
// counts in bin 0, one after TimelineWindow only in Beyond.
func (t *Timeline) Add(s Series, now time.Time) { t.AddN(s, now, 1) }

// AddN counts n packets of series s at now, as Add does.
func (t *Timeline) AddN(s Series, now time.Time, n uint32) {
	if t == nil || s == SeriesNone || s >= numSeries || n == 0 {
		return
	}
	bin := max(int64(now.Sub(t.start)/time.Millisecond), 0)
	if bin >= windowBins {
		t.beyond[s].Add(uint64(n))
		return
	}
	slot := &t.pages[s][bin>>pageShift]
	p := slot.Load()
	if p == nil {
		p = new(timelinePage)
		if !slot.CompareAndSwap(nil, p) {
			p = slot.Load() // another writer of s was first
		}
	}
	p[bin&(pageBins-1)].Add(n)
}

// TimelineSeries is one series' counts as Snapshot returns them: packets in
// each millisecond from bin First on, trimmed to the bins between the first
// and the last packet.
type TimelineSeries struct {
	Series Series
	First  int      // ms after the timeline's start of Counts[0]
	Counts []uint32 // packets per ms
	Beyond uint64   // packets after TimelineWindow
}

// Total is the number of packets the series counted.
func (s TimelineSeries) Total() uint64 {
	n := s.Beyond
	for _, c := range s.Counts {
		n += uint64(c)
	}
	return n
}

// Snapshot copies the counts of every series that saw a packet, in Series
// order. Concurrent Adds land in this snapshot or the next.
func (t *Timeline) Snapshot() []TimelineSeries {
	if t == nil {
		return nil
	}
	var out []TimelineSeries
	for s := SeriesNone + 1; s < numSeries; s++ {
		first, last := int64(-1), int64(-1)
		for pi := range t.pages[s] {
			p := t.pages[s][pi].Load()
			if p == nil {
				continue
			}
			for i := range p {
				if p[i].Load() != 0 {
					bin := int64(pi)<<pageShift + int64(i)
					if first < 0 {
						first = bin
					}
					last = bin
				}
			}
		}
		beyond := t.beyond[s].Load()
		if first < 0 && beyond == 0 {
			continue
		}
		ts := TimelineSeries{Series: s, Beyond: beyond}
		if first >= 0 {
			ts.First = int(first)
			ts.Counts = make([]uint32, last-first+1)
			for bin := first; bin <= last; bin++ {
				if p := t.pages[s][bin>>pageShift].Load(); p != nil {
					ts.Counts[bin-first] = p[bin&(pageBins-1)].Load()
				}
			}
		}
		out = append(out, ts)
	}
	return out
}
