package cache

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Deliverer writes IP packets straight onto a VM's interface as Ethernet
// frames addressed to the VM's MAC. Going around the kernel's routing and
// neighbour code is what lets a burst of cached packets reach the VM in
// order without overflowing the kernel's queue of packets waiting for an
// unresolved neighbour.
type Deliverer struct {
	fd      int
	ifindex int
	mac     net.HardwareAddr
}

// NewDeliverer opens a packet socket on dev. Opening takes from a few
// hundred microseconds to milliseconds on a busy host, so an arrival opens
// it before the first packet; the VM's MAC, often learnt later (from the
// handover's header or the VM's announcement), is set with SetMAC.
func NewDeliverer(dev string) (*Deliverer, error) {
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("deliver on %s: %w", dev, err)
	}
	// SOCK_DGRAM: the kernel adds the Ethernet header from the address.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("deliver on %s: packet socket: %w", dev, err)
	}
	// A large send buffer absorbs the burst of a flush.
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 8<<20)
	return &Deliverer{fd: fd, ifindex: link.Attrs().Index}, nil
}

// SetMAC sets the VM's MAC, where Write sends.
func (d *Deliverer) SetMAC(mac net.HardwareAddr) error {
	if len(mac) != 6 {
		return fmt.Errorf("deliver: VM MAC %q is not an Ethernet address", mac)
	}
	d.mac = slices.Clone(mac)
	return nil
}

// Write sends one IP packet (IPv4 or IPv6) to the VM. When the interface's
// queue is full it waits briefly and retries rather than drop.
func (d *Deliverer) Write(pkt []byte) error {
	if len(pkt) == 0 {
		return errors.New("deliver: empty packet")
	}
	if d.mac == nil {
		return errors.New("deliver: no VM MAC set")
	}
	proto := uint16(unix.ETH_P_IP)
	if pkt[0]>>4 == 6 {
		proto = unix.ETH_P_IPV6
	}
	sa := &unix.SockaddrLinklayer{Ifindex: d.ifindex, Protocol: htons(proto), Halen: 6}
	copy(sa.Addr[:], d.mac)
	for try := 0; ; try++ {
		err := unix.Sendto(d.fd, pkt, 0, sa)
		if err == nil {
			return nil
		}
		if (errors.Is(err, unix.ENOBUFS) || errors.Is(err, unix.EAGAIN)) && try < 200 {
			time.Sleep(50 * time.Microsecond)
			continue
		}
		return fmt.Errorf("deliver to %s: %w", d.mac, err)
	}
}

// Close releases the socket.
func (d *Deliverer) Close() error { return unix.Close(d.fd) }

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// NeighborMAC looks up the MAC the kernel has learnt for ip on dev, if any.
func NeighborMAC(dev string, ip netip.Addr) (net.HardwareAddr, bool) {
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, false
	}
	fam := netlink.FAMILY_V4
	if ip.Is6() {
		fam = netlink.FAMILY_V6
	}
	neighs, err := netlink.NeighList(link.Attrs().Index, fam)
	if err != nil {
		return nil, false
	}
	for _, n := range neighs {
		if a, ok := usableNeighbor(n); ok && a == ip {
			return n.HardwareAddr, true
		}
	}
	return nil, false
}

// usableNeighbor returns n's address if n gives a MAC to deliver to.
func usableNeighbor(n netlink.Neigh) (netip.Addr, bool) {
	if len(n.HardwareAddr) != 6 || n.State&(netlink.NUD_FAILED|netlink.NUD_INCOMPLETE) != 0 {
		return netip.Addr{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	return a.Unmap(), ok
}

// NeighborMACs is NeighborMAC for many interfaces at once: the MACs the
// neighbour tables of devs know, by interface and address, from one dump
// of the links and one of the neighbours, however many interfaces (each
// netlink round trip is 50-60 µs, and a host may run dozens of VMs).
func NeighborMACs(devs []string) (map[string]map[netip.Addr]net.HardwareAddr, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("list links: %w", err)
	}
	want := map[string]bool{}
	for _, d := range devs {
		want[d] = true
	}
	names := map[int]string{}
	for _, l := range links {
		if want[l.Attrs().Name] {
			names[l.Attrs().Index] = l.Attrs().Name
		}
	}
	out := map[string]map[netip.Addr]net.HardwareAddr{}
	if len(names) == 0 {
		return out, nil
	}
	neighs, err := netlink.NeighList(0, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list neighbours: %w", err)
	}
	for _, n := range neighs {
		name, ok := names[n.LinkIndex]
		if !ok {
			continue
		}
		if a, ok := usableNeighbor(n); ok {
			if out[name] == nil {
				out[name] = map[netip.Addr]net.HardwareAddr{}
			}
			out[name][a] = n.HardwareAddr
		}
	}
	return out, nil
}

// ResolveMAC asks the VM for its MAC with an ARP request from the anycast
// gateway address (what the VM's default route points at) and waits up to
// timeout for the answer. IPv4 only.
func ResolveMAC(dev string, ip, gateway netip.Addr, timeout time.Duration) (net.HardwareAddr, error) {
	if !ip.Is4() || !gateway.Is4() {
		return nil, fmt.Errorf("resolve %s: ARP needs IPv4 addresses", ip)
	}
	link, err := netlink.LinkByName(dev)
	if err != nil {
		return nil, fmt.Errorf("resolve %s on %s: %w", ip, dev, err)
	}
	src := link.Attrs().HardwareAddr
	if len(src) != 6 {
		return nil, fmt.Errorf("resolve %s: %s has no Ethernet address", ip, dev)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, int(htons(unix.ETH_P_ARP)))
	if err != nil {
		return nil, fmt.Errorf("resolve %s: packet socket: %w", ip, err)
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Ifindex: link.Attrs().Index, Protocol: htons(unix.ETH_P_ARP)}); err != nil {
		return nil, fmt.Errorf("resolve %s: bind: %w", ip, err)
	}
	req := make([]byte, 28)
	copy(req, []byte{0, 1, 8, 0, 6, 4, 0, 1}) // Ethernet, IPv4, request
	copy(req[8:14], src)
	g, t := gateway.As4(), ip.As4()
	copy(req[14:18], g[:])
	copy(req[24:28], t[:])
	bcast := &unix.SockaddrLinklayer{Ifindex: link.Attrs().Index, Protocol: htons(unix.ETH_P_ARP), Halen: 6, Addr: [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}}
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 128)
	for time.Now().Before(deadline) {
		if err := unix.Sendto(fd, req, 0, bcast); err != nil {
			return nil, fmt.Errorf("resolve %s: send: %w", ip, err)
		}
		wait := min(time.Until(deadline), 100*time.Millisecond)
		tv := unix.NsecToTimeval(wait.Nanoseconds())
		unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		for {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				break // timeout: ask again
			}
			if n >= 28 && buf[7] == 2 && [4]byte(buf[14:18]) == t {
				return net.HardwareAddr(append([]byte(nil), buf[8:14]...)), nil
			}
		}
	}
	return nil, fmt.Errorf("resolve %s on %s: no ARP reply within %v", ip, dev, timeout)
}
