package migrate

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
	"github.com/vmroam/vmroam/wgagent/route"
)

// The engine's tests over fakes (fakes_test.go): real handover streams
// between engines on loopback TCP, the agent, the cache device and the
// VM interfaces faked. Counts are drawn from a seed that each test logs.

var testVIP = netip.MustParseAddr("100.100.20.1")

func seeded(t *testing.T) *rand.Rand {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	return rand.New(rand.NewPCG(seed, 0))
}

// testTunables: a short linger, so that a handover ends quickly.
func testTunables() Tunables {
	tun := DefaultTunables()
	tun.Linger = 100 * time.Millisecond
	return tun
}

// record returns h's latest record of a migration of vip in role.
func (h *fakeHost) record(vip netip.Addr, role string) (control.Migration, bool) {
	ms := h.engine.Migrations()
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].VIP == vip.String() && ms[i].Role == role {
			return ms[i], true
		}
	}
	return control.Migration{}, false
}

// done waits until h has filed a finished migration of vip in role.
func (h *fakeHost) done(t *testing.T, vip netip.Addr, role string) control.Migration {
	t.Helper()
	var m control.Migration
	eventually(t, h.name+"'s "+role+" record", func() bool {
		var ok bool
		m, ok = h.record(vip, role)
		return ok && m.Done != nil
	})
	return m
}

func (h *fakeHost) state(vip netip.Addr) control.VIPState {
	h.Lock()
	defer h.Unlock()
	s, _ := h.engine.StateLocked(vip)
	return s
}

// sendTo hands datagrams from..to-1 to h's cache device for vip, and says
// how many had a sink.
func (h *fakeHost) sendTo(vip netip.Addr, from, to int) int {
	n := 0
	for i := from; i < to; i++ {
		if h.dev.take(vip, udpTo(vip, i)) {
			n++
		}
	}
	return n
}

func wantInOrder(t *testing.T, what string, got [][]byte, n int) {
	t.Helper()
	want := make([]int, n)
	for i := range want {
		want[i] = i
	}
	if g := numbers(got); !slices.Equal(g, want) {
		t.Fatalf("%s: %d datagrams %v, want 0..%d in order", what, len(g), g, n-1)
	}
}

