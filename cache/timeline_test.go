package cache

import (
	"sync"
	"testing"
	"time"
)

func seriesOf(t *testing.T, snap []TimelineSeries, s Series) TimelineSeries {
	t.Helper()
	for _, ts := range snap {
		if ts.Series == s {
			return ts
		}
	}
	t.Fatalf("no series %v in the snapshot %+v", s, snap)
	return TimelineSeries{}
}

func TestTimelineBins(t *testing.T) {
	start := time.Now()
	tl := NewTimeline(start)
	at := func(d time.Duration) time.Time { return start.Add(d) }
	tl.Add(SeriesCached, at(-time.Second))              // before the start: bin 0
	tl.Add(SeriesCached, at(500*time.Microsecond))      // bin 0
	tl.AddN(SeriesCached, at(1999*time.Microsecond), 3) // bin 1
	tl.Add(SeriesCached, at(2500*time.Millisecond))     // bin 2500, third page
	tl.Add(SeriesCached, at(TimelineWindow))            // past the window
	tl.Add(SeriesFlushed, at(10*time.Millisecond+time.Microsecond))
	tl.Add(SeriesNone, at(0)) // ignored
	snap := tl.Snapshot()
	if len(snap) != 2 {
		t.Fatalf("snapshot has %d series, want cached and flushed: %+v", len(snap), snap)
	}
	c := seriesOf(t, snap, SeriesCached)
	if c.First != 0 || len(c.Counts) != 2501 || c.Counts[0] != 2 || c.Counts[1] != 3 || c.Counts[2500] != 1 || c.Beyond != 1 {
		t.Errorf("cached: first %d, %d bins, bins 0/1/2500 = %d/%d/%d, beyond %d; want 0, 2501, 2/3/1, 1",
			c.First, len(c.Counts), c.Counts[0], c.Counts[1], c.Counts[len(c.Counts)-1], c.Beyond)
	}
	var mid uint32
	for _, n := range c.Counts[2:2500] {
		mid += n
	}
	if mid != 0 {
		t.Errorf("cached: %d packets in bins 2..2499, want 0", mid)
	}
	if c.Total() != 7 {
		t.Errorf("cached total %d, want 7", c.Total())
	}
	f := seriesOf(t, snap, SeriesFlushed)
	if f.First != 10 || len(f.Counts) != 1 || f.Counts[0] != 1 || f.Total() != 1 {
		t.Errorf("flushed %+v, want one packet in bin 10", f)
	}
	if SeriesDelivered.String() != "delivered" || Series(99).String() != "series-?" {
		t.Errorf("series names: %q %q", SeriesDelivered, Series(99))
	}
}

func TestTimelineNil(t *testing.T) {
	var tl *Timeline
	tl.Add(SeriesCached, time.Now()) // must not panic
	if s := tl.Snapshot(); s != nil {
		t.Errorf("nil timeline snapshot %v", s)
	}
}

func TestTimelineConcurrentAdds(t *testing.T) {
	start := time.Now()
	tl := NewTimeline(start)
	const writers, each = 4, 20000
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				// Every writer touches every page first at about the same
				// time: the lazy page allocation races.
				tl.Add(SeriesHeld, start.Add(time.Duration(i%5000)*time.Millisecond+time.Duration(w)))
			}
		}()
	}
	done := make(chan struct{})
	go func() { // snapshots while writers run see no more than was added
		defer close(done)
		for range 20 {
			if s := tl.Snapshot(); len(s) == 1 && s[0].Total() > writers*each {
				t.Errorf("snapshot counts %d, more than was added", s[0].Total())
			}
		}
	}()
	wg.Wait()
	<-done
	h := seriesOf(t, tl.Snapshot(), SeriesHeld)
	if h.Total() != writers*each {
		t.Fatalf("counted %d, want %d", h.Total(), writers*each)
	}
	for i, n := range h.Counts {
		if n != writers*each/5000 {
			t.Fatalf("bin %d has %d, want %d", i, n, writers*each/5000)
		}
	}
}

// The packet path's cost: no allocation once a page exists.
func TestTimelineAddAllocs(t *testing.T) {
	start := time.Now()
	tl := NewTimeline(start)
	now := start.Add(3 * time.Millisecond)
	tl.Add(SeriesCached, now)
	if n := testing.AllocsPerRun(1000, func() { tl.Add(SeriesCached, now) }); n != 0 {
		t.Errorf("Add allocates %v times per packet, want 0", n)
	}
	q := NewQueue(Limits{}, nil)
	q.Record(tl, SeriesCached, SeriesFlushed)
	pkt := make([]byte, 200)
	q.Push(pkt, now)
	q.Pop(now)
	if n := testing.AllocsPerRun(1000, func() { q.Push(pkt, now); q.Pop(now) }); n != 0 {
		t.Errorf("a recorded Push and Pop allocate %v times per packet, want 0", n)
	}
}

