package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/internal/sdnotify"
	"github.com/vmroam/vmroam/wgagent"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/wgdev"
)

// agentFlags are the agent's flags; the config file uses the same names.
type agentFlags struct {
	fs                *flag.FlagSet
	name              string
	bind, advertise   string
	gossipPort        int
	wgPort            int
	join              listFlag
	address           string
	iface             string
	mtu               int
	wgImpl            string
	site              string
	trustedSite       bool
	dataDir           string
	socket            string
	keyFile           string
	peerAllowlist     string
	insecureGossip    bool
	gossipProfile     string
	reconcileInterval time.Duration
	keepalive         time.Duration
	cache             bool
	cacheMaxBytes     int64
	cacheMaxPackets   int
	cacheMaxAge       time.Duration
	cacheGlobalMax    int64
	cacheLinger       time.Duration
	cacheSettle       time.Duration
	cacheIface        string
	handoverPort      int
	networks          listFlag
	vipPrefixes       listFlag
	filter            bool
	xenstore          string
	activation        string
	allocSettle       time.Duration
	allocQuarantine   time.Duration
	logLevel          string
	logFormat         string
	config            string
	metricsAddr       string
	maxVIPs           int
}

func newAgentFlags(stdout, stderr io.Writer) *agentFlags {
	d := wgagent.DefaultConfig()
	f := &agentFlags{fs: newFlagSet("agent", "agent --bind IP --address CIDR --encrypt-key-file FILE [flags]", stdout, stderr)}
	host, _ := os.Hostname()
	fs := f.fs
	fs.StringVar(&f.name, "name", host, "this host's unique member `name`")
	fs.StringVar(&f.bind, "bind", "", "underlay `IP` to listen on for gossip (required)")
	fs.StringVar(&f.advertise, "advertise", "", "underlay `IP` other hosts reach this one at (default: --bind)")
	fs.IntVar(&f.gossipPort, "gossip-port", d.GossipPort, "gossip `port` (TCP and UDP)")
	fs.IntVar(&f.wgPort, "wg-port", d.WGPort, "WireGuard UDP `port`")
	fs.Var(&f.join, "join", "`HOST[:PORT],...` of members to join, comma-separated or repeated; retried until one answers")
	fs.StringVar(&f.address, "address", "", "this host's overlay address with the overlay prefix, e.g. 100.100.0.1/16 (required)")
	fs.StringVar(&f.iface, "interface", d.Interface, "WireGuard interface `name`")
	fs.IntVar(&f.mtu, "mtu", d.MTU, "WireGuard interface `MTU`")
	fs.StringVar(&f.wgImpl, "wg-impl", string(d.Impl), "WireGuard implementation: auto (kernel if the module is there), kernel or userspace")
	fs.StringVar(&f.site, "site", "", "`name` of this host's site (LAN)")
	fs.BoolVar(&f.trustedSite, "trusted-site", false, "route VIPs of this site's hosts that trust it too over the LAN, unencrypted (between sites traffic stays encrypted)")
	fs.StringVar(&f.dataDir, "data-dir", d.DataDir, "`directory` for the private key and state kept across restarts")
	fs.StringVar(&f.socket, "socket", control.SocketPath(""), "control socket `path` (default from $VMROAM_SOCKET, else "+control.DefaultSocket+")")
	fs.StringVar(&f.keyFile, "encrypt-key-file", "", "`file` with the gossip key(s), base64, one per line, first is primary (required unless --insecure-gossip)")
	fs.StringVar(&f.peerAllowlist, "peer-allowlist", "", "`file` of WireGuard public keys that may be peers, 'KEY [NAME]' per line; other members get no tunnel and their VIP claims are ignored (re-read when it changes)")
	fs.BoolVar(&f.insecureGossip, "insecure-gossip", false, "run gossip unencrypted: anyone reaching the gossip port can then redirect VM traffic")
	fs.StringVar(&f.gossipProfile, "gossip-profile", string(d.GossipProfile), "memberlist timing: lan, wan or local")
	fs.DurationVar(&f.reconcileInterval, "reconcile-interval", d.ReconcileInterval, "how often to check kernel state even without a change")
	fs.DurationVar(&f.keepalive, "keepalive", d.Keepalive, "WireGuard persistent keepalive, keeps sessions warm for migrations (0 = off)")
	fs.BoolVar(&f.cache, "cache", d.Cache, "cache a migrating VM's packets and deliver them at its new host; false only re-routes (to measure the loss it saves)")
	f.cacheMaxBytes, f.cacheGlobalMax = d.CacheLimits.MaxBytes, d.CacheGlobalMax
	fs.Var(sizeValue{&f.cacheMaxBytes}, "cache-max-bytes", "`size` cached per VIP at most: bytes, or with a unit (64MiB)")
	fs.IntVar(&f.cacheMaxPackets, "cache-max-packets", d.CacheLimits.MaxPackets, "packets cached per VIP at most")
	fs.DurationVar(&f.cacheMaxAge, "cache-max-age", d.CacheLimits.MaxAge, "oldest packet kept; a VIP nobody claims by then is released")
	fs.Var(sizeValue{&f.cacheGlobalMax}, "cache-global-max-bytes", "`size` cached for all VIPs together at most: bytes, or with a unit (1GiB)")
	fs.DurationVar(&f.cacheLinger, "cache-linger", d.CacheLinger, "how long the old host forwards stragglers after a flush")
	fs.DurationVar(&f.cacheSettle, "cache-settle", d.CacheSettle, "least hold of a flow's first direct packets at the new host (raised to the measured RTT)")
	fs.StringVar(&f.cacheIface, "cache-interface", d.CacheInterface, "`name` of the cache's TUN device")
	fs.IntVar(&f.handoverPort, "handover-port", d.HandoverPort, "TCP `port` on the overlay address for handovers between agents")
	fs.Var(&f.networks, "network", "`NAME=CIDR,...` virtual networks to declare cluster-wide once joined, comma-separated or repeated (like 'vmroam network add')")
	fs.Var(&f.vipPrefixes, "vip-prefixes", "`CIDR,...` where VIPs may be, comma-separated or repeated: an attach or another host's claim outside them is refused (default: the --address prefix and the declared virtual networks)")
	fs.DurationVar(&f.allocSettle, "alloc-settle", d.AllocSettle, "how long 'vip allocate' waits for a competing claim before it trusts an address (longer than gossip takes)")
	fs.DurationVar(&f.allocQuarantine, "alloc-quarantine", d.AllocQuarantine, "how long a released address is not handed out again")
	fs.StringVar(&f.xenstore, "xenstore", d.Xenstore, "xenstored's socket `path`, to start caching the moment a Xen domain is asked to suspend: auto (use /run/xenstored/socket if there), off, or a path")
	fs.StringVar(&f.activation, "activation", string(d.Activation), "what shows an arriving VM runs, so its packets may go: carrier, announce (its gratuitous ARP/RARP/NA) or any")
	fs.BoolVar(&f.filter, "filter", d.Filter, "keep vmroam's nftables table: isolation between virtual networks and TCP MSS clamping into the tunnel")
	fs.StringVar(&f.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&f.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&f.config, "config", "", "TOML config `file` with the same keys as these flags; flags win")
	fs.IntVar(&f.maxVIPs, "max-vips", d.MaxVIPs, "location records (VIPs, released ones included) kept of the whole cluster at most; others' beyond it are refused")
	fs.StringVar(&f.metricsAddr, "metrics-addr", "", "serve Prometheus metrics on `HOST:PORT` at /metrics, e.g. 127.0.0.1:9474 (default: off)")
	return f
}

