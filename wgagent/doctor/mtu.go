package doctor

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/wgagent/control"
)

// Bytes WireGuard adds to each tunnelled packet: the outer IP header, UDP
// (8) and WireGuard's data header and tag (16 + 16).
const (
	overheadV4 = 20 + 8 + 32
	overheadV6 = 40 + 8 + 32
)

func overhead(a netip.Addr) int {
	if a.Is4() {
		return overheadV4
	}
	return overheadV6
}

// endpoint is another host's underlay address the tunnel reaches it at.
type endpoint struct {
	name string // the peer's name, or the address given on the command line
	addr netip.Addr
}

func (e endpoint) String() string {
	if e.name == e.addr.String() {
		return e.name
	}
	return fmt.Sprintf("peer %s (%s)", e.name, e.addr)
}

// pingCommand is the command line of a ping to e as large as a full tunnel
// packet of MTU bytes: ping's -s is MTU + 32 for IPv4 and IPv6 alike (the
// outer IP header is part of both ping's packet and the tunnel's overhead).
func pingCommand(e endpoint) string {
	return fmt.Sprintf("ping -M do -c 1 -s $((MTU+32)) %s", e.addr)
}

// checkMTU checks that a full packet of the tunnel, once WireGuard wrapped
// it, fits the path to every peer: first what this host's routes allow (the
// outgoing interface's MTU, a route's mtu, a path MTU the kernel learnt),
// then, with Probe, what a ping with Don't Fragment finds beyond.
func checkMTU(cfg Config, st *control.Status) []Result {
	tunMTU, tunWhat := tunnelMTU(cfg, st)
	eps := endpoints(cfg, st)
	if len(eps) == 0 {
		found := fmt.Sprintf("tunnel MTU %d (%s); no peer to check the path to", tunMTU, tunWhat)
		if st == nil {
			found += " (the agent did not answer; name other hosts with --endpoint)"
		}
		return []Result{{Check: "mtu", Level: Info, Found: found}}
	}
	var results []Result
	var fits []endpoint
	for _, e := range eps {
		need := tunMTU + overhead(e.addr)
		pathMTU, dev, byRoute, err := routeMTU(e.addr)
		via := "via " + dev
		if byRoute {
			via += fmt.Sprintf(" (its mtu, see ip route get %s)", e.addr)
		}
		switch {
		case err != nil:
			results = append(results, Result{Check: "mtu", Level: Warn,
				Found: fmt.Sprintf("to %s: %v", e, err),
				Fix:   fmt.Sprintf("ip route get %s; add a route to the other hosts' underlay addresses", e.addr)})
		case pathMTU == 0: // this host's own address
		case need > pathMTU:
			results = append(results, Result{Check: "mtu", Level: Fail,
				Found: fmt.Sprintf("to %s: a full tunnel packet is %d bytes (MTU %d + %d), the route %s allows %d: every full packet is fragmented", e, need, tunMTU, overhead(e.addr), via, pathMTU),
				Fix:   mtuFix(pathMTU-overhead(e.addr), dev, byRoute, need)})
		default:
			fits = append(fits, e)
		}
	}
	confirmed := 0
	if cfg.Probe && len(fits) > 0 {
		var rs []Result
		fits, confirmed, rs = probeMTU(cfg, fits, tunMTU)
		results = append(results, rs...)
	}
	if len(fits) > 0 {
		found := fmt.Sprintf("tunnel MTU %d (%s) + %d (IPv4) or %d (IPv6) bytes of WireGuard fits the route to %d hosts", tunMTU, tunWhat, overheadV4, overheadV6, len(fits))
		if cfg.Probe {
			found += fmt.Sprintf("; %d answered a full-size ping with Don't Fragment", confirmed)
		}
		results = append(results, Result{Check: "mtu", Level: OK, Found: found})
	}
	return results
}

// mtuFix says how to make the tunnel's packets fit a path: a smaller tunnel
// MTU, or a larger MTU on this host's interface dev (when the interface, not
// the route, is what limits the path).
func mtuFix(maxTunnel int, dev string, byRoute bool, need int) string {
	var fixes []string
	if maxTunnel >= 1280 {
		fixes = append(fixes, fmt.Sprintf("--mtu %d (mtu = %d in the config file) on the hosts whose traffic takes this path", maxTunnel, maxTunnel))
	}
	if dev != "" && !byRoute {
		fixes = append(fixes, fmt.Sprintf("ip link set dev %s mtu %d (if the network behind it carries that)", dev, need))
	}
	if len(fixes) == 0 {
		return "raise the MTU of the link on the path (the tunnel needs at least 1280)"
	}
	return strings.Join(fixes, ", or ")
}

// tunnelMTU is the WireGuard interface's MTU, or the configured one while
// it does not exist.
func tunnelMTU(cfg Config, st *control.Status) (int, string) {
	name := wgInterface(cfg, st)
	if l, err := netlink.LinkByName(name); err == nil {
		return l.Attrs().MTU, name
	}
	return cfg.MTU, fmt.Sprintf("--mtu; %s does not exist", name)
}

// endpoints are the addresses of the agent's live peers and those given in
// the config, each once, without this host's own.
func endpoints(cfg Config, st *control.Status) []endpoint {
	var self netip.Addr
	var eps []endpoint
	seen := map[netip.Addr]bool{}
	add := func(name string, a netip.Addr) {
		a = a.Unmap()
		if !a.IsValid() || a == self || seen[a] {
			return
		}
		seen[a] = true
		eps = append(eps, endpoint{name: name, addr: a})
	}
	if st != nil {
		if ap, err := netip.ParseAddrPort(st.Endpoint); err == nil {
			self = ap.Addr().Unmap()
		}
		for _, p := range st.Peers {
			if p.State != "alive" && p.State != "suspect" {
				continue
			}
			if ap, err := netip.ParseAddrPort(p.Endpoint); err == nil {
				add(p.Name, ap.Addr())
			}
		}
	}
	for _, a := range cfg.Endpoints {
		add(a.String(), a)
	}
	return eps
}

// routeMTU asks the kernel how it routes to a: the outgoing interface and
// its MTU, lowered by the route's own mtu or a path MTU the kernel learnt
// (byRoute). It returns mtu 0 for this host's own address.
func routeMTU(a netip.Addr) (mtu int, dev string, byRoute bool, err error) {
	routes, err := netlink.RouteGet(a.AsSlice())
	if err != nil {
		return 0, "", false, fmt.Errorf("no route to %s: %w", a, err)
	}
	if len(routes) == 0 {
		return 0, "", false, fmt.Errorf("no route to %s", a)
	}
	r := routes[0]
	if r.Type == unix.RTN_LOCAL {
		return 0, "", false, nil
	}
	link, err := netlink.LinkByIndex(r.LinkIndex)
	if err != nil {
		return 0, "", false, fmt.Errorf("route to %s: interface %d: %w", a, r.LinkIndex, err)
	}
	mtu, dev = link.Attrs().MTU, link.Attrs().Name
	if r.MTU > 0 && r.MTU < mtu {
		return r.MTU, dev, true, nil
	}
	return mtu, dev, false, nil
}
