package wgagent

import (
	"net/netip"
	"testing"
	"time"
)

// TestGraceTimer checks that an unwanted prefix comes due only once it was
// unwanted for allowedIPsGrace without a break, and that a prefix wanted
// again starts over.
func TestGraceTimer(t *testing.T) {
	var g graceTimer
	q := netip.MustParsePrefix("100.64.1.1/32")
	t0 := time.Now()
	if g.due(q, t0) {
		t.Fatal("due when first found unwanted")
	}
	g.sweep()
	if g.due(q, t0.Add(allowedIPsGrace/2)) {
		t.Fatal("due before the grace")
	}
	g.sweep()
	if !g.due(q, t0.Add(allowedIPsGrace)) {
		t.Fatal("not due after the grace")
	}
	g.sweep()

	// Wanted again in one reconcile (not asked), unwanted in the next:
	// a new grace.
	g.sweep()
	t1 := t0.Add(3 * allowedIPsGrace)
	if g.due(q, t1) {
		t.Fatal("due at once after being wanted again")
	}
	g.sweep()
	if !g.due(q, t1.Add(allowedIPsGrace)) {
		t.Fatal("not due a grace after being unwanted again")
	}
}