// TestHandover: a VM suspended at h1 arrives at h2. What h1 cached and
// what reached h2 directly before the VM ran reach the VM at h2, every
// one, in order, once its interface has carrier; h1 gives the VIP to h2's
// claim, and both file the migration with its counts.
func TestHandover(t *testing.T) {
	rng := seeded(t)
	lab := newTestLab(t)
	h1, h2 := lab.host("h1", testTunables()), lab.host("h2", testTunables())
	h1.links.setCarrier("vif-a", true)
	h1.attach(testVIP, "vif-a")

	h1.Lock()
	if err := h1.engine.SuspendLocked(testVIP, "test"); err != nil {
		t.Fatal(err)
	}
	h1.Unlock()
	if s := h1.state(testVIP); s != control.VIPCaching {
		t.Fatalf("h1 after the suspend: %q", s)
	}
	cached := 1 + rng.IntN(300)
	if n := h1.sendTo(testVIP, 0, cached); n != cached {
		t.Fatalf("h1's cache took %d of %d", n, cached)
	}

	old, _ := lab.table.get(testVIP)
	h2.Lock()
	claim := h2.engine.ArriveLocked(testVIP, "vif-b", old)
	h2.Unlock()
	if claim.Owner != "h2" || claim.Epoch != old.Epoch+1 {
		t.Fatalf("claim %+v after %+v", claim, old)
	}
	h2.routeMu.Lock()
	added := slices.Clone(h2.added)
	h2.routeMu.Unlock()
	if !slices.Contains(added, route.Route{Dst: hostPrefix(testVIP), Dev: "vmrc0", Metric: MetricDivert}) {
		t.Errorf("h2 did not divert the VIP to its cache device before claiming: %v", added)
	}
	held := rng.IntN(100)
	if n := h2.sendTo(testVIP, cached, cached+held); n != held {
		t.Fatalf("h2 held %d of %d", n, held)
	}
	// Nothing reaches the VM before it runs.
	time.Sleep(20 * time.Millisecond)
	if got := h2.links.deliveredTo("vif-b"); len(got) != 0 {
		t.Fatalf("delivered %d before the VM's interface had carrier", len(got))
	}
	h2.links.setCarrier("vif-b", true)
	h2.engine.CarrierChanged("vif-b", true)

	dst := h2.done(t, testVIP, metrics.RoleDestination)
	wantInOrder(t, "at h2", h2.links.deliveredTo("vif-b"), cached+held)
	if dst.CacheLost || dst.Flushed != uint64(cached) || dst.Delivered != uint64(cached+held) || dst.Held != uint64(held) {
		t.Errorf("h2's record: lost %v flushed %d delivered %d held %d, want flushed %d delivered %d held %d",
			dst.CacheLost, dst.Flushed, dst.Delivered, dst.Held, cached, cached+held, held)
	}
	src := h1.done(t, testVIP, metrics.RoleSource)
	if src.To != "h2" || src.Flushed != uint64(cached) || src.Cached != uint64(cached) {
		t.Errorf("h1's record: to %q flushed %d cached %d, want h2, %d, %d", src.To, src.Flushed, src.Cached, cached, cached)
	}
	h1.Lock()
	disowned := slices.Clone(h1.disowned)
	_, still := h1.attached[testVIP]
	h1.Unlock()
	if still || !slices.Equal(disowned, []gossip.Record{claim}) {
		t.Errorf("h1 gave up %v (still attached: %v), want exactly h2's claim %v", disowned, still, claim)
	}
	eventually(t, "h1 forgets the VIP", func() bool { return h1.state(testVIP) == "" })
	eventually(t, "h2 hands the VIP to the kernel", func() bool { return h2.state(testVIP) == control.VIPLocal })
	if got := len(h1.links.deliveredTo("vif-a")); got != 0 {
		t.Errorf("h1 delivered %d to the VM that left", got)
	}
}

// TestAbortDeliversHere: an aborted migration and a VM whose interface
// came back give the cache to the VM where it is, in order, and the VIP
// stays here.
func TestAbortDeliversHere(t *testing.T) {
	for _, how := range []string{"abort", "carrier"} {
		t.Run(how, func(t *testing.T) {
			rng := seeded(t)
			lab := newTestLab(t)
			h1 := lab.host("h1", testTunables())
			h1.links.setCarrier("vif-a", true)
			h1.attach(testVIP, "vif-a")
			if how == "abort" {
				h1.Lock()
				if err := h1.engine.SuspendLocked(testVIP, "test"); err != nil {
					t.Fatal(err)
				}
				h1.Unlock()
			} else {
				h1.links.setCarrier("vif-a", false)
				h1.Reconcile()
			}
			if s := h1.state(testVIP); s != control.VIPCaching {
				t.Fatalf("after the suspend: %q", s)
			}
			n := 1 + rng.IntN(300)
			h1.sendTo(testVIP, 0, n)
			if how == "abort" {
				h1.Lock()
				if err := h1.engine.AbortLocked(testVIP, "test"); err != nil {
					t.Fatal(err)
				}
				h1.Unlock()
			} else {
				h1.links.setCarrier("vif-a", true)
				h1.Reconcile()
			}
			m := h1.done(t, testVIP, metrics.RoleSource)
			wantInOrder(t, "at h1", h1.links.deliveredTo("vif-a"), n)
			if !m.Aborted && how == "abort" || m.Delivered != uint64(n) {
				t.Errorf("record: aborted %v delivered %d, want %d", m.Aborted, m.Delivered, n)
			}
			eventually(t, "the VIP local again", func() bool { return h1.state(testVIP) == control.VIPLocal })
			h1.Lock()
			_, attached := h1.attached[testVIP]
			h1.Unlock()
			if !attached {
				t.Error("the VIP was given up")
			}
		})
	}
}

