package migrate

import (
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
)

// AnycastGateway is the address every VM interface carries (DESIGN.md):
// the agent puts it there, and the engine asks a VM's MAC from it.
var AnycastGateway = netip.MustParseAddr("169.254.0.1")

// vipCtl is the data path of one VIP that is local here or moving through
// here. Its mutex guards everything below; Take runs on the interceptor's
// reader goroutine and must not block or take the agent's lock.
type vipCtl struct {
	e   *Engine
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
	// deliverStop stops the delivery under way (orderer); drained is
	// what it had delivered when it drained the migration's packets.
	deliverStop chan struct{}
	drained     uint64
	// undiverted: the linger is over; the VIP routes to its new owner
	// while the stream takes the cache's last packets (endLinger).
	undiverted bool
	// out is where the delivery under way (orderer) writes: the VM, or,
	// once spilled, a cache (spillLocked); nil outside a delivery.
	out *deliveryOut
	// pipes are the deliveries the VM left while they ran (spilled):
	// each goes on ordering what its migration brings, into queue,
	// until the controller ends (stopPipesLocked). takeInto, if set, is
	// the queue Take feeds instead of queue: the newest pipe's direct
	// queue, so that nothing new overtakes what the pipe still orders.
	pipes    []pipe
	takeInto *cache.Queue
}

// pipe is a spilled delivery still running.
type pipe struct {
	o    *cache.Orderer
	stop chan struct{}
}

func (e *Engine) newQueue() *cache.Queue { return cache.NewQueue(e.live().Limits, e.cfg.Budget) }

// Take queues a packet the cache device read for this VIP.
func (c *vipCtl) Take(pkt []byte) {
	c.mu.Lock()
	q, state, delivering := c.queue, c.state, c.orderer != nil
	if c.takeInto != nil {
		q = c.takeInto
	}
	c.mu.Unlock()
	if reason := q.Push(pkt, time.Now()); reason != "" {
		c.e.dropOnce(c, reason)
	}
	if state == stateLocal && !delivering {
		// The standby route was used: the VM's interface went away
		// before the agent heard of it.
		c.e.signalStandby(c.vip)
	}
}

// dropOnce logs the first drop of a migration, not every one.
func (e *Engine) dropOnce(c *vipCtl, reason cache.DropReason) {
	c.mu.Lock()
	first := c.rec.Dropped == nil
	if first {
		c.rec.Dropped = map[string]uint64{}
	}
	c.mu.Unlock()
	if first {
		e.log.Warn("cache full or expired: dropping packets for this VIP (logged once per migration)", "vip", c.vip, "reason", reason)
	}
}

func (e *Engine) signalStandby(vip netip.Addr) {
	e.standbyMu.Lock()
	e.standbyHits[vip] = true
	e.standbyMu.Unlock()
	e.host.Kick()
}

// LocalLocked creates the standby controller of a VIP attached here, or
// takes note of its interface. Agent lock held.
func (e *Engine) LocalLocked(vip netip.Addr, dev string) { e.localCtl(vip, dev) }

func (e *Engine) localCtl(vip netip.Addr, dev string) *vipCtl {
	if e.dev == nil {
		return nil
	}
	c := e.ctls[vip]
	if c == nil {
		return e.addCtlLocked(vip, dev, vipPhase{state: stateLocal})
	}
	c.mu.Lock()
	c.dev = dev
	c.mu.Unlock()
	return c
}

// addCtlLocked registers a new controller for vip in phase p and gives it
// the packets the cache device reads for vip. agent lock held.
func (e *Engine) addCtlLocked(vip netip.Addr, dev string, p vipPhase) *vipCtl {
	c := &vipCtl{e: e, vip: vip, dev: dev, state: p.state, byCarrier: p.byCarrier, queue: e.newQueue()}
	e.ctls[vip] = c
	e.dev.Attach(vip, c)
	return c
}

// forgetCtlLocked drops c and its sink: what the cache device reads for
// c's VIP from now on is unclaimed. agent lock held.
func (e *Engine) forgetCtlLocked(c *vipCtl) {
	if e.ctls[c.vip] == c {
		delete(e.ctls, c.vip)
	}
	e.dev.Detach(c.vip, c)
}

// ctlLocked finds the controller of a VIP attached here. agent lock held.
func (e *Engine) ctlLocked(vip netip.Addr) (*vipCtl, error) {
	if c := e.ctls[vip]; c != nil {
		return c, nil
	}
	return nil, fmt.Errorf("%w: %s is not attached here", control.ErrBadRequest, vip)
}

// SuspendLocked starts caching a local VIP's packets. Agent lock held.
func (e *Engine) SuspendLocked(vip netip.Addr, why string) error {
	c, err := e.ctlLocked(vip)
	if err != nil {
		return err
	}
	_, err = e.onLocked(c, evSuspend, why)
	return err
}

