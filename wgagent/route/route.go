// Package route keeps the kernel's routes equal to a desired set. It touches
// only routes tagged with vmroam's routing protocol number, so routes that
// others made (Xen's vif-route, the operator) are left alone, and it puts back
// any of its routes that someone else deleted.
package route

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Protocol tags the routes vmroam owns ("proto 118" in `ip route`).
const Protocol netlink.RouteProtocol = 118

// Route is one route vmroam wants in the main table.
type Route struct {
	// Dst is the destination prefix.
	Dst netip.Prefix
	// Dev is the output interface, looked up by name at every reconcile
	// because a VM's interface may come and go with a new index.
	Dev string
	// Metric orders routes to the same prefix; lower wins.
	Metric int
	// Via, when valid, is an on-link gateway on Dev: the kernel then
	// resolves Via's neighbour entry instead of Dst's.
	Via netip.Addr
}

func (r Route) String() string {
	if r.Via.IsValid() {
		return fmt.Sprintf("%s via %s dev %s onlink metric %d", r.Dst, r.Via, r.Dev, r.Metric)
	}
	return fmt.Sprintf("%s dev %s metric %d", r.Dst, r.Dev, r.Metric)
}

// ipv6DefaultMetric is the metric the kernel gives an IPv6 route added
// with none; keys must match what the kernel lists.
const ipv6DefaultMetric = 1024

type key struct {
	dst    netip.Prefix
	metric int
}

// Table reconciles the kernel to the desired routes. It is safe for
// concurrent use.
type Table struct {
	mu      sync.Mutex
	desired map[key]Route
}

// NewTable returns a table that wants no routes.
func NewTable() *Table { return &Table{desired: map[key]Route{}} }

// Set replaces the desired routes. It does not touch the kernel.
func (t *Table) Set(routes []Route) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.desired = make(map[key]Route, len(routes))
	for _, r := range routes {
		r.Dst = r.Dst.Masked()
		if r.Metric == 0 && r.Dst.Addr().Is6() {
			r.Metric = ipv6DefaultMetric // what the kernel stores for 0
		}
		t.desired[key{r.Dst, r.Metric}] = r
	}
}

// Desired returns the desired routes, sorted.
func (t *Table) Desired() []Route {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]Route, 0, len(t.desired))
	for _, r := range t.desired {
		out = append(out, r)
	}
	slices.SortFunc(out, Compare)
	return out
}

// Compare orders routes by destination address, then metric: the order of
// Desired. Within one table no two routes are equal by it.
func Compare(a, b Route) int {
	if c := a.Dst.Addr().Compare(b.Dst.Addr()); c != 0 {
		return c
	}
	return a.Metric - b.Metric
}

// Add puts one route into the kernel now, ahead of the next reconcile,
// which keeps it if the desired set has it by then and removes it if not.
func (t *Table) Add(r Route) error {
	link, err := netlink.LinkByName(r.Dev)
	if err != nil {
		return fmt.Errorf("route %s: %s: %w", r.Dst, r.Dev, ErrNoDevice)
	}
	if err := netlink.RouteReplace(kernelRoute(r, link.Attrs().Index)); err != nil {
		return fmt.Errorf("add route %s: %w", r, err)
	}
	return nil
}

// ErrNoDevice marks a desired route whose interface does not exist now.
var ErrNoDevice = errors.New("interface not found")

// Reconcile adds or fixes the desired routes and deletes vmroam's routes
// that are no longer desired. Routes whose device is missing are skipped
// and reported in the error (wrapping ErrNoDevice); the rest still applies.
func (t *Table) Reconcile() error {
	want := t.Desired()
	have, err := list()
	if err != nil {
		return err
	}
	var errs []error
	seen := map[key]bool{}
	// Most routes share a few devices, and each lookup is a netlink round
	// trip (50-60 µs here).
	index := map[string]int{}
	for _, r := range want {
		k := key{r.Dst, r.Metric}
		seen[k] = true
		idx, ok := index[r.Dev]
		if !ok {
			link, err := netlink.LinkByName(r.Dev)
			if err == nil {
				idx = link.Attrs().Index
			}
			index[r.Dev] = idx
		}
		if idx == 0 {
			errs = append(errs, fmt.Errorf("route %s: %s: %w", r.Dst, r.Dev, ErrNoDevice))
			continue
		}
		if cur, ok := have[k]; ok && cur.LinkIndex == idx && sameGateway(cur.Gw, r.Via) {
			continue
		}
		if err := netlink.RouteReplace(kernelRoute(r, idx)); err != nil {
			errs = append(errs, fmt.Errorf("add route %s: %w", r, err))
		}
	}
	for k, cur := range have {
		if seen[k] {
			continue
		}
		if err := netlink.RouteDel(&cur); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", k.dst, err))
		}
	}
	return errors.Join(errs...)
}

// Flush deletes every route tagged with Protocol, desired or not; the agent
// calls it on shutdown.
func (t *Table) Flush() error {
	t.Set(nil)
	return t.Reconcile()
}

func kernelRoute(r Route, index int) *netlink.Route {
	kr := &netlink.Route{
		LinkIndex: index,
		Dst:       ipNet(r.Dst),
		Priority:  r.Metric,
		Protocol:  Protocol,
		Scope:     netlink.SCOPE_LINK,
		Table:     unix.RT_TABLE_MAIN,
	}
	if r.Via.IsValid() {
		kr.Gw = r.Via.AsSlice()
		kr.Scope = netlink.SCOPE_UNIVERSE
		kr.SetFlag(netlink.FLAG_ONLINK)
	}
	return kr
}

func sameGateway(gw net.IP, via netip.Addr) bool {
	if len(gw) == 0 {
		return !via.IsValid()
	}
	a, ok := netip.AddrFromSlice(gw)
	return ok && via.IsValid() && a.Unmap() == via
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// list returns vmroam's routes in the main table, both families.
func list() (map[key]netlink.Route, error) {
	filter := &netlink.Route{Protocol: Protocol, Table: unix.RT_TABLE_MAIN}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, filter, netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	out := make(map[key]netlink.Route, len(routes))
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		ip, ok := netip.AddrFromSlice(r.Dst.IP)
		if !ok {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		out[key{netip.PrefixFrom(ip.Unmap(), ones), r.Priority}] = r
	}
	return out, nil
}
