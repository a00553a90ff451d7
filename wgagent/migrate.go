package wgagent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
	"github.com/vmroam/vmroam/wgagent/route"
	"github.com/vmroam/vmroam/xenhook"
)

// Route metrics of the cache device: the standby route of a local VIP is
// worse than the VM's own route, so the kernel fails over to the cache by
// itself the instant the VM's interface vanishes; the diversion route beats
// every VM route (ours, metric 1, and Xen's vif-route, metric 2).
const (
	metricDivert  = 0
	metricStandby = 100
)

// divertMetric is metricDivert for vip's family. IPv6 has no metric 0: the
// kernel stores 0 as 1024, which every VM route and the standby route
// beat, so IPv6 VIPs were never diverted while Xen's route (metric 2) was
// there, and their packets went on to the paused or the resuming VM (15,000
// datagrams out of order in 5 moves onto the client's host). There the
// diversion takes metric 1, that of this host's own VIP route: the two are
// never wanted at once, and a move between them is one replace.
func divertMetric(vip netip.Addr) int {
	if vip.Is6() {
		return metricLocalVIP
	}
	return metricDivert
}

// anycastGateway is the address every VM interface carries (DESIGN.md).
var anycastGateway = netip.MustParseAddr("169.254.0.1")

// vipCtl is the data path of one VIP that is local here or moving through
// here. Its mutex guards everything below; Take runs on the interceptor's
// reader goroutine and must not block or take the agent's lock.
type vipCtl struct {
	a   *Agent
	vip netip.Addr

	mu      sync.Mutex
	state   vipState
	source  bool // this host is (was) the VM's old host
	dev     string
	mac     net.HardwareAddr
	queue   *cache.Queue // source: the cache; destination: held packets
	stream  *cache.Queue // destination: packets from the handover stream
	orderer *cache.Orderer
	stop    chan struct{}
	rec     control.Migration
	flush   cache.FlushStats // what the handover stream carried, for the metrics
	tl      *cache.Timeline  // the migration's packets per ms; nil outside one
	started time.Time        // when it left stateLocal
	// byCarrier: the suspend came from the interface losing carrier, so
	// carrier coming back (before any claim) means the VM stayed.
	byCarrier bool
	// fenceVia: while valid, the VIP routes to the VM through this fence
	// gateway while the last packets the cache device took are delivered
	// (see fence).
	fenceVia netip.Addr
	// lostInRestart: restored from the data dir at start while its VM's
	// interface had no carrier, so what it cached before is gone (faults.go).
	lostInRestart bool
	// undiverted: the linger is over; the VIP routes to its new owner
	// while the stream takes the cache's last packets (endLinger).
	undiverted bool
}

func (a *Agent) newQueue() *cache.Queue { return cache.NewQueue(a.live().CacheLimits, a.budget) }

// Take queues a packet the cache device read for this VIP.
func (c *vipCtl) Take(pkt []byte) {
	c.mu.Lock()
	q, state, delivering := c.queue, c.state, c.orderer != nil
	c.mu.Unlock()
	if reason := q.Push(pkt, time.Now()); reason != "" {
		c.a.dropOnce(c, reason)
	}
	if state == stateLocal && !delivering {
		// The standby route was used: the VM's interface went away
		// before the agent heard of it.
		c.a.signalStandby(c.vip)
	}
}

// dropOnce logs the first drop of a migration, not every one.
func (a *Agent) dropOnce(c *vipCtl, reason cache.DropReason) {
	c.mu.Lock()
	first := c.rec.Dropped == nil
	if first {
		c.rec.Dropped = map[string]uint64{}
	}
	c.mu.Unlock()
	if first {
		a.log.Warn("cache full or expired: dropping packets for this VIP (logged once per migration)", "vip", c.vip, "reason", reason)
	}
}

func (a *Agent) signalStandby(vip netip.Addr) {
	a.standbyMu.Lock()
	a.standbyHits[vip] = true
	a.standbyMu.Unlock()
	a.kick()
}

// localCtl creates the standby controller of a VIP attached here. Called
// with a.mu held.
func (a *Agent) localCtl(vip netip.Addr, dev string) *vipCtl {
	if a.intercept == nil {
		return nil
	}
	c := a.ctls[vip]
	if c == nil {
		return a.addCtlLocked(vip, dev, vipPhase{state: stateLocal})
	}
	c.mu.Lock()
	c.dev = dev
	c.mu.Unlock()
	return c
}

// addCtlLocked registers a new controller for vip in phase p and gives it
// the packets the cache device reads for vip. a.mu held.
func (a *Agent) addCtlLocked(vip netip.Addr, dev string, p vipPhase) *vipCtl {
	c := &vipCtl{a: a, vip: vip, dev: dev, state: p.state, byCarrier: p.byCarrier, queue: a.newQueue()}
	a.ctls[vip] = c
	a.intercept.Attach(vip, c)
	return c
}

// forgetCtlLocked drops c and its sink: what the cache device reads for
// c's VIP from now on is unclaimed. a.mu held.
func (a *Agent) forgetCtlLocked(c *vipCtl) {
	if a.ctls[c.vip] == c {
		delete(a.ctls, c.vip)
	}
	a.intercept.Detach(c.vip, c)
}

// disownLocked gives up this host's claim on vip: to the claimer's record
// to (a handover), or, if to names no owner, to nobody (released). a.mu
// held.
func (a *Agent) disownLocked(vip netip.Addr, to gossip.Record) {
	delete(a.attached, vip)
	a.dirty = true
	if to.Owner == "" {
		a.cluster.Release(vip)
	} else {
		a.cluster.Assert(to)
	}
}

// ctlLocked finds the controller of a VIP attached here. a.mu held.
func (a *Agent) ctlLocked(vip netip.Addr) (*vipCtl, error) {
	if c := a.ctls[vip]; c != nil {
		return c, nil
	}
	return nil, fmt.Errorf("%w: %s is not attached here", control.ErrBadRequest, vip)
}

// suspendLocked starts caching a local VIP's packets. Called with a.mu held.
func (a *Agent) suspendLocked(vip netip.Addr, why string) error {
	c, err := a.ctlLocked(vip)
	if err != nil {
		return err
	}
	_, err = a.onLocked(c, evSuspend, why)
	return err
}

