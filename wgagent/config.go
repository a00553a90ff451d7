package wgagent

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/migrate"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/wgdev"
)

// Config is everything an agent needs to run. The CLI fills it from flags
// and the config file.
type Config struct {
	// Name is this host's member name, unique in the cluster.
	Name string
	// BindAddr is the underlay address gossip listens on.
	BindAddr netip.Addr
	// AdvertiseAddr is the underlay address other hosts reach this one at,
	// for gossip and WireGuard. Zero means BindAddr, which then must not
	// be unspecified.
	AdvertiseAddr netip.Addr
	// GossipPort is the memberlist port (TCP and UDP).
	GossipPort int
	// WGPort is WireGuard's UDP listen port.
	WGPort int
	// Join lists HOST or HOST:PORT of members to join; the agent retries
	// until one answers and rejoins when it finds itself alone.
	Join []string
	// Address is this host's overlay address with the overlay prefix
	// length, e.g. 100.100.0.1/16. The whole prefix is routed into the
	// tunnel.
	Address netip.Prefix
	// VIPPrefixes are where VIPs may be: an attach or another host's
	// record outside them is refused. Empty: the overlay prefix (of
	// Address) and the declared virtual networks.
	VIPPrefixes []netip.Prefix
	// Interface names the WireGuard interface.
	Interface string
	// MTU of the WireGuard interface.
	MTU int
	// Impl picks kernel or embedded WireGuard.
	Impl wgdev.Impl
	// Site names this host's LAN.
	Site string
	// TrustedSite: VIPs of this site's hosts that trust it too go over the
	// LAN directly, unencrypted, without WireGuard. Needs Site.
	TrustedSite bool
	// DataDir keeps the private key and the state that survives restarts.
	DataDir string
	// Socket is the control API's Unix socket.
	Socket string
	// GossipKeys encrypt gossip; the first is primary. Empty only with
	// InsecureGossip.
	GossipKeys [][]byte
	// GossipKeyFile is the file GossipKeys came from; `vmroam keys`
	// rewrites it when the cluster's keys change. Empty: key changes are
	// not persisted.
	GossipKeyFile string
	// PeerAllowlist is a file of WireGuard public keys ("KEY [NAME]" lines)
	// that may be peers. Empty: every member with the gossip key may. With
	// it, a member whose key is not listed, or listed for another name,
	// gets no tunnel and its VIP claims are ignored. Re-read when it
	// changes.
	PeerAllowlist string
	// InsecureGossip allows running without GossipKeys.
	InsecureGossip bool
	// GossipProfile is memberlist's timing profile: lan, wan or local.
	GossipProfile gossip.Profile
	// ReconcileInterval is how often kernel state is compared with the
	// desired state even when nothing signalled a change; it bounds how
	// long a route or peer deleted by someone else stays missing.
	ReconcileInterval time.Duration
	// Keepalive is WireGuard's persistent keepalive for every peer: it
	// keeps sessions up between hosts that exchange nothing, so the first
	// packets of a migration do not wait for a handshake. 0 turns it off.
	Keepalive time.Duration
	// Cache turns on the migration cache. Off, the agent only re-routes
	// VIPs (the baseline that shows what the cache saves).
	Cache bool
	// CacheLimits bound each VIP's queue.
	CacheLimits cache.Limits
	// CacheGlobalMax bounds the bytes held by all queues together.
	CacheGlobalMax int64
	// CacheLinger is how long the old host keeps forwarding stragglers
	// after its flush, for senders whose view is stale; about the time
	// gossip takes to reach every host.
	CacheLinger time.Duration
	// CacheSettle is the least time the new host holds a flow's first
	// direct packets so the same sender's packets on the old path come
	// first; the measured round trip to the old host raises it.
	CacheSettle time.Duration
	// CacheInterface names the TUN device the cache reads from.
	CacheInterface string
	// HandoverPort is the TCP port, on the overlay address, where the
	// agent serves its caches to the hosts VMs moved to.
	HandoverPort int
	// Networks are virtual networks this agent declares once it has
	// joined (the config file's way to say `vmroam network add`).
	Networks []NetworkConfig
	// AllocSettle is how long `vip allocate` waits after claiming an
	// address before it trusts that no other host claimed it too: longer
	// than gossip takes to reach every host.
	AllocSettle time.Duration
	// AllocQuarantine is how long a released address stays unused by
	// allocations, so traffic still on its way to the old VM does not
	// reach a new one.
	AllocQuarantine time.Duration
	// Activation is what tells the new host that an arriving VM runs, so
	// that delivery may start.
	Activation Activation
	// Xenstore is where the agent learns the moment a Xen domain is asked
	// to suspend: "auto" (xenstored's socket if there is one), "off", or
	// a socket path.
	Xenstore string
	// Filter keeps vmroam's nftables table: isolation between virtual
	// networks and TCP MSS clamping into the tunnel. Off only for hosts
	// whose firewall is managed otherwise.
	Filter bool
	// MaxVIPs bounds the location records (VIPs, tombstones of released
	// ones included) this host keeps of the whole cluster: other hosts'
	// records beyond it are refused and counted, and this host's own
	// claims beyond it fail. gossip.Config.MaxRecords; its default,
	// 200,000, is sized for 100,000 VIPs.
	MaxVIPs int
	// MetricsAddr is the HOST:PORT where the agent serves Prometheus
	// metrics at /metrics, e.g. 127.0.0.1:9474; empty (the default): off.
	MetricsAddr string
	// Logger receives the agent's logs; nil means slog.Default().
	Logger *slog.Logger
}