// TestAbortOutsideCaching: only an attached VIP can be suspended; an
// abort of a local VIP changes nothing (a hook that repeats itself), and
// one of an arriving VIP is refused with its state named.
func TestAbortOutsideCaching(t *testing.T) {
	lab := newTestLab(t)
	h1 := lab.host("h1", testTunables())
	h1.links.setCarrier("vif-a", true)
	h1.Lock()
	err := h1.engine.SuspendLocked(testVIP, "test")
	h1.Unlock()
	if err == nil {
		t.Error("suspended a VIP that is not attached")
	}
	h1.attach(testVIP, "vif-a")
	h1.Lock()
	err = h1.engine.AbortLocked(testVIP, "test")
	h1.Unlock()
	if err != nil || h1.state(testVIP) != control.VIPLocal {
		t.Errorf("abort of a local VIP: %v, state %q", err, h1.state(testVIP))
	}
	arriving := netip.MustParseAddr("100.100.20.2")
	lab.table.merge(gossip.Record{VIP: arriving, Owner: "h9", Epoch: 1})
	old, _ := lab.table.get(arriving)
	h1.Lock()
	h1.engine.ArriveLocked(arriving, "vif-b", old)
	err = h1.engine.AbortLocked(arriving, "test")
	h1.Unlock()
	if err == nil || !strings.Contains(err.Error(), "is holding; only a caching VIP can be aborted") {
		t.Errorf("abort of an arriving VIP: %v", err)
	}
}

// TestTimeoutReleases: a cache nobody claims within its max age is
// dropped, the VIP released, and the record says so.
func TestTimeoutReleases(t *testing.T) {
	tun := testTunables()
	tun.Limits.MaxAge = 200 * time.Millisecond
	lab := newTestLab(t)
	h1 := lab.host("h1", tun)
	h1.links.setCarrier("vif-a", true)
	h1.attach(testVIP, "vif-a")
	h1.Lock()
	h1.engine.SuspendLocked(testVIP, "test")
	h1.Unlock()
	h1.sendTo(testVIP, 0, 10)
	time.Sleep(250 * time.Millisecond)
	h1.Reconcile()
	m := h1.done(t, testVIP, metrics.RoleSource)
	var dropped uint64
	for _, n := range m.Dropped {
		dropped += n
	}
	if !m.TimedOut || m.Cached != 10 || dropped != 10 {
		t.Errorf("record: timed out %v cached %d dropped %v, want 10 cached and dropped", m.TimedOut, m.Cached, m.Dropped)
	}
	r, _ := lab.table.get(testVIP)
	if r.Owner != "" {
		t.Errorf("the VIP is still owned: %+v", r)
	}
	if h1.dev.take(testVIP, udpTo(testVIP, 11)) {
		t.Error("the cache device still hands the VIP's packets to a sink")
	}
}

// TestOldHostGone: an arrival whose old host is not a live member
// delivers what it holds, and files the old host's cache as lost.
func TestOldHostGone(t *testing.T) {
	lab := newTestLab(t)
	h2 := lab.host("h2", testTunables())
	lab.table.merge(gossip.Record{VIP: testVIP, Owner: "h9", Epoch: 4})
	old, _ := lab.table.get(testVIP)
	h2.Lock()
	h2.engine.ArriveLocked(testVIP, "vif-b", old)
	h2.Unlock()
	h2.sendTo(testVIP, 0, 20)
	h2.links.setCarrier("vif-b", true)
	h2.engine.CarrierChanged("vif-b", true)
	m := h2.done(t, testVIP, metrics.RoleDestination)
	if !m.CacheLost {
		t.Error("the old host's cache is not filed as lost")
	}
	wantInOrder(t, "at h2", h2.links.deliveredTo("vif-b"), 20)
}

