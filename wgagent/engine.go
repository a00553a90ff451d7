package wgagent

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/migrate"
	"github.com/vmroam/vmroam/wgagent/route"
)

// newEngine makes the migration engine over this agent (engineHost).
// Without a cache (--cache=false) it has no device and caches nothing.
func (a *Agent) newEngine() *migrate.Engine {
	cfg := migrate.Config{
		Name:    a.cfg.Name,
		Host:    engineHost{a},
		Metrics: a.metrics,
		Budget:  a.budget,
		Logger:  a.log,
		Tunables: func() migrate.Tunables {
			c := a.live()
			return migrate.Tunables{Limits: c.CacheLimits, Settle: c.CacheSettle, Linger: c.CacheLinger, Activation: c.Activation}
		},
	}
	if a.intercept != nil {
		cfg.Device = a.intercept
	}
	return migrate.New(cfg)
}

// engineHost is the agent as the migration engine sees it (migrate.Host).
type engineHost struct{ a *Agent }

func (h engineHost) Lock()   { h.a.mu.Lock() }
func (h engineHost) Unlock() { h.a.mu.Unlock() }

func (h engineHost) Attachment(vip netip.Addr) (migrate.Attachment, bool) {
	at, ok := h.a.attached[vip]
	return migrate.Attachment{Epoch: at.Epoch, MAC: at.MAC}, ok
}

func (h engineHost) Disown(vip netip.Addr, to gossip.Record) { h.a.disownLocked(vip, to) }

// disownLocked gives up this host's claim on vip: to the claimer's record
// to (a handover), or, if to names no owner, to nobody (released). a.mu
// held.
func (a *Agent) disownLocked(vip netip.Addr, to gossip.Record) {
	delete(a.attached, vip)
	a.dirty = true
	if to.Owner == "" {
		a.cluster.Release(vip)
	} else {
		a.cluster.Assert(to)
	}
}

func (h engineHost) Claim(vip netip.Addr) gossip.Record { return h.a.cluster.Claim(vip) }

func (h engineHost) Tell(to string, r gossip.Record) error { return h.a.cluster.Tell(to, r) }

func (h engineHost) Record(vip netip.Addr) (gossip.Record, bool) { return h.a.cluster.Table().Get(vip) }

func (h engineHost) Member(name string) (netip.Addr, bool) { return h.a.memberOverlay(name) }

func (h engineHost) Peer(addr netip.Addr) string { return h.a.handoverPeer(addr) }

func (h engineHost) Dial(ctx context.Context, member string, timeout time.Duration) (net.Conn, time.Duration, error) {
	return h.a.dialHandover(ctx, member, timeout)
}

func (h engineHost) TunnelState(member string) string { return h.a.tunnelState(member) }

func (h engineHost) AddRoute(r route.Route) error { return h.a.routes.Add(r) }

func (h engineHost) Reconcile() { h.a.reconcile() }

func (h engineHost) ReconcileFor(t time.Time) { h.a.reconcileFor(t) }

func (h engineHost) Kick() { h.a.kick() }

func (h engineHost) HoldTunnelWrites() func() {
	release, _ := h.a.dev.HoldWrites()
	return release
}

// handoverPeer returns the name of the current WireGuard peer whose
// overlay address is addr, "" if none.
func (a *Agent) handoverPeer(addr netip.Addr) string {
	if m := a.handoverPeers.Load(); m != nil {
		return (*m)[addr.Unmap()]
	}
	return ""
}

// dialHandover makes one attempt to connect to a member's handover port
// and returns the connection with its round trip.
func (a *Agent) dialHandover(ctx context.Context, member string, timeout time.Duration) (net.Conn, time.Duration, error) {
	addr, alive := a.memberOverlay(member)
	if !alive {
		return nil, 0, migrate.ErrNotAlive
	}
	d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: a.cfg.Address.Addr().AsSlice()}}
	t0 := time.Now()
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(addr.String(), strconv.Itoa(a.cfg.HandoverPort)))
	if err != nil {
		return nil, 0, err
	}
	return conn, time.Since(t0), nil
}

// tunnelState describes this host's WireGuard peer for a member, for a log
// line: when a handover cannot connect, whether the tunnel has a session
// and moves bytes tells a tunnel problem from a listener's.
func (a *Agent) tunnelState(member string) string {
	m, ok := a.member(member)
	if !ok || m.MetaErr != nil {
		return "no such member"
	}
	key := wgtypes.Key(m.Meta.PublicKey)
	dev, err := a.dev.State()
	if err != nil {
		return err.Error()
	}
	for _, p := range dev.Peers {
		if p.PublicKey != key {
			continue
		}
		hs := "none"
		if !p.LastHandshakeTime.IsZero() {
			hs = time.Since(p.LastHandshakeTime).Round(time.Millisecond).String() + " ago"
		}
		return fmt.Sprintf("endpoint %v, last handshake %s, rx %d B, tx %d B, allowed %v", p.Endpoint, hs, p.ReceiveBytes, p.TransmitBytes, p.AllowedIPs)
	}
	return "no WireGuard peer"
}

// member returns the gossip member called name.
func (a *Agent) member(name string) (gossip.Member, bool) {
	for _, m := range a.cluster.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return gossip.Member{}, false
}

// memberOverlay returns the overlay address of the member called name, and
// whether it is alive with readable metadata.
func (a *Agent) memberOverlay(name string) (netip.Addr, bool) {
	m, ok := a.member(name)
	return m.Meta.Address, ok && m.MetaErr == nil && m.State == gossip.MemberAlive
}

// watchLinks follows link changes: carrier for the engine's deliveries
// waiting on it,
// and a reconcile for everything else (a VM interface gone or down).
func (a *Agent) watchLinks(stop <-chan struct{}) {
	defer a.bg.Done()
	ch := make(chan netlink.LinkUpdate, 64)
	if err := netlink.LinkSubscribeWithOptions(ch, stop, netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) { a.log.Warn("link watcher", "err", err) },
	}); err != nil {
		a.log.Error("cannot watch links; relying on periodic checks", "err", err)
		return
	}
	for {
		select {
		case <-stop:
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			name := u.Attrs().Name
			up := u.Header.Type != unix.RTM_DELLINK && u.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
			a.engine.CarrierChanged(name, up)
			a.kick()
		}
	}
}