// AbortLocked gives a cached VIP back to its VM here, delivering the queue
// in order first. Agent lock held.
func (e *Engine) AbortLocked(vip netip.Addr, why string) error {
	c, err := e.ctlLocked(vip)
	if err != nil {
		return err
	}
	_, err = e.onLocked(c, evAbort, why)
	return err
}

// onLocked feeds ev to c's state machine (vipstate.go) and performs the
// action it returns, except those that need the caller's context (stream,
// hold, hand-back, forget, wait), which it only returns. Called with the agent lock
// held and c.mu not.
func (e *Engine) onLocked(c *vipCtl, ev vipEvent, why string) (vipAction, error) {
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
		e.spillLocked(c, why)
		e.beginLocked(c, why)
	case actStream:
		if prev == stateLocal || prev == stateHolding {
			e.spillLocked(c, why)
			e.beginLocked(c, why) // the claim is the suspend
		}
	case actDeliver:
		if prev == stateCaching {
			e.log.Info("migration aborted: delivering the cache to the VM here", "vip", c.vip, "why", why, "queued", c.queue.Len())
			c.rec.Aborted = true
		}
		e.startDeliveryLocked(c, c.queue, e.newQueue(), true)
	case actDrop:
		e.stopPipesLocked(c)
		n := c.queue.Discard()
		e.log.Warn("nobody claimed the VIP within the cache's max age: dropping its queue and releasing it", "vip", c.vip, "dropped", n)
		c.rec.TimedOut = true
		c.rec.Done = timePtr(time.Now())
		qs := c.queue.Stats()
		c.rec.Cached, c.rec.CachedBytes = qs.Packets, qs.Bytes
		c.rec.Dropped = dropMap(qs, nil)
		e.finishLocked(c, migrationQueues{cache: c.queue})
		e.forgetCtlLocked(c)
		e.host.Disown(c.vip, gossip.Record{})
	}
	if act != actNone {
		e.log.Debug("migration step", "vip", c.vip, "event", ev, "from", prev, "to", c.state, "action", act)
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
func (e *Engine) beginLocked(c *vipCtl, why string) {
	c.source = true
	c.started = time.Now()
	at, _ := e.host.Attachment(c.vip)
	c.rec = control.Migration{ID: e.migrationIDLocked(c.vip, at.Epoch), VIP: c.vip.String(), From: e.cfg.Name, Epoch: at.Epoch, Suspend: timePtr(c.started), Role: metrics.RoleSource}
	e.cfg.Metrics.MigrationStarted(metrics.RoleSource)
	c.tl = cache.NewTimeline(c.started)
	c.queue.Record(c.tl, cache.SeriesCached, cache.SeriesFlushed)
	if m, ok := e.links.NeighborMAC(c.dev, c.vip); ok {
		c.mac = m
	} else if len(at.MAC) == 6 {
		c.mac = at.MAC
	}
	e.signalCachingLocked()
	e.log.Info("VM suspended: caching its packets", "vip", c.vip, "dev", c.dev, "why", why)
}

// ReconcileLocked runs in every reconcile: it acts on standby hits,
// interfaces that vanished or came back, and timeouts, and unmarks the
// controllers restored after a restart whose VM runs again. Agent lock
// held.
func (e *Engine) ReconcileLocked() {
	e.reconcileMigrationsLocked()
	e.clearRestartLossLocked()
}

func (e *Engine) reconcileMigrationsLocked() {
	e.standbyMu.Lock()
	hits := e.standbyHits
	e.standbyHits = map[netip.Addr]bool{}
	e.standbyMu.Unlock()
	now := time.Now()
	for vip, c := range e.ctls {
		c.mu.Lock()
		state, dev, started, delivering := c.state, c.dev, c.started, c.orderer != nil
		// ran: the VM ran here during the delivery under way, so its
		// interface losing carrier means it left again.
		ran := delivering && !c.orderer.Stats().CarrierUp.IsZero()
		c.mu.Unlock()
		_, attached := e.host.Attachment(vip)
		up := e.links.Carrier(dev)
		switch {
		case (state == stateLocal || state == stateHolding && ran) && !up && attached:
			e.onLocked(c, evCarrierLost, "interface "+dev+" down or gone")
		case state == stateLocal && hits[vip] && !delivering:
			e.onLocked(c, evStandbyHit, "the standby route took packets")
		case state == stateCaching && up && attached:
			e.onLocked(c, evCarrierBack, "interface "+dev+" has carrier again")
		}
		if state == stateCaching && now.Sub(started) > e.live().Limits.MaxAge {
			e.onLocked(c, evTimeout, "max age")
		}
	}
}

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
func (e *Engine) watchCarrier(dev string, o *cache.Orderer) {
	e.carrierMu.Lock()
	e.carrierWatch[dev] = o
	e.carrierMu.Unlock()
}

func (e *Engine) unwatchCarrier(dev string, o *cache.Orderer) {
	e.carrierMu.Lock()
	if e.carrierWatch[dev] == o {
		delete(e.carrierWatch, dev)
	}
	e.carrierMu.Unlock()
}
