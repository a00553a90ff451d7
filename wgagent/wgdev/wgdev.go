// Package wgdev opens this host's WireGuard interface, either in the kernel
// through netlink or as embedded wireguard-go on a TUN device with its UAPI
// socket, and configures it (through wgctrl, or the embedded device's UAPI
// directly). Both give the same interface to `wg show` and to the rest of
// the agent.
package wgdev

import (
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/internal/barrier"
)

// Impl selects how the WireGuard interface is provided.
type Impl string

const (
	// Auto uses the kernel module when it is there, else userspace.
	Auto Impl = "auto"
	// Kernel creates a "wireguard" link through netlink.
	Kernel Impl = "kernel"
	// Userspace runs embedded wireguard-go on a TUN device.
	Userspace Impl = "userspace"
)

// ParseImpl checks an implementation name given by the operator.
func ParseImpl(s string) (Impl, error) {
	switch Impl(s) {
	case Auto, Kernel, Userspace:
		return Impl(s), nil
	}
	return "", fmt.Errorf("unknown WireGuard implementation %q (want auto, kernel or userspace)", s)
}

// Config describes the interface to open.
type Config struct {
	// Name is the interface name, at most 15 bytes. With userspace, it also
	// names the UAPI socket /var/run/wireguard/<Name>.sock, which every
	// network namespace shares.
	Name string
	// MTU of the interface.
	MTU int
	// Impl chooses kernel or userspace WireGuard.
	Impl Impl
	// PrivateKey is the interface's private key.
	PrivateKey wgtypes.Key
	// ListenPort is the UDP port WireGuard listens on.
	ListenPort int
	// Logger receives the device's log lines; nil means slog.Default().
	Logger *slog.Logger
}

// Device is an open WireGuard interface.
type Device struct {
	name    string
	impl    Impl
	created bool // we created the link, so Close removes it
	client  *wgctrl.Client
	log     *slog.Logger

	// userspace only
	wg       *device.Device
	hold     *holdTUN
	uapi     net.Listener
	uapiDone chan struct{}
	// The public key of priv, computed once (State).
	pubMu sync.Mutex
	priv  wgtypes.Key
	pub   wgtypes.Key

	closeOnce sync.Once
	closeErr  error
}

// ErrKernelUnsupported says the kernel has no WireGuard module.
var ErrKernelUnsupported = errors.New("kernel WireGuard is not available (no wireguard module)")

// Open creates (or, for a kernel link left by an earlier run, adopts) the
// interface, sets its key, port and MTU and brings it up. On error nothing
// it created is left behind.
func Open(cfg Config) (*Device, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Name == "" || len(cfg.Name) > 15 {
		return nil, fmt.Errorf("interface name %q: must be 1 to 15 bytes", cfg.Name)
	}
	if cfg.MTU < 1280 || cfg.MTU > 9000 {
		return nil, fmt.Errorf("MTU %d: must be between 1280 and 9000", cfg.MTU)
	}
	d := &Device{name: cfg.Name, log: cfg.Logger.With("iface", cfg.Name)}
	var err error
	switch cfg.Impl {
	case Kernel:
		err = d.openKernel(cfg)
	case Userspace:
		err = d.openUserspace(cfg)
	case Auto, "":
		err = d.openKernel(cfg)
		if errors.Is(err, ErrKernelUnsupported) {
			d.log.Info("kernel WireGuard not available, using embedded wireguard-go")
			err = d.openUserspace(cfg)
		}
	default:
		err = fmt.Errorf("unknown WireGuard implementation %q", cfg.Impl)
	}
	if err != nil {
		return nil, err
	}
	if err := d.setup(cfg); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func (d *Device) openKernel(cfg Config) error {
	if existing, err := netlink.LinkByName(cfg.Name); err == nil {
		if existing.Type() != "wireguard" {
			return fmt.Errorf("interface %s exists and is a %s device, not WireGuard", cfg.Name, existing.Type())
		}
		// A kernel link outlives a crashed agent; adopting it keeps the
		// VIPs reachable across the restart.
		d.log.Info("adopting existing kernel WireGuard interface")
		d.impl = Kernel
		d.created = true
		return nil
	}
	link := &netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: cfg.Name, MTU: cfg.MTU}}
	if err := netlink.LinkAdd(link); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.EINVAL) {
			return fmt.Errorf("create %s: %w", cfg.Name, ErrKernelUnsupported)
		}
		return fmt.Errorf("create kernel WireGuard link %s: %w", cfg.Name, err)
	}
	d.impl = Kernel
	d.created = true
	return nil
}

