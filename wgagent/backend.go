package wgagent

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
)

// backend serves the control API from the agent.
type backend struct{ a *Agent }

func badRequest(format string, args ...any) error {
	return fmt.Errorf("%w: %s", control.ErrBadRequest, fmt.Sprintf(format, args...))
}

// Attach makes this host the owner of vip, reached through dev. Attaching
// what is already attached here is a no-op (a changed dev is taken over),
// so hooks may repeat themselves.
func (b backend) Attach(_ context.Context, vip netip.Addr, dev string) (control.VIP, error) {
	a := b.a
	vip = vip.Unmap()
	if err := a.checkAttach(vip, dev); err != nil {
		return control.VIP{}, err
	}
	a.mu.Lock()
	// A hotplug script that ran before the attach may have replaced the
	// interface's addresses: look at its gateway anew (gateway.go).
	delete(a.gatewaysDone, dev)
	at, ok := a.attached[vip]
	if ok && at.Dev != dev {
		if at.Dev == "" {
			a.log.Info("reserved VIP attached", "vip", vip, "dev", dev)
			a.engine.LocalLocked(vip, dev)
		} else {
			a.log.Info("VIP moves to another local interface", "vip", vip, "from", at.Dev, "to", dev)
		}
		at.Dev = dev
		a.attached[vip] = at
		a.dirty = true
	}
	if ok {
		a.engine.ReattachLocked(vip)
	} else {
		var r gossip.Record
		cur, known := a.cluster.Table().Get(vip)
		if !known || cur.Owner == "" {
			// A new VM (an arrival is let in: it runs already).
			if err := a.checkAttachNetwork(vip); err != nil {
				a.mu.Unlock()
				return control.VIP{}, err
			}
		}
		if a.engine.Enabled() && known && cur.Owner != "" && cur.Owner != a.cfg.Name {
			r = a.engine.ArriveLocked(vip, dev, cur)
		} else {
			var err error
			if r, err = a.cluster.TryClaim(vip); err != nil {
				a.mu.Unlock()
				return control.VIP{}, badRequest("%v", err)
			}
			a.engine.LocalLocked(vip, dev)
		}
		at = attachment{VIP: vip, Dev: dev, Epoch: r.Epoch}
		a.attached[vip] = at
		a.dirty = true
		a.log.Info("VIP attached", "vip", vip, "dev", dev, "epoch", r.Epoch)
	}
	a.engine.SetDevLocked(vip, dev)
	a.mu.Unlock()
	a.reconcile()
	return a.vipStatus(vip), nil
}

// Detach releases vip. Detaching a VIP that is not attached here succeeds
// and changes nothing: after a migration the hook on the old host may
// arrive when the new host owns the VIP already, and after a failed
// incoming migration libvirt's release hook runs on the destination while
// the source still runs the VM. Only a prepared handover connection
// (Prepare) is closed then: the VM is not coming.
func (b backend) Detach(_ context.Context, vip netip.Addr) (control.VIP, error) {
	a := b.a
	vip = vip.Unmap()
	if a.engine.DropPrepared(vip) {
		a.log.Info("detached before arriving: the prepared handover connection is closed", "vip", vip)
	}
	if a.stopAwaiting(vip) {
		a.log.Info("detached before the VM announced itself here: not claiming", "vip", vip)
	}
	a.mu.Lock()
	_, ok := a.attached[vip]
	if ok && a.engine.HasLocked(vip) {
		// With the cache, detaching is how a hook says the VM stopped
		// here: keep its packets for whoever claims it next.
		err := a.engine.SuspendLocked(vip, "detached")
		a.mu.Unlock()
		if err != nil {
			return control.VIP{}, err
		}
		a.reconcile()
		return a.vipStatus(vip), nil
	}
	if ok {
		delete(a.attached, vip)
		a.dirty = true
		if r, released := a.cluster.Release(vip); released {
			a.log.Info("VIP detached", "vip", vip, "epoch", r.Epoch)
		}
	}
	a.mu.Unlock()
	if ok {
		a.reconcile()
	}
	return a.vipStatus(vip), nil
}

// checkAttach refuses what cannot be attached: a VIP checkVIP refuses, no
// interface, or one checkDev refuses.
func (a *Agent) checkAttach(vip netip.Addr, dev string) error {
	if err := a.checkVIP(vip); err != nil {
		return err
	}
	if dev == "" {
		return badRequest("--dev is required: the interface behind which the VM with %s runs", vip)
	}
	return a.checkDev(dev)
}

