package wgdev

import (
	"sync"

	"golang.zx2c4.com/wireguard/tun"
)

// holdTUN lets the agent stop wireguard-go from handing packets to the
// kernel for a moment. The kernel forwards a packet written to a TUN device
// within the write call, so once HoldWrites returns every packet from the
// tunnel is either out or queued where the kernel put it, and none arrives
// until the release.
type holdTUN struct {
	tun.Device
	mu sync.RWMutex
}

func (h *holdTUN) Write(bufs [][]byte, offset int) (int, error) {
	h.mu.RLock()
	defer h.mu.RUnlock()
	return h.Device.Write(bufs, offset)
}

// HoldWrites stops packets coming out of the tunnel from reaching the kernel
// until the returned release is called; it waits for writes under way to
// end. Callers hold it for microseconds: wireguard-go's receive path waits
// meanwhile. With kernel WireGuard it does nothing (the kernel's receive
// path cannot be held) and ok is false.
func (d *Device) HoldWrites() (release func(), ok bool) {
	if d == nil || d.hold == nil {
		return func() {}, false
	}
	d.hold.mu.Lock()
	return d.hold.mu.Unlock, true
}
