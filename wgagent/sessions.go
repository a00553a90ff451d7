package wgagent

import (
	"bytes"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// handshakeGrace is how long a new peer may go without a WireGuard session
// before this host starts a handshake anew: several round trips of a WAN.
// Two hosts add each other at once when gossip tells both about the other;
// across a WAN the initiations cross within one one-way delay, each end
// answers the other's and drops the answer to its own, and WireGuard's own
// retry comes only 5 s later, 10 s if they cross again (measured:
// wgdev.TestRehandshakeAfterCrossedInitiations). A migration onto or away
// from that host meanwhile has no tunnel.
const handshakeGrace = time.Second

// maxHandshakeWait caps the doubling wait between two new handshakes with
// a peer that still has no session (one that does not answer at all).
const maxHandshakeWait = 16 * time.Second

// sessionWatch says when a peer without a WireGuard session is due a new
// handshake: handshakeGrace after it was first found without one, then
// after twice the previous wait each time. A peer not asked about between
// two sweeps is forgotten: it has a session, or is gone.
type sessionWatch struct {
	due   map[wgtypes.Key]sessionless
	asked map[wgtypes.Key]bool
}

type sessionless struct {
	at       time.Time     // when the next handshake is due
	wait     time.Duration // the wait that led to at
	attempts int           // new handshakes started so far
}

// check notes that peer has no session at now and says whether a new
// handshake is due: 0 if not, else which one it is (1 for the first). The
// next one is then due after twice the wait.
func (w *sessionWatch) check(peer wgtypes.Key, now time.Time) (attempt int) {
	if w.due == nil {
		w.due, w.asked = map[wgtypes.Key]sessionless{}, map[wgtypes.Key]bool{}
	}
	w.asked[peer] = true
	s, ok := w.due[peer]
	if !ok {
		w.due[peer] = sessionless{at: now.Add(handshakeGrace), wait: handshakeGrace}
		return 0
	}
	if now.Before(s.at) {
		return 0
	}
	s.wait = min(2*s.wait, maxHandshakeWait)
	s.at = now.Add(s.wait)
	s.attempts++
	w.due[peer] = s
	return s.attempts
}

// sweep forgets the peers check was not asked about since the last sweep.
func (w *sessionWatch) sweep() {
	for k := range w.due {
		if !w.asked[k] {
			delete(w.due, k)
		}
	}
	clear(w.asked)
}

// next is when the earliest new handshake is due; false if none is waited
// for.
func (w *sessionWatch) next() (time.Time, bool) {
	var first time.Time
	for _, s := range w.due {
		if first.IsZero() || s.at.Before(first) {
			first = s.at
		}
	}
	return first, !first.IsZero()
}

// leadsHandshake says whether this host, of the two, starts a new
// handshake: the one with the lower public key. Were both to, 1 s after
// adding each other, their initiations would cross again.
func leadsHandshake(self, peer wgtypes.Key) bool {
	return bytes.Compare(self[:], peer[:]) < 0
}
