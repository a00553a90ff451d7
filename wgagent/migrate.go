package wgagent

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
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
	// interface had no carrier, so what it cached before is gone (restart.go).
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
