package wgagent

import (
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
