package migrate

import (
	"net/netip"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
)

// A source agent killed while it caches loses its queue with it. Restarted
// on the same data dir, it finds the VIP still attached and would answer
// the new owner's request with an empty stream, as if nothing had been
// cached. So a controller restored at start whose VM's interface has no
// carrier (the VM was suspended or gone) is marked, and a handover from it
// is refused: the new owner then reports the old host's cache lost
// (Migration.CacheLost) and delivers what it holds.

// RestoreLocked creates the controller of an attachment of vip behind dev
// restored from the data dir at start. Agent lock held (or the agent not
// yet running).
func (e *Engine) RestoreLocked(vip netip.Addr, dev string) {
	c := e.localCtl(vip, dev)
	if c != nil && !e.links.Carrier(dev) {
		c.lostInRestart = true
	}
}

// clearRestartLossLocked unmarks restored controllers whose VM runs here
// again: a later move of it starts with a whole cache. agent lock held.
func (e *Engine) clearRestartLossLocked() {
	for _, c := range e.ctls {
		c.mu.Lock()
		if c.lostInRestart && c.state == stateLocal && e.links.Carrier(c.dev) {
			c.lostInRestart = false
		}
		c.mu.Unlock()
	}
}

// dropLostInRestartLocked reports whether c, asked for by req, lost its
// cache in a restart; it then drops what c cached since, gives the VIP up
// to the claimer and forgets c. agent lock held, c.mu not.
func (e *Engine) dropLostInRestartLocked(c *vipCtl, req cache.Request) bool {
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
		e.finishLocked(c, migrationQueues{cache: c.queue})
	}
	c.state = stateNone
	e.forgetCtlLocked(c)
	e.host.Disown(c.vip, gossip.Record{VIP: req.VIP, Owner: req.Claimer, Epoch: req.Epoch})
	e.log.Error("handover refused: this VIP's cache was lost when this agent restarted; the new owner delivers what it holds",
		"vip", c.vip, "claimer", req.Claimer, "dropped_since_restart", n)
	return true
}
