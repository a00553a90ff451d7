package wgagent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/migrate"
	"github.com/vmroam/vmroam/wgagent/metrics"
	"github.com/vmroam/vmroam/wgagent/route"
)

// wantPeer is a WireGuard peer the cluster state asks for.
type wantPeer struct {
	name       string
	key        wgtypes.Key
	endpoint   netip.AddrPort
	allowedIPs []netip.Prefix
}

// reconcile brings ownership, WireGuard peers and routes to what gossip
// says. It is idempotent; everything it cannot fix now is kept in
// a.problems for status and retried on the next run.
func (a *Agent) reconcile() { a.reconcileFor(time.Now()) }

// reconcileFor is reconcile for a change made before asked: one that
// began after asked has done it (see reconcileWith).
func (a *Agent) reconcileFor(asked time.Time) { a.reconcileWith(false, asked) }

// reconcileWith is reconcile; verify also reads back what only someone
// else can have changed since the last run: the nftables table, whose dump
// is the dearest step (2-22 ms of a 5-50 ms reconcile on a busy host, and
// a migration runs several reconciles at both ends while the handover's
// packets need the CPU). The periodic reconcile verifies.
//
// A reconcile that began after asked (when the change to apply was made),
// and ended while this one waited for the lock, saw everything this one
// would: this one then only waits for the state to be saved. At either end
// of a migration the claim's gossip and the migration itself ask for a
// reconcile at the same moment, while the handover's first packets need
// the CPU.
func (a *Agent) reconcileWith(verify bool, asked time.Time) {
	defer a.persist()
	start := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	if !verify && a.reconciledFrom.After(asked) {
		return
	}
	a.reconciledFrom = time.Now()
	defer func() {
		if d := time.Since(start); d > 50*time.Millisecond {
			a.log.Debug("slow reconcile", "took", d)
		}
	}()
	var problems []string
	problem := func(format string, args ...any) {
		p := fmt.Sprintf(format, args...)
		problems = append(problems, p)
	}
	// A step that failed to apply is an error for the metrics too; a
	// member that cannot be a peer is only a problem.
	failed := func(step metrics.ReconcileStep, format string, args ...any) {
		a.metrics.ReconcileError(step)
		problem(format, args...)
	}
	a.metrics.ReconcileRun()

	a.checkAllowlistLocked(problem)
	a.conflictProblems(problem)
	members := a.cluster.Members()
	records := a.cluster.Table().Records()
	// Others' records are followed only where they could be a VM's: a
	// refused one changes no route, no peer and no local attachment.
	if verify || a.localAddrs.Load() == nil {
		if err := a.refreshLocalAddrs(members); err != nil {
			failed(metrics.StepAddress, "%v", err)
		}
	}
	records, refused := followedRecords(records, a.cfg.Name, a.claimRules(members))
	a.noteRefusedLocked(refused, problem)
	a.reconcileOwnership(records)
	a.engine.ExpirePrepared()
	a.rememberPeers(members)
	if a.intercept != nil {
		a.engine.ReconcileLocked()
		a.learnMACsLocked()
		a.followXenDomainsLocked()
	}

	// The address first: a new peer's warm-up datagram is sent from it.
	// Once in place only someone else removes it: the periodic run looks.
	if verify || !a.addressOK {
		err := a.ensureAddress()
		if a.addressOK = err == nil; err != nil {
			failed(metrics.StepAddress, "address: %v", err)
		}
	}
	a.reconcileGatewaysLocked(verify, failed)
	// Routes before peers: a VIP that moves to a host reached over the
	// LAN must leave the tunnel at once for the new host's LAN route; if
	// the tunnel first pointed it at the new host too, packets still in
	// wireguard-go would reach it after newer ones that took the LAN. A
	// VIP leaving the LAN goes on through the tunnel to its old host,
	// which forwards it, until the peers change.
	routes, overLAN := a.wantRoutes(records, a.lanPaths(members))
	a.routes.Set(routes)
	if err := a.routes.Reconcile(); err != nil {
		failed(metrics.StepRoutes, "routes: %v", err)
	}
	// Packets the kernel queued for embedded wireguard-go before the
	// route changed are still to be given a peer: the old host, as long
	// as the peers have not changed. Seen in a hybrid move under load:
	// five that went to the new host through the tunnel reached it after
	// newer ones that took the LAN.
	if newOverLAN(a.overLAN, overLAN) {
		if err := a.dev.ReadBarrier(50 * time.Millisecond); err != nil {
			a.log.Warn("reconcile: packets queued for the tunnel may reach a VIP's new LAN host out of order", "err", err)
		}
	}
	a.overLAN = overLAN
	peers := a.wantPeers(members, records, problem)
	// Before the peers change: a new peer's first handover connection
	// can only arrive once it is one.
	hp := make(map[netip.Addr]string, len(peers))
	for _, p := range peers {
		hp[p.allowedIPs[0].Addr()] = p.name
	}
	a.handoverPeers.Store(&hp)
	if err := a.applyPeers(peers); err != nil {
		failed(metrics.StepWireGuard, "WireGuard: %v", err)
	}
	a.reconcileFilter(verify, func(format string, args ...any) { failed(metrics.StepNftables, format, args...) })
	problems = append(problems, a.configProblems...)

	if !slices.Equal(problems, a.problems) {
		for _, p := range problems {
			if !slices.Contains(a.problems, p) {
				a.log.Warn("reconcile", "problem", p)
			}
		}
		if len(problems) == 0 && len(a.problems) > 0 {
			a.log.Info("reconcile: all problems cleared")
		}
	}
	a.problems = problems
}

