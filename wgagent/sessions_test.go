package wgagent

import (
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// TestSessionWatch checks when a peer without a session is due a new
// handshake: a grace after it was first found so, then after doubling
// waits up to the cap; and that a peer found with a session (not asked
// about) starts over.
func TestSessionWatch(t *testing.T) {
	var w sessionWatch
	p := wgtypes.Key{1}
	t0 := time.Now()
	if _, ok := w.next(); ok {
		t.Fatal("a handshake is due with no peer watched")
	}
	if w.check(p, t0) != 0 {
		t.Fatal("due when first found without a session")
	}
	w.sweep()
	if at, ok := w.next(); !ok || !at.Equal(t0.Add(handshakeGrace)) {
		t.Fatalf("next %v %v, want the grace after the first look", at, ok)
	}
	if w.check(p, t0.Add(handshakeGrace/2)) != 0 {
		t.Fatal("due before the grace")
	}
	w.sweep()
	now := t0.Add(handshakeGrace)
	if n := w.check(p, now); n != 1 {
		t.Fatalf("after the grace: attempt %d, want 1", n)
	}
	w.sweep()
	// Each next one after twice the wait, up to the cap.
	attempt := 1
	for wait := 2 * handshakeGrace; wait <= 2*maxHandshakeWait; wait *= 2 {
		want := min(wait, maxHandshakeWait)
		if w.check(p, now.Add(want-time.Millisecond)) != 0 {
			t.Fatalf("due %v after the last, before the wait of %v", want-time.Millisecond, want)
		}
		w.sweep()
		now = now.Add(want)
		attempt++
		if n := w.check(p, now); n != attempt {
			t.Fatalf("after a wait of %v: attempt %d, want %d", want, n, attempt)
		}
		w.sweep()
	}

	// A session (not asked about in one reconcile), then none again: a
	// new grace.
	w.sweep()
	if _, ok := w.next(); ok {
		t.Fatal("a peer with a session is still watched")
	}
	later := now.Add(time.Hour)
	if w.check(p, later) != 0 || w.check(p, later.Add(handshakeGrace-time.Millisecond)) != 0 {
		t.Fatal("due before a new grace")
	}
	if n := w.check(p, later.Add(handshakeGrace)); n != 1 {
		t.Fatalf("a grace after losing the session: attempt %d, want 1", n)
	}
}

// TestLeadsHandshake checks that of two hosts exactly one starts the new
// handshake: were both to, their initiations could cross again.
func TestLeadsHandshake(t *testing.T) {
	a, b := wgtypes.Key{1, 2}, wgtypes.Key{1, 3}
	if leadsHandshake(a, b) == leadsHandshake(b, a) {
		t.Fatalf("both or neither lead: %v %v", leadsHandshake(a, b), leadsHandshake(b, a))
	}
	if !leadsHandshake(a, b) {
		t.Error("the higher key leads")
	}
}

// TestSessionChecks checks when a peer's session is checked: once per new
// session, again after a failure after 1, 2 and 4 s, not after
// maxSessionChecks failures in a row, and from scratch for a peer that was
// away.
func TestSessionChecks(t *testing.T) {
	var s sessionChecks
	p := wgtypes.Key{1}
	t0 := time.Now()
	hs1 := t0.Add(-time.Second)
	if s.state(p) != "" {
		t.Fatalf("state %q before any check", s.state(p))
	}
	if !s.start(p, hs1, t0) {
		t.Fatal("a new session is not checked")
	}
	if s.start(p, hs1, t0) {
		t.Fatal("a second check while one runs")
	}
	s.sweep() // a running check survives a sweep, asked or not
	s.sweep()
	if n := s.done(p, hs1, true, t0); n != 0 || s.state(p) != "passed" {
		t.Fatalf("passed: failures %d, state %q", n, s.state(p))
	}
	if s.start(p, hs1, t0.Add(time.Hour)) {
		t.Fatal("a session that passed is checked again")
	}
	if _, ok := s.next(); ok {
		t.Fatal("a check is due with none failed")
	}

	// A new session fails its checks: the waits double, then no more.
	hs2 := t0.Add(time.Minute)
	now := hs2
	for i, wait := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second} {
		if !s.start(p, hs2, now) {
			t.Fatalf("check %d not started", i+1)
		}
		if n := s.done(p, hs2, false, now); n != i+1 || s.state(p) != "failing" || s.failures(p) != n {
			t.Fatalf("check %d: failures %d (%d for the metrics), state %q", i+1, n, s.failures(p), s.state(p))
		}
		if at, ok := s.next(); !ok || !at.Equal(now.Add(wait)) {
			t.Fatalf("after failure %d: next %v %v, want in %v", i+1, at, ok, wait)
		}
		if s.start(p, hs2, now.Add(wait-time.Millisecond)) {
			t.Fatalf("check %d started before its wait of %v", i+2, wait)
		}
		now = now.Add(wait)
	}
	if !s.start(p, hs2, now) {
		t.Fatal("last check not started")
	}
	if n := s.done(p, hs2, false, now); n != maxSessionChecks || s.state(p) != "gave up" {
		t.Fatalf("last check: failures %d, state %q", n, s.state(p))
	}
	// monitoring/vmroam.rules.yml's VmroamSessionCheckGaveUp says >= 4.
	if s.failures(p) != 4 {
		t.Fatalf("gave up at %d failures; the alert rules expect 4", s.failures(p))
	}
	if s.start(p, t0.Add(time.Hour), now.Add(time.Hour)) {
		t.Fatal("checked after giving up")
	}
	if _, ok := s.next(); ok {
		t.Fatal("a check is due after giving up")
	}

	// Away for one reconcile (gone, or no session): forgotten.
	s.sweep()
	s.sweep()
	if s.state(p) != "" || s.failures(p) != 0 || !s.start(p, hs2, now) {
		t.Fatal("a peer that came back is not checked from scratch")
	}
	// A result for a peer forgotten meanwhile is dropped.
	var empty sessionChecks
	if n := empty.done(p, hs2, false, now); n != 0 {
		t.Fatalf("done for an unknown peer: %d", n)
	}
}
