// Package wgagent is the agent of one host: it keeps the WireGuard
// interface, its peers and the host's routes equal to what the gossiped
// cluster state asks for, repairs what others change, serves the local
// control API, and runs the migration engine (package migrate) for the
// VIPs that move through this host, as its Host (engine.go). It does not
// start migrations: the hypervisor does, and its hooks tell the agent
// (package xenhook, the control API). Files by concern: agent.go,
// reconcile.go, config.go and reload.go the host agent; engine.go the
// engine's view of it; announced.go the wait for an arriving VM's
// announcement; backend.go the control API.
package wgagent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/migrate"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/filter"
	"github.com/vmroam/vmroam/wgagent/metrics"
	"github.com/vmroam/vmroam/wgagent/route"
	"github.com/vmroam/vmroam/wgagent/wgdev"
	"github.com/vmroam/vmroam/xenhook"
)

// Route metrics. A local VIP's route beats Xen's vif-route (metric 2) so
// the agent, not the hotplug script, decides where the VIP goes.
const (
	metricLocalVIP = migrate.MetricLocal
	metricOverlay  = 10
)

// Agent is one running host agent. Create it with New, then Run it.
type Agent struct {
	// cfg is the config the agent started with. Settings that Reload
	// changes (the live keys in reload.go) are read through a.live().
	cfg     Config
	conf    atomic.Pointer[liveConfig]
	ready   chan struct{} // closed once the agent serves (Ready)
	log     *slog.Logger
	key     wgtypes.Key
	dev     *wgdev.Device
	routes  *route.Table
	cluster *gossip.Cluster
	ctl     *control.Server
	started time.Time

	metrics    *metrics.Metrics // kept whether served or not
	metricsSrv *metrics.Server  // nil unless Config.MetricsAddr

	trigger chan struct{} // a reconcile is wanted; buffered 1

	// The migration cache; nil intercept when --cache=false.
	intercept *cache.Interceptor
	// cacheDev is intercept's interface name, "" without a cache: what
	// routes to the cache name.
	cacheDev   string
	budget     *cache.Budget
	handoverLn net.Listener
	linkStop   chan struct{}
	bg         sync.WaitGroup // goroutines of watchers
	// engine runs the migrations (package migrate); its tables are
	// guarded by mu. Always there; without a cache it caches nothing.
	engine *migrate.Engine
	// gatewaysDone: VM interfaces given their gateway addresses, and for
	// which families (gateway.go). a.mu.
	gatewaysDone map[string]gatewayFamilies

	mu       sync.Mutex // guards the fields below and serializes reconciles
	attached map[netip.Addr]attachment
	peers    []string // gossip addresses seen, persisted
	problems []string // from the last reconcile
	dirty    bool     // persisted state changed since the last save
	// addressOK says the overlay address was on the interface at the
	// last reconcile that looked (ensureAddress).
	addressOK bool
	// reconciledFrom is when the last reconcile took a.mu: a reconcile
	// asked for before then has nothing left to do (reconcileWith).
	reconciledFrom time.Time
	// Prefixes on a peer that should not have them (allowedIPsGrace).
	unwanted graceTimer
	// Peers without a WireGuard session yet, and the reconcile that
	// starts a new handshake with one when it is due.
	sessionless sessionWatch
	sessionKick *time.Timer
	// Which peers' sessions carried a round trip (checkSession).
	checks sessionChecks
	// VIPs routed over the LAN at the last reconcile (wantRoutes).
	overLAN map[netip.Addr]bool

	// vmroam's nftables table; nil when Config.Filter is off.
	filter        *filter.Table
	filterApplied *filter.Ruleset // what the table holds; nil = unknown
	// The xenstore watcher, while connected; xenMu guards it (the
	// reconnect loop replaces it without the agent's lock).
	xenMu       sync.Mutex
	xen         *xenhook.Watcher
	xenFollowed map[int]bool
	xenPath     string

	// saveMu serializes writing the state file (persist); it is never
	// taken with a.mu held.
	saveMu sync.Mutex

	// VIPs attached when announced, waiting for their VM; see
	// announced.go. awaitMu guards awaited and awaitClosed.
	awaitMu     sync.Mutex
	awaited     map[netip.Addr]*awaitedVIP
	awaitClosed bool
	awaitWG     sync.WaitGroup
	// awaitKeep is what of awaited the state file keeps, by VIP (the
	// interface); guarded by mu. Stopping cancels the waits, not this.
	awaitKeep map[netip.Addr]string
	// restoreOnce re-arms awaitKeep's waits once joined.
	restoreOnce sync.Once

	// refused are other hosts' records the last reconcile did not follow
	// (claims.go); guarded by mu. localAddrs are this host's addresses as
	// last read.
	refused    map[netip.Addr]refusedRecord
	localAddrs atomic.Pointer[hostAddrs]

	// configProblems are mistakes in the config found after start (a
	// network that clashes); status shows them until a restart or a
	// reload that declares the networks again.
	configProblems []string

	// allow is --peer-allowlist, nil without one; refusedLogged remembers
	// the members whose refusal was logged, and why.
	allow         *allowlistFile
	refusedLogged map[string]string
	// sitesWarned are the sites last warned about for running without
	// an allowlist (warnNoAllowlistLocked), "" before any warning.
	sitesWarned string
	// handoverPeers maps the overlay address of each current WireGuard
	// peer to its name: only they may open a handover connection.
	handoverPeers atomic.Pointer[map[netip.Addr]string]
	reloadMu      sync.Mutex // serializes Reload
	joinMu        sync.Mutex
	rejoin        context.CancelFunc // restarts joinLoop with the live config
}

