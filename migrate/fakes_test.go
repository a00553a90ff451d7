package migrate

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/route"
	"github.com/vmroam/vmroam/xenhook"
)

// The fakes of this file run engines without root: a gossip table shared
// by the test's hosts, hosts that reach each other's handover listeners on
// loopback TCP, a cache device whose sinks the test feeds, and links whose
// carrier the test sets and whose deliveries it reads.

// fakeTable is the gossip table every fake host of a test sees at once.
type fakeTable struct {
	mu      sync.Mutex
	records map[netip.Addr]gossip.Record
}

func (t *fakeTable) get(vip netip.Addr) (gossip.Record, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.records[vip]
	return r, ok
}

// merge keeps r if it beats what the table has, as gossip does.
func (t *fakeTable) merge(r gossip.Record) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if cur, ok := t.records[r.VIP]; !ok || r.Epoch > cur.Epoch || (r.Epoch == cur.Epoch && r.Owner > cur.Owner) {
		t.records[r.VIP] = r
	}
}

// testLab is a set of fake hosts over one table.
type testLab struct {
	t     *testing.T
	table *fakeTable
	mu    sync.Mutex // guards hosts: a test adds hosts while others serve
	hosts map[string]*fakeHost
}

func (l *testLab) lookup(name string) *fakeHost {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.hosts[name]
}

func newTestLab(t *testing.T) *testLab {
	return &testLab{t: t, table: &fakeTable{records: map[netip.Addr]gossip.Record{}}, hosts: map[string]*fakeHost{}}
}

// fakeHost is one agent: its lock, attachments, handover listener and
// the engine over them.
type fakeHost struct {
	lab  *testLab
	name string
	mu   sync.Mutex
	held atomic.Bool // the agent lock is held: Locked methods check it

	attached   map[netip.Addr]Attachment
	disowned   []gossip.Record // what Disown gave up, in order
	routes     []route.Route   // what the last Reconcile wanted
	routeMu    sync.Mutex      // guards added: the route table's own lock
	added      []route.Route   // what AddRoute added
	reconciles atomic.Int64
	kicks      sync.WaitGroup

	addr   netip.Addr // its overlay address: the handover port's
	ln     net.Listener
	dev    *fakeDevice
	links  *fakeLinks
	engine *Engine
}

func (l *testLab) host(name string, tun Tunables) *fakeHost {
	t := l.t
	// Each host its own loopback address, so that a connection's source
	// names its host, as an overlay address does.
	l.mu.Lock()
	addr := netip.AddrFrom4([4]byte{127, 0, 0, byte(len(l.hosts) + 1)})
	l.mu.Unlock()
	ln, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		t.Fatal(err)
	}
	h := &fakeHost{lab: l, name: name, addr: addr, attached: map[netip.Addr]Attachment{}, ln: ln,
		dev: &fakeDevice{sinks: map[netip.Addr]cache.Sink{}}, links: newFakeLinks()}
	h.engine = New(Config{Name: name, Host: h, Device: h.dev, Links: h.links,
		Tunables: func() Tunables { return tun },
		Logger:   slog.New(slog.NewTextHandler(io.Discard, nil))})
	l.mu.Lock()
	l.hosts[name] = h
	l.mu.Unlock()
	h.engine.Serve(ln)
	t.Cleanup(func() {
		ln.Close()
		closed := make(chan struct{})
		go func() {
			h.engine.Close()
			h.kicks.Wait()
			close(closed)
		}()
		select {
		case <-closed:
		case <-time.After(10 * time.Second):
			t.Errorf("%s: the engine did not stop within 10s: a migration's goroutines never end", name)
		}
	})
	return h
}

func (h *fakeHost) Lock()   { h.mu.Lock(); h.held.Store(true) }
func (h *fakeHost) Unlock() { h.held.Store(false); h.mu.Unlock() }

// mustHold reports a call of a method the engine must call with the
// agent lock held, made without it: the lock order of the package doc.
func (h *fakeHost) mustHold(what string) {
	if !h.held.Load() {
		h.lab.t.Errorf("%s: %s called without the agent lock", h.name, what)
	}
}