// abortLocked gives a cached VIP back to its VM here, delivering the queue
// in order first. Called with a.mu held.
func (a *Agent) abortLocked(vip netip.Addr, why string) error {
	c, err := a.ctlLocked(vip)
	if err != nil {
		return err
	}
	_, err = a.onLocked(c, evAbort, why)
	return err
}

// onLocked feeds ev to c's state machine (vipstate.go) and performs the
// action it returns, except those that need the caller's context (stream,
// hold, hand-back, forget, wait), which it only returns. Called with a.mu
// held and c.mu not.
func (a *Agent) onLocked(c *vipCtl, ev vipEvent, why string) (vipAction, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	prev, act := c.stepLocked(ev)
	switch act {
	case actRefuse:
		if ev == evAbort {
			return act, fmt.Errorf("%w: %s is %s; only a caching VIP can be aborted", control.ErrBadRequest, c.vip, prev)
		}
		return act, fmt.Errorf("%w: %s is %s here: cannot %s", control.ErrBadRequest, c.vip, prev, ev)
	case actCache:
		a.beginLocked(c, why)
	case actStream:
		if prev == stateLocal {
			a.beginLocked(c, why) // the claim is the suspend
		}
	case actDeliver:
		if prev == stateCaching {
			a.log.Info("migration aborted: delivering the cache to the VM here", "vip", c.vip, "why", why, "queued", c.queue.Len())
			c.rec.Aborted = true
		}
		a.startDeliveryLocked(c, c.queue, a.newQueue(), true)
	case actDrop:
		n := c.queue.Discard()
		a.log.Warn("nobody claimed the VIP within the cache's max age: dropping its queue and releasing it", "vip", c.vip, "dropped", n)
		c.rec.TimedOut = true
		c.rec.Done = timePtr(time.Now())
		a.finishLocked(c, migrationQueues{cache: c.queue})
		a.forgetCtlLocked(c)
		a.disownLocked(c.vip, gossip.Record{})
	}
	if act != actNone {
		a.log.Debug("migration step", "vip", c.vip, "event", ev, "from", prev, "to", c.state, "action", act)
	}
	return act, nil
}

// stepLocked moves c's state machine by ev. c.mu held.
func (c *vipCtl) stepLocked(ev vipEvent) (prev vipState, act vipAction) {
	prev = c.state
	next, act := step(vipPhase{state: c.state, byCarrier: c.byCarrier}, ev)
	c.state, c.byCarrier = next.state, next.byCarrier
	return prev, act
}

// beginLocked records the start of a migration away from this host. Both
// locks held.
func (a *Agent) beginLocked(c *vipCtl, why string) {
	c.source = true
	c.started = time.Now()
	at := a.attached[c.vip]
	c.rec = control.Migration{ID: a.migrationIDLocked(c.vip, at.Epoch), VIP: c.vip.String(), From: a.cfg.Name, Epoch: at.Epoch, Suspend: timePtr(c.started), Role: metrics.RoleSource}
	a.metrics.MigrationStarted(metrics.RoleSource)
	c.tl = cache.NewTimeline(c.started)
	c.queue.Record(c.tl, cache.SeriesCached, cache.SeriesFlushed)
	if m, ok := cache.NeighborMAC(c.dev, c.vip); ok {
		c.mac = m
	} else if len(at.MAC) == 6 {
		c.mac = at.MAC
	}
	a.signalCachingLocked()
	a.log.Info("VM suspended: caching its packets", "vip", c.vip, "dev", c.dev, "why", why)
}

// startDeliveryLocked runs an orderer that writes stream (then direct)
// packets to the VM and, once drained, hands the VIP back to the kernel.
// The caller holds c.mu.
func (a *Agent) startDeliveryLocked(c *vipCtl, stream, direct *cache.Queue, closed bool) {
	c.state = stateHolding
	c.stream, c.queue = stream, direct
	c.stop = make(chan struct{})
	write, prepareWriter, closeWriter := c.writer()
	o := &cache.Orderer{Stream: stream, Direct: direct, Settle: a.live().CacheSettle, Write: write, Timeline: c.tl}
	c.orderer = o
	if c.tl != nil {
		into := cache.SeriesReceived
		if c.source { // an abort: the stream is this host's cache
			into = cache.SeriesCached
		}
		stream.Record(c.tl, into, cache.SeriesNone)
		direct.Record(c.tl, cache.SeriesHeld, cache.SeriesNone)
	}
	if closed {
		o.Closed()
	}
	stop := c.stop
	// An arrival waits for what Config.Activation names; a VM that stays
	// here (abort, a route flap) runs already and needs its carrier only.
	mode := ActivationCarrier
	if !closed {
		mode = a.live().Activation
	}
	if mode != ActivationAnnounce {
		o.SetCarrier(hasCarrier(c.dev))
		a.watchCarrier(c.dev, o)
	}
	if mode != ActivationCarrier {
		a.bg.Add(1)
		go a.watchAnnouncements(c, o, stop)
	}
	a.bg.Add(2)
	go func() {
		defer a.bg.Done()
		defer closeWriter() // only Run writes
		prepareWriter()
		if err := o.Run(stop); err != nil {
			a.log.Error("delivering cached packets", "vip", c.vip, "err", err)
		}
	}()
	go func() {
		defer a.bg.Done()
		a.watchDelivery(c, o, stop)
	}()
}

// watchAnnouncements opens the gate of o when the arriving VM announces
// itself on its interface (gratuitous ARP, RARP, unsolicited NA), until
// stop is closed.
func (a *Agent) watchAnnouncements(c *vipCtl, o *cache.Orderer, stop chan struct{}) {
	defer a.bg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
		case <-ctx.Done():
		}
		cancel()
	}()
	c.mu.Lock()
	dev := c.dev
	c.mu.Unlock()
	err := xenhook.WatchAnnouncements(ctx, dev, func(an xenhook.Announcement) {
		if c.activate(o, an) {
			a.log.Debug("arriving VM announced itself", "vip", c.vip, "dev", dev, "kind", an.Kind, "mac", an.MAC.String(), "ip", an.IP)
		}
	})
	if err != nil {
		a.log.Debug("watching for the VM's announcements", "vip", c.vip, "dev", dev, "err", err)
	}
}

