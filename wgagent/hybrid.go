package wgagent

import (
	"net/netip"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/route"
)

// lanPaths returns, by member name, how to reach the hosts whose VIPs go
// over the LAN instead of the tunnel: alive members of this host's site
// that, like this host, trust it (--trusted-site). Between sites, or
// with either side untrusting, traffic stays encrypted. The route's Dev and
// Via are the underlay interface and next hop the kernel uses for the
// member's endpoint.
func (a *Agent) lanPaths(members []gossip.Member) map[string]route.Route {
	out := map[string]route.Route{}
	if !a.cfg.TrustedSite || a.cfg.Site == "" {
		return out
	}
	for _, m := range members {
		if m.Local || m.MetaErr != nil || m.State != gossip.MemberAlive || !m.Meta.Trusted || m.Meta.Site != a.cfg.Site {
			continue
		}
		if a.peerRefusal(m) != "" {
			continue
		}
		ep := m.Meta.Endpoint.Addr()
		rs, err := netlink.RouteGet(ep.AsSlice())
		if err != nil || len(rs) == 0 {
			continue
		}
		link, err := netlink.LinkByIndex(rs[0].LinkIndex)
		if err != nil || link.Attrs().Name == a.cfg.Interface {
			continue
		}
		via := ep
		if gw, ok := netip.AddrFromSlice(rs[0].Gw); ok && gw.IsValid() && !gw.IsUnspecified() {
			via = gw.Unmap()
		}
		out[m.Name] = route.Route{Dev: link.Attrs().Name, Via: via}
	}
	return out
}