func TestQueueRecord(t *testing.T) {
	q := NewQueue(Limits{}, nil)
	// In the future, so that Record's "now" for packets already gone
	// falls before the timeline's start: bin 0, however slow the test.
	t0 := time.Now().Add(time.Hour)
	pkt := make([]byte, 100)
	// Before the migration: three packets, one of them already popped.
	for i := range 3 {
		q.Push(pkt, t0.Add(time.Duration(i)*time.Millisecond))
	}
	q.Pop(t0)
	tl := NewTimeline(t0.Add(time.Millisecond))
	q.Record(tl, SeriesCached, SeriesFlushed)
	q.Record(tl, SeriesCached, SeriesFlushed) // the same timeline: nothing counted twice
	q.Push(pkt, t0.Add(5*time.Millisecond))
	q.Pop(t0.Add(7 * time.Millisecond))
	snap := tl.Snapshot()
	c := seriesOf(t, snap, SeriesCached)
	if c.Total() != q.Stats().Packets {
		t.Errorf("cached series counts %d, the queue accepted %d", c.Total(), q.Stats().Packets)
	}
	// The two still queued keep their arrival (bins 0 and 1), the popped
	// one counts when Record ran (before the start: bin 0), the new one
	// in bin 4.
	if c.First != 0 || len(c.Counts) != 5 || c.Counts[0] != 2 || c.Counts[1] != 1 || c.Counts[4] != 1 {
		t.Errorf("cached bins %+v", c)
	}
	if f := seriesOf(t, snap, SeriesFlushed); f.Total() != 1 || f.First != 6 {
		t.Errorf("flushed %+v, want the one pop after Record, in bin 6", f)
	}
	// Switching the pop series off (an abort delivers the cache here).
	q.Record(tl, SeriesCached, SeriesNone)
	q.Pop(t0.Add(8 * time.Millisecond))
	if f := seriesOf(t, tl.Snapshot(), SeriesFlushed); f.Total() != 1 {
		t.Errorf("a pop was counted after the pop series was turned off: %+v", f)
	}
	q.Record(nil, SeriesNone, SeriesNone)
	q.Push(pkt, t0.Add(9*time.Millisecond))
	if c := seriesOf(t, tl.Snapshot(), SeriesCached); c.Total() != q.Stats().Packets-1 {
		t.Errorf("a push was counted after recording stopped: %d of %d", c.Total(), q.Stats().Packets)
	}
}

func TestOrdererRecordsDelivered(t *testing.T) {
	stream, direct := NewQueue(DefaultLimits(), nil), NewQueue(DefaultLimits(), nil)
	start := time.Now()
	tl := NewTimeline(start)
	stream.Record(tl, SeriesReceived, SeriesNone)
	direct.Record(tl, SeriesHeld, SeriesNone)
	rec := &recorder{}
	o := &Orderer{Stream: stream, Direct: direct, Write: rec.write, Timeline: tl}
	for i := range 50 {
		stream.Push(udpFrom(t, 1, uint32(i)), time.Now())
	}
	for i := range 20 {
		direct.Push(udpFrom(t, 2, uint32(i)), time.Now())
	}
	o.SetCarrier(true)
	o.Closed()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- o.Run(stop) }()
	waitCount(t, rec, 70)
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	snap := tl.Snapshot()
	for _, want := range []struct {
		s Series
		n uint64
	}{{SeriesReceived, 50}, {SeriesHeld, 20}, {SeriesDelivered, o.Stats().Delivered}} {
		if got := seriesOf(t, snap, want.s).Total(); got != want.n || got == 0 {
			t.Errorf("%v counted %d, want %d", want.s, got, want.n)
		}
	}
}

// BenchmarkTimelineAdd is the per-packet cost of recording: with the
// caller's time (as Queue.Push and Pop have it), and with time.Now.
func BenchmarkTimelineAdd(b *testing.B) {
	start := time.Now()
	b.Run("given-time", func(b *testing.B) {
		tl := NewTimeline(start)
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			// 4096 bins round robin: four pages, allocated on the first lap.
			tl.Add(SeriesCached, start.Add(time.Duration(i&4095)*time.Millisecond))
			i++
		}
	})
	b.Run("time-now", func(b *testing.B) {
		tl := NewTimeline(time.Now())
		b.ReportAllocs()
		for b.Loop() {
			tl.Add(SeriesDelivered, time.Now())
		}
	})
}

// BenchmarkQueuePushPopRecorded is BenchmarkQueuePushPop/200B with a
// timeline counting both ends, as a source's cache queue runs.
func BenchmarkQueuePushPopRecorded(b *testing.B) {
	pkt := make([]byte, 200)
	now := time.Now()
	q := NewQueue(Limits{}, NewBudget(0))
	q.Record(NewTimeline(now), SeriesCached, SeriesFlushed)
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		q.Push(pkt, now)
		if i&63 == 63 {
			for {
				if _, _, ok := q.Pop(now); !ok {
					break
				}
			}
		}
	}
}
