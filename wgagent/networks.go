package wgagent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/filter"
)

// AddNetwork declares a virtual network cluster-wide (`vmroam network add`).
func (b backend) AddNetwork(_ context.Context, name string, prefix netip.Prefix) (control.Network, error) {
	a := b.a
	n, err := a.declareNetwork(name, prefix)
	if err != nil {
		return control.Network{}, err
	}
	a.log.Info("virtual network declared", "network", n.Name, "prefix", n.Prefix, "epoch", n.Epoch)
	a.kick()
	return a.networkStatus(n), nil
}

// RemoveNetwork removes a virtual network cluster-wide.
func (b backend) RemoveNetwork(_ context.Context, name string) (control.Network, error) {
	a := b.a
	n, ok := a.cluster.RemoveNetwork(name)
	if !ok {
		return control.Network{}, badRequest("no virtual network %q", name)
	}
	a.log.Info("virtual network removed", "network", name, "epoch", n.Epoch)
	a.kick()
	return control.Network{Name: n.Name, Epoch: n.Epoch, Origin: n.Origin}, nil
}

// declareNetwork checks prefix against every host address this agent knows
// of, then lets gossip check it against the other networks and spread it.
func (a *Agent) declareNetwork(name string, prefix netip.Prefix) (gossip.Network, error) {
	if err := a.checkNetworkPrefix(prefix); err != nil {
		return gossip.Network{}, err
	}
	n, err := a.cluster.DeclareNetwork(name, prefix)
	if err != nil {
		return gossip.Network{}, fmt.Errorf("%w: %v", control.ErrBadRequest, err)
	}
	return n, nil
}

// checkNetworkPrefix refuses a prefix that holds a host's overlay or
// underlay address, or overlaps a network this host sits on: VMs of the
// network would shadow hosts.
func (a *Agent) checkNetworkPrefix(p netip.Prefix) error {
	if err := gossip.ValidNetworkPrefix(p); err != nil {
		return badRequest("%v", err)
	}
	if p.Contains(a.cfg.Address.Addr()) {
		return badRequest("%s holds this host's overlay address %s", p, a.cfg.Address.Addr())
	}
	for _, m := range a.cluster.Members() {
		if m.MetaErr != nil {
			continue
		}
		if p.Contains(m.Meta.Address) {
			return badRequest("%s holds the overlay address %s of host %s", p, m.Meta.Address, m.Name)
		}
		if ep := m.Meta.Endpoint.Addr().Unmap(); p.Contains(ep) {
			return badRequest("%s holds the underlay address %s of host %s", p, ep, m.Name)
		}
	}
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list this host's addresses: %w", err)
	}
	for _, ad := range addrs {
		ip, ok := netip.AddrFromSlice(ad.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		ones, _ := ad.Mask.Size()
		own := netip.PrefixFrom(ip, ones).Masked()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || own.Contains(a.cfg.Address.Addr()) {
			continue // not the underlay; the overlay is checked above
		}
		if gossip.Overlaps(p, own) {
			dev := "an interface"
			if l, err := netlink.LinkByIndex(ad.LinkIndex); err == nil {
				dev = l.Attrs().Name
			}
			return badRequest("%s overlaps %s, the underlay on %s", p, own, dev)
		}
	}
	return nil
}

// declareConfigured declares the networks of the config file, once the
// agent has joined (so it sees what the cluster has already), and again
// after a reload that changed them. Its problems replace the earlier ones.
func (a *Agent) declareConfigured(networks []NetworkConfig) {
	var problems []string
	for _, n := range networks {
		cur, ok := a.cluster.Table().Network(n.Name)
		if ok && !cur.Removed() && cur.Prefix == n.Prefix {
			continue
		}
		if _, err := a.declareNetwork(n.Name, n.Prefix); err != nil {
			a.log.Error("network from the config not declared", "network", n.Name, "prefix", n.Prefix, "err", err)
			problems = append(problems, fmt.Sprintf("network %s %s from the config: %v", n.Name, n.Prefix, err))
		}
	}
	a.mu.Lock()
	a.configProblems = problems
	a.mu.Unlock()
}

// checkAttachNetwork refuses a VIP outside every virtual network once any
// is declared: it would be reachable from all of them.
func (a *Agent) checkAttachNetwork(vip netip.Addr) error {
	t := a.cluster.Table()
	active := t.ActiveNetworks()
	if len(active) == 0 {
		return nil
	}
	if _, ok := t.NetworkOf(vip); ok {
		return nil
	}
	var names []string
	for _, n := range active {
		names = append(names, n.Name+" "+n.Prefix.String())
	}
	return badRequest("%s is in no virtual network (declared: %s); declare one with 'vmroam network add NAME CIDR'", vip, strings.Join(names, ", "))
}

// networksStatus is every live network as status shows it; the active set
// and the overlaps are computed once for the whole list.
func (a *Agent) networksStatus() []control.Network {
	t := a.cluster.Table()
	active := map[string]bool{}
	for _, n := range t.ActiveNetworks() {
		active[n.Name] = true
	}
	overlaps := map[string]string{}
	for _, ov := range t.NetworkOverlaps() {
		overlaps[ov.Loser.Name] = ov.Winner.Name
	}
	out := []control.Network{}
	for _, n := range t.Networks() {
		out = append(out, control.Network{Name: n.Name, Prefix: n.Prefix, Epoch: n.Epoch, Origin: n.Origin,
			Active: active[n.Name], Overlaps: overlaps[n.Name]})
	}
	return out
}

// networkStatus is n as status shows it.
func (a *Agent) networkStatus(n gossip.Network) control.Network {
	for _, cn := range a.networksStatus() {
		if cn.Name == n.Name {
			return cn
		}
	}
	return control.Network{Name: n.Name, Prefix: n.Prefix, Epoch: n.Epoch, Origin: n.Origin}
}

// wantRuleset is the nftables table the cluster state asks for.
func (a *Agent) wantRuleset() filter.Ruleset {
	r := filter.Ruleset{TunnelDev: a.cfg.Interface, TunnelMTU: a.cfg.MTU}
	for _, n := range a.cluster.Table().ActiveNetworks() {
		r.Networks = append(r.Networks, filter.Network{Name: n.Name, Prefix: n.Prefix})
	}
	return r
}

// reconcileFilter rewrites vmroam's nftables table when the networks
// changed, and, when verify is set, repairs it if someone else changed or
// deleted it. a.mu held.
func (a *Agent) reconcileFilter(verify bool, problem func(string, ...any)) {
	if a.filter == nil {
		return
	}
	want := a.wantRuleset()
	same := a.filterApplied != nil && slices.Equal(a.filterApplied.Networks, want.Networks) &&
		a.filterApplied.TunnelDev == want.TunnelDev && a.filterApplied.TunnelMTU == want.TunnelMTU
	if same && !verify {
		return
	}
	if same {
		ok, err := a.filter.Check()
		if err == nil && ok {
			return
		}
		if err == nil {
			a.log.Warn("nftables table changed by someone else: rebuilding it")
		}
	}
	if err := a.filter.Apply(want); err != nil {
		a.filterApplied = nil
		problem("nftables (isolation between networks, MSS clamping): %v", err)
		return
	}
	a.filterApplied = &want
}