// listFlag collects a flag given several times, each a comma-separated list.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, ",") }

func (l *listFlag) Set(s string) error {
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			*l = append(*l, e)
		}
	}
	return nil
}

// agentConfig parses and checks the agent's command line and config file.
func agentConfig(args []string, stdout, stderr io.Writer) (wgagent.Config, error) {
	f := newAgentFlags(stdout, stderr)
	pos, err := parse(f.fs, args)
	if err != nil {
		return wgagent.Config{}, err
	}
	if len(pos) > 0 {
		return wgagent.Config{}, usagef("agent takes no arguments, got %q", pos)
	}
	if f.config != "" {
		if err := applyConfigFile(f.fs, f.config); err != nil {
			return wgagent.Config{}, err
		}
	}
	cfg := wgagent.DefaultConfig()
	cfg.Name = f.name
	if f.bind != "" {
		if cfg.BindAddr, err = netip.ParseAddr(f.bind); err != nil {
			return cfg, usagef("--bind %q: not an IP address", f.bind)
		}
	}
	if f.advertise != "" {
		if cfg.AdvertiseAddr, err = netip.ParseAddr(f.advertise); err != nil {
			return cfg, usagef("--advertise %q: not an IP address", f.advertise)
		}
	}
	if f.address != "" {
		if cfg.Address, err = netip.ParsePrefix(f.address); err != nil {
			return cfg, usagef("--address %q: want this host's overlay address with the prefix length, e.g. 100.100.0.1/16", f.address)
		}
	}
	cfg.Join = f.join
	if cfg.Impl, err = wgdev.ParseImpl(f.wgImpl); err != nil {
		return cfg, usagef("--wg-impl: %v", err)
	}
	cfg.GossipPort, cfg.WGPort = f.gossipPort, f.wgPort
	cfg.Interface, cfg.MTU, cfg.Site, cfg.TrustedSite = f.iface, f.mtu, f.site, f.trustedSite
	cfg.DataDir, cfg.Socket = f.dataDir, f.socket
	cfg.GossipKeyFile, cfg.PeerAllowlist = f.keyFile, f.peerAllowlist
	cfg.InsecureGossip, cfg.GossipProfile = f.insecureGossip, gossip.Profile(f.gossipProfile)
	cfg.ReconcileInterval = f.reconcileInterval
	cfg.Keepalive = f.keepalive
	cfg.Cache = f.cache
	cfg.CacheLimits.MaxBytes, cfg.CacheLimits.MaxPackets, cfg.CacheLimits.MaxAge = f.cacheMaxBytes, f.cacheMaxPackets, f.cacheMaxAge
	cfg.CacheGlobalMax, cfg.CacheLinger, cfg.CacheSettle = f.cacheGlobalMax, f.cacheLinger, f.cacheSettle
	cfg.CacheInterface, cfg.HandoverPort = f.cacheIface, f.handoverPort
	cfg.Filter = f.filter
	cfg.Xenstore = f.xenstore
	cfg.Activation = wgagent.Activation(f.activation)
	cfg.AllocSettle, cfg.AllocQuarantine = f.allocSettle, f.allocQuarantine
	cfg.MetricsAddr = f.metricsAddr
	cfg.MaxVIPs = f.maxVIPs
	for _, n := range f.networks {
		name, cidr, ok := strings.Cut(n, "=")
		p, err := netip.ParsePrefix(cidr)
		if !ok || err != nil {
			return cfg, usagef("--network %q: want NAME=CIDR, e.g. blue=100.64.1.0/24", n)
		}
		cfg.Networks = append(cfg.Networks, wgagent.NetworkConfig{Name: name, Prefix: p})
	}
	for _, s := range f.vipPrefixes {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return cfg, usagef("--vip-prefixes %q: want CIDR, e.g. 100.64.0.0/10", s)
		}
		cfg.VIPPrefixes = append(cfg.VIPPrefixes, p)
	}
	if f.keyFile != "" {
		if cfg.GossipKeys, err = gossip.LoadKeyFile(f.keyFile); err != nil {
			return cfg, usagef("--encrypt-key-file: %v", err)
		}
	}
	if err := cfg.Validate(); err != nil {
		return cfg, usageError{strings.ReplaceAll(err.Error(), "\n", "; ")}
	}
	cfg.Logger, err = newLogger(f.logLevel, f.logFormat, stderr)
	if err != nil {
		return cfg, err
	}
	return cfg, nil
}

