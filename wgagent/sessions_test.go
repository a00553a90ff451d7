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