// New opens the WireGuard interface, the gossip member and the control
// socket. On error, everything it created is removed again.
func New(cfg Config) (*Agent, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	a := &Agent{
		cfg:      cfg,
		log:      cfg.Logger,
		routes:   route.NewTable(),
		trigger:  make(chan struct{}, 1),
		attached: map[netip.Addr]attachment{},
		started:  time.Now(),
		ready:    make(chan struct{}),

		refusedLogged: map[string]string{},
		gatewaysDone:  map[string]gatewayFamilies{},
		linkStop:      make(chan struct{}),
	}
	a.metrics = metrics.New(metricsSource{a})
	a.conf.Store(&liveConfig{Config: cfg})
	ok := false
	defer func() {
		if !ok {
			a.teardown()
		}
	}()
	if len(cfg.GossipKeys) == 0 {
		a.log.Warn("GOSSIP IS NOT ENCRYPTED (--insecure-gossip): anyone who reaches the gossip port can join the cluster and redirect VM traffic")
	}
	if cfg.PeerAllowlist != "" {
		var err error
		if a.allow, err = loadAllowlistFile(cfg.PeerAllowlist); err != nil {
			return nil, err
		}
		a.log.Info("peer allowlist loaded", "path", cfg.PeerAllowlist, "keys", len(a.allow.list().keys))
	}
	if cfg.MetricsAddr != "" {
		// Before anything changes on the host: an address in use stops
		// the agent here.
		var err error
		if a.metricsSrv, err = metrics.Listen(cfg.MetricsAddr, a.log.With("component", "metrics")); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	var err error
	key, created, err := loadOrCreateKey(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	a.key = key
	if created {
		a.log.Info("generated a new WireGuard key", "public_key", key.PublicKey().String())
	}
	st, err := loadState(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	a.peers = st.Peers
	a.awaitKeep = map[netip.Addr]string{}
	for _, w := range st.Awaiting {
		a.awaitKeep[w.VIP] = w.Dev
	}
	warnSysctls(a.log, cfg.Address.Addr().Is6())

	a.dev, err = wgdev.Open(wgdev.Config{
		Name:       cfg.Interface,
		MTU:        cfg.MTU,
		Impl:       cfg.Impl,
		PrivateKey: key,
		ListenPort: cfg.WGPort,
		Logger:     a.log,
	})
	if err != nil {
		return nil, err
	}
	a.log.Info("WireGuard interface up", "iface", cfg.Interface, "impl", a.dev.Impl(), "public_key", key.PublicKey().String())

	if cfg.Cache {
		a.budget = cache.NewBudget(cfg.CacheGlobalMax)
		if a.intercept, err = cache.OpenInterceptor(cfg.CacheInterface, 9000, a.log); err != nil {
			return nil, err
		}
		a.cacheDev = a.intercept.Name()
		lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
			return handoverSockopts(c, cfg.Interface)
		}}
		if a.handoverLn, err = lc.Listen(context.Background(), "tcp", net.JoinHostPort(cfg.Address.Addr().String(), strconv.Itoa(cfg.HandoverPort))); err != nil {
			return nil, fmt.Errorf("handover listener: %w", err)
		}
	} else {
		a.log.Warn("migration cache off (--cache=false): packets for a moving VM are lost until it is reachable at its new host")
	}
	a.engine = a.newEngine()

	if a.xenPath, err = xenstorePath(cfg.Xenstore); err != nil {
		return nil, err
	}
	if a.xenPath != "" && a.intercept == nil {
		a.log.Warn("xenstore: not followed, the migration cache is off", "socket", a.xenPath)
		a.xenPath = ""
	}

	if cfg.Filter {
		if a.filter, err = filter.New(""); err != nil {
			return nil, err
		}
	} else {
		a.log.Warn("nftables table off (--filter=false): no isolation between virtual networks, no MSS clamping into the tunnel")
	}

	gcfg := gossip.DefaultConfig()
	gcfg.Name = cfg.Name
	gcfg.BindAddr = cfg.BindAddr
	gcfg.BindPort = cfg.GossipPort
	gcfg.AdvertiseAddr = cfg.AdvertiseAddr
	gcfg.Keys = cfg.GossipKeys
	gcfg.KeyFile = cfg.GossipKeyFile
	if a.allow != nil {
		gcfg.Admit = a.admitMember
	}
	gcfg.Meta = a.meta()
	gcfg.Profile = cfg.GossipProfile
	gcfg.MaxRecords = cfg.MaxVIPs
	gcfg.Logger = a.log
	gcfg.Events = events{a}
	a.cluster, err = gossip.New(gcfg)
	if err != nil {
		return nil, fmt.Errorf("gossip: %w", err)
	}

	// Re-announce what we owned before a restart, at the epoch we owned it
	// with: if someone claimed it since, their higher epoch wins on merge
	// and the next reconcile lets it go.
	for _, at := range st.Attachments {
		a.attached[at.VIP] = at
		if at.Dev != "" {
			a.engine.RestoreLocked(at.VIP, at.Dev)
		}
		a.cluster.Assert(gossip.Record{VIP: at.VIP, Owner: cfg.Name, Epoch: at.Epoch})
	}

	a.ctl, err = control.Listen(cfg.Socket, backend{a}, a.log.With("component", "control"))
	if err != nil {
		return nil, err
	}
	if a.metricsSrv != nil {
		a.metricsSrv.Serve(a.metrics)
	}
	ok = true
	return a, nil
}

func (a *Agent) meta() gossip.Meta {
	return gossip.Meta{
		Version:   gossip.ProtocolVersion,
		PublicKey: a.key.PublicKey(),
		Endpoint:  netip.AddrPortFrom(a.cfg.advertise(), uint16(a.cfg.WGPort)),
		Address:   a.cfg.Address.Addr(),
		Site:      a.cfg.Site,
		Trusted:   a.cfg.TrustedSite,
	}
}

// Run joins the cluster and reconciles until ctx is done, then leaves the
// cluster and removes everything the agent created.
func (a *Agent) Run(ctx context.Context) error {
	defer a.teardown()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		a.joinLoop(ctx)
	}()
	defer wg.Wait()
	if a.handoverLn != nil {
		a.engine.Serve(a.handoverLn)
		a.bg.Add(1)
		go a.watchLinks(a.linkStop)
	}
	if a.xenPath != "" {
		xctx, stopXen := context.WithCancel(ctx)
		defer stopXen()
		a.bg.Add(1)
		go a.runXenstore(xctx, a.xenPath)
	}

	a.reconcileWith(true, time.Now())
	close(a.ready)
	interval := a.live().ReconcileInterval
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		verify := false
		select {
		case <-ctx.Done():
			a.log.Info("shutting down")
			a.mu.Lock()
			if a.sessionKick != nil {
				a.sessionKick.Stop()
			}
			a.mu.Unlock()
			return nil
		case <-a.trigger:
		case <-tick.C:
			verify = true
		}
		if iv := a.live().ReconcileInterval; iv != interval { // reloaded
			interval = iv
			tick.Reset(iv)
		}
		a.reconcileWith(verify, time.Now())
	}
}