func (d *Device) openUserspace(cfg Config) error {
	if existing, err := netlink.LinkByName(cfg.Name); err == nil {
		return fmt.Errorf("interface %s already exists (a %s device): is another agent or wireguard-go running?", cfg.Name, existing.Type())
	}
	uapiFile, err := ipc.UAPIOpen(cfg.Name)
	if err != nil {
		return fmt.Errorf("open UAPI socket for %s (another wireguard-go on this name, in any namespace?): %w", cfg.Name, err)
	}
	tdev, err := tun.CreateTUN(cfg.Name, cfg.MTU)
	if err != nil {
		uapiFile.Close()
		os.Remove(uapiSocketPath(cfg.Name))
		return fmt.Errorf("create TUN %s: %w", cfg.Name, err)
	}
	log := d.log.With("wg", "userspace")
	logger := &device.Logger{
		Verbosef: func(format string, args ...any) { log.Debug(fmt.Sprintf(format, args...)) },
		Errorf:   func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...)) },
	}
	d.hold = newHoldTUN(tdev, barrier.SendOn(cfg.Name, readBarrierAddr))
	d.wg = device.NewDevice(d.hold, conn.NewDefaultBind(), logger)
	uapi, err := ipc.UAPIListen(cfg.Name, uapiFile)
	if err != nil {
		d.wg.Close()
		uapiFile.Close()
		return fmt.Errorf("listen on UAPI socket for %s: %w", cfg.Name, err)
	}
	d.uapi = uapi
	d.uapiDone = make(chan struct{})
	go d.serveUAPI()
	d.impl = Userspace
	d.created = true
	return nil
}

func (d *Device) serveUAPI() {
	defer close(d.uapiDone)
	for {
		c, err := d.uapi.Accept()
		if err != nil {
			return
		}
		go d.wg.IpcHandle(c)
	}
}

// userspaceTxQueueLen is the transmit queue of wireguard-go's TUN, in
// packets (see setup).
const userspaceTxQueueLen = 10000

func uapiSocketPath(name string) string { return "/var/run/wireguard/" + name + ".sock" }

func (d *Device) setup(cfg Config) error {
	client, err := wgctrl.New()
	if err != nil {
		return fmt.Errorf("open wgctrl: %w", err)
	}
	d.client = client
	port := cfg.ListenPort
	if err := d.client.ConfigureDevice(d.name, wgtypes.Config{PrivateKey: &cfg.PrivateKey, ListenPort: &port}); err != nil {
		return fmt.Errorf("configure %s with listen port %d (is the port taken by another agent or WireGuard?): %w", d.name, port, err)
	}
	link, err := netlink.LinkByName(d.name)
	if err != nil {
		return fmt.Errorf("find %s: %w", d.name, err)
	}
	if err := netlink.LinkSetMTU(link, cfg.MTU); err != nil {
		return fmt.Errorf("set MTU of %s: %w", d.name, err)
	}
	if d.impl == Userspace {
		// The kernel queues what is routed into the TUN until wireguard-go
		// reads it, and drops beyond txqueuelen (500 by default: a few
		// milliseconds of traffic). A VM that resumes sends a burst; a deep
		// queue lets wireguard-go catch up instead of dropping it.
		if err := netlink.LinkSetTxQLen(link, userspaceTxQueueLen); err != nil {
			return fmt.Errorf("set the transmit queue of %s: %w", d.name, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bring %s up: %w", d.name, err)
	}
	return nil
}

// Name is the interface name.
func (d *Device) Name() string { return d.name }

// Impl is the implementation in use (never Auto).
func (d *Device) Impl() Impl { return d.impl }

// State reads the device's peers and counters.
func (d *Device) State() (*wgtypes.Device, error) {
	if d.impl == Userspace && d.wg != nil {
		text, err := d.wg.IpcGet()
		if err != nil {
			return nil, fmt.Errorf("read WireGuard state of %s: %w", d.name, err)
		}
		dev, err := parseUAPI(d.name, text)
		if err != nil {
			return nil, err
		}
		d.pubMu.Lock()
		if d.priv != dev.PrivateKey || d.pub == (wgtypes.Key{}) {
			d.priv, d.pub = dev.PrivateKey, dev.PrivateKey.PublicKey()
		}
		dev.PublicKey = d.pub
		d.pubMu.Unlock()
		return dev, nil
	}
	dev, err := d.client.Device(d.name)
	if err != nil {
		return nil, fmt.Errorf("read WireGuard state of %s: %w", d.name, err)
	}
	return dev, nil
}

// Configure applies a change to the device.
func (d *Device) Configure(c wgtypes.Config) error {
	if d.impl == Userspace && d.wg != nil {
		set, err := formatUAPISet(c)
		if err == nil {
			err = d.wg.IpcSet(set)
		}
		if err != nil {
			return fmt.Errorf("configure WireGuard %s: %w", d.name, err)
		}
		return nil
	}
	if err := d.client.ConfigureDevice(d.name, c); err != nil {
		return fmt.Errorf("configure WireGuard %s: %w", d.name, err)
	}
	return nil
}

// RemoveAllowedIPs takes prefixes off one peer and leaves its others in
// place. A replace (wgtypes.PeerConfig.ReplaceAllowedIPs) first removes
// every prefix of the peer and then adds back the ones kept: a packet to
// any of them routed in between has no peer and is dropped. wireguard-go
// was seen descheduled for milliseconds in there on a busy host, dropping
// a handover request to the peer's overlay address. wireguard-go takes
// single prefixes off ("allowed_ip=-P"); the kernel's netlink API as wgctrl
// speaks it cannot, so there a replace to keep is what remains, done in
// one netlink message.
func (d *Device) RemoveAllowedIPs(peer wgtypes.Key, remove, keep []netip.Prefix) error {
	if len(remove) == 0 {
		return nil
	}
	if d.impl == Userspace && d.wg != nil {
		var b strings.Builder
		fmt.Fprintf(&b, "public_key=%s\nupdate_only=true\n", hex.EncodeToString(peer[:]))
		for _, p := range remove {
			fmt.Fprintf(&b, "allowed_ip=-%s\n", p)
		}
		if err := d.wg.IpcSet(b.String()); err != nil {
			return fmt.Errorf("configure WireGuard %s: remove allowed IPs %v: %w", d.name, remove, err)
		}
		return nil
	}
	nets := make([]net.IPNet, len(keep))
	for i, p := range keep {
		nets[i] = net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
	}
	return d.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: peer, UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: nets}}})
}

