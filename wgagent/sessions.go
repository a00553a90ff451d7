package wgagent

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"time"

	"golang.org/x/sys/unix"
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

// A session that both ends count as made may still carry nothing one way.
// When initiations cross, wireguard-go may handle the answer to its own
// and the other end's initiation on two handshake workers at once; the
// answer is checked against the handshake state under a read lock and
// written under a write lock later, so the initiation handled in between
// is overwritten (wireguard-go then logs "Failed to create response
// message: handshake initiation must be consumed first"), and the two ends
// can be left with keypairs the other does not have. Seen in the lab: a
// handover connection that timed out for 12 s between two hosts whose
// sessions were up (a handshake on both ends, nothing received after it),
// and in a loop of crossed handshakes between two embedded devices with
// no delay between them, once in 150. WireGuard itself starts anew only
// after 15 s without an answer. So the agent checks every new session
// with a TCP connect to the peer's handover port through the tunnel (an
// answer, accept or refusal, needs both directions), and starts a new
// handshake when none comes, which revives such a session at once
// (wgdev's TestRehandshakeRevivesAOneWaySession).

// sessionCheckTimeout bounds one check: TCP's first SYN and its answer.
// A dead session is found that soon after it was made; a SYN lost on the
// way fails a good session's check, and the new handshake that follows
// costs a round trip.
const sessionCheckTimeout = time.Second

// maxSessionChecks is how many checks in a row may fail before the agent
// stops checking the peer (a firewall that drops the handover port makes
// every check fail; the migrations then fail too, and say so).
const maxSessionChecks = 4

// sessionChecks remembers, per peer, which of its sessions carried a
// round trip, and when it may be checked again after a failure.
type sessionChecks struct {
	peers map[wgtypes.Key]*sessionCheck
	asked map[wgtypes.Key]bool
}

type sessionCheck struct {
	passed   time.Time // the handshake whose session carried a round trip
	running  bool
	failures int       // failed checks in a row
	next     time.Time // no check before
}

// start notes that peer has a session made at handshake and says whether
// to check it now; if so, the check counts as running until done.
func (s *sessionChecks) start(peer wgtypes.Key, handshake, now time.Time) bool {
	if s.peers == nil {
		s.peers, s.asked = map[wgtypes.Key]*sessionCheck{}, map[wgtypes.Key]bool{}
	}
	s.asked[peer] = true
	c := s.peers[peer]
	if c == nil {
		c = &sessionCheck{}
		s.peers[peer] = c
	}
	if c.running || c.passed.Equal(handshake) || c.failures >= maxSessionChecks || now.Before(c.next) {
		return false
	}
	c.running = true
	return true
}

// done records the end of a check of the session made at handshake and
// returns how many checks in a row have failed (0 if this one passed).
// The next check after a failure waits 1 s, then 2 s, 4 s.
func (s *sessionChecks) done(peer wgtypes.Key, handshake time.Time, ok bool, now time.Time) (failures int) {
	c := s.peers[peer]
	if c == nil { // the peer went meanwhile
		return 0
	}
	c.running = false
	if ok {
		c.passed, c.failures = handshake, 0
		return 0
	}
	c.failures++
	c.next = now.Add(time.Second << (c.failures - 1))
	return c.failures
}

// sweep forgets the peers start was not asked about since the last sweep
// (gone, or without a session: a new one is checked from scratch), unless
// a check of theirs still runs.
func (s *sessionChecks) sweep() {
	for k, c := range s.peers {
		if !s.asked[k] && !c.running {
			delete(s.peers, k)
		}
	}
	clear(s.asked)
}

// state says how the last check of peer's sessions went, as
// control.Peer.SessionCheck.
func (s *sessionChecks) state(peer wgtypes.Key) string {
	c := s.peers[peer]
	switch {
	case c == nil:
		return ""
	case c.failures >= maxSessionChecks:
		return "gave up"
	case c.failures > 0:
		return "failing"
	case !c.passed.IsZero():
		return "passed"
	}
	return ""
}

// failures is how many checks in a row of peer's sessions failed.
func (s *sessionChecks) failures(peer wgtypes.Key) int {
	if c := s.peers[peer]; c != nil {
		return c.failures
	}
	return 0
}

// next is when the earliest check waiting after a failure is due; false
// if none waits.
func (s *sessionChecks) next() (time.Time, bool) {
	var first time.Time
	for _, c := range s.peers {
		if c.running || c.failures == 0 || c.failures >= maxSessionChecks {
			continue
		}
		if first.IsZero() || c.next.Before(first) {
			first = c.next
		}
	}
	return first, !first.IsZero()
}

// checkSession checks in the background that the session with a peer,
// made at handshake, carries a round trip: a TCP connect to the peer's
// handover port through the tunnel, closed at once. If none comes, the
// end that leads handshakes starts a new one, and from the second failure
// on either end does (the leading end may hold an old session it already
// checked). A kick then lets the next reconcile look again.
func (a *Agent) checkSession(name string, peer wgtypes.Key, handshake time.Time, leads bool) {
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		defer a.kick()
		err := a.probeSession(name)
		a.mu.Lock()
		failures := a.checks.done(peer, handshake, err == nil, time.Now())
		a.mu.Unlock()
		switch {
		case failures == 0:
			return
		case failures >= maxSessionChecks:
			a.log.Warn("the WireGuard session with peer carries no round trip to its handover port; no more checks until it is added anew",
				"peer", name, "checks", failures, "err", err)
			return
		case !leads && failures == 1:
			a.log.Debug("WireGuard session check failed; the peer leads the new handshake", "peer", name, "err", err)
			return
		}
		level := slog.LevelInfo
		if failures > 1 {
			level = slog.LevelDebug
		}
		a.log.Log(context.Background(), level, "WireGuard session with peer carries nothing back: starting a new handshake",
			"peer", name, "check", failures, "err", err)
		if err := a.dev.Rehandshake(peer); err != nil {
			a.log.Warn("new handshake", "peer", name, "err", err)
		}
	}()
}

// probeSession connects to a member's handover port through the tunnel and
// closes at once: an accept and a refusal both came back through it. The
// agent's shutdown cuts it short.
func (a *Agent) probeSession(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), sessionCheckTimeout)
	defer cancel()
	go func() {
		select {
		case <-a.linkStop:
			cancel()
		case <-ctx.Done():
		}
	}()
	conn, _, err := a.dialHandover(ctx, name, sessionCheckTimeout)
	if errors.Is(err, unix.ECONNREFUSED) {
		return nil
	}
	if err != nil {
		return err
	}
	return conn.Close()
}