// Ready is closed once the agent serves: the control socket answers, the
// join has started (it goes on retrying in the background until a member
// answers: an agent whose peers are all down must still serve its VMs),
// and the first reconcile has put the interface, peers and routes in place.
func (a *Agent) Ready() <-chan struct{} { return a.ready }

// joinLoop joins the cluster, declares the configured networks once
// joined, and rejoins whenever this member is alone. A reload that changes
// the join list or the networks restarts it with the new ones; members it
// adds to the join list are joined at once.
func (a *Agent) joinLoop(ctx context.Context) {
	joined := false
	prev := a.live().Join
	for ctx.Err() == nil {
		jctx, cancel := context.WithCancel(ctx)
		// Before reading the config: a reload that stores a new one
		// after this point cancels this round.
		a.joinMu.Lock()
		a.rejoin = cancel
		a.joinMu.Unlock()
		cfg := a.live()
		a.mu.Lock()
		list := joinList(cfg.Join, a.peers, a.cfg.advertise(), a.cfg.GossipPort)
		a.mu.Unlock()
		wasJoined := joined
		if !joined {
			if len(list) > 0 {
				a.log.Info("joining", "members", list)
				a.cluster.Join(jctx, list)
			}
			joined = jctx.Err() == nil
		}
		if joined {
			// Only now: the table is the cluster's, so a wait sees
			// who runs its VM.
			a.restoreOnce.Do(a.restoreAwaiting)
			a.declareConfigured(cfg.Networks)
			a.cluster.KeepJoined(jctx, list)
		}
		if added := notIn(cfg.Join, prev); wasJoined && len(added) > 0 {
			a.log.Info("joining members the reloaded config added", "members", added)
			a.cluster.Join(jctx, added)
		}
		prev = cfg.Join
		<-jctx.Done()
		cancel()
	}
}

