package wgagent

import (
	"errors"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/route"
)

// Fence gateways: on-link addresses on a VM's interface that nobody
// answers for. Routing a VIP through one makes the kernel queue its packets
// while it resolves the gateway, until the agent says where it is. There
// are two per family: the hand-back moves the route from one to the other
// (fence).
var (
	fenceGateways4 = [2]netip.Addr{netip.MustParseAddr("169.254.0.2"), netip.MustParseAddr("169.254.0.3")}
	fenceGateways6 = [2]netip.Addr{netip.MustParseAddr("fe80::76:6d72"), netip.MustParseAddr("fe80::76:6d73")}
)

func fenceGateways(vip netip.Addr) [2]netip.Addr {
	if vip.Is4() {
		return fenceGateways4
	}
	return fenceGateways6
}

// maxFenceSteps bounds how often the hand-back moves the route from one
// fence gateway to the other before it lets the kernel's queue go while
// new packets pass (fence).
const maxFenceSteps = 8

// fence hands the VIP from the cache back to the kernel without letting a
// packet overtake one still inside the cache: it points the VIP's route at
// the VM through an unresolved gateway (the kernel queues new packets in
// order), waits until the cache has delivered everything it took, then
// resolves the gateway to the VM's MAC, which releases the kernel's queue.
// Without a known MAC it does nothing and the switch is plain.
//
// The kernel sends a resolved neighbour's queue one packet at a time,
// unlocked in between, while packets from other CPUs already pass: one
// arriving meanwhile overtakes the queue's tail. So a gateway is resolved
// while packets queue for it only once the route has moved to the other,
// unresolved, gateway: what arrives meanwhile waits there. Resolving a
// gateway nothing waits for (the kernel makes its neighbour entry for the
// first packet) releases nothing, so nothing can be overtaken: that ends
// the hand-back, as soon as a step finds no packet that came during the
// one before. Traffic in bursts (iperf3 sends one every millisecond) leaves
// such a gap within a few steps of ~0.2 ms.
func (a *Agent) fence(c *vipCtl, o *cache.Orderer) (waited time.Duration, quiet bool, steps int) {
	c.mu.Lock()
	dev, mac := c.dev, c.mac
	c.mu.Unlock()
	if len(mac) != 6 {
		if m, ok := cache.NeighborMAC(dev, c.vip); ok {
			mac = m
		} else {
			return 0, false, 0
		}
	}
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return 0, false, 0
	}
	gws := fenceGateways(c.vip)
	fam := netlink.FAMILY_V4
	if c.vip.Is6() {
		fam = netlink.FAMILY_V6
	}
	neigh := func(ip netip.Addr, state int) *netlink.Neigh {
		return &netlink.Neigh{LinkIndex: link.Attrs().Index, Family: fam, State: state, IP: ip.AsSlice(), HardwareAddr: mac}
	}
	routeVia := func(gw netip.Addr) {
		a.mu.Lock()
		c.mu.Lock()
		c.fenceVia = gw // so a reconcile keeps the fence route
		c.mu.Unlock()
		a.mu.Unlock()
		if err := a.routes.Add(route.Route{Dst: hostPrefix(c.vip), Dev: dev, Via: gw, Metric: divertMetric(c.vip)}); err != nil {
			a.log.Warn("fence route", "vip", c.vip, "err", err)
		}
	}
	// resolve resolves gateway gw to the VM; with onlyIdle, only if no
	// packet waits for it, which the kernel decides atomically: it makes
	// the neighbour entry for the first packet, and an exclusive add fails
	// on one that exists.
	resolve := func(gw netip.Addr, onlyIdle bool) (done bool) {
		// With embedded wireguard-go nothing arrives from the tunnel while
		// the tunnel's writes are held.
		release, _ := a.dev.HoldWrites()
		var err error
		if onlyIdle {
			err = netlink.NeighAdd(neigh(gw, netlink.NUD_PERMANENT))
		} else {
			err = netlink.NeighSet(neigh(gw, netlink.NUD_PERMANENT))
		}
		release()
		if onlyIdle && errors.Is(err, unix.EEXIST) {
			return false
		}
		if err != nil {
			a.log.Warn("fence: resolving the fence gateway", "vip", c.vip, "gateway", gw, "err", err)
		}
		return true
	}
	for _, gw := range gws {
		netlink.NeighDel(neigh(gw, 0)) // left resolved by an earlier fence
	}
	// The kernel's queue for an unresolved neighbour is small (208 KiB);
	// make room for the fence's few milliseconds of traffic.
	for _, p := range []string{"/proc/sys/net/ipv4/neigh/" + dev + "/unres_qlen_bytes", "/proc/sys/net/ipv6/neigh/" + dev + "/unres_qlen_bytes"} {
		os.WriteFile(p, []byte("8388608"), 0o644)
	}
	routeVia(gws[0])
	// Nothing new reaches the cache now; wait for what is inside: the
	// barrier says the device's queue is empty of the VIP (a quiet spell
	// alone does not: senders such as iperf3 send in bursts a millisecond
	// apart, and the reader may not have woken for the last one yet),
	// then the orderer must have written all it took.
	// Short is better: the fewer packets queue at the gateway meanwhile,
	// the sooner a step finds none.
	start := time.Now()
	deadline := start.Add(50 * time.Millisecond)
	if err := a.intercept.Barrier(50 * time.Millisecond); err != nil {
		a.log.Warn("fence", "vip", c.vip, "err", err)
	} else {
		for time.Now().Before(deadline) {
			if o.Idle() {
				quiet = true
				break
			}
			time.Sleep(10 * time.Microsecond)
		}
	}
	waited = time.Since(start)
	cur := 0
	for !resolve(gws[cur], steps < maxFenceSteps) {
		next := 1 - cur
		netlink.NeighDel(neigh(gws[next], 0)) // resolved by the step before last
		routeVia(gws[next])
		resolve(gws[cur], false)
		cur = next
		steps++
	}
	// The VIP's own neighbour entry, for after the fence route goes.
	netlink.NeighSet(neigh(c.vip, netlink.NUD_REACHABLE))
	return waited, quiet, steps
}