// activate opens o's gate for an arriving VM that announced itself with
// an, learning its MAC if unknown; it says whether an is the arrival's
// activation (the first sign that the VM runs).
func (c *vipCtl) activate(o *cache.Orderer, an xenhook.Announcement) (first bool) {
	c.mu.Lock()
	if len(c.mac) != 6 {
		c.mac = an.MAC
	}
	first = c.rec.Activation == "" && o.Stats().CarrierUp.IsZero()
	if first {
		c.rec.Activation = an.Kind
	}
	c.mu.Unlock()
	o.SetCarrier(true)
	return first
}

// writer returns the delivery function; prepare, which opens the packet
// socket ahead of the first packet if the VM's interface is there (else
// the first write opens it); and closeWriter, to call once no write can
// come. All three are for the orderer's goroutine only.
func (c *vipCtl) writer() (write func([]byte) error, prepare, closeWriter func()) {
	var d *cache.Deliverer
	var mac net.HardwareAddr // the VM's, once known
	open := func() error {
		if d != nil {
			return nil
		}
		c.mu.Lock()
		dev := c.dev
		c.mu.Unlock()
		var err error
		if d, err = cache.NewDeliverer(dev); err == nil && mac != nil {
			err = d.SetMAC(mac)
		}
		return err
	}
	closeWriter = func() {
		if d != nil {
			d.Close()
			d = nil
		}
	}
	prepare = func() { open() }
	write = func(pkt []byte) error {
		if err := open(); err != nil {
			return err
		}
		if mac == nil {
			c.mu.Lock()
			dev, m := c.dev, c.mac
			c.mu.Unlock()
			if len(m) != 6 {
				learnt, ok := cache.NeighborMAC(dev, c.vip)
				switch {
				case ok:
					m = learnt
				case c.vip.Is4():
					var err error
					if m, err = cache.ResolveMAC(dev, c.vip, anycastGateway, time.Second); err != nil {
						return err
					}
				default:
					return fmt.Errorf("no MAC known for %s on %s", c.vip, dev)
				}
			}
			if err := d.SetMAC(m); err != nil {
				return err
			}
			mac = m
		}
		err := d.Write(pkt)
		if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENODEV) {
			// The interface was made anew since the socket opened (a
			// vif that flapped): open on the new one.
			closeWriter()
			if err := open(); err != nil {
				return err
			}
			err = d.Write(pkt)
		}
		return err
	}
	return write, prepare, closeWriter
}

// watchDelivery waits until the orderer drained what the migration brought,
// then routes the VIP to the VM directly, and stops the orderer after a
// grace period for packets that were already on their way to the cache.
func (a *Agent) watchDelivery(c *vipCtl, o *cache.Orderer, stop chan struct{}) {
	select {
	case <-stop:
		return
	case <-o.Done():
	}
	t0 := time.Now()
	waited, quiet, steps := a.fence(c, o)
	fenced := time.Since(t0)
	a.mu.Lock()
	c.mu.Lock()
	st := o.Stats()
	c.rec.Delivered, c.rec.Late = st.Delivered, st.Late
	if !st.FirstDelivery.IsZero() {
		c.rec.FirstDelivery = timePtr(st.FirstDelivery)
	}
	if !st.CarrierUp.IsZero() {
		c.rec.CarrierUp = timePtr(st.CarrierUp)
		if c.rec.Activation == "" {
			c.rec.Activation = "carrier"
		}
	}
	if c.queue != nil {
		qs := c.queue.Stats()
		c.rec.Held = qs.Packets
		c.rec.Dropped = dropMap(qs, c.stream)
		if c.source && c.stream != nil { // an abort: the stream is the cache
			ss := c.stream.Stats()
			c.rec.Cached, c.rec.CachedBytes = ss.Packets, ss.Bytes
		}
	}
	c.stepLocked(evDrained)
	c.fenceVia = netip.Addr{}
	c.mu.Unlock()
	a.mu.Unlock()
	a.reconcile()
	select {
	case <-stop:
	case <-time.After(300 * time.Millisecond):
	}
	a.mu.Lock()
	c.mu.Lock()
	a.unwatchCarrier(c.dev, o)
	if c.stop == stop {
		close(stop)
		c.stop = nil
	}
	if c.orderer == o {
		c.orderer = nil
		// Whatever the orderer did not take goes to the new standby
		// queue's consumer: the flap path below delivers it.
		c.queue = a.newQueue()
	}
	after := o.Stats().Delivered - st.Delivered
	c.rec.Delivered += after // as the timeline counts them
	c.rec.Done = timePtr(time.Now())
	if c.source { // an abort: the stream is the cache
		a.finishLocked(c, migrationQueues{cache: o.Stream, held: o.Direct, orderer: o})
	} else {
		a.finishLocked(c, migrationQueues{stream: o.Stream, held: o.Direct, orderer: o})
	}
	c.mu.Unlock()
	a.mu.Unlock()
	// Packets the cache still delivered after the hand-back were routed
	// to it before, yet went out after newer ones the kernel sent: each
	// is likely out of order at the VM.
	lv := slog.LevelInfo
	if after > 0 || !quiet {
		lv = slog.LevelWarn
	}
	a.log.Log(context.Background(), lv, "migration delivered", "vip", c.vip, "delivered", st.Delivered,
		"hand_back", fenced, "fence_wait", waited, "fence_steps", steps, "cache_quiet", quiet, "delivered_after_hand_back", after)
}

// Fence gateways: on-link addresses on a VM's interface that nobody
// answers for. Routing a VIP through one makes the kernel queue its packets
// while it resolves the gateway, until the agent says where it is. There
// are two per family: the hand-back moves the route from one to the other
// (fence).
var (
	fenceGateways4 = [2]netip.Addr{netip.MustParseAddr("169.254.0.2"), netip.MustParseAddr("169.254.0.3")}
	fenceGateways6 = [2]netip.Addr{netip.MustParseAddr("fe80::76:6d72"), netip.MustParseAddr("fe80::76:6d73")}
)

func fenceGateways(vip netip.Addr) [2]netip.Addr {
	if vip.Is4() {
		return fenceGateways4
	}
	return fenceGateways6
}

// maxFenceSteps bounds how often the hand-back moves the route from one
// fence gateway to the other before it lets the kernel's queue go while
// new packets pass (fence).
const maxFenceSteps = 8

