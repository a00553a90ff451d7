package wgagent

import (
	"math/big"
	"net/netip"
	"testing"
)

func TestAllocAddressMath(t *testing.T) {
	p4 := netip.MustParsePrefix("100.64.1.0/24")
	if got := prefixSize(p4); got.Cmp(big.NewInt(256)) != 0 {
		t.Errorf("size of %s = %v", p4, got)
	}
	for n, want := range map[int64]string{0: "100.64.1.0", 1: "100.64.1.1", 255: "100.64.1.255"} {
		if got := nthAddr(p4, big.NewInt(n)); got != netip.MustParseAddr(want) {
			t.Errorf("nthAddr(%s, %d) = %s, want %s", p4, n, got, want)
		}
	}
	for addr, want := range map[string]bool{"100.64.1.0": false, "100.64.1.1": true, "100.64.1.254": true, "100.64.1.255": false} {
		if got := usableInPrefix(p4, netip.MustParseAddr(addr)); got != want {
			t.Errorf("usableInPrefix(%s, %s) = %v", p4, addr, got)
		}
	}
	p6 := netip.MustParsePrefix("fd00:64::/64")
	if got := nthAddr(p6, new(big.Int).Lsh(big.NewInt(1), 63)); got != netip.MustParseAddr("fd00:64::8000:0:0:0") {
		t.Errorf("nthAddr v6 = %s", got)
	}
	if !usableInPrefix(p6, netip.MustParseAddr("fd00:64::ffff:ffff:ffff:ffff")) || usableInPrefix(p6, netip.MustParseAddr("fd00:64::")) {
		t.Error("IPv6: every address but the prefix's own is usable")
	}
	for range 100 {
		if r := randBelow(big.NewInt(10)); r.Sign() < 0 || r.Cmp(big.NewInt(10)) >= 0 {
			t.Fatalf("randBelow(10) = %v", r)
		}
	}
}
