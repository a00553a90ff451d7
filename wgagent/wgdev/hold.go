package wgdev

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"

	"github.com/vmroam/vmroam/internal/udpcsum"
)

// holdTUN sits between embedded wireguard-go and its TUN device. It lets
// the agent stop wireguard-go from handing packets to the kernel for a
// moment (HoldWrites), and learn when wireguard-go has chosen a peer for
// every packet the kernel gave it before a given moment (ReadBarrier). It
// also mends what wireguard-go's reads get wrong (package udpcsum).
type holdTUN struct {
	tun.Device
	mu sync.RWMutex // writes hold it shared; HoldWrites exclusively

	// send puts a barrier packet with the nonce into the kernel's queue
	// for the device.
	send      func(nonce uint64) error
	barrierMu sync.Mutex    // one barrier at a time
	want      atomic.Uint64 // the nonce of the barrier under way, 0 if none
	// seen is the nonce of a barrier packet the last Read returned, which
	// passes at the next Read; only wireguard-go's one reader touches it.
	seen   uint64
	passed chan uint64
}

func newHoldTUN(dev tun.Device, send func(nonce uint64) error) *holdTUN {
	return &holdTUN{Device: dev, send: send, passed: make(chan uint64, 1)}
}

func (h *holdTUN) Write(bufs [][]byte, offset int) (int, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.Device.Write(bufs, offset)
}

// Read is wireguard-go's read of what the kernel routed into the tunnel.
// wireguard-go looks up each packet's peer after Read returns and calls
// Read again only when it has, so a barrier packet in one batch has passed
// once the next Read begins. Barrier packets go no further: their size is
// set to 0, which wireguard-go skips. Read also mends the UDP checksums
// that the device completed to zero, which IPv6 receivers drop.
func (h *holdTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if h.seen != 0 {
		select {
		case h.passed <- h.seen:
		default: // nobody waits any more
		}
		h.seen = 0
	}
	n, err := h.Device.Read(bufs, sizes, offset)
	want := h.want.Load()
	for i := range n {
		pkt := bufs[i][offset : offset+sizes[i]]
		// wireguard-go completed the checksums the kernel left partial
		// and may have written a zero (see package udpcsum).
		udpcsum.FixZero(pkt)
		if want == 0 {
			continue
		}
		if nonce, ok := readBarrierNonce(pkt); ok {
			sizes[i] = 0
			if nonce == want {
				h.seen = nonce
			}
		}
	}
	return n, err
}

// barrier is ReadBarrier for embedded wireguard-go.
func (h *holdTUN) barrier(timeout time.Duration) error {
	h.barrierMu.Lock()
	defer h.barrierMu.Unlock()
	// Random: anyone who can route a packet into the tunnel (a local VM)
	// could otherwise send the next barrier's packet ahead of it.
	var nb [8]byte
	rand.Read(nb[:])
	nonce := binary.BigEndian.Uint64(nb[:]) | 1 // never 0, which means none
	h.want.Store(nonce)
	defer h.want.Store(0)
	// A packet of an older barrier that passed late.
	select {
	case <-h.passed:
	default:
	}
	if err := h.send(nonce); err != nil {
		return fmt.Errorf("WireGuard read barrier: %w", err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case n := <-h.passed:
			if n == nonce {
				return nil
			}
		case <-t.C:
			return fmt.Errorf("WireGuard read barrier: wireguard-go did not read its packet within %v", timeout)
		}
	}
}

// HoldWrites stops packets coming out of the tunnel from reaching the kernel
// until the returned release is called; it waits for writes under way to
// end. The kernel forwards a packet written to a TUN device within the
// write call, so once HoldWrites returns every packet from the tunnel is
// either out or queued where the kernel put it, and none arrives until the
// release. Callers hold it for microseconds: wireguard-go's receive path
// waits meanwhile. With kernel WireGuard it does nothing (the kernel's
// receive path cannot be held) and ok is false.
func (d *Device) HoldWrites() (release func(), ok bool) {
	if d == nil || d.hold == nil {
		return func() {}, false
	}
	d.hold.mu.Lock()
	return d.hold.mu.Unlock, true
}

// ReadBarrier returns once WireGuard has chosen the peer of every packet
// the kernel routed into the interface before the call. The agent calls it
// after routing a VIP away from the tunnel and before it gives the VIP to
// another peer: a packet still queued for embedded wireguard-go would
// otherwise go to the new peer, behind the newer packets that took the new
// route. It sends a packet of its own into the device's queue, which is
// first in, first out, and waits until wireguard-go has read it and gone
// on to its next read. Kernel WireGuard chooses the peer as the kernel
// routes a packet, so there it returns at once.
func (d *Device) ReadBarrier(timeout time.Duration) error {
	if d == nil || d.hold == nil {
		return nil
	}
	return d.hold.barrier(timeout)
}

// readBarrierAddr is where barrier packets go: link-local, so no peer's
// allowed IPs match it and one that escaped would be dropped.
var readBarrierAddr = netip.MustParseAddr("169.254.0.5")

// readBarrierPort is the UDP port of barrier packets.
const readBarrierPort = 9 // discard

// sendReadBarrier returns a sender of barrier packets into interface
// name: a UDP socket bound to the interface, which routes anything there.
func sendReadBarrier(name string) func(nonce uint64) error {
	return func(nonce uint64) error {
		d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
			var err error
			if cerr := c.Control(func(fd uintptr) { err = unix.BindToDevice(int(fd), name) }); cerr != nil {
				return cerr
			}
			return err
		}}
		conn, err := d.Dial("udp4", netip.AddrPortFrom(readBarrierAddr, readBarrierPort).String())
		if err != nil {
			return fmt.Errorf("socket on %s: %w", name, err)
		}
		defer conn.Close()
		var b [8]byte
		binary.BigEndian.PutUint64(b[:], nonce)
		if _, err := conn.Write(b[:]); err != nil {
			return fmt.Errorf("send on %s: %w", name, err)
		}
		return nil
	}
}

// readBarrierNonce reads the nonce of a barrier packet: IPv4 to
// readBarrierAddr, not a fragment, UDP to readBarrierPort, 8 bytes of
// payload.
func readBarrierNonce(pkt []byte) (uint64, bool) {
	if len(pkt) < 20 || pkt[0]>>4 != 4 || pkt[9] != 17 || netip.AddrFrom4([4]byte(pkt[16:20])) != readBarrierAddr {
		return 0, false
	}
	if pkt[6]&0x3f != 0 || pkt[7] != 0 { // more fragments, or an offset
		return 0, false
	}
	ihl := int(pkt[0]&0x0f) * 4
	if ihl < 20 || len(pkt) < ihl+8+8 || binary.BigEndian.Uint16(pkt[ihl+2:]) != readBarrierPort {
		return 0, false
	}
	return binary.BigEndian.Uint64(pkt[ihl+8:]), true
}