// fence hands the VIP from the cache back to the kernel without letting a
// packet overtake one still inside the cache: it points the VIP's route at
// the VM through an unresolved gateway (the kernel queues new packets in
// order), waits until the cache has delivered everything it took, then
// resolves the gateway to the VM's MAC, which releases the kernel's queue.
// Without a known MAC it does nothing and the switch is plain.
//
// The kernel sends a resolved neighbour's queue one packet at a time,
// unlocked in between, while packets from other CPUs already pass: one
// arriving meanwhile overtakes the queue's tail. So a gateway is resolved
// while packets queue for it only once the route has moved to the other,
// unresolved, gateway: what arrives meanwhile waits there. Resolving a
// gateway nothing waits for (the kernel makes its neighbour entry for the
// first packet) releases nothing, so nothing can be overtaken: that ends
// the hand-back, as soon as a step finds no packet that came during the
// one before. Traffic in bursts (iperf3 sends one every millisecond) leaves
// such a gap within a few steps of ~0.2 ms.
func (a *Agent) fence(c *vipCtl, o *cache.Orderer) (waited time.Duration, quiet bool, steps int) {
	c.mu.Lock()
	dev, mac := c.dev, c.mac
	c.mu.Unlock()
	if len(mac) != 6 {
		if m, ok := cache.NeighborMAC(dev, c.vip); ok {
			mac = m
		} else {
			return 0, false, 0
		}
	}
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return 0, false, 0
	}
	gws := fenceGateways(c.vip)
	fam := netlink.FAMILY_V4
	if c.vip.Is6() {
		fam = netlink.FAMILY_V6
	}
	neigh := func(ip netip.Addr, state int) *netlink.Neigh {
		return &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: fam, State: state, IP: ip.AsSlice(), HardwareAddr: mac}
	}
	routeVia := func(gw netip.Addr) {
		a.mu.Lock()
		c.mu.Lock()
		c.fenceVia = gw // so a reconcile keeps the fence route
		c.mu.Unlock()
		a.mu.Unlock()
		if err := a.routes.Add(route.Route{Dst: hostPrefix(c.vip), Dev: dev, Via: gw, Metric: divertMetric(c.vip)}); err != nil {
			a.log.Warn("fence route", "vip", c.vip, "err", err)
		}
	}
	// resolve resolves gateway gw to the VM; with onlyIdle, only if no
	// packet waits for it, which the kernel decides atomically: it makes
	// the neighbour entry for the first packet, and an exclusive add fails
	// on one that exists.
	resolve := func(gw netip.Addr, onlyIdle bool) (done bool) {
		// With embedded wireguard-go nothing arrives from the tunnel while
		// the tunnel's writes are held.
		release, _ := a.dev.HoldWrites()
		var err error
		if onlyIdle {
			err = netlink.NeighAdd(neigh(gw, netlink.NUD_PERMANENT))
		} else {
			err = netlink.NeighSet(neigh(gw, netlink.NUD_PERMANENT))
		}
		release()
		if onlyIdle && errors.Is(err, unix.EEXIST) {
			return false
		}
		if err != nil {
			a.log.Warn("fence: resolving the fence gateway", "vip", c.vip, "gateway", gw, "err", err)
		}
		return true
	}
	for _, gw := range gws {
		netlink.NeighDel(neigh(gw, 0)) // left resolved by an earlier fence
	}
	// The kernel's queue for an unresolved neighbour is small (208 KiB);
	// make room for the fence's few milliseconds of traffic.
	for _, p := range []string{"/proc/sys/net/ipv4/neigh/" + dev + "/unres_qlen_bytes", "/proc/sys/net/ipv6/neigh/" + dev + "/unres_qlen_bytes"} {
		os.WriteFile(p, []byte("8388608"), 0o644)
	}
	routeVia(gws[0])
	// Nothing new reaches the cache now; wait for what is inside: the
	// barrier says the device's queue is empty of the VIP (a quiet spell
	// alone does not: senders such as iperf3 send in bursts a millisecond
	// apart, and the reader may not have woken for the last one yet),
	// then the orderer must have written all it took.
	// Short is better: the fewer packets queue at the gateway meanwhile,
	// the sooner a step finds none.
	start := time.Now()
	deadline := start.Add(50 * time.Millisecond)
	if err := a.intercept.Barrier(50 * time.Millisecond); err != nil {
		a.log.Warn("fence", "vip", c.vip, "err", err)
	} else {
		for time.Now().Before(deadline) {
			if o.Idle() {
				quiet = true
				break
			}
			time.Sleep(10 * time.Microsecond)
		}
	}
	waited = time.Since(start)
	cur := 0
	for !resolve(gws[cur], steps < maxFenceSteps) {
		next := 1 - cur
		netlink.NeighDel(neigh(gws[next], 0)) // resolved by the step before last
		routeVia(gws[next])
		resolve(gws[cur], false)
		cur = next
		steps++
	}
	// The VIP's own neighbour entry, for after the fence route goes.
	netlink.NeighSet(neigh(c.vip, netlink.NUD_REACHABLE))
	return waited, quiet, steps
}

// finishLocked files the migration record, and its totals from the queues
// it used in the metrics. Both locks held.
func (a *Agent) finishLocked(c *vipCtl, q migrationQueues) {
	if c.rec.VIP == "" {
		return
	}
	a.metrics.MigrationEnded(c.totalsLocked(q))
	a.keepTimelineLocked(c)
	a.history = append(a.history, c.rec)
	if len(a.history) > 100 {
		a.history = a.history[len(a.history)-100:]
	}
	c.rec = control.Migration{}
	c.flush = cache.FlushStats{}
}

