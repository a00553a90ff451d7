package cache

import (
	"bytes"
	"encoding/binary"
	"math"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

var t0 = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// mkPacket returns a packet of size n (>= 8) that carries seq, so that
// order and integrity can be checked after a round trip.
func mkPacket(seq uint64, n int) []byte {
	p := make([]byte, n)
	binary.BigEndian.PutUint64(p, seq)
	for i := 8; i < n; i++ {
		p[i] = byte(seq) + byte(i)
	}
	return p
}

func checkPacket(t testing.TB, p []byte, seq uint64, n int) {
	t.Helper()
	if len(p) != n {
		t.Fatalf("packet %d: %d bytes, want %d", seq, len(p), n)
	}
	if !bytes.Equal(p, mkPacket(seq, n)) {
		t.Fatalf("packet %d: content differs (got seq %d)", seq, binary.BigEndian.Uint64(p))
	}
}

func sizeOf(i int) int { return 8 + (i*7919)%1500 }

func TestQueueOrder(t *testing.T) {
	q := NewQueue(Limits{}, nil)
	const n = 5000 // about 3.7 MB: many slabs
	buf := make([]byte, 0, 2000)
	for i := 0; i < n; i++ {
		// The caller's buffer is reused: Push must copy.
		buf = append(buf[:0], mkPacket(uint64(i), sizeOf(i))...)
		if r := q.Push(buf, t0.Add(time.Duration(i)*time.Microsecond)); r != "" {
			t.Fatalf("push %d dropped: %s", i, r)
		}
		clear(buf)
	}
	if q.Len() != n {
		t.Fatalf("Len %d, want %d", q.Len(), n)
	}
	for i := 0; i < n; i++ {
		if at, ok := q.Peek(); !ok || !at.Equal(t0.Add(time.Duration(i)*time.Microsecond)) {
			t.Fatalf("peek %d: %v %v", i, at, ok)
		}
		p, at, ok := q.Pop(t0)
		if !ok {
			t.Fatalf("pop %d: empty", i)
		}
		if want := t0.Add(time.Duration(i) * time.Microsecond); !at.Equal(want) {
			t.Fatalf("pop %d: arrived %v, want %v", i, at, want)
		}
		checkPacket(t, p, uint64(i), sizeOf(i))
	}
	if _, _, ok := q.Pop(t0); ok {
		t.Fatal("pop from an empty queue succeeded")
	}
	if _, ok := q.Peek(); ok {
		t.Fatal("peek into an empty queue succeeded")
	}
	s := q.Stats()
	if s.Packets != n || s.Delivered != n || s.Bytes != s.DeliveredBytes || s.Len != 0 || s.QueuedBytes != 0 || s.DroppedTotal() != 0 {
		t.Fatalf("stats %+v", s)
	}
}

func TestQueueBounds(t *testing.T) {
	t.Run("packets", func(t *testing.T) {
		q := NewQueue(Limits{MaxPackets: 3}, nil)
		for i := 0; i < 3; i++ {
			if r := q.Push(mkPacket(uint64(i), 100), t0); r != "" {
				t.Fatalf("push %d: %s", i, r)
			}
		}
		if r := q.Push(mkPacket(3, 100), t0); r != DropPackets {
			t.Fatalf("4th push: %q, want %q", r, DropPackets)
		}
		// Tail drop: what was kept is still there, in order.
		for i := 0; i < 3; i++ {
			p, _, _ := q.Pop(t0)
			checkPacket(t, p, uint64(i), 100)
		}
		s := q.Stats()
		if s.Dropped[DropPackets] != 1 || s.DroppedBytes[DropPackets] != 100 || s.Packets != 3 {
			t.Fatalf("stats %+v", s)
		}
	})
	t.Run("bytes", func(t *testing.T) {
		q := NewQueue(Limits{MaxBytes: 1000}, nil)
		if r := q.Push(mkPacket(0, 600), t0); r != "" {
			t.Fatal(r)
		}
		if r := q.Push(mkPacket(1, 600), t0); r != DropBytes {
			t.Fatalf("got %q, want %q", r, DropBytes)
		}
		if r := q.Push(mkPacket(2, 400), t0); r != "" {
			t.Fatalf("exact fit dropped: %s", r)
		}
		if s := q.Stats(); s.Dropped[DropBytes] != 1 || s.QueuedBytes != 1000 || s.Len != 2 {
			t.Fatalf("stats %+v", s)
		}
	})
	t.Run("too-big", func(t *testing.T) {
		q := NewQueue(Limits{MaxBytes: 1000}, nil)
		if r := q.Push(make([]byte, 1001), t0); r != DropTooBig {
			t.Fatalf("got %q, want %q", r, DropTooBig)
		}
		q = NewQueue(Limits{}, nil)
		if r := q.Push(make([]byte, MaxPacket+1), t0); r != DropTooBig {
			t.Fatalf("got %q, want %q", r, DropTooBig)
		}
		if r := q.Push(make([]byte, MaxPacket), t0); r != "" {
			t.Fatalf("largest packet dropped: %s", r)
		}
		if s := q.Stats(); s.Dropped[DropTooBig] != 1 || s.Len != 1 {
			t.Fatalf("stats %+v", s)
		}
	})
	t.Run("defaults", func(t *testing.T) {
		if l := NewQueue(Limits{MaxAge: time.Second}, nil).Limits(); l.MaxBytes != 64<<20 || l.MaxPackets != 262144 || l.MaxAge != time.Second {
			t.Fatalf("limits %+v", l)
		}
	})
}

func TestQueueBudgetShared(t *testing.T) {
	b := NewBudget(1000)
	q1, q2 := NewQueue(Limits{}, b), NewQueue(Limits{}, b)
	if r := q1.Push(mkPacket(1, 600), t0); r != "" {
		t.Fatal(r)
	}
	if r := q2.Push(mkPacket(2, 600), t0); r != DropGlobal {
		t.Fatalf("got %q, want %q", r, DropGlobal)
	}
	if r := q2.Push(mkPacket(3, 400), t0); r != "" {
		t.Fatalf("fit dropped: %s", r)
	}
	if b.Used() != 1000 {
		t.Fatalf("used %d", b.Used())
	}
	q1.Pop(t0)
	if b.Used() != 400 {
		t.Fatalf("after pop: used %d", b.Used())
	}
	if r := q2.Push(mkPacket(4, 600), t0); r != "" {
		t.Fatalf("after pop: %s", r)
	}
	if s := q2.Stats(); s.Dropped[DropGlobal] != 1 {
		t.Fatalf("stats %+v", s)
	}
	q2.Discard()
	if b.Used() != 0 {
		t.Fatalf("after discard: used %d", b.Used())
	}
	// No cap: counts, never refuses.
	inf := NewBudget(0)
	q := NewQueue(Limits{}, inf)
	q.Push(make([]byte, 1000), t0)
	if inf.Used() != 1000 {
		t.Fatalf("uncapped used %d", inf.Used())
	}
}

// A reload changes the cap under queues that hold bytes: lowered below what
// they hold, new pushes fail while the bytes held stay; raised, they fit.
func TestBudgetSetMax(t *testing.T) {
	b := NewBudget(1000)
	q := NewQueue(Limits{}, b)
	if r := q.Push(mkPacket(1, 600), t0); r != "" {
		t.Fatal(r)
	}
	b.SetMax(500)
	if b.Max() != 500 {
		t.Fatalf("max %d after SetMax(500)", b.Max())
	}
	if r := q.Push(mkPacket(2, 100), t0); r != DropGlobal {
		t.Fatalf("push above a lowered cap: got %q, want %q", r, DropGlobal)
	}
	if q.Len() != 1 || b.Used() != 600 {
		t.Fatalf("lowering the cap changed what is held: len %d, used %d", q.Len(), b.Used())
	}
	b.SetMax(2000)
	if r := q.Push(mkPacket(3, 1000), t0); r != "" {
		t.Fatalf("push under a raised cap: %s", r)
	}
	b.SetMax(0)
	if b.Max() != math.MaxInt64 {
		t.Fatalf("SetMax(0): max %d, want no cap", b.Max())
	}
}

func TestQueueExpire(t *testing.T) {
	q := NewQueue(Limits{MaxAge: time.Second}, NewBudget(1<<20))
	ms := time.Millisecond
	for i, d := range []time.Duration{0, 500 * ms, 900 * ms, 1000 * ms} {
		q.Push(mkPacket(uint64(i), 64), t0.Add(d))
	}
	// At 1.6 s the first two are older than 1 s.
	if k := q.Expire(t0.Add(1600 * ms)); k != 2 {
		t.Fatalf("expired %d, want 2", k)
	}
	// Exactly MaxAge old is still kept.
	p, at, ok := q.Pop(t0.Add(1900 * ms))
	if !ok || !at.Equal(t0.Add(900*ms)) {
		t.Fatalf("pop: %v %v", at, ok)
	}
	checkPacket(t, p, 2, 64)
	// Pop drops instead of returning.
	if _, _, ok := q.Pop(t0.Add(2500*ms + 1)); ok {
		t.Fatal("expired packet returned")
	}
	s := q.Stats()
	if s.Dropped[DropAge] != 3 || s.Delivered != 1 || s.Len != 0 || q.budget.Used() != 0 {
		t.Fatalf("stats %+v used %d", s, q.budget.Used())
	}

	// A full queue of stale packets does not turn a fresh one away.
	q = NewQueue(Limits{MaxAge: time.Second, MaxPackets: 2}, nil)
	q.Push(mkPacket(0, 64), t0)
	q.Push(mkPacket(1, 64), t0)
	if r := q.Push(mkPacket(2, 64), t0.Add(time.Second)); r != DropPackets {
		t.Fatalf("got %q, want %q", r, DropPackets)
	}
	if r := q.Push(mkPacket(3, 64), t0.Add(2*time.Second)); r != "" {
		t.Fatalf("fresh packet dropped: %s", r)
	}
	p, _, _ = q.Pop(t0.Add(2 * time.Second))
	checkPacket(t, p, 3, 64)
}

func TestQueueMonotonicTimes(t *testing.T) {
	// Real time.Now values (with a monotonic reading) round-trip too.
	q := NewQueue(Limits{}, nil)
	now := time.Now()
	q.Push([]byte{1}, now)
	_, at, ok := q.Pop(now)
	if !ok || !at.Equal(now) || at.Sub(now) != 0 {
		t.Fatalf("arrived %v, pushed %v", at, now)
	}
}

func TestQueueDiscard(t *testing.T) {
	b := NewBudget(0)
	q := NewQueue(Limits{}, b)
	for i := 0; i < 3000; i++ { // several slabs
		q.Push(mkPacket(uint64(i), 200), t0)
	}
	q.Pop(t0)
	if k := q.Discard(); k != 2999 {
		t.Fatalf("discarded %d", k)
	}
	s := q.Stats()
	if s.Dropped[DropFlushed] != 2999 || s.DroppedBytes[DropFlushed] != 2999*200 || s.Len != 0 || s.QueuedBytes != 0 || b.Used() != 0 {
		t.Fatalf("stats %+v used %d", s, b.Used())
	}
	if q.Discard() != 0 {
		t.Fatal("second discard found packets")
	}
	// Usable again afterwards.
	q.Push(mkPacket(7, 300), t0)
	p, _, ok := q.Pop(t0)
	if !ok {
		t.Fatal("empty after push")
	}
	checkPacket(t, p, 7, 300)
}

func TestQueuePopSliceValidity(t *testing.T) {
	q := NewQueue(Limits{MaxAge: time.Second}, nil)
	const size = 1000
	perSlab := slabSize / size
	// Fill the first slab and put a few packets in the second.
	for i := 0; i < perSlab+10; i++ {
		q.Push(mkPacket(uint64(i), size), t0)
	}
	// Take the last packet of the first slab and hold on to it.
	for i := 0; i < perSlab-1; i++ {
		q.Pop(t0)
	}
	held, _, ok := q.Pop(t0)
	if !ok {
		t.Fatal("empty")
	}
	checkPacket(t, held, uint64(perSlab-1), size)
	// A push much later expires the rest, moving the head past the held
	// packet's slab; then many pushes want slabs. None may reuse the held one.
	later := t0.Add(10 * time.Second)
	for i := 0; i < 5*perSlab; i++ {
		if r := q.Push(mkPacket(uint64(1_000_000+i), size), later); r != "" {
			t.Fatal(r)
		}
	}
	if k := q.Stats().Dropped[DropAge]; k != 10 {
		t.Fatalf("expired %d, want 10", k)
	}
	q.Expire(later.Add(time.Hour))
	for i := 0; i < 5*perSlab; i++ {
		q.Push(mkPacket(uint64(2_000_000+i), size), later.Add(time.Hour))
	}
	checkPacket(t, held, uint64(perSlab-1), size)
	// Appending to the returned slice must not clobber the next packet.
	_ = append(held, 0xff)
	p, _, _ := q.Pop(later.Add(time.Hour))
	checkPacket(t, p, 2_000_000, size)
}

func TestQueueNotify(t *testing.T) {
	q := NewQueue(Limits{MaxPackets: 1}, nil)
	select {
	case <-q.Notify():
		t.Fatal("signal before any push")
	default:
	}
	q.Push([]byte{1}, t0)
	q.Push([]byte{2}, t0) // dropped: no new signal needed, and coalesced anyway
	select {
	case <-q.Notify():
	default:
		t.Fatal("no signal after push")
	}
	select {
	case <-q.Notify():
		t.Fatal("signals not coalesced")
	default:
	}
}

func TestQueueConcurrent(t *testing.T) {
	const n = 100_000
	b := NewBudget(1 << 30)
	q := NewQueue(Limits{MaxBytes: 1 << 30, MaxPackets: n}, b)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 1600)
		for i := 0; i < n; i++ {
			p := buf[:sizeOf(i)]
			binary.BigEndian.PutUint64(p, uint64(i))
			p[len(p)-1] = byte(i)
			if r := q.Push(p, time.Now()); r != "" {
				t.Errorf("push %d: %s", i, r)
				return
			}
		}
	}()
	next := 0
	deadline := time.After(20 * time.Second)
	for next < n {
		p, _, ok := q.Pop(time.Now())
		if !ok {
			select {
			case <-q.Notify():
			case <-deadline:
				t.Fatalf("stuck at %d", next)
			}
			continue
		}
		if seq := binary.BigEndian.Uint64(p); seq != uint64(next) || len(p) != sizeOf(next) || p[len(p)-1] != byte(next) {
			t.Fatalf("got seq %d len %d, want %d len %d", seq, len(p), next, sizeOf(next))
		}
		next++
	}
	wg.Wait()
	if s := q.Stats(); s.Delivered != n || s.DroppedTotal() != 0 || b.Used() != 0 {
		t.Fatalf("stats %+v used %d", s, b.Used())
	}
}

