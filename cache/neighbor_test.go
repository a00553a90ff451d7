package cache

import (
	"net"
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/internal/netnstest"
)

// TestNeighborMACs reads the MACs of two interfaces' neighbours in one go,
// and agrees with NeighborMAC; other interfaces are left out.
func TestNeighborMACs(t *testing.T) {
	netnstest.Run(t, func() {
		add := func(name string) netlink.Link {
			l := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}
			if err := netlink.LinkAdd(l); err != nil {
				t.Fatal(err)
			}
			if err := netlink.LinkSetUp(l); err != nil {
				t.Fatal(err)
			}
			link, err := netlink.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			return link
		}
		vif1, vif2, other := add("vif1"), add("vif2"), add("other")
		mac := func(s string) net.HardwareAddr {
			m, err := net.ParseMAC(s)
			if err != nil {
				t.Fatal(err)
			}
			return m
		}
		neigh := func(l netlink.Link, ip string, m net.HardwareAddr, state int) {
			a := netip.MustParseAddr(ip)
			fam := netlink.FAMILY_V4
			if a.Is6() {
				fam = netlink.FAMILY_V6
			}
			n := &netlink.Neigh{LinkIndex: l.Attrs().Index, Family: fam, State: state, IP: a.AsSlice(), HardwareAddr: m}
			if err := netlink.NeighSet(n); err != nil {
				t.Fatalf("neighbour %s: %v", ip, err)
			}
		}
		neigh(vif1, "100.64.0.1", mac("52:54:00:00:00:01"), netlink.NUD_PERMANENT)
		neigh(vif1, "fd00:64::1", mac("52:54:00:00:00:01"), netlink.NUD_REACHABLE)
		neigh(vif2, "100.64.0.2", mac("52:54:00:00:00:02"), netlink.NUD_STALE)
		neigh(other, "100.64.0.3", mac("52:54:00:00:00:03"), netlink.NUD_PERMANENT)

		got, err := NeighborMACs([]string{"vif1", "vif2", "gone"})
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]map[string]string{
			"vif1": {"100.64.0.1": "52:54:00:00:00:01", "fd00:64::1": "52:54:00:00:00:01"},
			"vif2": {"100.64.0.2": "52:54:00:00:00:02"},
		}
		if len(got) != len(want) {
			t.Errorf("interfaces %v, want vif1 and vif2", got)
		}
		for dev, addrs := range want {
			if len(got[dev]) != len(addrs) {
				t.Errorf("%s: %v, want %v", dev, got[dev], addrs)
			}
			for ip, m := range addrs {
				a := netip.MustParseAddr(ip)
				if got[dev][a].String() != m {
					t.Errorf("%s %s: %v, want %s", dev, ip, got[dev][a], m)
				}
				if one, ok := NeighborMAC(dev, a); !ok || one.String() != m {
					t.Errorf("NeighborMAC(%s, %s) = %v, %v; want %s", dev, ip, one, ok, m)
				}
			}
		}
	})
}
