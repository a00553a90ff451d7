package wgagent

import (
	"strings"

	"github.com/vmroam/vmroam/gossip"
)

// A double start: two hosts attached one VIP at one epoch, unaware of each
// other (a partition, a VM started twice). gossip keeps the conflict and
// every member lets the same owner win (the greater name); the agent makes
// it an alarm and makes the loser let go at once.

// conflictProblems raises every open conflict (one VIP claimed by two
// hosts at one epoch, a double start) as a problem: the tie is broken the
// same way everywhere, but a VM on the losing host has lost its address
// and an operator must stop one of them.
func (a *Agent) conflictProblems(problem func(format string, args ...any)) {
	for _, c := range a.cluster.Table().Conflicts() {
		winner, _ := a.cluster.Table().Get(c.VIP)
		problem("VIP %s claimed by %s at epoch %d (started twice?): %s wins, the others dropped it; stop the VM on the others",
			c.VIP, strings.Join(c.Owners, " and "), c.Epoch, winner.Owner)
	}
}

// lostTieLocked reports whether another host's record r for a VIP
// attached here at at is a double start that this host lost (same epoch:
// a move always claims a higher one) while the VM runs here; it then
// takes the VIP's controller away, so that the VIP is dropped as any VIP
// another host owns instead of cached for a handover nobody will ask
// for. a.mu held.
func (a *Agent) lostTieLocked(r gossip.Record, at attachment) bool {
	return r.Epoch == at.Epoch && a.engine.ForgetIfLocalLocked(r.VIP)
}