// arriveLocked handles `vip attach` of a VIP another host owns: claim it,
// hold its packets here, ask the old owner for its cache, deliver once the
// VM's interface is up. Called with a.mu held; returns the new record.
func (a *Agent) arriveLocked(vip netip.Addr, dev string, old gossip.Record) gossip.Record {
	if prev := a.ctls[vip]; prev != nil {
		prev.mu.Lock()
		if _, act := prev.stepLocked(evArrive); act == actHold && prev.stop != nil {
			// Back here while the move away still forwards stragglers:
			// end that stream; what comes now is this arrival's to hold.
			close(prev.stop)
			prev.stop = nil
		}
		prev.mu.Unlock()
	}
	// The controller takes the VIP's packets before any route leads them
	// to the cache device, so none arrives without a sink.
	holding, _ := step(vipPhase{state: stateNone}, evArrive)
	tl := cache.NewTimeline(time.Now()) // from before the first held packet
	c := a.addCtlLocked(vip, dev, holding)
	// Divert before claiming: senders switch to this host as soon as the
	// claim reaches them, and what they send must be held here, not
	// routed back to the old owner through the tunnel.
	if err := a.routes.Add(route.Route{Dst: hostPrefix(vip), Dev: a.intercept.Name(), Metric: divertMetric(vip)}); err != nil {
		a.log.Warn("holding route", "vip", vip, "err", err)
	}
	r := a.cluster.Claim(vip)
	claimed := time.Now()
	req := cache.Request{VIP: vip, Epoch: r.Epoch, Claimer: a.cfg.Name, Ticks: true}
	pc := a.takePrepared(vip, old.Owner)
	var stream *cache.Queue
	var offer cache.Offer
	if pc != nil {
		// The copies the old owner sent ahead are the stream's start.
		stream, req.Resume, offer = pc.preview.Ask(vip, r.Epoch)
		// Now, not in fetchHandover: on a busy host its goroutine waited
		// 1-4 ms for a CPU, a tenth of the whole handover across a WAN.
		pc.ask(req)
	} else {
		stream = a.newQueue()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(offer.MAC) == 6 {
		c.mac = offer.MAC
	}
	c.started = claimed
	c.source = false
	c.rec = control.Migration{ID: a.migrationIDLocked(vip, old.Epoch), VIP: vip.String(), From: old.Owner, To: a.cfg.Name, Epoch: r.Epoch, Claim: timePtr(c.started), Role: metrics.RoleDestination}
	a.metrics.MigrationStarted(metrics.RoleDestination)
	c.tl = tl
	// c.queue has held what arrived since the holding route went in.
	a.startDeliveryLocked(c, stream, c.queue, false)
	o, stop := c.orderer, c.stop
	a.log.Info("VM arriving: holding its packets and asking the old host for its cache", "vip", vip, "from", old.Owner, "epoch", r.Epoch, "copies_here", stream.Len())
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		a.fetchHandover(c, old.Owner, req, pc, stream, o, stop)
	}()
	return r
}

// fetchHandover asks the old owner for its cache, on the prepared
// connection pc if there is one (req already sent on it), and feeds the
// stream queue. Whatever happens, it ends by telling the orderer the source
// is closed.
func (a *Agent) fetchHandover(c *vipCtl, from string, req cache.Request, pc *preparedConn, stream *cache.Queue, o *cache.Orderer, stop chan struct{}) {
	defer o.Closed()
	var conn net.Conn
	var rd *cache.Reader
	var first cache.Frame // of the answer
	var rtt, dialRTT time.Duration
	var copies uint64 // sent ahead on the prepared connection
	for {
		asked := pc
		prepared := pc != nil
		if prepared {
			conn, dialRTT = pc.conn, pc.dialRTT
			pc = nil
		} else if conn, dialRTT = a.connectHandover(c, from, stop); conn == nil {
			a.noteCacheLost(c, from, stop, "no connection", nil)
			return
		}
		// Long enough for a source that makes the request wait; the
		// header shortens it (see handoverIdle).
		if ic, ok := conn.(*idleConn); ok {
			// Prepared: its preview may be waiting in a read already.
			ic.setLimit(handoverWait + handoverIdle)
			ic.SetReadDeadline(time.Now().Add(handoverWait + handoverIdle))
		} else {
			conn = newIdleConn(conn, handoverWait+handoverIdle)
		}
		released := make(chan struct{})
		go func(conn net.Conn) {
			select {
			case <-stop:
				conn.Close()
			case <-released:
			}
		}(conn)
		var err error
		switch {
		case asked == nil:
			sent := time.Now()
			if err = cache.SendRequest(conn, req); err == nil {
				rd = cache.NewReader(conn)
				if first, err = rd.Next(); err != nil {
					err = fmt.Errorf("handover: no answer: %w", err)
				}
				rtt = time.Since(sent)
			}
		case asked.askErr != nil:
			err = asked.askErr
		default:
			var at time.Time
			rd, first, at, err = asked.preview.Await()
			rtt = at.Sub(asked.asked)
		}
		if err == nil {
			defer func() {
				close(released)
				conn.Close()
			}()
			if prepared {
				copies = asked.preview.Copies()
				a.log.Info("handover: requested on the prepared connection", "vip", c.vip, "from", from, "rtt", rtt, "copies_ahead", copies)
			}
			break
		}
		close(released)
		conn.Close()
		select {
		case <-stop:
			return
		default:
		}
		if prepared {
			// What came ahead stays in the stream: ask from there, once
			// the preview has taken all it will (the close ends it).
			asked.preview.Await()
			req.Resume = asked.preview.Resume()
			a.log.Info("handover: the prepared connection failed; connecting anew", "vip", c.vip, "from", from, "err", err, "resume", req.Resume.Seq)
			continue
		}
		if req.Ticks && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			// An agent from before ticks closes on a request with flags.
			a.log.Warn("handover: the old host does not know ticks (an older vmroam?); asking again without, so a loss in the stream may reorder", "vip", c.vip, "from", from)
			req.Ticks = false
			continue
		}
		a.noteCacheLost(c, from, stop, "handover request", err)
		return
	}
	o.ExpectTicks(req.Ticks)
	// The answer's round trip is the path's, unless the source made the
	// request wait (see handoverWait); the connect's is one too.
	o.Settle = max(a.live().CacheSettle, min(rtt, dialRTT)+2*time.Millisecond)
	st, err := cache.Receiver{Queue: stream, OnTick: o.Tick,
		OnHeader: func(h cache.Header) error {
			if h.VIP != req.VIP || h.Epoch != req.Epoch {
				// A source that answers another request than ours:
				// its packets are not this VM's.
				return fmt.Errorf("%w: the old host sent %s at epoch %d for a request of %s at epoch %d",
					cache.ErrMalformed, h.VIP, h.Epoch, req.VIP, req.Epoch)
			}
			if ic, ok := conn.(*idleConn); ok && req.Ticks {
				ic.setLimit(handoverIdle)
			}
			o.Tick(0) // the source's tick clock starts with the header
			c.mu.Lock()
			if len(h.MAC) == 6 {
				c.mac = h.MAC
			}
			c.rec.FlushStart = timePtr(time.Now())
			c.mu.Unlock()
			return nil
		},
		OnEnd: func(e cache.End) {
			c.mu.Lock()
			c.rec.FlushEnd = timePtr(time.Now())
			c.rec.Lost += e.Dropped
			c.mu.Unlock()
			o.Ended()
		},
	}.Receive(rd, first)
	st.Flushed += copies
	st.Ahead = copies
	c.mu.Lock()
	c.rec.Flushed, c.rec.Forwarded, c.rec.Ahead = st.Flushed, st.Forwarded, st.Ahead
	c.flush = st
	c.mu.Unlock()
	if err != nil {
		a.noteCacheLost(c, from, stop, "handover stream ended early", err)
	}
}

