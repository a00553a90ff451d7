package wgdev

import (
	"net/netip"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/tun"

	"github.com/vmroam/vmroam/internal/barrier"
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

	barrier *barrier.Barrier
	// seen is the nonce of a barrier packet the last Read returned, which
	// passes at the next Read; only wireguard-go's one reader touches it.
	seen uint64
}

func newHoldTUN(dev tun.Device, send func(payload []byte) error) *holdTUN {
	return &holdTUN{Device: dev, barrier: barrier.New(readBarrierAddr, "WireGuard read", send)}
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
		h.barrier.Pass(h.seen)
		h.seen = 0
	}
	n, err := h.Device.Read(bufs, sizes, offset)
	want := h.barrier.Waiting()
	for i := range n {
		pkt := bufs[i][offset : offset+sizes[i]]
		// wireguard-go completed the checksums the kernel left partial
		// and may have written a zero (see package udpcsum).
		udpcsum.FixZero(pkt)
		if want == 0 {
			continue
		}
		if nonce, ok := h.barrier.Match(pkt); ok {
			sizes[i] = 0
			if nonce == want {
				h.seen = nonce
			}
		}
	}
	return n, err
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
	return d.hold.barrier.Wait(timeout)
}

// readBarrierAddr is where barrier packets go: link-local, so no peer's
// allowed IPs match it and one that escaped would be dropped.
var readBarrierAddr = netip.MustParseAddr("169.254.0.5")
