package migrate

import (
	"net/netip"
	"time"

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
func (e *Engine) fence(c *vipCtl, o *cache.Orderer) (waited time.Duration, quiet bool, steps int) {
	c.mu.Lock()
	dev, mac := c.dev, c.mac
	c.mu.Unlock()
	if len(mac) != 6 {
		if m, ok := e.links.NeighborMAC(dev, c.vip); ok {
			mac = m
		} else {
			return 0, false, 0
		}
	}
	f, err := e.links.OpenFence(dev, c.vip, mac)
	if err != nil {
		return 0, false, 0
	}
	gws := fenceGateways(c.vip)
	routeVia := func(gw netip.Addr) {
		e.host.Lock()
		c.mu.Lock()
		spilled := c.orderer != o // the VM left: the VIP stays diverted
		if !spilled {
			c.fenceVia = gw // so a reconcile keeps the fence route
		}
		c.mu.Unlock()
		e.host.Unlock()
		if spilled {
			return
		}
		if err := e.host.AddRoute(route.Route{Dst: hostPrefix(c.vip), Dev: dev, Via: gw, Metric: divertMetric(c.vip)}); err != nil {
			e.log.Warn("fence route", "vip", c.vip, "err", err)
		}
	}
	// resolve resolves gateway gw to the VM; with onlyIdle, only if no
	// packet waits for it.
	resolve := func(gw netip.Addr, onlyIdle bool) (done bool) {
		// With embedded wireguard-go nothing arrives from the tunnel while
		// the tunnel's writes are held.
		release := e.host.HoldTunnelWrites()
		done, err := f.Resolve(gw, onlyIdle)
		release()
		if err != nil {
			e.log.Warn("fence: resolving the fence gateway", "vip", c.vip, "gateway", gw, "err", err)
		}
		return done
	}
	for _, gw := range gws {
		f.Unresolve(gw) // left resolved by an earlier fence
	}
	f.MakeRoom()
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
	if err := e.dev.Barrier(50 * time.Millisecond); err != nil {
		e.log.Warn("fence", "vip", c.vip, "err", err)
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
		f.Unresolve(gws[next]) // resolved by the step before last
		routeVia(gws[next])
		resolve(gws[cur], false)
		cur = next
		steps++
	}
	f.Reach()
	return waited, quiet, steps
}