// Rehandshake starts a new WireGuard handshake with peer now, however
// recently the last initiation went out. It is for a peer that never
// completed one: two hosts that add each other within one one-way delay
// both send an initiation, each answers the other's, and each then drops
// the answer to its own, since answering replaced its own initiation's
// state. Neither has a session, and WireGuard sends no new initiation
// before REKEY_TIMEOUT (5 s, and again if they cross again). A peer with
// a session gets a new one, and what is sent meanwhile waits a round trip.
func (d *Device) Rehandshake(peer wgtypes.Key) error {
	if d.impl == Userspace && d.wg != nil {
		if err := rehandshake(d.wg, peer); err != nil {
			return fmt.Errorf("WireGuard %s: %w", d.name, err)
		}
		return nil
	}
	// The kernel's netlink API has no such command, but a peer added anew
	// has no initiation behind it. Removal and addition are one message,
	// so no packet finds the peer missing.
	st, err := d.State()
	if err != nil {
		return err
	}
	i := slices.IndexFunc(st.Peers, func(p wgtypes.Peer) bool { return p.PublicKey == peer })
	if i < 0 {
		return fmt.Errorf("WireGuard %s: no peer %s", d.name, peer)
	}
	p := st.Peers[i]
	return d.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{
		{PublicKey: peer, Remove: true},
		{
			PublicKey:                   peer,
			PresharedKey:                &p.PresharedKey,
			Endpoint:                    p.Endpoint,
			PersistentKeepaliveInterval: &p.PersistentKeepaliveInterval,
			ReplaceAllowedIPs:           true,
			AllowedIPs:                  p.AllowedIPs,
		},
	}})
}

// rehandshake is Rehandshake for embedded wireguard-go. Expiring the
// peer's keypairs is what lifts the limit of one initiation per
// REKEY_TIMEOUT.
func rehandshake(wg *device.Device, peer wgtypes.Key) error {
	p := wg.LookupPeer(device.NoisePublicKey(peer))
	if p == nil {
		return fmt.Errorf("no peer %s", peer)
	}
	p.ExpireCurrentKeypairs()
	if err := p.SendHandshakeInitiation(false); err != nil {
		return fmt.Errorf("handshake with %s: %w", peer, err)
	}
	return nil
}

// Close removes the interface (which removes its routes with it) and stops
// the embedded device. It is safe to call more than once.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		var errs []error
		if d.client != nil {
			errs = append(errs, d.client.Close())
		}
		switch d.impl {
		case Userspace:
			d.uapi.Close()
			<-d.uapiDone
			d.wg.Close() // closes the TUN, which removes the link
		case Kernel:
			if d.created {
				if link, err := netlink.LinkByName(d.name); err == nil {
					if err := netlink.LinkDel(link); err != nil {
						errs = append(errs, fmt.Errorf("remove %s: %w", d.name, err))
					}
				}
			}
		}
		d.closeErr = errors.Join(errs...)
	})
	return d.closeErr
}
