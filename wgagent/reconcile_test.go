package wgagent

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/migrate"
	"github.com/vmroam/vmroam/wgagent/route"
)

// TestWantRoutes pins the routes the agent wants for each kind of VIP,
// without a kernel: a local VIP's route to its VM with the standby route
// to the cache behind it; a VIP in migration as the engine routes it
// (migrate's TestRoutesLocked has every state), not as its record says; a
// trusted LAN host's VIP over the LAN; a
// remote VIP outside the overlay prefix into the tunnel; a remote one
// inside it nothing (the prefix route carries it).
func TestWantRoutes(t *testing.T) {
	a, _ := testAgent(t, "")
	a.cfg.Interface = "vmr0"
	a.cacheDev = "vmrc0"
	p := netip.MustParseAddr
	local, caching := p("100.100.20.1"), p("100.100.20.2")
	lanVIP, outside, inside := p("100.100.30.1"), p("100.101.0.1"), p("100.100.40.1")
	a.attached = map[netip.Addr]attachment{local: {VIP: local, Dev: "vif1.0", Epoch: 3}, caching: {VIP: caching, Dev: "vif2.0", Epoch: 1}}
	a.engine = migrate.New(migrate.Config{Name: "h1", Host: engineHost{a}, Device: fakeDevice("vmrc0"), Logger: a.log})
	a.engine.LocalLocked(local, "vif1.0")
	a.engine.LocalLocked(caching, "vif2.0")
	if err := a.engine.SuspendLocked(caching, "test"); err != nil {
		t.Fatal(err)
	}
	records := []gossip.Record{
		{VIP: local, Owner: "h1", Epoch: 3},
		{VIP: caching, Owner: "h1", Epoch: 1},
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
		{Dst: host(local), Dev: "vmrc0", Metric: migrate.MetricStandby},
		{Dst: host(caching), Dev: "vmrc0", Metric: migrate.MetricDivert},
		{Dst: host(lanVIP), Dev: "eth0", Via: p("198.18.0.3"), Metric: metricOverlay},
		{Dst: host(outside), Dev: "vmr0", Metric: metricOverlay},
	}
	slices.SortFunc(got, route.Compare)
	slices.SortFunc(want, route.Compare)
	if !slices.Equal(got, want) {
		t.Errorf("routes:\n got %v\nwant %v", got, want)
	}
	if len(overLAN) != 1 || !overLAN[lanVIP] {
		t.Errorf("over the LAN: %v, want only %s", overLAN, lanVIP)
	}

	// Without a cache (--cache=false) a local VIP has no standby route.
	a.cacheDev = ""
	a.engine = migrate.New(migrate.Config{Name: "h1", Host: engineHost{a}, Logger: a.log})
	got, _ = a.wantRoutes(records[:1], nil)
	if len(got) != 2 || got[1] != (route.Route{Dst: host(local), Dev: "vif1.0", Metric: metricLocalVIP}) {
		t.Errorf("without a cache: %v", got)
	}
}

// fakeDevice is a cache device that reads nothing.
type fakeDevice string

func (d fakeDevice) Name() string                { return string(d) }
func (fakeDevice) Attach(netip.Addr, cache.Sink) {}
func (fakeDevice) Detach(netip.Addr, cache.Sink) {}
func (fakeDevice) Barrier(time.Duration) error   { return nil }
