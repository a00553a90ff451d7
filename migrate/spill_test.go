package migrate

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
)

// The VM leaves a host again while that host still delivers to it (moves
// in quick succession): whatever way the engine hears of it, what was not
// delivered there goes on to the next host, behind nothing, and every
// datagram reaches the VM once, in order across the hosts.

// leaveHow is how a host learns that the VM left during its delivery.
type leaveHow string

const (
	leaveSuspend leaveHow = "suspend" // `migrate suspend` or `vip detach`
	leaveCarrier leaveHow = "carrier" // the interface loses carrier, a reconcile sees it
	leaveWrite   leaveHow = "write"   // a write to the vanished interface fails
	leaveClaim   leaveHow = "claim"   // the next host claims, nothing else said
)

var leaveHows = []leaveHow{leaveSuspend, leaveCarrier, leaveWrite, leaveClaim}

// suspendWith attaches testVIP to h behind dev, with carrier, suspends it
// and has h cache datagrams 0..n-1.
func suspendWith(h *fakeHost, dev string, n int) {
	h.links.setCarrier(dev, true)
	h.attach(testVIP, dev)
	h.Lock()
	h.engine.SuspendLocked(testVIP, "test")
	h.Unlock()
	h.sendTo(testVIP, 0, n)
}

// arriveAt makes h claim testVIP from its current owner, with carrier on
// dev at once (the VM runs there).
func arriveAt(t *testing.T, lab *testLab, h *fakeHost, dev string) {
	t.Helper()
	old, _ := lab.table.get(testVIP)
	h.Lock()
	h.engine.ArriveLocked(testVIP, dev, old)
	h.Unlock()
	h.links.setCarrier(dev, true)
	h.engine.CarrierChanged(dev, true)
}

// leave makes the VM leave h (behind dev) during its delivery, as how says;
// leaveClaim does nothing here: the next arrival is the news.
func leave(t *testing.T, h *fakeHost, dev string, how leaveHow) {
	t.Helper()
	switch how {
	case leaveSuspend:
		h.Lock()
		err := h.engine.SuspendLocked(testVIP, "test")
		h.Unlock()
		if err != nil {
			t.Fatalf("suspend during the delivery: %v", err)
		}
	case leaveCarrier:
		h.links.setCarrier(dev, false)
		h.engine.CarrierChanged(dev, false)
		h.Reconcile()
	case leaveWrite:
		h.links.setCarrier(dev, false)
	}
}

// midDelivery waits until h has delivered at least one datagram to dev and
// returns a count in the delivery's first half to wait for, drawn from rng.
func midDelivery(t *testing.T, h *fakeHost, dev string, rng *rand.Rand, n int) {
	t.Helper()
	k := 1 + rng.IntN(n/2)
	eventually(t, fmt.Sprintf("%d delivered at %s", k, h.name), func() bool { return len(h.links.deliveredTo(dev)) >= k })
}

// TestLeaveDuringArrivalDelivery: the VM arrives at h2 from h1 and leaves
// for h3 while h2 still delivers h1's cache, then more reaches h2 directly
// and h3 directly. At h2 and h3 together every datagram arrives once, in
// order, and h2 moves on from holding without a 10 s wait.
func TestLeaveDuringArrivalDelivery(t *testing.T) {
	for _, how := range leaveHows {
		t.Run(string(how), func(t *testing.T) {
			rng := seeded(t)
			lab := newTestLab(t)
			h1, h2, h3 := lab.host("h1", testTunables()), lab.host("h2", testTunables()), lab.host("h3", testTunables())
			cached := 2000 + rng.IntN(2000) // 100-200 ms of paced delivery
			suspendWith(h1, "vif-a", cached)
			arriveAt(t, lab, h2, "vif-b")
			midDelivery(t, h2, "vif-b", rng, cached)
			leave(t, h2, "vif-b", how)
			n := cached
			if how != leaveClaim {
				more := rng.IntN(200)
				if got := h2.sendTo(testVIP, n, n+more); got != more {
					t.Fatalf("h2 took %d of %d after the VM left", got, more)
				}
				n += more
				eventually(t, "h2 caching", func() bool { return h2.state(testVIP) == control.VIPCaching })
			}
			arriveAt(t, lab, h3, "vif-c")
			direct := rng.IntN(200)
			h3.sendTo(testVIP, n, n+direct)
			n += direct
			h3.done(t, testVIP, metrics.RoleDestination)
			at2, at3 := h2.links.deliveredTo("vif-b"), h3.links.deliveredTo("vif-c")
			eventually(t, "every datagram at h3", func() bool {
				at3 = h3.links.deliveredTo("vif-c")
				return len(at2)+len(at3) >= n
			})
			wantInOrder(t, "at h2 then h3", append(at2, at3...), n)
			in := h2.done(t, testVIP, metrics.RoleDestination)
			// A write to the VM under way as it left may be
			// missing from the record.
			if d := uint64(len(at2)) - in.Delivered; d > 1 {
				t.Errorf("h2's arrival record: delivered %d, want %d", in.Delivered, len(at2))
			}
			eventually(t, "h2 forgets the VIP", func() bool { return h2.state(testVIP) == "" })
			if m := h3.done(t, testVIP, metrics.RoleDestination); m.CacheLost || m.Late != 0 {
				t.Errorf("h3's record: cache lost %v, late %d", m.CacheLost, m.Late)
			}
		})
	}
}