// Activation is what tells the new host that an arriving VM runs.
type Activation = migrate.Activation

const (
	ActivationCarrier  = migrate.ActivationCarrier
	ActivationAnnounce = migrate.ActivationAnnounce
	ActivationAny      = migrate.ActivationAny
)

// NetworkConfig is a virtual network declared in the config.
type NetworkConfig struct {
	Name   string
	Prefix netip.Prefix
}

// String returns NAME=CIDR, as the config file writes it.
func (n NetworkConfig) String() string { return n.Name + "=" + n.Prefix.String() }

// DefaultConfig returns a Config with every default filled in; Name,
// BindAddr, Address and GossipKeys remain to be set.
func DefaultConfig() Config {
	tun := migrate.DefaultTunables() // the engine's defaults, one source
	return Config{
		GossipPort:        7946,
		WGPort:            51820,
		Interface:         "vmr0",
		MTU:               1420,
		Impl:              wgdev.Auto,
		DataDir:           "/var/lib/vmroam",
		Socket:            control.DefaultSocket,
		GossipProfile:     gossip.ProfileLAN,
		ReconcileInterval: 2 * time.Second,
		Keepalive:         25 * time.Second,
		Cache:             true,
		CacheLimits:       tun.Limits,
		CacheGlobalMax:    1 << 30,
		CacheLinger:       tun.Linger,
		CacheSettle:       tun.Settle,
		CacheInterface:    "vmrc0",
		HandoverPort:      7947,
		Filter:            true,
		Xenstore:          "auto",
		Activation:        tun.Activation,
		AllocSettle:       2 * time.Second,
		AllocQuarantine:   5 * time.Minute,
		MaxVIPs:           gossip.DefaultMaxRecords,
	}
}

