package cache

import (
	"errors"
	"fmt"
	"net/netip"
	"strconv"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// Flow identifies a flow for ordering: packets of one flow must be
// delivered in order. It is comparable, so it can key a map.
type Flow struct {
	Src, Dst         netip.Addr
	Proto            uint8  // IP protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6, ...)
	SrcPort, DstPort uint16 // TCP/UDP ports; ICMP echo: id in SrcPort; 0 otherwise
	// Fragment is set for any IP fragment (first or not). Only the first
	// fragment carries the ports, so fragments are classified without them:
	// that way every fragment of a datagram lands in one flow. An IPv6
	// atomic fragment (offset 0, no more fragments) is a whole datagram and
	// is classified as one.
	Fragment bool
}

// String formats the flow for logs, e.g. "tcp 10.0.0.1:40000 > 10.0.0.2:80"
// or "udp-frag [fd00::1] > [fd00::2]".
func (f Flow) String() string {
	name := protoName(f.Proto)
	if f.Fragment {
		return name + "-frag " + bracket(f.Src) + " > " + bracket(f.Dst)
	}
	switch f.Proto {
	case 6, 17, 132, 136:
		return name + " " + netip.AddrPortFrom(f.Src, f.SrcPort).String() + " > " +
			netip.AddrPortFrom(f.Dst, f.DstPort).String()
	case 1, 58:
		if f.SrcPort != 0 {
			return name + " " + bracket(f.Src) + " > " + bracket(f.Dst) + " id " + strconv.Itoa(int(f.SrcPort))
		}
	}
	return name + " " + bracket(f.Src) + " > " + bracket(f.Dst)
}

func bracket(a netip.Addr) string {
	if a.Is6() {
		return "[" + a.String() + "]"
	}
	return a.String()
}

func protoName(p uint8) string {
	switch p {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 58:
		return "icmp6"
	case 132:
		return "sctp"
	case 136:
		return "udplite"
	}
	return "proto" + strconv.Itoa(int(p))
}

// ErrNotIP is the error Classify wraps for a packet that is not an IPv4 or
// IPv6 packet at all.
var ErrNotIP = errors.New("cache: not an IP packet")

// Classifier decodes with gopacket's DecodingLayerParser into layers it
// owns, so classifying allocates nothing per packet. Not safe for
// concurrent use; make one per goroutine.
type Classifier struct {
	p4, p6  *gopacket.DecodingLayerParser
	ip4     ip4Layer
	ip6     ip6Layer
	ext     extLayer
	frag    fragLayer
	tcp     tcpLayer
	udp     udpLayer
	icmp4   icmp4Layer
	icmp6   icmp6Layer
	echo6   echo6Layer
	decoded []gopacket.LayerType
}

// The parser reuses one layer object per type, so a second layer of a type
// already decoded would overwrite the first: an IP-in-IP packet would be
// classified by its inner header, or rejected for inner garbage. These
// wrappers end the parse where the flow is known, which also spares the
// port-to-protocol lookups gopacket does after TCP and UDP.
type (
	ip4Layer   struct{ layers.IPv4 }
	ip6Layer   struct{ layers.IPv6 }
	extLayer   struct{ layers.IPv6ExtensionSkipper }
	fragLayer  struct{ layers.IPv6Fragment }
	tcpLayer   struct{ layers.TCP }
	udpLayer   struct{ layers.UDP }
	icmp4Layer struct{ layers.ICMPv4 }
	icmp6Layer struct{ layers.ICMPv6 }
	echo6Layer struct{ layers.ICMPv6Echo }
)

func notIP(t gopacket.LayerType) gopacket.LayerType {
	if t == layers.LayerTypeIPv4 || t == layers.LayerTypeIPv6 {
		return gopacket.LayerTypeZero
	}
	return t
}

func (l *ip4Layer) NextLayerType() gopacket.LayerType { return notIP(l.IPv4.NextLayerType()) }
func (l *ip6Layer) NextLayerType() gopacket.LayerType { return notIP(l.IPv6.NextLayerType()) }
func (l *extLayer) NextLayerType() gopacket.LayerType {
	return notIP(l.IPv6ExtensionSkipper.NextLayerType())
}
func (l *fragLayer) NextLayerType() gopacket.LayerType  { return notIP(l.IPv6Fragment.NextLayerType()) }
func (l *tcpLayer) NextLayerType() gopacket.LayerType   { return gopacket.LayerTypeZero }
func (l *udpLayer) NextLayerType() gopacket.LayerType   { return gopacket.LayerTypeZero }
func (l *icmp4Layer) NextLayerType() gopacket.LayerType { return gopacket.LayerTypeZero }
func (l *echo6Layer) NextLayerType() gopacket.LayerType { return gopacket.LayerTypeZero }

// Only an echo's identifier matters beyond the ICMPv6 type.
func (l *icmp6Layer) NextLayerType() gopacket.LayerType {
	switch l.TypeCode.Type() {
	case layers.ICMPv6TypeEchoRequest, layers.ICMPv6TypeEchoReply:
		return layers.LayerTypeICMPv6Echo
	}
	return gopacket.LayerTypeZero
}

// NewClassifier returns a classifier for raw IP packets (no link header).
func NewClassifier() *Classifier {
	c := &Classifier{decoded: make([]gopacket.LayerType, 0, 16)}
	// The payload after TCP, UDP or ICMP is of no interest: no decoder is
	// registered for it and IgnoreUnsupported ends the parse there.
	// Decoding stops at a fragment the same way, so a first fragment is not
	// mistaken for a whole TCP or UDP header. The fragment layer is added
	// after the extension skipper so that it, not the skipper, decodes
	// fragment headers.
	mk := func(first gopacket.LayerType) *gopacket.DecodingLayerParser {
		p := gopacket.NewDecodingLayerParser(first)
		p.SetDecodingLayerContainer(gopacket.DecodingLayerSparse(nil))
		for _, l := range []gopacket.DecodingLayer{
			&c.ip4, &c.ip6, &c.ext, &c.frag, &c.tcp, &c.udp, &c.icmp4, &c.icmp6, &c.echo6,
		} {
			p.AddDecodingLayer(l)
		}
		p.IgnoreUnsupported = true
		return p
	}
	c.p4 = mk(layers.LayerTypeIPv4)
	c.p6 = mk(layers.LayerTypeIPv6)
	return c
}

// Classify returns the flow of pkt, a raw IPv4 or IPv6 packet. It fails on
// garbage and on a packet shorter than its IP header says; it never panics
// (gopacket's parser turns a decoder panic into an error too).
func (c *Classifier) Classify(pkt []byte) (Flow, error) {
	if len(pkt) == 0 {
		return Flow{}, fmt.Errorf("classify: empty packet: %w", ErrNotIP)
	}
	var p *gopacket.DecodingLayerParser
	switch pkt[0] >> 4 {
	case 4:
		p = c.p4
	case 6:
		p = c.p6
	default:
		return Flow{}, fmt.Errorf("classify: IP version %d: %w", pkt[0]>>4, ErrNotIP)
	}
	if err := p.DecodeLayers(pkt, &c.decoded); err != nil {
		return Flow{}, fmt.Errorf("classify: %w", err)
	}
	if p.Truncated {
		return Flow{}, fmt.Errorf("classify: truncated packet (%d bytes)", len(pkt))
	}
	var f Flow
	for _, t := range c.decoded {
		switch t {
		case layers.LayerTypeIPv4:
			f.Src = netip.AddrFrom4([4]byte(c.ip4.SrcIP))
			f.Dst = netip.AddrFrom4([4]byte(c.ip4.DstIP))
			f.Proto = uint8(c.ip4.Protocol)
			f.Fragment = c.ip4.Flags&layers.IPv4MoreFragments != 0 || c.ip4.FragOffset != 0
		case layers.LayerTypeIPv6:
			f.Src = netip.AddrFrom16([16]byte(c.ip6.SrcIP))
			f.Dst = netip.AddrFrom16([16]byte(c.ip6.DstIP))
			f.Proto = uint8(c.ip6.NextHeader)
			if c.ip6.HopByHop != nil {
				f.Proto = uint8(c.ip6.HopByHop.NextHeader)
			}
		case layers.LayerTypeIPv6HopByHop, layers.LayerTypeIPv6Routing, layers.LayerTypeIPv6Destination:
			// One skipper serves every extension header; what it holds now
			// is the last one's, which is the one that matters.
			f.Proto = uint8(c.ext.NextHeader)
		case layers.LayerTypeIPv6Fragment:
			f.Proto = uint8(c.frag.NextHeader)
			f.Fragment = c.frag.FragmentOffset != 0 || c.frag.MoreFragments
		case layers.LayerTypeTCP:
			f.SrcPort, f.DstPort = uint16(c.tcp.SrcPort), uint16(c.tcp.DstPort)
		case layers.LayerTypeUDP:
			f.SrcPort, f.DstPort = uint16(c.udp.SrcPort), uint16(c.udp.DstPort)
		case layers.LayerTypeICMPv4:
			switch c.icmp4.TypeCode.Type() {
			case layers.ICMPv4TypeEchoRequest, layers.ICMPv4TypeEchoReply:
				f.SrcPort = c.icmp4.Id
			}
		case layers.LayerTypeICMPv6Echo:
			f.SrcPort = c.echo6.Identifier
		}
	}
	return f, nil
}

// Destination returns the destination address of an IPv4 or IPv6 packet
// without decoding anything else: the agent picks a VIP's queue with it for
// every intercepted packet, so it must be cheap. It checks only the
// version and that the fixed header is there.
func Destination(pkt []byte) (netip.Addr, bool) {
	if len(pkt) == 0 {
		return netip.Addr{}, false
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) >= 20 {
			return netip.AddrFrom4([4]byte(pkt[16:20])), true
		}
	case 6:
		if len(pkt) >= 40 {
			return netip.AddrFrom16([16]byte(pkt[24:40])), true
		}
	}
	return netip.Addr{}, false
}

// Source is Destination's twin for the source address.
func Source(pkt []byte) (netip.Addr, bool) {
	if len(pkt) == 0 {
		return netip.Addr{}, false
	}
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) >= 20 {
			return netip.AddrFrom4([4]byte(pkt[12:16])), true
		}
	case 6:
		if len(pkt) >= 40 {
			return netip.AddrFrom16([16]byte(pkt[8:24])), true
		}
	}
	return netip.Addr{}, false
}
