package xenhook

import (
	"bytes"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

var (
	vmMAC     = net.HardwareAddr{0x52, 0x54, 0x00, 0x12, 0x34, 0x56}
	otherMAC  = net.HardwareAddr{0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc}
	bcastMAC  = net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	zeroMAC   = net.HardwareAddr{0, 0, 0, 0, 0, 0}
	allNodes  = net.HardwareAddr{0x33, 0x33, 0, 0, 0, 1}
	vmIP      = netip.MustParseAddr("100.64.1.5")
	vmIP6     = netip.MustParseAddr("fd00:64::5")
	gatewayIP = netip.MustParseAddr("169.254.0.1")
)

func serialize(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatal(err)
	}
	return bytes.Clone(buf.Bytes())
}

// arpFrame is an ARP (or, with ethertype 0x8035, RARP) frame as a VM's
// NIC sends it.
func arpFrame(t testing.TB, ethType layers.EthernetType, op uint16, src, dst net.HardwareAddr, sip, tip netip.Addr) []byte {
	t.Helper()
	tha := zeroMAC
	if op == layers.ARPReply {
		tha = dst
	}
	if ethType == ethTypeRARP {
		tha = src // QEMU's announce: sender and target are the VM
	}
	s4, t4 := sip.As4(), tip.As4()
	return serialize(t,
		&layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: ethType},
		&layers.ARP{
			AddrType: layers.LinkTypeEthernet, Protocol: layers.EthernetTypeIPv4,
			Operation:       op,
			SourceHwAddress: src, SourceProtAddress: s4[:],
			DstHwAddress: tha, DstProtAddress: t4[:],
		})
}

func garpFrame(t testing.TB, op uint16, ip netip.Addr) []byte {
	return arpFrame(t, layers.EthernetTypeARP, op, vmMAC, bcastMAC, ip, ip)
}

func rarpFrame(t testing.TB, mac net.HardwareAddr) []byte {
	return arpFrame(t, ethTypeRARP, rarpRequestReverse, mac, bcastMAC, netip.IPv4Unspecified(), netip.IPv4Unspecified())
}

const (
	naRouter    = 0x80
	naSolicited = 0x40
	naOverride  = 0x20
)

// naFrame is a neighbour advertisement for target from vmMAC.
func naFrame(t testing.TB, flags uint8, target netip.Addr, hopLimit uint8) []byte {
	t.Helper()
	ip6 := &layers.IPv6{
		Version: 6, NextHeader: layers.IPProtocolICMPv6, HopLimit: hopLimit,
		SrcIP: net.ParseIP("fe80::5054:ff:fe12:3456"), DstIP: net.ParseIP("ff02::1"),
	}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborAdvertisement, 0)}
	if err := icmp.SetNetworkLayerForChecksum(ip6); err != nil {
		t.Fatal(err)
	}
	return serialize(t,
		&layers.Ethernet{SrcMAC: vmMAC, DstMAC: allNodes, EthernetType: layers.EthernetTypeIPv6},
		ip6, icmp,
		&layers.ICMPv6NeighborAdvertisement{
			Flags: flags, TargetAddress: target.AsSlice(),
			Options: layers.ICMPv6Options{{Type: layers.ICMPv6OptTargetAddress, Data: vmMAC}},
		})
}

func nsFrame(t testing.TB, target netip.Addr) []byte {
	t.Helper()
	ip6 := &layers.IPv6{
		Version: 6, NextHeader: layers.IPProtocolICMPv6, HopLimit: 255,
		SrcIP: net.ParseIP("fe80::5054:ff:fe12:3456"), DstIP: net.ParseIP("ff02::1:ff00:5"),
	}
	icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeNeighborSolicitation, 0)}
	icmp.SetNetworkLayerForChecksum(ip6)
	return serialize(t,
		&layers.Ethernet{SrcMAC: vmMAC, DstMAC: net.HardwareAddr{0x33, 0x33, 0xff, 0, 0, 5}, EthernetType: layers.EthernetTypeIPv6},
		ip6, icmp, &layers.ICMPv6NeighborSolicitation{TargetAddress: target.AsSlice()})
}

func udpFrame(t testing.TB) []byte {
	t.Helper()
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: vmIP.AsSlice(), DstIP: net.IPv4(100, 64, 2, 9)}
	udp := &layers.UDP{SrcPort: 5000, DstPort: 5001}
	udp.SetNetworkLayerForChecksum(ip)
	return serialize(t,
		&layers.Ethernet{SrcMAC: vmMAC, DstMAC: otherMAC, EthernetType: layers.EthernetTypeIPv4},
		ip, udp, gopacket.Payload("hello"))
}

// tagged inserts an 802.1Q tag after the MAC addresses.
func tagged(frame []byte, vlan uint16) []byte {
	out := append([]byte(nil), frame[:12]...)
	out = append(out, 0x81, 0x00, byte(vlan>>8), byte(vlan))
	return append(out, frame[12:]...)
}