// tunnelState describes this host's WireGuard peer for a member, for a log
// line: when a handover cannot connect, whether the tunnel has a session
// and moves bytes tells a tunnel problem from a listener's.
func (a *Agent) tunnelState(member string) string {
	m, ok := a.member(member)
	if !ok || m.MetaErr != nil {
		return "no such member"
	}
	key := wgtypes.Key(m.Meta.PublicKey)
	dev, err := a.dev.State()
	if err != nil {
		return err.Error()
	}
	for _, p := range dev.Peers {
		if p.PublicKey != key {
			continue
		}
		hs := "none"
		if !p.LastHandshakeTime.IsZero() {
			hs = time.Since(p.LastHandshakeTime).Round(time.Millisecond).String() + " ago"
		}
		return fmt.Sprintf("endpoint %v, last handshake %s, rx %d B, tx %d B, allowed %v", p.Endpoint, hs, p.ReceiveBytes, p.TransmitBytes, p.AllowedIPs)
	}
	return "no WireGuard peer"
}

// connectHandover connects to the old owner's handover port, retrying
// until it answers, stops being alive, the cache's age limit passes or
// stop closes; nil if it gave up.
func (a *Agent) connectHandover(c *vipCtl, from string, stop chan struct{}) (net.Conn, time.Duration) {
	deadline := time.Now().Add(a.live().CacheLimits.MaxAge)
	var warned time.Time // held packets wait: say why, every few seconds
	for attempt := 1; ; attempt++ {
		// Short attempts: a lost SYN is retried by a new dial sooner than
		// by TCP's own 1 s backoff.
		conn, rtt, err := a.dialHandover(context.Background(), from, 300*time.Millisecond)
		if err == nil {
			lv := slog.LevelDebug
			if time.Since(c.started) > time.Second {
				lv = slog.LevelWarn // worth knowing: every held packet waits
			}
			a.log.Log(context.Background(), lv, "handover: connected", "vip", c.vip, "from", from, "after", time.Since(c.started))
			return conn, rtt
		}
		if errors.Is(err, errNotAlive) {
			a.log.Warn("old owner is not alive: delivering what is held without its cache", "vip", c.vip, "from", from)
			return nil, 0
		}
		if waited := time.Since(c.started); waited > time.Second && time.Since(warned) > 3*time.Second {
			warned = time.Now()
			a.log.Warn("handover: cannot connect to the old host yet; its VM's packets are held here", "vip", c.vip, "from", from,
				"waited", waited.Round(time.Millisecond), "attempts", attempt, "err", err, "tunnel", a.tunnelState(from))
		} else {
			a.log.Debug("handover: connect", "vip", c.vip, "from", from, "err", err)
		}
		if time.Now().After(deadline) {
			a.log.Error("handover: old owner unreachable; its cache is lost", "vip", c.vip, "from", from, "err", err)
			return nil, 0
		}
		select {
		case <-stop:
			return nil, 0
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// member returns the gossip member called name.
func (a *Agent) member(name string) (gossip.Member, bool) {
	for _, m := range a.cluster.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return gossip.Member{}, false
}

// memberOverlay returns the overlay address of the member called name, and
// whether it is alive with readable metadata.
func (a *Agent) memberOverlay(name string) (netip.Addr, bool) {
	m, ok := a.member(name)
	return m.Meta.Address, ok && m.MetaErr == nil && m.State == gossip.MemberAlive
}

// handoverWait bounds how long a claim waits for a delivery under way here.
const handoverWait = 10 * time.Second

// handoverPeer returns the name of the current WireGuard peer whose
// overlay address is addr, "" if none.
func (a *Agent) handoverPeer(addr netip.Addr) string {
	if m := a.handoverPeers.Load(); m != nil {
		return (*m)[addr.Unmap()]
	}
	return ""
}

// fromPeer says whether a handover connection comes from the overlay
// address of a current WireGuard peer (an alive or suspect member, admitted
// by the allowlist if there is one). Anything else is refused before a
// byte is read, counted and logged (at most once a second): a VM, which
// reaches hosts' overlay addresses through the tunnel from its VIP, a
// local process (Linux delivers local connections to a socket bound to any
// device), or a member that is not a peer. The listener is bound to the
// WireGuard interface, so connections from the underlay do not get here.
func (a *Agent) fromPeer(conn net.Conn) bool {
	remote, err := netip.ParseAddrPort(conn.RemoteAddr().String())
	if err == nil && a.handoverPeer(remote.Addr()) != "" {
		return true
	}
	n := a.handoverRefused.Add(1)
	now := time.Now().UnixNano()
	if last := a.handoverLogged.Load(); now-last >= int64(time.Second) && a.handoverLogged.CompareAndSwap(last, now) {
		a.log.Warn("handover: refused a connection that is not from a WireGuard peer's overlay address",
			"remote", conn.RemoteAddr(), "refused_total", n)
	}
	return false
}

// serveHandovers answers handover requests from other agents.
func (a *Agent) serveHandovers(ln net.Listener) {
	defer a.bg.Done()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		if !a.fromPeer(conn) {
			conn.Close()
			continue
		}
		a.bg.Add(1)
		go func() {
			defer a.bg.Done()
			defer conn.Close()
			switch err := a.handleHandover(conn); {
			case errors.Is(err, errSessionCheck):
				a.log.Debug("handover: a session check", "remote", conn.RemoteAddr())
			case err != nil:
				a.log.Warn("handover", "remote", conn.RemoteAddr(), "err", err)
			}
		}()
	}
}

// handoverTick is how often the old host writes a tick while it lingers
// (cache.Sender.Tick): it bounds how much a tick adds to a flow's
// settle at the new host.
const handoverTick = 2 * time.Millisecond

// errSessionCheck is a handover connection closed before its first frame:
// a peer's check that its WireGuard session carries a round trip
// (checkSession).
var errSessionCheck = errors.New("closed before the first frame: a session check")

func (a *Agent) handleHandover(conn net.Conn) error {
	rd := cache.NewReader(conn)
	f, err := a.readHandoverRequest(conn, rd)
	if errors.Is(err, io.EOF) {
		return errSessionCheck
	}
	if err != nil {
		return err
	}
	w := cache.NewWriter(conn)
	refuse := func(format string, args ...any) error {
		reason := fmt.Sprintf(format, args...)
		w.Refuse(cache.Refuse{Reason: reason})
		w.Flush()
		return errors.New("refused: " + reason)
	}
	var copied cache.Resume // what the prepared connection carried ahead
	if f.Type == cache.FramePrepare {
		if err := a.checkClaimer(conn, f.Prepare.Claimer); err != nil {
			return refuse("%v", err)
		}
		stop, done := make(chan struct{}), make(chan error, 1)
		go func() {
			var err error
			copied, err = a.offerCache(conn, f.Prepare.VIP.Unmap(), stop)
			if err != nil {
				conn.Close() // ends the wait for the request below
			}
			done <- err
		}()
		f, err = a.readHandoverRequest(conn, rd)
		close(stop)
		if oerr := <-done; oerr != nil {
			// The stream is out of step: the claimer connects anew,
			// and asks from what it has.
			return fmt.Errorf("copying the cache ahead: %w", oerr)
		}
		if err != nil {
			return err
		}
	}
	if f.Type != cache.FrameRequest {
		return refuse("expected a request")
	}
	req := f.Request
	a.log.Debug("handover request", "vip", req.VIP, "claimer", req.Claimer, "epoch", req.Epoch)
	if err := a.checkClaimer(conn, req.Claimer); err != nil {
		return refuse("%v", err)
	}

	var c *vipCtl
	asked := time.Now()
	for wait := time.Now().Add(handoverWait); ; {
		a.mu.Lock()
		c = a.ctls[req.VIP]
		at, attached := a.attached[req.VIP]
		if c == nil || !(attached || c.state == stateCaching) || (attached && req.Epoch <= at.Epoch) {
			a.mu.Unlock()
			return refuse("%s is not held here at an epoch below %d", req.VIP, req.Epoch)
		}
		if a.dropLostInRestartLocked(c, req) {
			a.mu.Unlock()
			return refuse("the cache of %s was lost when this agent restarted", req.VIP)
		}
		act, err := a.onLocked(c, evClaim, "claimed by "+req.Claimer)
		if err != nil {
			a.mu.Unlock()
			return refuse("%v", err)
		}
		if act == actStream {
			break
		}
		a.mu.Unlock()
		// actWait: the VM arrived here and moves on before its packets
		// were all delivered; hand over once they are.
		if time.Now().After(wait) {
			return refuse("%s is still being delivered here after %v", req.VIP, handoverWait)
		}
		time.Sleep(10 * time.Millisecond)
	}
	c.mu.Lock()
	c.rec.To = req.Claimer
	c.rec.Epoch = req.Epoch
	c.rec.Claim = timePtr(time.Now())
	q, mac, stop := c.queue, c.mac, make(chan struct{})
	c.stop = stop
	c.mu.Unlock()
	a.disownLocked(req.VIP, gossip.Record{VIP: req.VIP, Owner: req.Claimer, Epoch: req.Epoch})
	a.mu.Unlock()
	// Move the VIP to the new owner's peer while the flush starts: the
	// reconcile takes milliseconds (a tenth of a handover across a WAN)
	// that the new host need not wait for. The end marker waits for it:
	// what our own senders sent before the move is in the cache and
	// flushed ahead of the marker, what they send after it goes straight
	// to the new host, newer than all of it. (An end marker ahead of the
	// move reordered 29-32 packets in every third hybrid move: packets
	// still on the old path overtook the stream.) The Assert kicked the
	// reconcile loop, which may well take the lock before the goroutine
	// below starts (1-7 ms later on a busy host): its run then does the
	// move, and the goroutine's is skipped.
	t0 := time.Now()
	routed := make(chan struct{})
	var reconciled time.Duration
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		a.reconcileFor(t0)
		reconciled = time.Since(t0)
		close(routed)
	}()
	a.log.Debug("handover: streaming", "vip", req.VIP, "queued", q.Len(), "mac", mac.String(), "after", time.Since(asked), "copied_ahead", copied.Seq, "resume", req.Resume.Seq)
	var tick time.Duration
	if req.Ticks {
		tick = handoverTick
	}
	lingerOver, streamDone := a.endLinger(c, stop)
	// The claimer has the copies its request names; and, if it took
	// this connection's copies (it names their cache: it drops the
	// copies of an offer that does not match its claim), also those that
	// were still on their way when it asked, up to copied.
	var from uint64
	if req.Resume.Cache == q.ID() {
		from = req.Resume.Seq
		if copied.Cache == q.ID() {
			from = max(from, copied.Seq)
		}
	}
	st, err := cache.Sender{Queue: q, Header: cache.Header{VIP: req.VIP, Epoch: req.Epoch, MAC: mac}, From: from,
		Linger: a.live().CacheLinger + time.Second, Tick: tick, FlushUntil: routed, Stop: lingerOver}.Send(conn)
	close(streamDone)
	<-routed
	a.log.Debug("handover: sent", "vip", req.VIP, "flush", st.FlushEnd.Sub(st.FlushStart), "total", time.Since(t0), "reconcile", reconciled)
	a.mu.Lock()
	c.mu.Lock()
	c.rec.Flushed, c.rec.Forwarded, c.rec.Ahead = st.Flushed, st.Forwarded, st.Ahead
	c.flush = st
	qs := q.Stats()
	c.rec.Cached, c.rec.CachedBytes = qs.Packets, qs.Bytes
	c.rec.Dropped = dropMap(qs, nil)
	if !st.FlushStart.IsZero() {
		c.rec.FlushStart = timePtr(st.FlushStart)
	}
	if !st.FlushEnd.IsZero() {
		c.rec.FlushEnd = timePtr(st.FlushEnd)
	}
	c.rec.Done = timePtr(time.Now())
	a.finishLocked(c, migrationQueues{cache: q})
	c.mu.Unlock()
	mine := a.ctls[req.VIP] == c
	if mine {
		delete(a.ctls, req.VIP)
	}
	a.mu.Unlock()
	// Routes first, then the sink: a straggler that still reaches the
	// cache device in between is not dropped unclaimed.
	a.reconcile()
	if mine {
		time.Sleep(50 * time.Millisecond)
		if n := q.Len(); n > 0 {
			a.log.Warn("handover: packets reached the old host after the stream closed", "vip", req.VIP, "count", n)
		}
		a.intercept.Detach(req.VIP, c)
	}
	a.log.Info("handover done", "vip", req.VIP, "to", req.Claimer, "flushed", st.Flushed, "ahead", st.Ahead, "forwarded", st.Forwarded, "err", err)
	return err
}

// checkClaimer says why a handover connection cannot be from claimer, if
// it cannot: it must come from the overlay address of that live member,
// its WireGuard peer.
func (a *Agent) checkClaimer(conn net.Conn, claimer string) error {
	remote, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	if addr, alive := a.memberOverlay(claimer); !alive || addr != remote.Addr().Unmap() {
		return fmt.Errorf("%s is not the overlay address of a live member %q", remote.Addr(), claimer)
	}
	if peer := a.handoverPeer(remote.Addr()); peer != claimer {
		return fmt.Errorf("%s is the overlay address of peer %q, not of %q", remote.Addr(), peer, claimer)
	}
	return nil
}

// readHandoverRequest reads the next frame from a peer's connection: its
// request, or the prepare that comes first on a prepared connection. A
// peer may connect long before it asks (Prepare).
func (a *Agent) readHandoverRequest(conn net.Conn, rd *cache.Reader) (cache.Frame, error) {
	remote, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	from := remote.Addr().Unmap()
	wait := 5 * time.Second
	a.prepMu.Lock()
	if a.idleHandovers == nil {
		a.idleHandovers = map[netip.Addr]int{}
	}
	if n := a.idleHandovers[from]; n < maxIdleHandovers {
		wait = prepareTTL
		a.idleHandovers[from] = n + 1
		defer func() {
			a.prepMu.Lock()
			if a.idleHandovers[from]--; a.idleHandovers[from] <= 0 {
				delete(a.idleHandovers, from)
			}
			a.prepMu.Unlock()
		}()
	}
	if a.closing {
		a.prepMu.Unlock()
		return cache.Frame{}, errors.New("agent stopping")
	}
	if a.waiting == nil {
		a.waiting = map[net.Conn]bool{}
	}
	a.waiting[conn] = true
	a.prepMu.Unlock()
	conn.SetReadDeadline(time.Now().Add(wait))
	f, err := rd.Next()
	a.prepMu.Lock()
	delete(a.waiting, conn)
	a.prepMu.Unlock()
	if err != nil {
		return f, fmt.Errorf("read request: %w", err)
	}
	conn.SetReadDeadline(time.Time{})
	return f, nil
}

// reconcileMigrations runs in every reconcile with a.mu held: it acts on
// standby hits, interfaces that vanished or came back, and timeouts.
func (a *Agent) reconcileMigrationsLocked() {
	a.standbyMu.Lock()
	hits := a.standbyHits
	a.standbyHits = map[netip.Addr]bool{}
	a.standbyMu.Unlock()
	now := time.Now()
	for vip, c := range a.ctls {
		c.mu.Lock()
		state, dev, started, delivering := c.state, c.dev, c.started, c.orderer != nil
		c.mu.Unlock()
		_, attached := a.attached[vip]
		up := hasCarrier(dev)
		switch {
		case state == stateLocal && !up && attached:
			a.onLocked(c, evCarrierLost, "interface "+dev+" down or gone")
		case state == stateLocal && hits[vip] && !delivering:
			a.onLocked(c, evStandbyHit, "the standby route took packets")
		case state == stateCaching && up && attached:
			a.onLocked(c, evCarrierBack, "interface "+dev+" has carrier again")
		}
		if state == stateCaching && now.Sub(started) > a.live().CacheLimits.MaxAge {
			a.onLocked(c, evTimeout, "max age")
		}
	}
}

func timePtr(t time.Time) *time.Time { return &t }

// dropMap merges the drop counts of a queue's stats and, if not nil, of
// another queue.
func dropMap(qs cache.Stats, other *cache.Queue) map[string]uint64 {
	m := map[string]uint64{}
	for r, n := range qs.Dropped {
		m[string(r)] += n
	}
	if other != nil {
		for r, n := range other.Stats().Dropped {
			m[string(r)] += n
		}
	}
	return m
}

// watchCarrier tells o when dev's carrier changes, straight from the link
// watcher: the handover time is measured from that moment.
func (a *Agent) watchCarrier(dev string, o *cache.Orderer) {
	a.carrierMu.Lock()
	a.carrierWatch[dev] = o
	a.carrierMu.Unlock()
}

func (a *Agent) unwatchCarrier(dev string, o *cache.Orderer) {
	a.carrierMu.Lock()
	if a.carrierWatch[dev] == o {
		delete(a.carrierWatch, dev)
	}
	a.carrierMu.Unlock()
}

// watchLinks follows link changes: carrier for deliveries waiting on it,
// and a reconcile for everything else (a VM interface gone or down).
func (a *Agent) watchLinks(stop <-chan struct{}) {
	defer a.bg.Done()
	ch := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(ch, stop, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) { a.log.Warn("link watcher", "err", err) },
	}); err != nil {
		a.log.Error("cannot watch links; relying on periodic checks", "err", err)
		return
	}
	for {
		select {
		case <-stop:
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			name := u.Attrs().Name
			up := u.Header.Type != unix.RTM_DELLINK && u.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
			a.carrierMu.Lock()
			o := a.carrierWatch[name]
			a.carrierMu.Unlock()
			if o != nil {
				o.SetCarrier(up)
			}
			a.kick()
		}
	}
}

// hasCarrier reports whether dev exists and has carrier.
func hasCarrier(dev string) bool {
	l, err := netlink.LinkByName(dev)
	return err == nil && l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
}