// checkDev refuses an interface that cannot be a VM's.
func (a *Agent) checkDev(dev string) error {
	switch {
	case dev == a.cfg.Interface:
		return badRequest("--dev %s is the WireGuard interface, not a VM's", dev)
	case a.cfg.Cache && dev == a.cfg.CacheInterface:
		return badRequest("--dev %s is the cache's interface, not a VM's", dev)
	case !linkExists(dev):
		return badRequest("interface %s not found on this host", dev)
	case a.isUnderlayDev(dev):
		return badRequest("--dev %s carries this host's underlay (gossip and WireGuard to the other hosts), not a VM's interface", dev)
	}
	if bridge := bridgeOf(dev); bridge != "" {
		return badRequest("--dev %s is a port of bridge %s: the agent routes a VIP to its VM's interface, and a VM does not get what is routed to a bridge port; "+
			"take it out of the bridge (ip link set %s nomaster), as Xen's vif-route does, or give the VM a routed interface", dev, bridge, dev)
	}
	return nil
}

// bridgeOf names the bridge (or other master) that dev is a port of, ""
// if none or if dev cannot be read.
func bridgeOf(dev string) string {
	l, err := netlink.LinkByName(dev)
	if err != nil || l.Attrs().MasterIndex == 0 {
		return ""
	}
	if m, err := netlink.LinkByIndex(l.Attrs().MasterIndex); err == nil {
		return m.Attrs().Name
	}
	return fmt.Sprintf("#%d", l.Attrs().MasterIndex)
}

// checkVIP refuses addresses that cannot be a VM's, by the rule every
// host applies to others' records too (claimRules.refuse): a host's own
// or another host's address, an address of this host's interfaces, not
// unicast, or outside --vip-prefixes.
func (a *Agent) checkVIP(vip netip.Addr) error {
	if !vip.IsValid() {
		return badRequest("a VIP is required")
	}
	members := a.cluster.Members()
	if err := a.refreshLocalAddrs(members); err != nil {
		return fmt.Errorf("check %s: %w", vip, err)
	}
	if why := a.claimRules(members).refuse(vip); why != "" {
		return badRequest("%s cannot be a VIP: %s", vip, why)
	}
	return nil
}

func (a *Agent) vipStatus(vip netip.Addr) control.VIP {
	r, _ := a.cluster.Table().Get(vip)
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.vipLocked(gossip.Record{VIP: vip, Owner: r.Owner, Epoch: r.Epoch})
}

func (a *Agent) vipLocked(r gossip.Record) control.VIP {
	v := control.VIP{VIP: r.VIP.String(), Owner: r.Owner, Epoch: r.Epoch}
	if a.isRefusedLocked(r) {
		v.State = control.VIPRefused
		return v
	}
	if state, dev := a.engine.StateLocked(r.VIP); state != "" && state != control.VIPLocal {
		v.State, v.Dev = state, dev
		v.Local = state == control.VIPHolding
		return v
	}
	switch at, ok := a.attached[r.VIP]; {
	case ok && r.Owner == a.cfg.Name && at.Dev == "":
		v.State = control.VIPReserved
	case ok && r.Owner == a.cfg.Name:
		v.Local, v.Dev, v.State = true, at.Dev, control.VIPLocal
	case r.Owner == "":
		v.State = control.VIPReleased
	default:
		v.State = control.VIPRemote
	}
	if !v.Local {
		if dev, ok := a.awaitingOn(r.VIP); ok {
			v.State, v.Dev = control.VIPAwaiting, dev
		}
	}
	return v
}

