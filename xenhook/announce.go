package xenhook

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Announcement is a frame by which a VM says it runs: a gratuitous ARP
// (request or reply whose sender IP equals its target IP), a RARP
// (ethertype 0x8035), or an unsolicited IPv6 neighbour advertisement.
//
// A resumed Linux PV guest (netfront) sends a gratuitous ARP and, for
// IPv6, unsolicited neighbour advertisements; QEMU sends RARP frames of its
// own after an incoming migration, whatever the guest. Either is the first
// sign on the destination that the VM really runs, often before the
// interface's carrier says so.
type Announcement struct {
	// Kind is "garp", "rarp" or "na".
	Kind string
	// MAC is the VM's MAC: the ARP sender hardware address for a
	// gratuitous ARP, the Ethernet source for RARP and NA.
	MAC net.HardwareAddr
	// IP is the address announced (the NA's target address); zero for
	// RARP, which carries none.
	IP netip.Addr
	// At is when the frame was read; ParseAnnouncement leaves it zero.
	At time.Time
}

// Ethertypes and ICMPv6 values the detector and its socket filter know.
const (
	ethTypeARP       = 0x0806
	ethTypeRARP      = 0x8035
	ethTypeIPv6      = 0x86dd
	ipProtoICMPv6    = 58
	icmp6NeighborAdv = 136
	// rarpRequestReverse is what QEMU's announce sends ("request
	// reverse", RFC 903); 4 is the reply.
	rarpRequestReverse = 3
	rarpReplyReverse   = 4
)

// ParseAnnouncement decodes one Ethernet frame with gopacket and reports
// whether it is an announcement. A single 802.1Q tag is looked through. It
// never panics, whatever frame it is given.
func ParseAnnouncement(frame []byte) (Announcement, bool) {
	var eth layers.Ethernet
	if err := eth.DecodeFromBytes(frame, gopacket.NilDecodeFeedback); err != nil {
		return Announcement{}, false
	}
	typ, payload := eth.EthernetType, eth.Payload
	if typ == layers.EthernetTypeDot1Q {
		var tag layers.Dot1Q
		if err := tag.DecodeFromBytes(payload, gopacket.NilDecodeFeedback); err != nil {
			return Announcement{}, false
		}
		typ, payload = tag.Type, tag.Payload
	}
	switch typ {
	case ethTypeARP:
		return parseGARP(payload)
	case ethTypeRARP:
		return parseRARP(eth.SrcMAC, payload)
	case ethTypeIPv6:
		return parseNA(eth.SrcMAC, payload)
	}
	return Announcement{}, false
}

// ethernetIPv4ARP decodes an ARP (or RARP: the same layout) body for
// Ethernet and IPv4, the only kind a VM sends.
func ethernetIPv4ARP(payload []byte) (*layers.ARP, bool) {
	var arp layers.ARP
	if err := arp.DecodeFromBytes(payload, gopacket.NilDecodeFeedback); err != nil {
		return nil, false
	}
	if arp.AddrType != layers.LinkTypeEthernet || arp.Protocol != layers.EthernetTypeIPv4 ||
		arp.HwAddressSize != 6 || arp.ProtAddressSize != 4 {
		return nil, false
	}
	return &arp, true
}

func parseGARP(payload []byte) (Announcement, bool) {
	arp, ok := ethernetIPv4ARP(payload)
	if !ok || (arp.Operation != layers.ARPRequest && arp.Operation != layers.ARPReply) {
		return Announcement{}, false
	}
	sender := netip.AddrFrom4([4]byte(arp.SourceProtAddress))
	target := netip.AddrFrom4([4]byte(arp.DstProtAddress))
	// An ARP probe (RFC 5227) has sender 0.0.0.0: it asks, it does not
	// announce.
	if sender != target || !announceable(sender) {
		return Announcement{}, false
	}
	return Announcement{Kind: "garp", MAC: cloneMAC(arp.SourceHwAddress), IP: sender}, true
}

func parseRARP(src net.HardwareAddr, payload []byte) (Announcement, bool) {
	arp, ok := ethernetIPv4ARP(payload)
	if !ok || (arp.Operation != rarpRequestReverse && arp.Operation != rarpReplyReverse) {
		return Announcement{}, false
	}
	return Announcement{Kind: "rarp", MAC: cloneMAC(src)}, true
}