// restartJoin makes joinLoop start over with the live config.
func (a *Agent) restartJoin() {
	a.joinMu.Lock()
	if a.rejoin != nil {
		a.rejoin()
	}
	a.joinMu.Unlock()
}

// notIn returns the elements of xs that ys lacks.
func notIn(xs, ys []string) []string {
	var out []string
	for _, x := range xs {
		if !slices.Contains(ys, x) {
			out = append(out, x)
		}
	}
	return out
}

// teardown undoes New. It runs once, from Run or from a failed New.
// The control and metrics servers go first: their handlers use everything
// else.
func (a *Agent) teardown() {
	if a.metricsSrv != nil {
		a.metricsSrv.Close()
		a.metricsSrv = nil
	}
	if a.ctl != nil {
		a.ctl.Close()
		a.ctl = nil
	}
	a.closeAwaiting() // a claim needs the cluster
	if a.cluster != nil {
		if err := a.cluster.Leave(3 * time.Second); err != nil {
			a.log.Warn("leaving the cluster", "err", err)
		}
		a.cluster = nil
	}
	if a.handoverLn != nil {
		a.handoverLn.Close()
		close(a.linkStop)
		if a.engine != nil {
			a.engine.Close()
		}
		a.bg.Wait()
		a.handoverLn = nil
	}
	if a.intercept != nil {
		a.intercept.Close()
		a.intercept = nil
	}
	if err := a.routes.Flush(); err != nil {
		a.log.Warn("removing routes", "err", err)
	}
	if a.filter != nil {
		if err := a.filter.Close(); err != nil {
			a.log.Warn("removing the nftables table", "err", err)
		}
		a.filter = nil
	}
	if a.dev != nil {
		if err := a.dev.Close(); err != nil {
			a.log.Warn("removing the WireGuard interface", "err", err)
		}
		a.dev = nil
	}
	a.persist()
}

