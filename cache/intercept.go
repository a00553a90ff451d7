package cache

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/vmroam/vmroam/internal/barrier"
	"github.com/vmroam/vmroam/internal/udpcsum"
)

// Sink takes the packets the interceptor reads for one VIP. Take is called
// from the interceptor's single reader goroutine, in arrival order; it must
// not block (push into a Queue and return). pkt is only valid during the
// call.
type Sink interface {
	Take(pkt []byte)
}

// Interceptor owns the cache device: a TUN interface that routes point at
// when a VIP's packets must not reach the VIP's own interface (a suspended
// VM, a VM not yet running at its new host). Outside a migration no route
// leads to it and it reads nothing.
type Interceptor struct {
	dev  tun.Device
	name string
	log  *slog.Logger

	mu    sync.RWMutex
	sinks map[netip.Addr]Sink

	unclaimed atomic.Uint64 // packets for a VIP without a sink
	malformed atomic.Uint64
	done      chan struct{}
	closeOnce sync.Once

	barrier *barrier.Barrier
}

// BarrierAddr is routed to the cache device so that Barrier can send a
// packet through the device's queue. A link-local address nobody uses.
var BarrierAddr = netip.MustParseAddr("169.254.0.4")

// OpenInterceptor creates the TUN device name (with the kernel's offloads,
// so reads come in batches), brings it up and starts reading.
func OpenInterceptor(name string, mtu int, log *slog.Logger) (*Interceptor, error) {
	if log == nil {
		log = slog.Default()
	}
	if existing, err := netlink.LinkByName(name); err == nil {
		return nil, fmt.Errorf("cache interface %s already exists (a %s device): is another agent running?", name, existing.Type())
	}
	dev, err := tun.CreateTUN(name, mtu)
	if err != nil {
		return nil, fmt.Errorf("create cache interface %s: %w", name, err)
	}
	link, err := netlink.LinkByName(name)
	if err == nil {
		// A deep queue absorbs bursts while the reader catches up.
		err = netlink.LinkSetTxQLen(link, 10000)
	}
	if err == nil {
		err = netlink.LinkSetUp(link)
	}
	if err != nil {
		dev.Close()
		return nil, fmt.Errorf("bring cache interface %s up: %w", name, err)
	}
	// Packets arrive here from every interface; the kernel must not
	// drop them for arriving "from the wrong side".
	os.WriteFile("/proc/sys/net/ipv4/conf/"+name+"/rp_filter", []byte("0"), 0o644)
	// Not vmroam's route protocol: the agent's route reconciler must leave
	// it alone. It goes with the device.
	barrierRoute := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: BarrierAddr.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteReplace(barrierRoute); err != nil {
		dev.Close()
		return nil, fmt.Errorf("cache interface %s: barrier route: %w", name, err)
	}
	in := &Interceptor{dev: dev, name: name, log: log.With("iface", name), sinks: map[netip.Addr]Sink{}, done: make(chan struct{}),
		barrier: barrier.New(BarrierAddr, "cache device "+name, barrier.SendOn(name, BarrierAddr))}
	go in.drainEvents()
	go in.read()
	return in, nil
}

// Name is the cache device's interface name, for routes.
func (in *Interceptor) Name() string { return in.name }

// Attach sends vip's packets to s from now on, replacing any earlier sink.
func (in *Interceptor) Attach(vip netip.Addr, s Sink) {
	in.mu.Lock()
	in.sinks[vip] = s
	in.mu.Unlock()
}

// Detach stops sending vip's packets anywhere; they are dropped and counted
// as unclaimed if a route still leads them here.
func (in *Interceptor) Detach(vip netip.Addr, s Sink) {
	in.mu.Lock()
	if in.sinks[vip] == s {
		delete(in.sinks, vip)
	}
	in.mu.Unlock()
}

// Unclaimed counts packets that reached the cache device for no VIP being
// migrated: a route left behind, or the kernel's standby route used before
// the agent noticed a VM interface vanish is counted here only if the agent
// had no sink yet (it attaches one first).
func (in *Interceptor) Unclaimed() uint64 { return in.unclaimed.Load() }

func (in *Interceptor) drainEvents() {
	for range in.dev.Events() {
	}
}

func (in *Interceptor) read() {
	defer close(in.done)
	batch := in.dev.BatchSize()
	bufs := make([][]byte, batch)
	for i := range bufs {
		bufs[i] = make([]byte, 65535)
	}
	sizes := make([]int, batch)
	for {
		n, err := in.dev.Read(bufs, sizes, 0)
		if err != nil {
			if isClosed(err) {
				return
			}
			// A super-packet that did not split is lost; say so, go on.
			in.log.Warn("cache device read", "err", err)
			in.malformed.Add(1)
			continue
		}
		in.mu.RLock()
		for i := range n {
			pkt := bufs[i][:sizes[i]]
			// The device completed partial checksums; a zero would be
			// dropped by an IPv6 VM (see package udpcsum).
			udpcsum.FixZero(pkt)
			dst, ok := Destination(pkt)
			if !ok {
				in.malformed.Add(1)
				continue
			}
			if dst == BarrierAddr {
				// Everything read before it has been handed to its sink.
				if n, ok := in.barrier.Match(pkt); ok {
					in.barrier.Pass(n)
				}
				continue
			}
			if s, ok := in.sinks[dst]; ok {
				s.Take(pkt)
			} else if !dst.IsMulticast() && !dst.IsLinkLocalUnicast() {
				// (The kernel's own IPv6 chatter on the device is no loss.)
				in.unclaimed.Add(1)
			}
		}
		in.mu.RUnlock()
	}
}

// Barrier returns once every packet the kernel queued on the cache device
// before the call has been handed to its sink (package barrier). The agent
// uses it after routing a VIP away from the device, to know that nothing of
// the VIP is left inside.
func (in *Interceptor) Barrier(timeout time.Duration) error { return in.barrier.Wait(timeout) }

func isClosed(err error) bool {
	return errors.Is(err, os.ErrClosed) || errors.Is(err, os.ErrNotExist)
}

// Close removes the cache device and stops reading.
func (in *Interceptor) Close() error {
	var err error
	in.closeOnce.Do(func() {
		err = in.dev.Close()
		<-in.done
	})
	return err
}