func parseNA(src net.HardwareAddr, payload []byte) (Announcement, bool) {
	var ip6 layers.IPv6
	if err := ip6.DecodeFromBytes(payload, gopacket.NilDecodeFeedback); err != nil {
		return Announcement{}, false
	}
	// RFC 4861 7.1.2: a neighbour advertisement that crossed a router
	// (hop limit below 255) is not from the link, so not from the VM.
	if ip6.NextHeader != layers.IPProtocolICMPv6 || ip6.HopLimit != 255 {
		return Announcement{}, false
	}
	var icmp layers.ICMPv6
	if err := icmp.DecodeFromBytes(ip6.Payload, gopacket.NilDecodeFeedback); err != nil {
		return Announcement{}, false
	}
	if icmp.TypeCode != layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborAdvertisement, 0) {
		return Announcement{}, false
	}
	var na layers.ICMPv6NeighborAdvertisement
	if err := na.DecodeFromBytes(icmp.Payload, gopacket.NilDecodeFeedback); err != nil {
		return Announcement{}, false
	}
	// A solicited advertisement answers someone's question; only an
	// unsolicited one is the VM speaking first.
	if na.Solicited() {
		return Announcement{}, false
	}
	target, ok := netip.AddrFromSlice(na.TargetAddress)
	if !ok || !announceable(target) {
		return Announcement{}, false
	}
	return Announcement{Kind: "na", MAC: cloneMAC(src), IP: target}, true
}

// announceable is an address a VM may claim as its own.
func announceable(a netip.Addr) bool {
	return a.IsValid() && !a.IsUnspecified() && !a.IsMulticast() && !a.IsLoopback() &&
		a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// cloneMAC copies out of the frame, which the caller's buffer reuses.
func cloneMAC(b []byte) net.HardwareAddr {
	return append(net.HardwareAddr(nil), b...)
}

// announceFilter accepts only frames that came in (host, broadcast or
// multicast: not the kernel's own outgoing copies, not frames for other
// hosts) and are ARP, RARP, or IPv6 carrying ICMPv6 neighbour
// advertisements directly after the fixed header. Filtering in the kernel
// keeps the agent from waking for the VM's ordinary traffic, and for the
// cache's own deliveries to the VM.
var announceFilter = []bpf.Instruction{
	/* 0 */ bpf.LoadExtension{Num: bpf.ExtType},
	/* 1 */ bpf.JumpIf{Cond: bpf.JumpGreaterThan, Val: unix.PACKET_MULTICAST, SkipTrue: 9},
	/* 2 */ bpf.LoadAbsolute{Off: 12, Size: 2}, // ethertype
	/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: ethTypeARP, SkipTrue: 6},
	/* 4 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: ethTypeRARP, SkipTrue: 5},
	/* 5 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: ethTypeIPv6, SkipFalse: 5},
	/* 6 */ bpf.LoadAbsolute{Off: 14 + 6, Size: 1}, // IPv6 next header
	/* 7 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: ipProtoICMPv6, SkipFalse: 3},
	/* 8 */ bpf.LoadAbsolute{Off: 14 + 40, Size: 1}, // ICMPv6 type
	/* 9 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: icmp6NeighborAdv, SkipFalse: 1},
	/* 10 */ bpf.RetConstant{Val: 1 << 16},
	/* 11 */ bpf.RetConstant{Val: 0},
}

// downPoll is how often a watch whose device went down checks whether the
// device was deleted: a device deleted while down reports nothing more to
// the socket.
const downPoll = 250 * time.Millisecond

// WatchAnnouncements opens a packet socket on dev and calls fn for every
// announcement that comes in from the VM on dev, until ctx ends (then it
// returns nil) or dev goes away (then it returns an error wrapping
// unix.ENODEV). A socket filter in the kernel passes only incoming ARP,
// RARP and neighbour advertisements, so ordinary traffic costs nothing;
// frames the host sends out of dev never count. dev may go down and up
// again meanwhile. fn runs on WatchAnnouncements' goroutine and must not
// block. No goroutine outlives the call.
//
// The socket is made in the calling thread's network namespace.
func WatchAnnouncements(ctx context.Context, dev string, fn func(Announcement)) error {
	w, err := openWatch(dev)
	if err != nil {
		return err
	}
	defer w.f.Close()
	rc, err := w.f.SyscallConn()
	if err != nil {
		return fmt.Errorf("xenhook: announcements on %s: %w", dev, err)
	}
	// Cancelling moves the read deadline into the past, which wakes a
	// blocked read at once.
	woken := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		w.f.SetReadDeadline(time.Unix(1, 0))
		close(woken)
	})
	defer func() {
		if !stop() {
			<-woken
		}
	}()

	buf := make([]byte, 1<<16)
	down := false
	for {
		// Deadline first, then the context: a cancel that comes between
		// the two still finds a deadline to move.
		deadline := time.Time{}
		if down {
			deadline = time.Now().Add(downPoll)
		}
		if err := w.f.SetReadDeadline(deadline); err != nil {
			// Only if the runtime could not poll the socket: then nothing
			// could wake a read when ctx ends.
			return fmt.Errorf("xenhook: announcements on %s: %w", dev, err)
		}
		if ctx.Err() != nil {
			return nil
		}
		var (
			n    int
			from unix.Sockaddr
			rerr error
		)
		err := rc.Read(func(fd uintptr) bool {
			n, from, rerr = unix.Recvfrom(int(fd), buf, 0)
			return rerr != unix.EAGAIN
		})
		if err == nil {
			err = rerr
		}
		at := time.Now()
		switch {
		case ctx.Err() != nil:
			return nil
		case err == nil:
			down = false
			if incoming(from) {
				if a, ok := ParseAnnouncement(buf[:min(n, len(buf))]); ok {
					a.At = at
					fn(a)
				}
			}
		case errors.Is(err, os.ErrDeadlineExceeded):
			// Only set while down.
			up, err := w.state()
			if err != nil {
				return err
			}
			down = !up
		case errors.Is(err, unix.ENETDOWN):
			// Reported once when dev goes down, also as the first step
			// of its deletion; the socket works again when it comes up.
			up, serr := w.state()
			if serr != nil {
				return fmt.Errorf("%w (%w)", serr, err)
			}
			down = !up
		case errors.Is(err, unix.EINTR):
		default:
			return fmt.Errorf("xenhook: announcements on %s: %w", dev, err)
		}
	}
}

