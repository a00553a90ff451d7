package migrate

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/vmroam/vmroam/wgagent/route"
)

// TestRoutesLocked pins the routes the engine wants for each state of a
// VIP: none for a local one (the agent routes it to its VM) or one whose
// linger is over (back on its new owner's path); a caching or arriving one
// diverted to the cache device above every VM route (IPv6: metric 1, the
// kernel stores 0 as 1024); one in its hand-back through the fence
// gateway to the VM.
func TestRoutesLocked(t *testing.T) {
	p := netip.MustParseAddr
	local, caching, fenced, undiverted, arriving6 := p("100.100.20.1"), p("100.100.20.2"), p("100.100.20.3"), p("100.100.20.4"), p("fd76:6d72::5")
	e := New(Config{Name: "h1", Device: &fakeDevice{}})
	e.ctls = map[netip.Addr]*vipCtl{
		local:      {vip: local, dev: "vif1.0", state: stateLocal},
		caching:    {vip: caching, dev: "vif2.0", state: stateCaching},
		fenced:     {vip: fenced, dev: "vif3.0", state: stateHolding, fenceVia: fenceGateways4[1]},
		undiverted: {vip: undiverted, dev: "vif4.0", state: stateForwarding, undiverted: true},
		arriving6:  {vip: arriving6, dev: "vif5.0", state: stateHolding},
	}
	got, diverted := e.RoutesLocked()
	want := []route.Route{
		{Dst: hostPrefix(caching), Dev: "vmrc0", Metric: MetricDivert},
		{Dst: hostPrefix(fenced), Dev: "vif3.0", Via: fenceGateways4[1], Metric: MetricDivert},
		{Dst: hostPrefix(arriving6), Dev: "vmrc0", Metric: MetricLocal},
	}
	slices.SortFunc(got, route.Compare)
	slices.SortFunc(want, route.Compare)
	if !slices.Equal(got, want) {
		t.Errorf("routes:\n got %v\nwant %v", got, want)
	}
	if len(diverted) != 3 || !diverted[caching] || !diverted[fenced] || !diverted[arriving6] {
		t.Errorf("diverted %v, want %s, %s and %s", diverted, caching, fenced, arriving6)
	}
}