// reconcileOwnership lets go of local attachments that another host now
// owns, and releases records that name us without an attachment (state
// lost in a crash).
func (a *Agent) reconcileOwnership(records []gossip.Record) {
	byVIP := make(map[netip.Addr]gossip.Record, len(records))
	for _, r := range records {
		byVIP[r.VIP] = r
	}
	for vip, at := range a.attached {
		r, ok := byVIP[vip]
		if ok && r.Owner == a.cfg.Name {
			if r.Epoch != at.Epoch {
				at.Epoch = r.Epoch
				a.attached[vip] = at
				a.dirty = true
			}
			continue
		}
		if !ok {
			// Not merged yet (cannot happen after Claim or Assert); keep it.
			continue
		}
		if a.engine.HasLocked(vip) && r.Owner != "" && !a.lostTieLocked(r, at) {
			// The VM moved: cache its packets until the new owner asks
			// for them (or the cache's max age passes).
			a.engine.SuspendLocked(vip, "claimed by "+r.Owner)
			continue
		}
		if r.Owner == "" {
			a.log.Warn("VIP released elsewhere; dropping the local attachment", "vip", vip, "epoch", r.Epoch)
		} else if r.Epoch == at.Epoch {
			a.log.Error("DUPLICATE OWNER: another host claimed this VIP at the same epoch and wins the tie; dropping the local attachment", "vip", vip, "epoch", r.Epoch, "winner", r.Owner)
		} else {
			a.log.Info("VIP now owned by another host; dropping the local attachment", "vip", vip, "owner", r.Owner, "epoch", r.Epoch)
		}
		delete(a.attached, vip)
		a.dirty = true
	}
	for _, r := range records {
		if r.Owner == a.cfg.Name {
			if _, ok := a.attached[r.VIP]; !ok {
				a.log.Warn("a record names this host as owner but nothing is attached here; releasing it", "vip", r.VIP, "epoch", r.Epoch)
				a.cluster.Release(r.VIP)
			}
		}
	}
}

// learnMACsLocked keeps each local VM's MAC from the neighbour table, for
// the handover when the VM moves.
func (a *Agent) learnMACsLocked() {
	var devs []string
	for _, at := range a.attached {
		if at.Dev != "" { // else reserved
			devs = append(devs, at.Dev)
		}
	}
	if len(devs) == 0 {
		return
	}
	macs, err := cache.NeighborMACs(devs)
	if err != nil {
		a.log.Debug("learning the VMs' MACs", "err", err)
		return
	}
	for vip, at := range a.attached {
		if m, ok := macs[at.Dev][vip]; ok && m.String() != at.MAC.String() {
			at.MAC = m
			a.attached[vip] = at
			a.dirty = true
		}
	}
}

func (a *Agent) rememberPeers(members []gossip.Member) {
	for _, m := range members {
		if m.Local || m.State != "alive" || !m.Addr.IsValid() {
			continue
		}
		s := m.Addr.String()
		if !slices.Contains(a.peers, s) {
			a.peers = append(a.peers, s)
			a.dirty = true
		}
	}
}

// isPeerState says which gossip states keep a member a WireGuard peer: a
// suspect member may only be slow, so its tunnel stays until it is dead.
func isPeerState(s gossip.MemberState) bool { return s == "alive" || s == "suspect" }