func (h *fakeHost) Attachment(vip netip.Addr) (Attachment, bool) {
	h.mustHold("Attachment")
	at, ok := h.attached[vip]
	return at, ok
}

func (h *fakeHost) Disown(vip netip.Addr, to gossip.Record) {
	h.mustHold("Disown")
	delete(h.attached, vip)
	h.disowned = append(h.disowned, to)
	if to.Owner == "" {
		r, _ := h.lab.table.get(vip)
		h.lab.table.merge(gossip.Record{VIP: vip, Epoch: r.Epoch + 1})
	} else {
		h.lab.table.merge(to)
	}
}

func (h *fakeHost) Claim(vip netip.Addr) gossip.Record {
	h.mustHold("Claim")
	r, _ := h.lab.table.get(vip)
	r = gossip.Record{VIP: vip, Owner: h.name, Epoch: r.Epoch + 1}
	h.lab.table.merge(r)
	h.attached[vip] = Attachment{Epoch: r.Epoch}
	return r
}

// attach makes vip local here at the next epoch, as `vip attach` of a new
// VM does.
func (h *fakeHost) attach(vip netip.Addr, dev string) {
	h.Lock()
	defer h.Unlock()
	h.Claim(vip)
	h.engine.LocalLocked(vip, dev)
}

func (h *fakeHost) Tell(string, gossip.Record) error { return nil } // one table for all

func (h *fakeHost) Record(vip netip.Addr) (gossip.Record, bool) { return h.lab.table.get(vip) }

func (h *fakeHost) Member(name string) (netip.Addr, bool) {
	if m := h.lab.lookup(name); m != nil {
		return m.addr, true
	}
	return netip.Addr{}, false
}

func (h *fakeHost) Peer(addr netip.Addr) string {
	h.lab.mu.Lock()
	defer h.lab.mu.Unlock()
	for name, m := range h.lab.hosts {
		if m.addr == addr.Unmap() && name != h.name {
			return name
		}
	}
	return ""
}

func (h *fakeHost) Dial(ctx context.Context, member string, timeout time.Duration) (net.Conn, time.Duration, error) {
	to := h.lab.lookup(member)
	if to == nil {
		return nil, 0, ErrNotAlive
	}
	d := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(h.addr, 0))}
	t0 := time.Now()
	conn, err := d.DialContext(ctx, "tcp", to.ln.Addr().String())
	return conn, time.Since(t0), err
}

func (h *fakeHost) TunnelState(string) string { return "fake" }

func (h *fakeHost) AddRoute(r route.Route) error {
	h.routeMu.Lock()
	h.added = append(h.added, r)
	h.routeMu.Unlock()
	return nil
}

func (h *fakeHost) Reconcile() {
	h.Lock()
	h.engine.ReconcileLocked()
	h.routes, _ = h.engine.RoutesLocked()
	h.Unlock()
	h.reconciles.Add(1)
}

func (h *fakeHost) ReconcileFor(time.Time) { h.Reconcile() }

func (h *fakeHost) Kick() {
	h.kicks.Add(1)
	go func() {
		defer h.kicks.Done()
		h.Reconcile()
	}()
}

func (h *fakeHost) HoldTunnelWrites() func() { return func() {} }

// fakeDevice is the cache device: the test hands packets to its sinks as
// the interceptor's reader would.
type fakeDevice struct {
	mu    sync.Mutex
	sinks map[netip.Addr]cache.Sink
}

func (d *fakeDevice) Name() string { return "vmrc0" }

func (d *fakeDevice) Attach(vip netip.Addr, s cache.Sink) {
	d.mu.Lock()
	d.sinks[vip] = s
	d.mu.Unlock()
}

func (d *fakeDevice) Detach(vip netip.Addr, s cache.Sink) {
	d.mu.Lock()
	if d.sinks[vip] == s {
		delete(d.sinks, vip)
	}
	d.mu.Unlock()
}

func (d *fakeDevice) Barrier(time.Duration) error { return nil }

// take hands pkt to vip's sink, and says whether there was one (else the
// interceptor counts it unclaimed).
func (d *fakeDevice) take(vip netip.Addr, pkt []byte) bool {
	d.mu.Lock()
	s := d.sinks[vip]
	d.mu.Unlock()
	if s == nil {
		return false
	}
	s.Take(pkt)
	return true
}