// watch is an open packet socket on one device.
type watch struct {
	dev     string
	ifindex uint32
	f       *os.File
}

func openWatch(dev string) (*watch, error) {
	// Protocol 0: nothing is queued until the filter is attached and the
	// socket bound.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("xenhook: announcements on %s: packet socket: %w", dev, err)
	}
	fail := func(what string, err error) (*watch, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("xenhook: announcements on %s: %s: %w", dev, what, err)
	}
	// The ioctls ask the socket's own namespace, which is where it binds.
	ifr, err := unix.NewIfreq(dev)
	if err != nil {
		return fail("interface name", err)
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFINDEX, ifr); err != nil {
		return fail("no such device", err)
	}
	ifindex := ifr.Uint32()
	raw, err := bpf.Assemble(announceFilter)
	if err != nil {
		return fail("assemble filter", err)
	}
	prog := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		prog[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER,
		&unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}); err != nil {
		return fail("attach filter", err)
	}
	// Also keeps the kernel from copying outgoing frames here at all
	// (Linux 4.20); the filter and the check in the loop cover older ones.
	unix.SetsockoptInt(fd, unix.SOL_PACKET, unix.PACKET_IGNORE_OUTGOING, 1)
	if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: int(ifindex)}); err != nil {
		return fail("bind", err)
	}
	// Non-blocking, so os.NewFile hands it to the runtime's poller and
	// read deadlines work.
	return &watch{dev: dev, ifindex: ifindex, f: os.NewFile(uintptr(fd), "packet:"+dev)}, nil
}

// state reports whether the watched device is up, or an error wrapping
// unix.ENODEV when it no longer exists. It goes by ifindex: a new device
// with the same name is another VM's.
func (w *watch) state() (up bool, err error) {
	rc, err := w.f.SyscallConn()
	if err != nil {
		return false, fmt.Errorf("xenhook: announcements on %s: %w", w.dev, err)
	}
	var ierr error
	cerr := rc.Control(func(fd uintptr) {
		ifr, err := unix.NewIfreq("")
		if err != nil {
			ierr = err
			return
		}
		ifr.SetUint32(w.ifindex)
		if ierr = unix.IoctlIfreq(int(fd), unix.SIOCGIFNAME, ifr); ierr != nil {
			return
		}
		if ierr = unix.IoctlIfreq(int(fd), unix.SIOCGIFFLAGS, ifr); ierr != nil {
			return
		}
		up = ifr.Uint16()&unix.IFF_UP != 0
	})
	switch {
	case cerr != nil:
		return false, fmt.Errorf("xenhook: announcements on %s: %w", w.dev, cerr)
	case errors.Is(ierr, unix.ENODEV), errors.Is(ierr, unix.ENXIO):
		return false, fmt.Errorf("xenhook: announcements on %s: device is gone: %w", w.dev, unix.ENODEV)
	case ierr != nil:
		return false, fmt.Errorf("xenhook: announcements on %s: %w", w.dev, ierr)
	}
	return up, nil
}

// incoming is a frame the VM sent: not one the host sent out of dev.
func incoming(from unix.Sockaddr) bool {
	ll, ok := from.(*unix.SockaddrLinklayer)
	if !ok {
		return false
	}
	switch ll.Pkttype {
	case unix.PACKET_HOST, unix.PACKET_BROADCAST, unix.PACKET_MULTICAST:
		return true
	}
	return false
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