func (a *Agent) wantPeers(members []gossip.Member, records []gossip.Record, problem func(string, ...any)) []wantPeer {
	self := a.key.PublicKey()
	byKey := map[wgtypes.Key]string{}
	var cands []gossip.Member
	for _, m := range members {
		if m.Local || !isPeerState(m.State) {
			continue
		}
		if m.MetaErr != nil {
			problem("member %s: unreadable metadata: %v", m.Name, m.MetaErr)
			continue
		}
		if m.Meta.Version != gossip.ProtocolVersion {
			problem("member %s speaks protocol %d, this agent %d", m.Name, m.Meta.Version, gossip.ProtocolVersion)
			continue
		}
		k := wgtypes.Key(m.Meta.PublicKey)
		if why := a.peerRefusal(m); why != "" {
			problem("member %s is not a peer: %s (--peer-allowlist)", m.Name, why)
			a.warnRefusedLocked(m, why)
			continue
		}
		if k == self {
			problem("member %s uses this host's WireGuard key", m.Name)
			continue
		}
		if other, dup := byKey[k]; dup {
			problem("members %s and %s share one WireGuard key; ignoring %s", other, m.Name, m.Name)
			continue
		}
		byKey[k] = m.Name
		cands = append(cands, m)
	}
	// A member's overlay address is only ever in its own AllowedIPs:
	// WireGuard would move it to whichever peer lists it, and with it the
	// host's tunnel traffic and its handover port. So an address two
	// would-be peers announce (or one announces this host's) is nobody's,
	// whichever came first, and no record moves one.
	announced := map[netip.Addr][]string{a.cfg.Address.Addr(): {a.cfg.Name}}
	for _, m := range cands {
		announced[m.Meta.Address] = append(announced[m.Meta.Address], m.Name)
	}
	owned := map[string][]netip.Prefix{}
	for _, r := range records {
		if r.Owner == "" {
			continue
		}
		if names, ok := announced[r.VIP]; ok {
			problem("host %s claims %s, the overlay address of %s: refused", r.Owner, r.VIP, strings.Join(names, " and "))
			continue
		}
		owned[r.Owner] = append(owned[r.Owner], hostPrefix(r.VIP))
	}
	var out []wantPeer
	for _, m := range cands {
		if names := announced[m.Meta.Address]; len(names) > 1 {
			problem("%s announce one overlay address %s; ignoring %s", strings.Join(names, " and "), m.Meta.Address, m.Name)
			continue
		}
		allowed := append([]netip.Prefix{hostPrefix(m.Meta.Address)}, owned[m.Name]...)
		out = append(out, wantPeer{name: m.Name, key: wgtypes.Key(m.Meta.PublicKey), endpoint: m.Meta.Endpoint, allowedIPs: allowed})
	}
	return out
}

// allowedIPsGrace is how long a prefix no peer wants stays on the peer
// that had it. Packets the kernel routed into the tunnel before a VIP's
// route changed (it arrived here) may still wait in the TUN device's queue
// for wireguard-go, which drops, uncounted, any packet no peer's allowed
// IPs match: the likely cause of 12 datagrams lost, no counter explaining
// them, when a VM arrived on its client's host. Kept, they reach the old
// host, which forwards them as stragglers. At least a reconcile interval
// passes before the removal.
const allowedIPsGrace = time.Second

// graceTimer says when prefixes found unwanted have been so for
// allowedIPsGrace. A prefix not asked about between two sweeps is
// forgotten: it is wanted again, or gone.
type graceTimer struct {
	since map[netip.Prefix]time.Time
	asked map[netip.Prefix]bool
}

// due notes that q is unwanted at now and says whether it has been since
// allowedIPsGrace.
func (g *graceTimer) due(q netip.Prefix, now time.Time) bool {
	if g.since == nil {
		g.since, g.asked = map[netip.Prefix]time.Time{}, map[netip.Prefix]bool{}
	}
	g.asked[q] = true
	first, ok := g.since[q]
	if !ok {
		g.since[q], first = now, now
	}
	return now.Sub(first) >= allowedIPsGrace
}

// sweep forgets the prefixes due was not asked about since the last sweep.
func (g *graceTimer) sweep() {
	for q := range g.since {
		if !g.asked[q] {
			delete(g.since, q)
		}
	}
	clear(g.asked)
}

