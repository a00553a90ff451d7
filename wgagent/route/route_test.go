package route

import (
	"net/netip"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/internal/netnstest"
)

func addLink(t *testing.T, name string) netlink.Link {
	t.Helper()
	// A veth pair: this kernel has no dummy module.
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
		t.Fatalf("add %s: %v", name, err)
	}
	l, err := netlink.LinkByName(name)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		t.Fatal(err)
	}
	return l
}

func TestReconcileAddsRepairsAndLeavesOthersAlone(t *testing.T) {
	netnstest.Run(t, func() {
		a := addLink(t, "d0")
		addLink(t, "d1")
		// A route someone else owns, to the same kind of prefix.
		foreign := &netlink.Route{LinkIndex: a.Attrs().Index, Dst: ipNet(netip.MustParsePrefix("100.100.9.9/32")), Protocol: 4, Scope: netlink.SCOPE_LINK}
		if err := netlink.RouteAdd(foreign); err != nil {
			t.Fatal(err)
		}

		tab := NewTable()
		tab.Set([]Route{
			{Dst: netip.MustParsePrefix("100.100.0.0/16"), Dev: "d0", Metric: 10},
			{Dst: netip.MustParsePrefix("100.100.10.1/32"), Dev: "d1", Metric: 1},
			{Dst: netip.MustParsePrefix("fd76:6d72::a1/128"), Dev: "d0"},
		})
		if err := tab.Reconcile(); err != nil {
			t.Fatal(err)
		}
		have, err := list()
		if err != nil {
			t.Fatal(err)
		}
		if len(have) != 3 {
			t.Fatalf("after reconcile: %d vmroam routes, want 3: %v", len(have), have)
		}

		// Someone deletes one of ours: the next reconcile puts it back.
		for k, r := range have {
			if k.dst == netip.MustParsePrefix("100.100.10.1/32") {
				if err := netlink.RouteDel(&r); err != nil {
					t.Fatal(err)
				}
			}
		}
		if have, _ = list(); len(have) != 2 {
			t.Fatalf("delete did not happen: %v", have)
		}
		if err := tab.Reconcile(); err != nil {
			t.Fatal(err)
		}
		if have, _ = list(); len(have) != 3 {
			t.Fatalf("reconcile did not repair: %v", have)
		}

		// Moving a route to another device replaces it in place.
		tab.Set([]Route{{Dst: netip.MustParsePrefix("100.100.10.1/32"), Dev: "d0", Metric: 1}})
		if err := tab.Reconcile(); err != nil {
			t.Fatal(err)
		}
		have, _ = list()
		if len(have) != 1 {
			t.Fatalf("want only the moved route, got %v", have)
		}
		for _, r := range have {
			if r.LinkIndex != a.Attrs().Index {
				t.Fatalf("route not moved to d0: %+v", r)
			}
		}

		// A missing device is reported and does not stop the rest.
		tab.Set([]Route{
			{Dst: netip.MustParsePrefix("100.100.10.2/32"), Dev: "gone0", Metric: 1},
			{Dst: netip.MustParsePrefix("100.100.10.3/32"), Dev: "d0", Metric: 1},
		})
		if err := tab.Reconcile(); err == nil {
			t.Fatal("no error for a missing device")
		}
		if have, _ = list(); len(have) != 1 {
			t.Fatalf("want the one applicable route, got %v", have)
		}

		if err := tab.Flush(); err != nil {
			t.Fatal(err)
		}
		if have, _ = list(); len(have) != 0 {
			t.Fatalf("flush left %v", have)
		}
		all, err := netlink.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			t.Fatal(err)
		}
		found := false
		for _, r := range all {
			if r.Dst != nil && r.Dst.String() == "100.100.9.9/32" {
				found = true
			}
		}
		if !found {
			t.Fatal("the foreign route was removed")
		}
	})
}