// Validate reports the first problem with c, in words for the operator.
func (c *Config) Validate() error {
	var errs []error
	add := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	if c.Name == "" {
		add("--name is required")
	} else if len(c.Name) > 64 {
		add("--name %q is longer than 64 bytes", c.Name)
	}
	if !c.BindAddr.IsValid() {
		add("--bind is required")
	}
	adv := c.advertise()
	if !adv.IsValid() || adv.IsUnspecified() {
		add("--advertise is required when --bind is %s", c.BindAddr)
	}
	if !c.Address.IsValid() {
		add("--address is required (this host's overlay address with the overlay prefix, e.g. 100.100.0.1/16)")
	} else if c.Address.Addr() == c.Address.Masked().Addr() && c.Address.Bits() < c.Address.Addr().BitLen() {
		add("--address %s is the overlay prefix itself; give this host's address in it, e.g. %s", c.Address, nextAddr(c.Address))
	}
	for _, p := range c.VIPPrefixes {
		// The rule of a virtual network's prefix: a range VMs can use.
		if err := gossip.ValidNetworkPrefix(p); err != nil {
			add("--vip-prefixes %s: %v", p, err)
		}
	}
	for _, p := range []struct {
		name string
		v    int
	}{{"--gossip-port", c.GossipPort}, {"--wg-port", c.WGPort}} {
		if p.v < 1 || p.v > 65535 {
			add("%s %d: must be 1 to 65535", p.name, p.v)
		}
	}
	if c.Interface == "" || len(c.Interface) > 15 {
		add("--interface %q: must be 1 to 15 bytes", c.Interface)
	}
	if c.MTU < 1280 || c.MTU > 9000 {
		add("--mtu %d: must be 1280 to 9000", c.MTU)
	}
	if c.DataDir == "" {
		add("--data-dir is required")
	}
	if c.Socket == "" {
		add("--socket is required")
	}
	if len(c.GossipKeys) == 0 && !c.InsecureGossip {
		add("--encrypt-key-file is required (make a key with `vmroam keygen --gossip`); --insecure-gossip runs without encryption")
	}
	if !c.GossipProfile.Valid() {
		add("--gossip-profile %q: want lan, wan or local", c.GossipProfile)
	}
	if c.Cache {
		if c.CacheLimits.MaxBytes < 1<<16 || c.CacheLimits.MaxPackets < 1 || c.CacheLimits.MaxAge < time.Second {
			add("cache limits too small: --cache-max-bytes >= 64KiB, --cache-max-packets >= 1, --cache-max-age >= 1s")
		}
		if c.CacheGlobalMax < c.CacheLimits.MaxBytes {
			add("--cache-global-max-bytes %d is below --cache-max-bytes %d", c.CacheGlobalMax, c.CacheLimits.MaxBytes)
		}
		if c.CacheInterface == "" || len(c.CacheInterface) > 15 || c.CacheInterface == c.Interface {
			add("--cache-interface %q: must be 1 to 15 bytes and differ from --interface", c.CacheInterface)
		}
		if c.HandoverPort < 1 || c.HandoverPort > 65535 {
			add("--handover-port %d: must be 1 to 65535", c.HandoverPort)
		}
		if c.CacheLinger < 0 || c.CacheSettle < 0 {
			add("--cache-linger and --cache-settle must not be negative")
		}
	}
	if !c.Activation.Valid() {
		add("--activation %q: want carrier, announce or any", c.Activation)
	}
	if c.TrustedSite && c.Site == "" {
		add("--trusted-site needs --site: the hosts to trust are those of this host's site")
	}
	if c.AllocSettle < 0 || c.AllocQuarantine < 0 {
		add("--alloc-settle and --alloc-quarantine must not be negative")
	}
	seen := map[string]bool{}
	for _, n := range c.Networks {
		if err := gossip.ValidNetworkName(n.Name); err != nil {
			add("--network %s=%s: %v", n.Name, n.Prefix, err)
		} else if err := gossip.ValidNetworkPrefix(n.Prefix); err != nil {
			add("--network %s=%s: %v", n.Name, n.Prefix, err)
		}
		if seen[n.Name] {
			add("--network %s given twice", n.Name)
		}
		seen[n.Name] = true
	}
	if c.MaxVIPs < 1 {
		add("--max-vips %d: must be at least 1", c.MaxVIPs)
	}
	if c.MetricsAddr != "" {
		if _, port, err := net.SplitHostPort(c.MetricsAddr); err != nil {
			add("--metrics-addr %q: want HOST:PORT, e.g. 127.0.0.1:9474", c.MetricsAddr)
		} else if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
			add("--metrics-addr %q: the port must be 1 to 65535", c.MetricsAddr)
		}
	}
	if c.ReconcileInterval < 100*time.Millisecond {
		add("--reconcile-interval %s: must be at least 100ms", c.ReconcileInterval)
	}
	return errors.Join(errs...)
}

func (c *Config) advertise() netip.Addr {
	if c.AdvertiseAddr.IsValid() {
		return c.AdvertiseAddr
	}
	return c.BindAddr
}

func nextAddr(p netip.Prefix) netip.Prefix {
	return netip.PrefixFrom(p.Masked().Addr().Next(), p.Bits())
}
