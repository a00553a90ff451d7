package cache

import (
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmroam/vmroam/internal/netnstest"
)

// queueSink pushes what the interceptor reads into a queue, as the agent's
// migration does, and counts what it was given.
type queueSink struct {
	q     *Queue
	taken atomic.Uint64
}

func (s *queueSink) Take(pkt []byte) {
	s.taken.Add(1)
	s.q.Push(pkt, time.Now())
}

// TestFloodWithinCaps floods two migrating VIPs through the cache device
// with over ten times what the caches may hold. Each queue stays within
// its bytes, all of them within the global budget, at every moment
// sampled; the heap keeps no more than the caps; every packet taken is
// either queued or counted as dropped, by the bound that dropped it.
func TestFloodWithinCaps(t *testing.T) {
	netnstest.Run(t, func() {
		in := openTestInterceptor(t, "vmrflood0", 9000)
		defer in.Close()

		const (
			perQueue = 2 << 20
			global   = 3 << 20
			size     = 1400 // UDP payload; 1428 bytes with the headers
			burst    = 2000
		)
		budget := NewBudget(global)
		vips := []netip.Addr{netip.MustParseAddr("100.64.9.1"), netip.MustParseAddr("100.64.9.2")}
		sinks := make([]*queueSink, len(vips))
		for i, vip := range vips {
			routeToInterceptor(t, in, vip)
			sinks[i] = &queueSink{q: NewQueue(Limits{MaxBytes: perQueue, MaxAge: time.Minute}, budget)}
			in.Attach(vip, sinks[i])
		}

		// The reader is running (its buffers allocated) once a barrier
		// came through it.
		if err := in.Barrier(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		runtime.GC()
		runtime.GC()
		var before runtime.MemStats
		runtime.ReadMemStats(&before)

		// Sample the bounds while the flood runs.
		var worstQueue, worstBudget atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				for _, s := range sinks {
					if b := s.q.Stats().QueuedBytes; b > worstQueue.Load() {
						worstQueue.Store(b)
					}
				}
				if u := budget.Used(); u > worstBudget.Load() {
					worstBudget.Store(u)
				}
				select {
				case <-stop:
					return
				case <-time.After(time.Millisecond):
				}
			}
		}()

		// One VIP after the other: the first fills its own queue (and
		// drops at max-bytes), the second the rest of the budget (and
		// drops at the global cap).
		// The device's queue overflows while the reader catches up (more
		// so under the race detector on a busy machine), so each VIP is
		// sent bursts until its queue took five times the global budget,
		// not a fixed count.
		payload := make([]byte, size)
		var sent uint64
		for i, vip := range vips {
			conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: vip.AsSlice(), Port: 5000})
			if err != nil {
				t.Fatal(err)
			}
			deadline := time.Now().Add(60 * time.Second)
			for sinks[i].taken.Load()*size < 5*global {
				if time.Now().After(deadline) {
					t.Fatalf("after 60 s the cache device had read only %d packets for %s", sinks[i].taken.Load(), vip)
				}
				for range burst {
					if _, err := conn.Write(payload); err == nil {
						sent++
					}
				}
				waitQuiet(t, sinks, 20*time.Millisecond)
			}
			conn.Close()
			waitQuiet(t, sinks, 300*time.Millisecond)
		}
		close(stop)
		wg.Wait()

		runtime.GC()
		runtime.GC()
		var after runtime.MemStats
		runtime.ReadMemStats(&after)
		grown := int64(after.HeapAlloc) - int64(before.HeapAlloc)

		var taken uint64
		for _, s := range sinks {
			taken += s.taken.Load()
		}
		t.Logf("sent %d packets (%d MiB), the cache device read %d; worst queue %d bytes, worst budget %d bytes; heap grew %d bytes",
			sent, sent*size>>20, taken, worstQueue.Load(), worstBudget.Load(), grown)
		if taken*size < 10*global {
			t.Fatalf("only %d of %d packets reached the queues: no flood", taken, sent)
		}
		if worstQueue.Load() > perQueue || worstBudget.Load() > global {
			t.Fatalf("bounds exceeded: queue %d > %d or budget %d > %d", worstQueue.Load(), perQueue, worstBudget.Load(), global)
		}
		if budget.Used() > global {
			t.Fatalf("budget used %d > %d", budget.Used(), global)
		}
		// Slabs are 256 KiB, so a queue may hold most of a slab beyond its
		// bytes; rings add a little.
		if limit := int64(global + 2*slabSize + 1<<20); grown > limit {
			t.Fatalf("heap grew %d bytes during the flood, more than the caps allow (%d)", grown, limit)
		}
		reasons := []DropReason{DropBytes, DropGlobal}
		for i, s := range sinks {
			st := s.q.Stats()
			if st.QueuedBytes > perQueue {
				t.Fatalf("queue %d holds %d bytes", i, st.QueuedBytes)
			}
			if st.Packets+st.DroppedTotal() != s.taken.Load() {
				t.Fatalf("queue %d: %d kept + %d dropped != %d taken", i, st.Packets, st.DroppedTotal(), s.taken.Load())
			}
			if st.Dropped[reasons[i]] == 0 || st.Dropped[reasons[i]] != st.DroppedTotal() {
				t.Fatalf("queue %d: drops %v, want all of them %q", i, st.Dropped, reasons[i])
			}
			t.Logf("queue %d: kept %d packets (%d bytes), dropped %v", i, st.Packets, st.QueuedBytes, st.Dropped)
		}
		for _, s := range sinks {
			s.q.Discard()
		}
		if budget.Used() != 0 {
			t.Fatalf("budget after discarding: %d", budget.Used())
		}
	})
}

// waitQuiet waits until the interceptor has read everything the kernel
// queued: no sink takes a packet for quiet. (A barrier packet could be
// dropped by the device's full queue behind the flood.)
func waitQuiet(t *testing.T, sinks []*queueSink, quiet time.Duration) {
	t.Helper()
	total := func() (n uint64) {
		for _, s := range sinks {
			n += s.taken.Load()
		}
		return n
	}
	last, since := total(), time.Now()
	for deadline := time.Now().Add(30 * time.Second); time.Since(since) < quiet; {
		if time.Now().After(deadline) {
			t.Fatal("the cache device kept reading for 30 s")
		}
		time.Sleep(20 * time.Millisecond)
		if n := total(); n != last {
			last, since = n, time.Now()
		}
	}
}
