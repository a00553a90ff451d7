package gossip

import (
	"net/netip"
	"testing"
	"time"
)

func TestReleasedAt(t *testing.T) {
	tb := NewTable()
	vip := netip.MustParseAddr("100.64.1.5")
	if _, ok := tb.ReleasedAt(vip); ok {
		t.Fatal("released before any record")
	}
	tb.Merge(Record{VIP: vip, Owner: "h1", Epoch: 1})
	if _, ok := tb.ReleasedAt(vip); ok {
		t.Fatal("released while owned")
	}
	before := time.Now()
	tb.Merge(Record{VIP: vip, Epoch: 2})
	at, ok := tb.ReleasedAt(vip)
	if !ok || at.Before(before) {
		t.Fatalf("after the tombstone: %v %v", at, ok)
	}
	// An older tombstone arriving later changes nothing, not even the time.
	tb.Merge(Record{VIP: vip, Epoch: 1})
	if again, _ := tb.ReleasedAt(vip); !again.Equal(at) {
		t.Errorf("time moved from %v to %v", at, again)
	}
	tb.Merge(Record{VIP: vip, Owner: "h2", Epoch: 3})
	if _, ok := tb.ReleasedAt(vip); ok {
		t.Error("still released after a new claim")
	}
}