// logHandler is the agent's log handler. It keeps its level, which a
// reload changes, and its format, which a reload compares.
type logHandler struct {
	slog.Handler
	level  *slog.LevelVar
	format string
}

func newLogger(level, format string, w io.Writer) (*slog.Logger, error) {
	lv := new(slog.LevelVar)
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, usagef("--log-level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(&logHandler{slog.NewTextHandler(w, opts), lv, format}), nil
	case "json":
		return slog.New(&logHandler{slog.NewJSONHandler(w, opts), lv, format}), nil
	}
	return nil, usagef("--log-format %q: want text or json", format)
}

func runAgent(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	return serveAgent(ctx, args, hup, stdout, stderr)
}

// serveAgent runs the agent until ctx ends, re-reads its config file each
// time reload fires, and tells systemd (Type=notify) when it is ready,
// reloading and stopping.
func serveAgent(ctx context.Context, args []string, reload <-chan os.Signal, stdout, stderr io.Writer) error {
	cfg, err := agentConfig(args, stdout, stderr)
	if err != nil {
		return err
	}
	a, err := wgagent.New(cfg)
	if err != nil {
		return err
	}
	log := cfg.Logger
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	ready := a.Ready()
	for {
		select {
		case <-ready:
			ready = nil
			notify(log, sdnotify.Ready, sdnotify.Status("serving on "+cfg.Socket))
		case <-reload:
			if ready != nil { // not serving yet: systemd waits for READY anyway
				reloadAgent(a, log, args)
				continue
			}
			notify(log, sdnotify.Reloading())
			notify(log, sdnotify.Ready, sdnotify.Status(reloadAgent(a, log, args)))
		case <-ctx.Done():
			notify(log, sdnotify.Stopping)
			return <-done
		case err := <-done:
			return err
		}
	}
}

