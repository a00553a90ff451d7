package migrate

import (
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
)

func fill(q *cache.Queue, n, size int) {
	for range n {
		q.Push(make([]byte, size), time.Now())
	}
}

func TestTotalsOfAHandedOverSource(t *testing.T) {
	q := cache.NewQueue(cache.Limits{MaxPackets: 5}, nil)
	fill(q, 7, 100) // 2 over the bound: dropped
	c := &vipCtl{
		rec:   control.Migration{VIP: "100.100.20.1", Role: metrics.RoleSource},
		flush: cache.FlushStats{Flushed: 4, FlushedB: 400, Forwarded: 1, ForwardedB: 100},
	}
	got := c.totalsLocked(migrationQueues{cache: q})
	if got.Role != metrics.RoleSource || got.Outcome != metrics.Completed || got.Handover != 0 {
		t.Errorf("role %q, outcome %d, handover %v: want source, completed, none", got.Role, got.Outcome, got.Handover)
	}
	for kind, want := range map[string]metrics.Traffic{
		metrics.KindCached:    {Packets: 5, Bytes: 500},
		metrics.KindFlushed:   {Packets: 4, Bytes: 400},
		metrics.KindForwarded: {Packets: 1, Bytes: 100},
	} {
		if got.Traffic[kind] != want {
			t.Errorf("%s: %+v, want %+v", kind, got.Traffic[kind], want)
		}
	}
	if got.Traffic[metrics.KindDelivered] != (metrics.Traffic{}) || got.Traffic[metrics.KindHeld] != (metrics.Traffic{}) {
		t.Errorf("a source that handed over delivered or held: %+v", got.Traffic)
	}
	if d := got.Dropped[string(cache.DropPackets)]; d != (metrics.Traffic{Packets: 2, Bytes: 200}) {
		t.Errorf("dropped %+v, want 2 packets of 200 bytes for %s", got.Dropped, cache.DropPackets)
	}
}

func TestTotalsOfATimeout(t *testing.T) {
	q := cache.NewQueue(cache.DefaultLimits(), nil)
	fill(q, 3, 60)
	q.Discard()
	c := &vipCtl{rec: control.Migration{VIP: "100.100.20.1", Role: metrics.RoleSource, TimedOut: true}}
	got := c.totalsLocked(migrationQueues{cache: q})
	if got.Outcome != metrics.TimedOut {
		t.Errorf("outcome %d, want timed out", got.Outcome)
	}
	if got.Traffic[metrics.KindCached].Packets != 3 || got.Dropped[string(cache.DropFlushed)] != (metrics.Traffic{Packets: 3, Bytes: 180}) {
		t.Errorf("cached %+v, dropped %+v: want 3 cached, 3 discarded", got.Traffic[metrics.KindCached], got.Dropped)
	}
}

func TestTotalsOfADestination(t *testing.T) {
	stream, direct := cache.NewQueue(cache.DefaultLimits(), nil), cache.NewQueue(cache.DefaultLimits(), nil)
	fill(stream, 4, 80)
	wrote := 0
	o := &cache.Orderer{Stream: stream, Direct: direct, Write: func([]byte) error { wrote++; return nil }}
	o.SetCarrier(true)
	o.Closed()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- o.Run(stop) }()
	select {
	case <-o.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("the orderer did not drain 4 packets")
	}
	close(stop)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	up := time.Now()
	first := up.Add(3 * time.Millisecond)
	c := &vipCtl{
		rec:   control.Migration{VIP: "100.100.20.1", Role: metrics.RoleDestination, CarrierUp: &up, FirstDelivery: &first},
		flush: cache.FlushStats{Flushed: 4, FlushedB: 320},
	}
	got := c.totalsLocked(migrationQueues{stream: stream, held: direct, orderer: o})
	if got.Traffic[metrics.KindDelivered] != (metrics.Traffic{Packets: 4, Bytes: 320}) || wrote != 4 {
		t.Errorf("delivered %+v (wrote %d), want 4 packets of 320 bytes", got.Traffic[metrics.KindDelivered], wrote)
	}
	if got.Traffic[metrics.KindCached] != (metrics.Traffic{}) {
		t.Errorf("the stream counted as cached here: %+v", got.Traffic[metrics.KindCached])
	}
	if got.Handover != 3*time.Millisecond {
		t.Errorf("handover %v, want 3ms", got.Handover)
	}
}
