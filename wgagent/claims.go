package wgagent

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
)

// What a host may claim. A record routes its VIP into the tunnel on every
// host and puts it in its owner's AllowedIPs, so a VIP that is a host's
// address takes that host's WireGuard and gossip traffic into the tunnel
// (the host goes dead), and one that is loopback, link-local or the
// metadata service's sends what is local to every host to the claimer.
// One rule (claimRules.refuse) decides for a local attach and for every
// record from another host alike; a refused record changes no route and no
// peer, and is shown.

// claimRules are the facts a refusal rests on: where VIPs may be, the
// members' addresses and this host's.
type claimRules struct {
	// prefixes are where VIPs may be (--vip-prefixes; by default the
	// overlay prefix and the declared virtual networks).
	prefixes []netip.Prefix
	// hosts says, for every overlay and underlay address of a member
	// (this host included), whose it is: "the overlay address of host h2".
	hosts map[netip.Addr]string
	// local maps this host's interface addresses to their interface's
	// index, which ifName names.
	local  map[netip.Addr]int
	ifName func(int) string
}

var broadcast4 = netip.AddrFrom4([4]byte{255, 255, 255, 255})

// refuse says why vip cannot be a VIP; "" if it can be one.
func (c claimRules) refuse(vip netip.Addr) string {
	if err := gossip.ValidVIP(vip); err != nil {
		return err.Error()
	}
	switch {
	case vip.IsLoopback():
		return "a loopback address"
	case vip.IsLinkLocalUnicast():
		return "a link-local address (169.254.0.0/16, fe80::/10: the VM gateways and the metadata service)"
	case vip.IsMulticast():
		return "a multicast address"
	case vip.IsUnspecified():
		return "the unspecified address"
	case vip == broadcast4:
		return "the broadcast address"
	}
	if who, ok := c.hosts[vip]; ok {
		return who
	}
	if i, ok := c.local[vip]; ok {
		return "an address of this host's interface " + c.ifName(i)
	}
	if !slices.ContainsFunc(c.prefixes, func(p netip.Prefix) bool { return p.Contains(vip) }) {
		return fmt.Sprintf("outside the overlay (--vip-prefixes %s)", prefixList(c.prefixes))
	}
	return ""
}

func prefixList(ps []netip.Prefix) string {
	s := ""
	for i, p := range ps {
		if i > 0 {
			s += ","
		}
		s += p.String()
	}
	return s
}

// claimRules gathers the rules as they stand: the config, the members
// known now and this host's addresses as last read (refreshLocalAddrs).
func (a *Agent) claimRules(members []gossip.Member) claimRules {
	c := claimRules{hosts: map[netip.Addr]string{}, ifName: linkName}
	if l := a.localAddrs.Load(); l != nil {
		c.local = l.byAddr
	}
	if len(a.cfg.VIPPrefixes) > 0 {
		c.prefixes = a.cfg.VIPPrefixes
	} else {
		c.prefixes = []netip.Prefix{a.cfg.Address.Masked()}
		for _, n := range a.cluster.Table().Networks() {
			c.prefixes = append(c.prefixes, n.Prefix)
		}
	}
	add := func(ip netip.Addr, what string) {
		if ip = ip.Unmap(); ip.IsValid() && !ip.IsUnspecified() {
			if _, ok := c.hosts[ip]; !ok {
				c.hosts[ip] = what
			}
		}
	}
	add(a.cfg.Address.Addr(), "this host's overlay address")
	add(a.cfg.advertise(), "this host's underlay address")
	add(a.cfg.BindAddr, "this host's underlay address")
	for _, m := range members {
		if m.Local {
			continue
		}
		if m.MetaErr == nil {
			add(m.Meta.Address, "the overlay address of host "+m.Name)
			add(m.Meta.Endpoint.Addr(), "the underlay address of host "+m.Name)
		}
		add(m.Addr.Addr(), "the underlay address of host "+m.Name)
	}
	return c
}

// hostAddrs are this host's interface addresses and the interfaces that
// carry the underlay: those on a subnet that holds this host's advertised
// or bound address or a member's. A host-length address (/32, /128) makes
// no subnet: Xen's vif-route puts dom0's own address on every VM
// interface that way. Interfaces are kept by index, named only when a
// refusal says which: listing the links too (one message each, hundreds
// on a busy host) would be a second dump at every attach.
type hostAddrs struct {
	byAddr   map[netip.Addr]int
	underlay map[int]bool
}

