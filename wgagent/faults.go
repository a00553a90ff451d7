package wgagent

import (
	"net"
	"sync/atomic"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
)

// A dead or cut-off old host must not keep a destination holding forever:
// its agent's death takes its WireGuard device with it, so no FIN or RST
// reaches the destination, and a TCP connection that only reads never
// notices. The destination therefore reads the handover stream with an
// idle timeout, and files what it could not get as lost.

// handoverIdle is how long the new host waits for the next frame of a
// handover stream with ticks before it gives the old host up: the old host
// writes a tick every handoverTick while it lingers, so only a dead agent
// or a cut underlay is this quiet. Long enough for TCP to get through an
// underlay outage of a few seconds (its retransmissions back off to ~1.6 s).
const handoverIdle = 5 * time.Second

// idleConn is a net.Conn whose every Read fails with a timeout once
// nothing arrived for its current limit.
type idleConn struct {
	net.Conn
	limit atomic.Int64 // time.Duration
}

func newIdleConn(conn net.Conn, limit time.Duration) *idleConn {
	c := &idleConn{Conn: conn}
	c.limit.Store(int64(limit))
	return c
}

func (c *idleConn) setLimit(d time.Duration) { c.limit.Store(int64(d)) }

func (c *idleConn) Read(b []byte) (int, error) {
	if err := c.Conn.SetReadDeadline(time.Now().Add(time.Duration(c.limit.Load()))); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

// noteCacheLost marks the migration of c as having lost the old host's
// cache, unless the handover was stopped on purpose. A stream cut after
// the end marker brought the whole cache: only stragglers the old host
// still forwarded may be lost, and that is logged only. c.mu not held.
func (a *Agent) noteCacheLost(c *vipCtl, from string, stop chan struct{}, why string, err error) {
	select {
	case <-stop:
		return
	default:
	}
	c.mu.Lock()
	whole := c.rec.FlushEnd != nil
	c.rec.CacheLost = c.rec.CacheLost || !whole
	c.mu.Unlock()
	if whole {
		a.log.Warn("handover: the stream was cut after the whole cache came; stragglers the old host still had are lost", "vip", c.vip, "from", from, "err", err)
		return
	}
	a.log.Error("handover: the old host's cache is lost; delivering what is held here", "vip", c.vip, "from", from, "why", why, "err", err)
}

// A source agent killed while it caches loses its queue with it. Restarted
// on the same data dir, it finds the VIP still attached and would answer
// the new owner's request with an empty stream, as if nothing had been
// cached. So a controller restored at start whose VM's interface has no
// carrier (the VM was suspended or gone) is marked, and a handover from it
// is refused: the new owner then reports the old host's cache lost
// (Migration.CacheLost) and delivers what it holds.

// restoreCtlLocked creates the controller of an attachment restored from
// the data dir at start. a.mu held (or the agent not yet running).
func (a *Agent) restoreCtlLocked(at attachment) {
	c := a.localCtl(at.VIP, at.Dev)
	if c != nil && !hasCarrier(at.Dev) {
		c.lostInRestart = true
	}
}

// clearRestartLossLocked unmarks restored controllers whose VM runs here
// again: a later move of it starts with a whole cache. a.mu held.
func (a *Agent) clearRestartLossLocked() {
	for _, c := range a.ctls {
		c.mu.Lock()
		if c.lostInRestart && c.state == stateLocal && hasCarrier(c.dev) {
			c.lostInRestart = false
		}
		c.mu.Unlock()
	}
}

// dropLostInRestartLocked reports whether c, asked for by req, lost its
// cache in a restart; it then drops what c cached since, gives the VIP up
// to the claimer and forgets c. a.mu held, c.mu not.
func (a *Agent) dropLostInRestartLocked(c *vipCtl, req cache.Request) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.lostInRestart {
		return false
	}
	n := c.queue.Discard()
	if c.rec.VIP != "" {
		c.rec.To = req.Claimer
		c.rec.Done = timePtr(time.Now())
		qs := c.queue.Stats()
		c.rec.Cached, c.rec.CachedBytes = qs.Packets, qs.Bytes
		c.rec.Dropped = dropMap(qs, nil)
		a.finishLocked(c, migrationQueues{cache: c.queue})
	}
	c.state = stateNone
	a.forgetCtlLocked(c)
	a.disownLocked(c.vip, gossip.Record{VIP: req.VIP, Owner: req.Claimer, Epoch: req.Epoch})
	a.log.Error("handover refused: this VIP's cache was lost when this agent restarted; the new owner delivers what it holds",
		"vip", c.vip, "claimer", req.Claimer, "dropped_since_restart", n)
	return true
}

// endLinger ends an old host's straggler stream without losing what its
// own senders (VMs on this host, which follow its routes) still put into
// the cache: once the linger is over it routes the VIP to the new owner,
// waits until the cache device has handed over everything routed to it
// before (a barrier), and only then closes lingerOver, on which the stream
// sends what is left and closes. Closing the stream first lost what
// arrived until a reconcile changed the routes (tens to hundreds of
// packets per move at 12,500/s). lingerOver also closes when stop does
// or the caller closes streamDone (the stream ended some other way).
func (a *Agent) endLinger(c *vipCtl, stop <-chan struct{}) (lingerOver <-chan struct{}, streamDone chan struct{}) {
	over, done := make(chan struct{}), make(chan struct{})
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		defer close(over)
		t := time.NewTimer(a.live().CacheLinger)
		defer t.Stop()
		select {
		case <-stop:
			return
		case <-done:
			return
		case <-t.C:
		}
		c.mu.Lock()
		c.undiverted = true
		c.mu.Unlock()
		a.reconcile()
		if err := a.intercept.Barrier(100 * time.Millisecond); err != nil {
			a.log.Debug("handover: barrier at the linger's end", "vip", c.vip, "err", err)
		}
	}()
	return over, done
}