// announcementCases are the frames the tests and the fuzz seeds share.
func announcementCases(t testing.TB) []struct {
	name  string
	frame []byte
	want  Announcement
	ok    bool
} {
	garpReq := garpFrame(t, layers.ARPRequest, vmIP)
	na := naFrame(t, naOverride, vmIP6, 255)
	return []struct {
		name  string
		frame []byte
		want  Announcement
		ok    bool
	}{
		{"garp request", garpReq, Announcement{Kind: "garp", MAC: vmMAC, IP: vmIP}, true},
		{"garp reply", garpFrame(t, layers.ARPReply, vmIP), Announcement{Kind: "garp", MAC: vmMAC, IP: vmIP}, true},
		{"garp in a vlan", tagged(garpReq, 42), Announcement{Kind: "garp", MAC: vmMAC, IP: vmIP}, true},
		{"arp request", arpFrame(t, layers.EthernetTypeARP, layers.ARPRequest, vmMAC, bcastMAC, vmIP, gatewayIP), Announcement{}, false},
		{"arp reply", arpFrame(t, layers.EthernetTypeARP, layers.ARPReply, vmMAC, otherMAC, vmIP, gatewayIP), Announcement{}, false},
		{"arp probe", arpFrame(t, layers.EthernetTypeARP, layers.ARPRequest, vmMAC, bcastMAC, netip.IPv4Unspecified(), vmIP), Announcement{}, false},
		{"garp for 0.0.0.0", garpFrame(t, layers.ARPRequest, netip.IPv4Unspecified()), Announcement{}, false},
		{"garp for broadcast", garpFrame(t, layers.ARPRequest, netip.MustParseAddr("255.255.255.255")), Announcement{}, false},
		{"garp with RARP opcode", arpFrame(t, layers.EthernetTypeARP, rarpRequestReverse, vmMAC, bcastMAC, vmIP, vmIP), Announcement{}, false},
		{"rarp request", rarpFrame(t, vmMAC), Announcement{Kind: "rarp", MAC: vmMAC}, true},
		{"rarp reply", arpFrame(t, ethTypeRARP, rarpReplyReverse, vmMAC, bcastMAC, vmIP, vmIP), Announcement{Kind: "rarp", MAC: vmMAC}, true},
		{"rarp with ARP opcode", arpFrame(t, ethTypeRARP, layers.ARPRequest, vmMAC, bcastMAC, vmIP, vmIP), Announcement{}, false},
		{"unsolicited na, override", na, Announcement{Kind: "na", MAC: vmMAC, IP: vmIP6}, true},
		{"unsolicited na, no flag", naFrame(t, 0, vmIP6, 255), Announcement{Kind: "na", MAC: vmMAC, IP: vmIP6}, true},
		{"unsolicited na, link-local", naFrame(t, naOverride, netip.MustParseAddr("fe80::5054:ff:fe12:3456"), 255), Announcement{Kind: "na", MAC: vmMAC, IP: netip.MustParseAddr("fe80::5054:ff:fe12:3456")}, true},
		{"solicited na", naFrame(t, naSolicited|naOverride, vmIP6, 255), Announcement{}, false},
		{"solicited na from a router", naFrame(t, naRouter|naSolicited, vmIP6, 255), Announcement{}, false},
		{"na with hop limit 64", naFrame(t, naOverride, vmIP6, 64), Announcement{}, false},
		{"na for a multicast target", naFrame(t, naOverride, netip.MustParseAddr("ff02::1"), 255), Announcement{}, false},
		{"neighbour solicitation", nsFrame(t, vmIP6), Announcement{}, false},
		{"ipv4 udp", udpFrame(t), Announcement{}, false},
		{"truncated garp", garpReq[:30], Announcement{}, false},
		{"truncated rarp", rarpFrame(t, vmMAC)[:20], Announcement{}, false},
		{"truncated na", na[:14+40+4+10], Announcement{}, false},
		{"ethernet header only", garpReq[:14], Announcement{}, false},
		{"short", []byte{0xff, 0xff, 0xff}, Announcement{}, false},
		{"empty", nil, Announcement{}, false},
		{"garbage", bytes.Repeat([]byte{0x86, 0xdd, 0x3a}, 40), Announcement{}, false},
	}
}

func TestParseAnnouncement(t *testing.T) {
	for _, tc := range announcementCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := ParseAnnouncement(tc.frame)
			if ok != tc.ok {
				t.Fatalf("ok = %v, want %v (got %+v)", ok, tc.ok, got)
			}
			if got.Kind != tc.want.Kind || got.IP != tc.want.IP || !bytes.Equal(got.MAC, tc.want.MAC) || !got.At.IsZero() {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestParseAnnouncementCopiesMAC(t *testing.T) {
	// The watcher reuses its read buffer: a reported MAC must not change
	// under the receiver.
	frame := garpFrame(t, layers.ARPRequest, vmIP)
	a, ok := ParseAnnouncement(frame)
	if !ok {
		t.Fatal("not an announcement")
	}
	clear(frame)
	if !bytes.Equal(a.MAC, vmMAC) {
		t.Fatalf("MAC %v changed with the frame", a.MAC)
	}
}

func FuzzParseAnnouncement(f *testing.F) {
	for _, tc := range announcementCases(f) {
		f.Add(tc.frame)
	}
	f.Fuzz(func(t *testing.T, frame []byte) {
		a, ok := ParseAnnouncement(frame)
		if !ok {
			if a.Kind != "" || a.MAC != nil || a.IP.IsValid() {
				t.Fatalf("no announcement, but %+v", a)
			}
			return
		}
		if len(a.MAC) != 6 {
			t.Fatalf("MAC %v is not an Ethernet address", a.MAC)
		}
		switch a.Kind {
		case "garp":
			if !a.IP.Is4() || !announceable(a.IP) {
				t.Fatalf("garp for %v", a.IP)
			}
		case "na":
			if !a.IP.Is6() || !announceable(a.IP) {
				t.Fatalf("na for %v", a.IP)
			}
		case "rarp":
			if a.IP.IsValid() {
				t.Fatalf("rarp with address %v", a.IP)
			}
		default:
			t.Fatalf("kind %q", a.Kind)
		}
	})
}