// kick asks the reconcile loop for a run without blocking.
func (a *Agent) kick() {
	select {
	case a.trigger <- struct{}{}:
	default:
	}
}

// events forwards gossip's events to the reconcile loop; it must not block.
type events struct{ a *Agent }

func (e events) MembersChanged() { e.a.kick() }
func (e events) RecordsChanged() { e.a.kick() }

// joinList merges the configured join addresses with the persisted peers,
// minus ourselves.
func joinList(cfg, persisted []string, self netip.Addr, port int) []string {
	selfStr := net.JoinHostPort(self.String(), strconv.Itoa(port))
	var out []string
	for _, s := range append(slices.Clone(cfg), persisted...) {
		if s == "" || s == selfStr || s == self.String() || slices.Contains(out, s) {
			continue
		}
		out = append(out, s)
	}
	return out
}

// persist saves the state if it changed. The file is written and synced
// outside a.mu (a sync took up to 40 ms on a busy host, and a handover
// request waits for a.mu), but under saveMu, so that when persist returns
// whatever changed before it was called is on disk: the next caller waits
// for a save under way, then finds nothing left to save.
func (a *Agent) persist() {
	a.saveMu.Lock()
	defer a.saveMu.Unlock()
	a.mu.Lock()
	if !a.dirty {
		a.mu.Unlock()
		return
	}
	st := persisted{Peers: slices.Clone(a.peers)}
	for _, at := range a.attached {
		st.Attachments = append(st.Attachments, at)
	}
	for vip, dev := range a.awaitKeep {
		st.Awaiting = append(st.Awaiting, awaitingVIP{VIP: vip, Dev: dev})
	}
	a.dirty = false
	a.mu.Unlock()
	if err := saveState(a.cfg.DataDir, st); err != nil {
		a.log.Error("saving state", "err", err)
		a.mu.Lock()
		a.dirty = true // the next reconcile tries again
		a.mu.Unlock()
	}
}

// warnSysctls says loudly when the host will not forward VM traffic.
func warnSysctls(log *slog.Logger, v6 bool) {
	check := func(path string) {
		b, err := os.ReadFile(path)
		if err == nil && len(b) > 0 && b[0] == '0' {
			log.Warn("IP forwarding is off: VMs on this host will not be reachable through the tunnel", "sysctl", path)
		}
	}
	check("/proc/sys/net/ipv4/ip_forward")
	if v6 {
		check("/proc/sys/net/ipv6/conf/all/forwarding")
	}
}

// linkExists reports whether a network interface of that name exists here.
func linkExists(name string) bool {
	_, err := netlink.LinkByName(name)
	return err == nil
}

// handoverSockopts sets up the handover listener's socket. Freebind lets
// it bind the overlay address before the reconcile loop has put it on the
// WireGuard interface. Binding it to that interface keeps out connections
// that arrive on another interface: Linux takes packets for any local
// address on any interface, so without it a host on the underlay could
// send to the overlay address directly. (Local processes still reach it;
// the agent refuses them, see fromPeer.)
func handoverSockopts(c syscall.RawConn, iface string) error {
	var serr error
	err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_FREEBIND, 1)
		if serr == nil {
			unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_FREEBIND, 1)
			serr = unix.BindToDevice(int(fd), iface)
		}
	})
	if err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("handover socket options: %w", serr)
	}
	return nil
}