// applyPeers changes the device's peers to want. A VIP moves between peers
// by adding it to the new peer, which WireGuard does atomically; only a
// prefix that must leave a peer without going elsewhere needs the peer's
// whole list replaced.
func (a *Agent) applyPeers(want []wantPeer) error {
	dev, err := a.dev.State()
	if err != nil {
		return err
	}
	cur := make(map[wgtypes.Key]wgtypes.Peer, len(dev.Peers))
	for _, p := range dev.Peers {
		cur[p.PublicKey] = p
	}
	wanted := make(map[wgtypes.Key]wantPeer, len(want))
	var changes []wgtypes.PeerConfig
	keepalive := a.live().Keepalive
	for _, w := range want {
		wanted[w.key] = w
		c, ok := cur[w.key]
		if !ok {
			a.log.Info("adding peer", "peer", w.name, "endpoint", w.endpoint, "allowed_ips", w.allowedIPs)
			changes = append(changes, wgtypes.PeerConfig{
				PublicKey:                   w.key,
				Endpoint:                    udpAddr(w.endpoint),
				PersistentKeepaliveInterval: &keepalive,
				ReplaceAllowedIPs:           true,
				AllowedIPs:                  ipNets(w.allowedIPs),
			})
			continue
		}
		pc := wgtypes.PeerConfig{PublicKey: w.key, UpdateOnly: true}
		changed := false
		// The advertised endpoint is authoritative: it is how operators
		// say where a host is reachable, NAT included.
		if c.Endpoint == nil || unmapped(c.Endpoint.AddrPort()) != w.endpoint {
			pc.Endpoint = udpAddr(w.endpoint)
			changed = true
		}
		// A reload may have changed the keepalive. WireGuard counts it
		// in whole seconds.
		if c.PersistentKeepaliveInterval != keepalive.Truncate(time.Second) {
			pc.PersistentKeepaliveInterval = &keepalive
			changed = true
		}
		have := prefixSet(c.AllowedIPs)
		for _, p := range w.allowedIPs {
			if !have[p] {
				pc.AllowedIPs = append(pc.AllowedIPs, ipNet(p))
				changed = true
			}
		}
		if changed {
			changes = append(changes, pc)
		}
	}
	for k, c := range cur {
		if _, ok := wanted[k]; !ok {
			a.log.Info("removing peer", "public_key", k.String(), "endpoint", c.Endpoint)
			changes = append(changes, wgtypes.PeerConfig{PublicKey: k, Remove: true})
		}
	}
	if len(changes) > 0 {
		if err := a.dev.Configure(wgtypes.Config{Peers: changes}); err != nil {
			return err
		}

		if dev, err = a.dev.State(); err != nil {
			return err
		}
	}
	// Second pass: prefixes still on a peer that should not have them
	// (a prefix another peer wants left this one when that peer took
	// it), once they have been unwanted for allowedIPsGrace; and a
	// warm-up for every peer without a session yet, with a new handshake
	// if it has waited too long (sessionWatch).
	var errs []error
	now := time.Now()
	defer a.unwanted.sweep()
	defer a.sessionWatchDone()
	for _, p := range dev.Peers {
		w, ok := wanted[p.PublicKey]
		if !ok {
			continue
		}
		leads := leadsHandshake(dev.PublicKey, p.PublicKey)
		if p.LastHandshakeTime.IsZero() {
			// Only the leading end keeps the schedule: the other would
			// start nothing when it came due.
			n := 0
			if leads {
				n = a.sessionless.check(p.PublicKey, now)
			}
			if n > 0 {
				// Once is news; a peer that never answers is doctor's.
				level := slog.LevelInfo
				if n > 1 {
					level = slog.LevelDebug
				}
				a.log.Log(context.Background(), level, "no WireGuard session with peer yet: starting a new handshake", "peer", w.name, "endpoint", p.Endpoint, "attempt", n)
				if err := a.dev.Rehandshake(p.PublicKey); err != nil {
					errs = append(errs, err)
				}
			}
			a.warmUp(w.allowedIPs[0].Addr())
		} else if a.checks.start(p.PublicKey, p.LastHandshakeTime, now) {
			a.checkSession(w.name, p.PublicKey, p.LastHandshakeTime, leads)
		}
		want := map[netip.Prefix]bool{}
		for _, q := range w.allowedIPs {
			want[q] = true
		}
		var remove []netip.Prefix
		for q := range prefixSet(p.AllowedIPs) {
			if want[q] {
				continue
			}
			if a.unwanted.due(q, now) {
				remove = append(remove, q)
			}
		}
		if err := a.dev.RemoveAllowedIPs(p.PublicKey, remove, w.allowedIPs); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// wantRoutes returns the kernel routes the records and the LAN paths ask
// for, and which VIPs they send over the LAN.
func (a *Agent) wantRoutes(records []gossip.Record, lan map[string]route.Route) (routes []route.Route, overLAN map[netip.Addr]bool) {
	wg := a.cfg.Interface
	overlay := a.cfg.Address.Masked()
	routes = []route.Route{{Dst: overlay, Dev: wg, Metric: metricOverlay}}
	overLAN = map[netip.Addr]bool{}
	diversions, diverted := a.engine.RoutesLocked()
	routes = append(routes, diversions...)
	for _, r := range records {
		switch {
		case diverted[r.VIP]:
		case r.Owner == a.cfg.Name:
			if at, ok := a.attached[r.VIP]; ok && at.Dev != "" {
				routes = append(routes, route.Route{Dst: hostPrefix(r.VIP), Dev: at.Dev, Metric: metricLocalVIP})
				if a.cacheDev != "" {
					routes = append(routes, route.Route{Dst: hostPrefix(r.VIP), Dev: a.cacheDev, Metric: migrate.MetricStandby})
				}
			}
		case r.Owner != "" && lan[r.Owner].Dev != "":
			// A trusted host of this site: straight over the LAN.
			via := lan[r.Owner]
			routes = append(routes, route.Route{Dst: hostPrefix(r.VIP), Dev: via.Dev, Via: via.Via, Metric: metricOverlay})
			overLAN[r.VIP] = true
		case r.Owner != "" && !overlay.Contains(r.VIP):
			// Inside the overlay prefix the prefix route already leads
			// into the tunnel; outside it (another family, another
			// range) the VIP needs its own route.
			routes = append(routes, route.Route{Dst: hostPrefix(r.VIP), Dev: wg, Metric: metricOverlay})
		}
	}
	return routes, overLAN
}

// newOverLAN says whether now sends a VIP over the LAN that before did not.
func newOverLAN(before, now map[netip.Addr]bool) bool {
	for vip := range now {
		if !before[vip] {
			return true
		}
	}
	return false
}

// ensureAddress puts this host's overlay address on the WireGuard interface
// (as a host address: the prefix route is the route table's job).
func (a *Agent) ensureAddress() error {
	link, err := netlink.LinkByName(a.cfg.Interface)
	if err != nil {
		return fmt.Errorf("%s: %w", a.cfg.Interface, err)
	}
	want := hostPrefix(a.cfg.Address.Addr())
	addrs, err := netlink.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", a.cfg.Interface, err)
	}
	for _, ad := range addrs {
		if p, ok := prefixOf(*ad.IPNet); ok && p == want {
			return nil
		}
	}
	n := ipNet(want)
	if err := netlink.AddrReplace(link, &netlink.Addr{IPNet: &n}); err != nil {
		return fmt.Errorf("add %s to %s: %w", want, a.cfg.Interface, err)
	}
	return nil
}

// sessionWatchDone ends a reconcile's look at sessions: peers it did not
// find without one are forgotten, and a reconcile is due when the next
// new handshake is.
func (a *Agent) sessionWatchDone() {
	a.sessionless.sweep()
	a.checks.sweep()
	at, ok := a.sessionless.next()
	if c, cok := a.checks.next(); cok && (!ok || c.Before(at)) {
		at, ok = c, true
	}
	if !ok {
		return
	}
	d := max(time.Until(at), 0)
	if a.sessionKick == nil {
		a.sessionKick = time.AfterFunc(d, a.kick)
		return
	}
	a.sessionKick.Reset(d)
}

// warmUp sends one datagram into the tunnel to a peer without a session
// yet, at every reconcile until it has one, so that the WireGuard
// handshake happens now, not when a migration's first packets need the
// tunnel (wireguard-go keeps only a few packets while it handshakes and
// drops the rest). The peer answers with a port unreachable, which is all
// it is for.
func (a *Agent) warmUp(peer netip.Addr) {
	c, err := net.DialUDP("udp", &net.UDPAddr{IP: a.cfg.Address.Addr().AsSlice()}, net.UDPAddrFromAddrPort(netip.AddrPortFrom(peer, 9)))
	if err != nil {
		a.log.Debug("warm-up datagram", "peer", peer, "err", err)
		return
	}
	c.Write([]byte("vmroam"))
	c.Close()
}

func hostPrefix(ip netip.Addr) netip.Prefix {
	return netip.PrefixFrom(ip, ip.BitLen())
}

func ipNet(p netip.Prefix) net.IPNet {
	return net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func ipNets(ps []netip.Prefix) []net.IPNet {
	out := make([]net.IPNet, len(ps))
	for i, p := range ps {
		out[i] = ipNet(p)
	}
	return out
}

func prefixOf(n net.IPNet) (netip.Prefix, bool) {
	ip, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones), true
}

func prefixSet(ns []net.IPNet) map[netip.Prefix]bool {
	out := make(map[netip.Prefix]bool, len(ns))
	for _, n := range ns {
		if p, ok := prefixOf(n); ok {
			out[p] = true
		}
	}
	return out
}

func unmapped(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func udpAddr(ap netip.AddrPort) *net.UDPAddr {
	return net.UDPAddrFromAddrPort(ap)
}