// reloadAgent re-reads the command line and the config file (the command
// line still wins) and applies the result, or nothing if any of it is
// wrong. It returns a one-line summary for systemd.
func reloadAgent(a *wgagent.Agent, log *slog.Logger, args []string) string {
	log.Info("reloading the config")
	next, err := agentConfig(args, io.Discard, io.Discard)
	var applied, restart []string
	if err == nil {
		applied, restart, err = a.Reload(next)
	}
	if err != nil {
		log.Error("config reload refused, nothing changed", "err", err)
		return "serving; last reload refused: " + err.Error()
	}
	cur, _ := log.Handler().(*logHandler)
	nw, _ := next.Logger.Handler().(*logHandler)
	if cur != nil && nw != nil {
		if from, to := cur.level.Level(), nw.level.Level(); from != to {
			cur.level.Set(to)
			log.Info("config reloaded", "key", "log-level", "from", from, "to", to)
			applied = append(applied, "log-level")
		}
		if cur.format != nw.format {
			log.Warn("config changed, but this key needs a restart: running with the old value until then", "key", "log-format", "running", cur.format, "file", nw.format)
			restart = append(restart, "log-format")
		}
	}
	msg := "serving; config reloaded at " + time.Now().Format(time.TimeOnly)
	if len(applied) > 0 {
		msg += ", applied " + strings.Join(applied, ", ")
	}
	if len(restart) > 0 {
		msg += ", RESTART NEEDED for " + strings.Join(restart, ", ")
	}
	return msg
}

func notify(log *slog.Logger, msgs ...string) {
	if _, err := sdnotify.Notify(msgs...); err != nil {
		log.Warn("telling systemd", "err", err)
	}
}