// TestQueueOverheadPerPacket checks the memory goal: at most 64
// bytes of bookkeeping per queued packet beyond the packet itself.
func TestQueueOverheadPerPacket(t *testing.T) {
	const n, size = 100_000, 200
	pkt := make([]byte, size)
	// Two collections empty the slab pool, so slabs that earlier tests
	// left there cannot hide this queue's allocations.
	runtime.GC()
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	q := NewQueue(Limits{}, nil)
	for i := 0; i < n; i++ {
		if r := q.Push(pkt, t0); r != "" {
			t.Fatal(r)
		}
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(q)
	grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	per := float64(grown-n*size) / n
	t.Logf("heap grew %d bytes for %d packets of %d bytes: %.1f bytes/packet overhead", grown, n, size, per)
	if per > 64 {
		t.Fatalf("overhead %.1f bytes/packet, goal <= 64", per)
	}
}

func BenchmarkQueuePush(b *testing.B) {
	for _, size := range []int{200, 1400} {
		b.Run(sizeName(size), func(b *testing.B) {
			pkt := make([]byte, size)
			q := NewQueue(Limits{MaxBytes: 1 << 40, MaxPackets: 1 << 30}, NewBudget(0))
			now := time.Now()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				// Keep the queue bounded without timing a drain per packet.
				if i&(1<<16-1) == 0 && i > 0 {
					b.StopTimer()
					q.Discard()
					b.StartTimer()
				}
				if r := q.Push(pkt, now); r != "" {
					b.Fatal(r)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pkts/s")
		})
	}
}

func BenchmarkQueuePushPop(b *testing.B) {
	for _, size := range []int{200, 1400} {
		b.Run(sizeName(size), func(b *testing.B) {
			pkt := make([]byte, size)
			q := NewQueue(Limits{}, NewBudget(0))
			now := time.Now()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				q.Push(pkt, now)
				if i&63 == 63 {
					for {
						if _, _, ok := q.Pop(now); !ok {
							break
						}
					}
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pkts/s")
		})
	}
}

func sizeName(n int) string { return strconv.Itoa(n) + "B" }

// TestQueueCopyOut: copies come out in order and intact across slabs, from
// any number on, without leaving the queue; a number that has left starts
// at the head; Skip then removes exactly what the copies covered.
func TestQueueCopyOut(t *testing.T) {
	q := NewQueue(Limits{}, nil)
	const n = 600 // about 450 KB: three slabs
	for i := range n {
		q.Push(mkPacket(uint64(i), sizeOf(i)), t0)
	}
	buf := make([]byte, 0, 8<<10)
	next := uint64(0)
	for next < n {
		pkts, nx := q.CopyOut(next, buf, 7)
		if len(pkts) == 0 || len(pkts) > 7 || nx != next+uint64(len(pkts)) {
			t.Fatalf("CopyOut(%d): %d packets, next %d", next, len(pkts), nx)
		}
		for i, p := range pkts {
			checkPacket(t, p, next+uint64(i), sizeOf(int(next)+i))
		}
		next = nx
	}
	if pkts, nx := q.CopyOut(n, buf, 7); len(pkts) != 0 || nx != n {
		t.Fatalf("CopyOut past the tail: %d packets, next %d", len(pkts), nx)
	}
	if q.Len() != n || q.Head() != 0 {
		t.Fatalf("copies took packets: len %d, head %d", q.Len(), q.Head())
	}
	// Pop into the second slab, then copy from a number that has left.
	for i := range 250 {
		p, _, _ := q.Pop(t0)
		checkPacket(t, p, uint64(i), sizeOf(i))
	}
	pkts, nx := q.CopyOut(10, buf, 3)
	if nx != 253 || len(pkts) != 3 {
		t.Fatalf("CopyOut(10) after 250 pops: %d packets, next %d", len(pkts), nx)
	}
	for i, p := range pkts {
		checkPacket(t, p, uint64(250+i), sizeOf(250+i))
	}
	if k, _ := q.Skip(400, t0); k != 150 || q.Head() != 400 {
		t.Fatalf("Skip(400): %d skipped, head %d", k, q.Head())
	}
	if k, _ := q.Skip(300, t0); k != 0 {
		t.Fatalf("Skip below the head took %d", k)
	}
	p, _, _ := q.Pop(t0)
	checkPacket(t, p, 400, sizeOf(400))
	if s := q.Stats(); s.Delivered != 401 || s.DroppedTotal() != 0 {
		t.Fatalf("stats %+v: skipped packets count as delivered", s)
	}
	// Copy while a producer pushes and the consumer pops.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := n; i < n+2000; i++ {
			q.Push(mkPacket(uint64(i), sizeOf(i)), t0)
		}
	}()
	for next = q.Head(); next < n+2000; {
		pkts, nx := q.CopyOut(next, buf, 64)
		for i, p := range pkts {
			checkPacket(t, p, nx-uint64(len(pkts))+uint64(i), sizeOf(int(nx)-len(pkts)+i))
		}
		next = nx
		q.Pop(t0)
	}
	wg.Wait()
}
