package migrate

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/xenhook"
)

// Links is what the engine reads and changes on VM interfaces: carrier,
// neighbours, the packet socket that delivers to the VM, the VM's
// announcements and the fence's neighbour entries. KernelLinks is the
// kernel's; tests give a fake.
type Links interface {
	// Carrier says whether dev exists and has carrier.
	Carrier(dev string) bool
	// NeighborMAC returns the MAC the neighbour table has for ip on dev.
	NeighborMAC(dev string, ip netip.Addr) (net.HardwareAddr, bool)
	// ResolveMAC asks for ip's MAC on dev, from the address from.
	ResolveMAC(dev string, ip, from netip.Addr, timeout time.Duration) (net.HardwareAddr, error)
	// OpenDelivery opens a writer of packets to the VM behind dev.
	OpenDelivery(dev string) (Delivery, error)
	// WatchAnnouncements calls fn for each gratuitous ARP, RARP or
	// unsolicited neighbour advertisement seen on dev, until ctx ends.
	WatchAnnouncements(ctx context.Context, dev string, fn func(xenhook.Announcement)) error
	// OpenFence returns the neighbour entries of dev that the fence sets,
	// for the VM's mac.
	OpenFence(dev string, ip netip.Addr, mac net.HardwareAddr) (Fence, error)
}

// Delivery writes packets to a VM's interface (cache.Deliverer).
type Delivery interface {
	// SetMAC sets the destination MAC of the frames written.
	SetMAC(mac net.HardwareAddr) error
	Write(pkt []byte) error
	Close() error
}

// Fence is the neighbour entries of one VM interface that the fence
// sets (fence.go).
type Fence interface {
	// Resolve resolves gw to the VM's MAC. With onlyIdle it does so only
	// if no packet waits for gw, and says false if one does.
	Resolve(gw netip.Addr, onlyIdle bool) (resolved bool, err error)
	// Unresolve deletes gw's entry, so that packets routed through gw
	// queue again.
	Unresolve(gw netip.Addr)
	// Reach marks the VM's own address reachable at its MAC, for after
	// the fence route goes.
	Reach()
	// MakeRoom makes the kernel's queue of packets waiting for an
	// unresolved neighbour large enough for the fence's milliseconds.
	MakeRoom()
}

// KernelLinks are the kernel's links, through netlink and packet sockets.
type KernelLinks struct{}

func (KernelLinks) Carrier(dev string) bool {
	l, err := netlink.LinkByName(dev)
	return err == nil && l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0
}

func (KernelLinks) NeighborMAC(dev string, ip netip.Addr) (net.HardwareAddr, bool) {
	return cache.NeighborMAC(dev, ip)
}

func (KernelLinks) ResolveMAC(dev string, ip, from netip.Addr, timeout time.Duration) (net.HardwareAddr, error) {
	return cache.ResolveMAC(dev, ip, from, timeout)
}

func (KernelLinks) OpenDelivery(dev string) (Delivery, error) {
	d, err := cache.NewDeliverer(dev)
	if err != nil {
		// A nil interface, not a nil *Deliverer in one: the writer
		// tests for nil.
		return nil, err
	}
	return d, nil
}

func (KernelLinks) WatchAnnouncements(ctx context.Context, dev string, fn func(xenhook.Announcement)) error {
	return xenhook.WatchAnnouncements(ctx, dev, fn)
}

func (KernelLinks) OpenFence(dev string, ip netip.Addr, mac net.HardwareAddr) (Fence, error) {
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, err
	}
	f := &kernelFence{dev: dev, index: link.Attrs().Index, ip: ip, mac: mac, family: netlink.FAMILY_V4}
	if ip.Is6() {
		f.family = netlink.FAMILY_V6
	}
	return f, nil
}

type kernelFence struct {
	dev    string
	index  int
	family int
	ip     netip.Addr
	mac    net.HardwareAddr
}

func (f *kernelFence) neigh(ip netip.Addr, state int) *netlink.Neigh {
	return &netlink.Neigh{LinkIndex: f.index, Family: f.family, State: state, IP: ip.AsSlice(), HardwareAddr: f.mac}
}

// Resolve with onlyIdle is an exclusive add, which the kernel decides
// atomically: it makes the neighbour entry for the first packet that
// waits, and an exclusive add fails on one that exists.
func (f *kernelFence) Resolve(gw netip.Addr, onlyIdle bool) (bool, error) {
	if onlyIdle {
		err := netlink.NeighAdd(f.neigh(gw, netlink.NUD_PERMANENT))
		if errors.Is(err, unix.EEXIST) {
			return false, nil
		}
		return true, err
	}
	return true, netlink.NeighSet(f.neigh(gw, netlink.NUD_PERMANENT))
}

func (f *kernelFence) Unresolve(gw netip.Addr) { netlink.NeighDel(f.neigh(gw, 0)) }

func (f *kernelFence) Reach() { netlink.NeighSet(f.neigh(f.ip, netlink.NUD_REACHABLE)) }

// MakeRoom: the kernel's queue for an unresolved neighbour is small
// (208 KiB).
func (f *kernelFence) MakeRoom() {
	for _, p := range []string{"/proc/sys/net/ipv4/neigh/" + f.dev + "/unres_qlen_bytes", "/proc/sys/net/ipv6/neigh/" + f.dev + "/unres_qlen_bytes"} {
		os.WriteFile(p, []byte("8388608"), 0o644)
	}
}