// refreshLocalAddrs reads this host's addresses again. It is a netlink
// dump: an attach and the periodic reconcile do it, not every reconcile
// (addresses change seldom, and a migration's reconciles need the CPU).
func (a *Agent) refreshLocalAddrs(members []gossip.Member) error {
	addrs, err := netlink.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list this host's addresses: %w", err)
	}
	l := &hostAddrs{byAddr: map[netip.Addr]int{}, underlay: map[int]bool{}}
	under := []netip.Addr{a.cfg.advertise().Unmap(), a.cfg.BindAddr.Unmap()}
	for _, m := range members {
		if !m.Local && m.MetaErr == nil {
			under = append(under, m.Meta.Endpoint.Addr().Unmap())
		}
	}
	for _, ad := range addrs {
		ip, ok := netip.AddrFromSlice(ad.IP)
		if !ok {
			continue
		}
		ip = ip.Unmap()
		l.byAddr[ip] = ad.LinkIndex
		ones, _ := ad.Mask.Size()
		if ip.IsLoopback() || ip.IsLinkLocalUnicast() || ones == ip.BitLen() {
			continue
		}
		subnet := netip.PrefixFrom(ip, ones).Masked()
		for _, u := range under {
			if u.IsValid() && subnet.Contains(u) {
				l.underlay[ad.LinkIndex] = true
			}
		}
	}
	a.localAddrs.Store(l)
	return nil
}

// isUnderlayDev says whether dev carries the underlay, as last read.
func (a *Agent) isUnderlayDev(dev string) bool {
	l := a.localAddrs.Load()
	if l == nil {
		return false
	}
	link, err := netlink.LinkByName(dev)
	return err == nil && l.underlay[link.Attrs().Index]
}

// linkName names the interface with index i, for a message.
func linkName(i int) string {
	if link, err := netlink.LinkByIndex(i); err == nil {
		return link.Attrs().Name
	}
	return fmt.Sprintf("#%d", i)
}

// refusedRecord is a record of another host that this one does not follow.
type refusedRecord struct {
	gossip.Record
	why string
}

// followedRecords splits records into those this host follows (its own,
// tombstones, and others' that rules allow) and those it refuses.
func followedRecords(records []gossip.Record, self string, rules claimRules) ([]gossip.Record, []refusedRecord) {
	var refused []refusedRecord
	out := records[:0:0]
	for _, r := range records {
		if r.Owner != "" && r.Owner != self {
			if why := rules.refuse(r.VIP); why != "" {
				refused = append(refused, refusedRecord{r, why})
				continue
			}
		}
		out = append(out, r)
	}
	return out, refused
}

// refusedStatus is refused as status shows it.
func refusedStatus(refused []refusedRecord) []control.RefusedRecord {
	out := make([]control.RefusedRecord, 0, len(refused))
	for _, r := range refused {
		out = append(out, control.RefusedRecord{VIP: r.VIP.String(), Owner: r.Owner, Epoch: r.Epoch, Reason: r.why})
	}
	return out
}

// noteRefusedLocked keeps refused for status and the metrics, raises each
// as a problem and logs each new one once. a.mu held.
func (a *Agent) noteRefusedLocked(refused []refusedRecord, problem func(string, ...any)) {
	for _, r := range refusedStatus(refused) {
		problem("%s", r.Problem())
	}
	now := make(map[netip.Addr]refusedRecord, len(refused))
	for _, r := range refused {
		now[r.VIP] = r
		if a.refused[r.VIP].Record != r.Record {
			a.log.Warn("refused another host's record: its VIP cannot be one; nothing routed", "vip", r.VIP, "owner", r.Owner, "epoch", r.Epoch, "reason", r.why)
		}
	}
	a.refused = now
}

// refusedLocked is what the last reconcile refused, by VIP. a.mu held.
func (a *Agent) refusedLocked() []refusedRecord {
	out := slices.Collect(maps.Values(a.refused))
	slices.SortFunc(out, func(x, y refusedRecord) int { return x.VIP.Compare(y.VIP) })
	return out
}

// isRefusedLocked says whether r is a record the last reconcile refused.
// a.mu held.
func (a *Agent) isRefusedLocked(r gossip.Record) bool {
	o, ok := a.refused[r.VIP]
	return ok && o.Record == r
}

// refusedByOwnerLocked counts the records refused now, by owner. a.mu held.
func (a *Agent) refusedByOwnerLocked() map[string]int {
	out := map[string]int{}
	for _, r := range a.refused {
		out[r.Owner]++
	}
	return out
}