// fakeLinks: VM interfaces whose carrier the test sets, every VM's MAC
// known, deliveries recorded per interface.
type fakeLinks struct {
	mu        sync.Mutex
	carrier   map[string]bool
	delivered map[string][][]byte
	announce  map[string]chan xenhook.Announcement
}

func newFakeLinks() *fakeLinks {
	return &fakeLinks{carrier: map[string]bool{}, delivered: map[string][][]byte{}, announce: map[string]chan xenhook.Announcement{}}
}

var testMAC = net.HardwareAddr{2, 0, 0, 0, 0, 1}

func (l *fakeLinks) setCarrier(dev string, up bool) {
	l.mu.Lock()
	l.carrier[dev] = up
	l.mu.Unlock()
}

func (l *fakeLinks) Carrier(dev string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.carrier[dev]
}

func (l *fakeLinks) NeighborMAC(string, netip.Addr) (net.HardwareAddr, bool) { return testMAC, true }

func (l *fakeLinks) ResolveMAC(string, netip.Addr, netip.Addr, time.Duration) (net.HardwareAddr, error) {
	return testMAC, nil
}

func (l *fakeLinks) OpenDelivery(dev string) (Delivery, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.carrier[dev] {
		return nil, fmt.Errorf("%s: no such interface", dev)
	}
	return &fakeDelivery{links: l, dev: dev}, nil
}

func (l *fakeLinks) WatchAnnouncements(ctx context.Context, dev string, fn func(xenhook.Announcement)) error {
	l.mu.Lock()
	ch := l.announce[dev]
	if ch == nil {
		ch = make(chan xenhook.Announcement, 1)
		l.announce[dev] = ch
	}
	l.mu.Unlock()
	for {
		select {
		case <-ctx.Done():
			return nil
		case an := <-ch:
			fn(an)
		}
	}
}

func (l *fakeLinks) OpenFence(string, netip.Addr, net.HardwareAddr) (Fence, error) {
	return instantFence{}, nil
}

// deliveredTo returns what reached the VM behind dev, in order.
func (l *fakeLinks) deliveredTo(dev string) [][]byte {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.delivered[dev])
}

type fakeDelivery struct {
	links *fakeLinks
	dev   string
}

func (d *fakeDelivery) SetMAC(net.HardwareAddr) error { return nil }
func (d *fakeDelivery) Close() error                  { return nil }

// Write fails once the interface has no carrier, as a packet socket's
// write fails on an interface gone or down.
func (d *fakeDelivery) Write(pkt []byte) error {
	d.links.mu.Lock()
	defer d.links.mu.Unlock()
	if !d.links.carrier[d.dev] {
		return fmt.Errorf("deliver on %s: network is down", d.dev)
	}
	d.links.delivered[d.dev] = append(d.links.delivered[d.dev], slices.Clone(pkt))
	return nil
}

// instantFence resolves every gateway at once: no packet ever waits.
type instantFence struct{}

func (instantFence) Resolve(netip.Addr, bool) (bool, error) { return true, nil }
func (instantFence) Unresolve(netip.Addr)                   {}
func (instantFence) Reach()                                 {}
func (instantFence) MakeRoom()                              {}

// udpTo is an IPv4 UDP datagram to vip from 100.100.20.3, numbered n in
// its payload.
func udpTo(vip netip.Addr, n int) []byte {
	p := make([]byte, 32)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], 32)
	p[8] = 64
	p[9] = 17
	copy(p[12:16], []byte{100, 100, 20, 3})
	v := vip.As4()
	copy(p[16:20], v[:])
	binary.BigEndian.PutUint16(p[20:], 5001)
	binary.BigEndian.PutUint16(p[22:], 5201)
	binary.BigEndian.PutUint16(p[24:], 12)
	binary.BigEndian.PutUint32(p[28:], uint32(n))
	return p
}

// numbers returns the numbers of the datagrams udpTo made.
func numbers(pkts [][]byte) []int {
	out := make([]int, len(pkts))
	for i, p := range pkts {
		out[i] = int(binary.BigEndian.Uint32(p[28:]))
	}
	return out
}

// eventually polls cond every millisecond until it holds or the generous
// deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
