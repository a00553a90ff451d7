package wgagent

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/route"
)

// TestWantRoutes pins the routes the agent wants for each kind of VIP,
// without a kernel: a local VIP's route to its VM with the standby route
// to the cache behind it; a VIP in migration diverted to the cache device
// above every VM route (IPv6: metric 1, the kernel stores 0 as 1024), or
// through a fence gateway during the hand-back, or back on its new owner's
// path once the linger is over; a trusted LAN host's VIP over the LAN; a
// remote VIP outside the overlay prefix into the tunnel; a remote one
// inside it nothing (the prefix route carries it).
func TestWantRoutes(t *testing.T) {
	a, _ := testAgent(t, "")
	a.cfg.Interface = "vmr0"
	a.cacheDev = "vmrc0"
	p := netip.MustParseAddr
	local, caching, fenced, undiverted, arriving6 := p("100.100.20.1"), p("100.100.20.2"), p("100.100.20.3"), p("100.100.20.4"), p("fd76:6d72::5")
	lanVIP, outside, inside := p("100.100.30.1"), p("100.101.0.1"), p("100.100.40.1")
	a.attached = map[netip.Addr]attachment{local: {VIP: local, Dev: "vif1.0", Epoch: 3}}
	a.ctls = map[netip.Addr]*vipCtl{
		local:      {vip: local, dev: "vif1.0", state: stateLocal},
		caching:    {vip: caching, dev: "vif2.0", state: stateCaching},
		fenced:     {vip: fenced, dev: "vif3.0", state: stateHolding, fenceVia: fenceGateways4[1]},
		undiverted: {vip: undiverted, dev: "vif4.0", state: stateForwarding, undiverted: true},
		arriving6:  {vip: arriving6, dev: "vif5.0", state: stateHolding},
	}
	records := []gossip.Record{
		{VIP: local, Owner: "h1", Epoch: 3},
		{VIP: caching, Owner: "h1", Epoch: 1},
		{VIP: fenced, Owner: "h1", Epoch: 2},
		{VIP: undiverted, Owner: "h2", Epoch: 5},
		{VIP: arriving6, Owner: "h1", Epoch: 2},
		{VIP: lanVIP, Owner: "h3", Epoch: 1},
		{VIP: outside, Owner: "h2", Epoch: 1},
		{VIP: inside, Owner: "h2", Epoch: 1},
		{VIP: p("100.100.50.1"), Owner: "", Epoch: 4}, // released
	}
	lan := map[string]route.Route{"h3": {Dev: "eth0", Via: p("198.18.0.3")}}
	got, overLAN := a.wantRoutes(records, lan)
	host := func(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }
	want := []route.Route{
		{Dst: netip.MustParsePrefix("100.100.0.0/16"), Dev: "vmr0", Metric: metricOverlay},
		{Dst: host(local), Dev: "vif1.0", Metric: metricLocalVIP},
		{Dst: host(local), Dev: "vmrc0", Metric: metricStandby},
		{Dst: host(caching), Dev: "vmrc0", Metric: metricDivert},
		{Dst: host(fenced), Dev: "vif3.0", Via: fenceGateways4[1], Metric: metricDivert},
		{Dst: host(arriving6), Dev: "vmrc0", Metric: metricLocalVIP},
		{Dst: host(lanVIP), Dev: "eth0", Via: p("198.18.0.3"), Metric: metricOverlay},
		{Dst: host(outside), Dev: "vmr0", Metric: metricOverlay},
	}
	key := func(r route.Route) string { return r.Dst.String() + " " + r.Dev + " " + r.Via.String() }
	sortRoutes := func(rs []route.Route) {
		slices.SortFunc(rs, func(x, y route.Route) int { return strings.Compare(key(x), key(y)) })
	}
	sortRoutes(got)
	sortRoutes(want)
	if !slices.Equal(got, want) {
		t.Errorf("routes:\n got %v\nwant %v", got, want)
	}
	if len(overLAN) != 1 || !overLAN[lanVIP] {
		t.Errorf("over the LAN: %v, want only %s", overLAN, lanVIP)
	}

	// Without a cache (--cache=false) a local VIP has no standby route.
	a.cacheDev = ""
	a.ctls = nil
	got, _ = a.wantRoutes(records[:1], nil)
	if len(got) != 2 || got[1] != (route.Route{Dst: host(local), Dev: "vif1.0", Metric: metricLocalVIP}) {
		t.Errorf("without a cache: %v", got)
	}
}
