package cache

import (
	"crypto/rand"
	"encoding/binary"
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

	barrierMu sync.Mutex  // one Barrier at a time
	barrierCh chan uint64 // nonces of barrier packets read
}

// BarrierAddr is routed to the cache device so that Barrier can send a
// packet through the device's queue. A link-local address nobody uses.
var BarrierAddr = netip.MustParseAddr("169.254.0.4")

// barrierPort is the UDP port of barrier packets.
const barrierPort = 9 // discard

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
	barrier := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: BarrierAddr.AsSlice(), Mask: net.CIDRMask(32, 32)}, Scope: netlink.SCOPE_LINK}
	if err := netlink.RouteReplace(barrier); err != nil {
		dev.Close()
		return nil, fmt.Errorf("cache interface %s: barrier route: %w", name, err)
	}
	in := &Interceptor{dev: dev, name: name, log: log.With("iface", name), sinks: map[netip.Addr]Sink{}, done: make(chan struct{}), barrierCh: make(chan uint64, 16)}
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
				if n, ok := barrierNonce(pkt); ok {
					select {
					case in.barrierCh <- n:
					default:
					}
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
// before the call has been handed to its sink: it sends a packet of its
// own through the device's queue, which is first in, first out, and waits
// for it to come out. The agent uses it after routing a VIP away from the
// device, to know that nothing of the VIP is left inside.
func (in *Interceptor) Barrier(timeout time.Duration) error {
	in.barrierMu.Lock()
	defer in.barrierMu.Unlock()
	// Random, not counted: anyone who can route a packet to BarrierAddr
	// (a local VM, through the host) could otherwise send the next
	// barrier's packet ahead of it and end a hand-back early.
	var nb [8]byte
	rand.Read(nb[:]) // never fails (it crashes the program instead)
	nonce := binary.BigEndian.Uint64(nb[:])
	conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: BarrierAddr.AsSlice(), Port: barrierPort})
	if err != nil {
		return fmt.Errorf("cache barrier: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write(nb[:]); err != nil {
		return fmt.Errorf("cache barrier: send: %w", err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case n := <-in.barrierCh:
			if n == nonce {
				return nil
			}
			// An older barrier's packet, late: keep waiting for ours.
		case <-t.C:
			return fmt.Errorf("cache barrier: no packet back from %s within %v", in.name, timeout)
		}
	}
}

// barrierNonce reads the nonce of a barrier packet: IPv4, not a
// fragment, UDP to barrierPort, 8 bytes of payload.
func barrierNonce(pkt []byte) (uint64, bool) {
	if len(pkt) < 20 || pkt[0]>>4 != 4 || pkt[9] != 17 {
		return 0, false
	}
	if pkt[6]&0x3f != 0 || pkt[7] != 0 { // more fragments, or an offset
		return 0, false
	}
	ihl := int(pkt[0]&0x0f) * 4
	if ihl < 20 || len(pkt) < ihl+8+8 || binary.BigEndian.Uint16(pkt[ihl+2:]) != barrierPort {
		return 0, false
	}
	return binary.BigEndian.Uint64(pkt[ihl+8:]), true
}

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