// Status reports the agent, its peers and every VIP it knows.
func (b backend) Status(context.Context) (control.Status, error) {
	a := b.a
	st := control.Status{
		Name:      a.cfg.Name,
		Address:   a.cfg.Address.String(),
		PublicKey: a.key.PublicKey().String(),
		Endpoint:  a.meta().Endpoint.String(),
		Site:      a.cfg.Site,
		Interface: a.cfg.Interface,
		Impl:      string(a.dev.Impl()),
		Started:   a.started,
		Peers:     []control.Peer{},
		VIPs:      []control.VIP{},
		Conflicts: []control.Conflict{},
	}
	dev, err := a.dev.State()
	if err != nil {
		return st, err
	}
	wgPeers := map[wgtypes.Key]wgtypes.Peer{}
	for _, p := range dev.Peers {
		wgPeers[p.PublicKey] = p
	}
	records := a.cluster.Table().Records()
	owned := map[string][]string{}
	for _, r := range records {
		owned[r.Owner] = append(owned[r.Owner], r.VIP.String())
	}
	members := a.cluster.Members()
	lan := a.lanPaths(members)
	for _, m := range members {
		if m.Local {
			continue
		}
		p := control.Peer{Name: m.Name, State: string(m.State), VIPs: owned[m.Name], Path: "tunnel", Refused: a.peerRefusal(m)}
		if _, ok := lan[m.Name]; ok {
			p.Path = "lan"
		}
		if p.VIPs == nil {
			p.VIPs = []string{}
		}
		if m.MetaErr == nil {
			k := wgtypes.Key(m.Meta.PublicKey)
			p.PublicKey = k.String()
			p.Endpoint = m.Meta.Endpoint.String()
			p.Address = m.Meta.Address.String()
			p.Site = m.Meta.Site
			if wp, ok := wgPeers[k]; ok {
				if !wp.LastHandshakeTime.IsZero() {
					t := wp.LastHandshakeTime
					p.LastHandshake = &t
				}
				p.RxBytes, p.TxBytes = wp.ReceiveBytes, wp.TransmitBytes
				a.mu.Lock()
				p.SessionCheck = a.checks.state(k)
				a.mu.Unlock()
			}
		}
		st.Peers = append(st.Peers, p)
	}
	a.mu.Lock()
	for _, r := range records {
		st.VIPs = append(st.VIPs, a.vipLocked(r))
	}
	st.Problems = slices.Clone(a.problems)
	st.RefusedRecords = refusedStatus(a.refusedLocked())
	st.Networks = a.networksStatus()
	st.Migrations = a.engine.MigrationsLocked()
	if a.intercept != nil {
		st.CacheUnclaimed = a.intercept.Unclaimed()
	}
	a.mu.Unlock()
	if st.Problems == nil {
		st.Problems = []string{}
	}
	for _, c := range a.cluster.Table().Conflicts() {
		winner, _ := a.cluster.Table().Get(c.VIP)
		st.Conflicts = append(st.Conflicts, control.Conflict{VIP: c.VIP.String(), Epoch: c.Epoch, Owners: c.Owners, Winner: winner.Owner})
	}
	gs := a.cluster.Stats()
	st.Gossip = control.Gossip{Members: gs.Members, Encrypted: len(a.cfg.GossipKeys) > 0, DroppedMessages: gs.DroppedMessages, DroppedMeta: gs.DroppedMeta, Refused: gs.Refused, PeerAllowlist: a.allow != nil}
	st.Gossip.Records, _ = a.cluster.Table().Size()
	st.Gossip.MaxRecords, st.Gossip.OverCap = a.cluster.Table().Limits().Records, a.cluster.Table().OverCap()
	st.HandoverRefused = a.engine.Refused()
	st.Config = a.configStatus()
	return st, nil
}

// Suspend starts caching a local VIP's packets (`vmroam migrate suspend`).
func (b backend) Suspend(_ context.Context, vip netip.Addr) (control.VIP, error) {
	return b.migrateOp(vip, func(v netip.Addr) error { return b.a.engine.SuspendLocked(v, "migrate suspend") })
}

// Abort delivers a caching VIP's queue to its VM here (`vmroam migrate abort`).
func (b backend) Abort(_ context.Context, vip netip.Addr) (control.VIP, error) {
	return b.migrateOp(vip, func(v netip.Addr) error { return b.a.engine.AbortLocked(v, "migrate abort") })
}

// migrateOp runs a migrate command under the agent's lock, then reconciles.
func (b backend) migrateOp(vip netip.Addr, op func(netip.Addr) error) (control.VIP, error) {
	a := b.a
	if !a.engine.Enabled() {
		return control.VIP{}, errCacheOff
	}
	vip = vip.Unmap()
	a.mu.Lock()
	err := op(vip)
	a.mu.Unlock()
	if err != nil {
		return control.VIP{}, err
	}
	a.reconcile()
	return a.vipStatus(vip), nil
}

// errCacheOff answers the commands that need the migration cache.
var errCacheOff = badRequest("the migration cache is off (--cache=false)")

// Prepare connects to the current owner of a VIP about to arrive here
// (migrate.Engine.Prepare).
func (b backend) Prepare(ctx context.Context, vip netip.Addr) (control.VIP, error) {
	a := b.a
	if !a.engine.Enabled() {
		return control.VIP{}, errCacheOff
	}
	vip = vip.Unmap()
	if !vip.Is4() && !vip.Is6() {
		return control.VIP{}, badRequest("not an IP address")
	}
	if err := a.engine.Prepare(ctx, vip); err != nil {
		return control.VIP{}, err
	}
	return a.vipStatus(vip), nil
}

// Migrations lists this host's side of recent migrations and those under
// way (`vmroam migrations`).
func (b backend) Migrations(context.Context) ([]control.Migration, error) {
	return b.a.engine.Migrations(), nil
}

// Migration returns one migration with its timeline (`vmroam migrations
// --json ID`).
func (b backend) Migration(_ context.Context, id string) (control.Migration, error) {
	return b.a.engine.Migration(id)
}