// TestCacheLostInRestart: a source restored at start while its VM had no
// carrier refuses the handover (what it cached before is gone), gives the
// VIP to the claimer, and the claimer files the cache as lost.
func TestCacheLostInRestart(t *testing.T) {
	lab := newTestLab(t)
	h1, h2 := lab.host("h1", testTunables()), lab.host("h2", testTunables())
	lab.table.merge(gossip.Record{VIP: testVIP, Owner: "h1", Epoch: 3})
	h1.Lock()
	h1.attached[testVIP] = Attachment{Epoch: 3}
	h1.engine.RestoreLocked(testVIP, "vif-a") // no carrier: the VM is gone
	h1.Unlock()
	h1.Reconcile() // no carrier: caching
	h1.sendTo(testVIP, 0, 5)
	old, _ := lab.table.get(testVIP)
	h2.Lock()
	claim := h2.engine.ArriveLocked(testVIP, "vif-b", old)
	h2.Unlock()
	h2.links.setCarrier("vif-b", true)
	h2.engine.CarrierChanged("vif-b", true)
	m := h2.done(t, testVIP, metrics.RoleDestination)
	if !m.CacheLost {
		t.Error("the claimer did not file the cache as lost")
	}
	if got := h2.links.deliveredTo("vif-b"); len(got) != 0 {
		t.Errorf("delivered %d datagrams of a cache that restarted", len(got))
	}
	eventually(t, "h1 gives the VIP to the claim", func() bool {
		h1.Lock()
		defer h1.Unlock()
		return slices.Equal(h1.disowned, []gossip.Record{claim})
	})
}

// TestMoveOnBeforeDelivered: the VM moves on from h2 to h3 before it ran
// at h2, while h2 still holds what it was given. h2 hands it all to h3's
// claim at once, and carrier at h2 afterwards delivers nothing there: at
// h2 and h3 together every datagram arrives once, in order.
func TestMoveOnBeforeDelivered(t *testing.T) {
	rng := seeded(t)
	lab := newTestLab(t)
	h1, h2, h3 := lab.host("h1", testTunables()), lab.host("h2", testTunables()), lab.host("h3", testTunables())
	cached := 1 + rng.IntN(200)
	suspendWith(h1, "vif-a", cached)
	old, _ := lab.table.get(testVIP)
	h2.Lock()
	h2.engine.ArriveLocked(testVIP, "vif-b", old)
	h2.Unlock()
	eventually(t, "h1 streams to h2", func() bool {
		m, ok := h1.record(testVIP, metrics.RoleSource)
		return ok && m.Claim != nil
	})

	// h3 claims while h2 still holds (its VM never got carrier there).
	at2, _ := lab.table.get(testVIP)
	h3.Lock()
	h3.engine.ArriveLocked(testVIP, "vif-c", at2)
	h3.Unlock()
	time.Sleep(time.Duration(rng.IntN(300)) * time.Millisecond)
	// A late carrier at h2 (a flap, the interface torn down late).
	h2.links.setCarrier("vif-b", true)
	h2.engine.CarrierChanged("vif-b", true)
	h3.links.setCarrier("vif-c", true)
	h3.engine.CarrierChanged("vif-c", true)
	h3.done(t, testVIP, metrics.RoleDestination)
	at2got, at3got := h2.links.deliveredTo("vif-b"), h3.links.deliveredTo("vif-c")
	wantInOrder(t, "at h2 then h3", append(at2got, at3got...), cached)
	// h2 files both of its sides: the arrival, with what it delivered,
	// and the move on, with what it handed over.
	in := h2.done(t, testVIP, metrics.RoleDestination)
	out := h2.done(t, testVIP, metrics.RoleSource)
	if in.Delivered != uint64(len(at2got)) || in.From != "h1" {
		t.Errorf("h2's arrival: from %q delivered %d, want h1, %d", in.From, in.Delivered, len(at2got))
	}
	if out.To != "h3" || out.Flushed+out.Forwarded != uint64(len(at3got)) {
		t.Errorf("h2's move on: to %q flushed %d and forwarded %d, want h3, %d in all", out.To, out.Flushed, out.Forwarded, len(at3got))
	}
}