// TestMoveDuringAbortDelivery: an aborted migration delivers h1's cache to
// the VM at h1, and the VM is moved to h2 before that delivery is over
// (the failure of the lab's quick-succession test). What h1 had not
// delivered reaches the VM at h2, in order.
func TestMoveDuringAbortDelivery(t *testing.T) {
	for _, how := range leaveHows {
		t.Run(string(how), func(t *testing.T) {
			rng := seeded(t)
			lab := newTestLab(t)
			h1, h2 := lab.host("h1", testTunables()), lab.host("h2", testTunables())
			cached := 2000 + rng.IntN(2000) // 100-200 ms of paced delivery
			suspendWith(h1, "vif-a", cached)
			h1.Lock()
			if err := h1.engine.AbortLocked(testVIP, "test"); err != nil {
				t.Fatal(err)
			}
			h1.Unlock()
			midDelivery(t, h1, "vif-a", rng, cached)
			leave(t, h1, "vif-a", how)
			n := cached
			if how != leaveClaim {
				more := rng.IntN(200)
				h1.sendTo(testVIP, n, n+more)
				n += more
			}
			arriveAt(t, lab, h2, "vif-b")
			h2.done(t, testVIP, metrics.RoleDestination)
			at1 := h1.links.deliveredTo("vif-a")
			var at2 [][]byte
			eventually(t, "every datagram at h2", func() bool {
				at2 = h2.links.deliveredTo("vif-b")
				return len(at1)+len(at2) >= n
			})
			wantInOrder(t, "at h1 then h2", append(at1, at2...), n)
			// h1 files both: the abort, with what it delivered, and
			// the move on.
			var aborted, moved bool
			for _, m := range h1.engine.Migrations() {
				aborted = aborted || m.Aborted && uint64(len(at1))-m.Delivered <= 1
				moved = moved || m.Role == metrics.RoleSource && m.To == "h2" && m.Done != nil
			}
			if !aborted || !moved {
				t.Errorf("h1's records: the abort with %d delivered filed %v, the move to h2 %v: %+v", len(at1), aborted, moved, h1.engine.Migrations())
			}
		})
	}
}

// TestAbortAfterSpill: the VM arrives at h2, is paused again there during
// the delivery, and the move on is aborted: it runs on at h2. h2 delivers
// what its first delivery had not, then what came since, in order: the
// spilled delivery feeds the abort's.
func TestAbortAfterSpill(t *testing.T) {
	rng := seeded(t)
	lab := newTestLab(t)
	h1, h2 := lab.host("h1", testTunables()), lab.host("h2", testTunables())
	cached := 2000 + rng.IntN(2000) // 100-200 ms of paced delivery
	suspendWith(h1, "vif-a", cached)
	arriveAt(t, lab, h2, "vif-b")
	midDelivery(t, h2, "vif-b", rng, cached)
	leave(t, h2, "vif-b", leaveSuspend)
	n := cached
	more := rng.IntN(200)
	h2.sendTo(testVIP, n, n+more)
	n += more
	h2.Lock()
	if err := h2.engine.AbortLocked(testVIP, "test"); err != nil {
		t.Fatal(err)
	}
	h2.Unlock()
	after := rng.IntN(200)
	h2.sendTo(testVIP, n, n+after)
	n += after
	var at2 [][]byte
	eventually(t, "every datagram at h2", func() bool {
		at2 = h2.links.deliveredTo("vif-b")
		return len(at2) >= n
	})
	wantInOrder(t, "at h2", at2, n)
	eventually(t, "the VIP local at h2", func() bool { return h2.state(testVIP) == control.VIPLocal })
}
