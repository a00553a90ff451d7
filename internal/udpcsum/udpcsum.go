// Package udpcsum mends IPv6 UDP datagrams whose checksum was completed to
// zero.
//
// A checksum that sums to zero must be sent as 0xffff (RFC 768), and over
// IPv6 a zero checksum field is not allowed at all (RFC 8200, 8.1): the
// receiving kernel drops the datagram. wireguard-go's TUN device completes
// the checksums the kernel leaves partial (it reads with the kernel's
// offloads) and writes ^sum as it is, so one IPv6 UDP datagram in 65,536 that
// passes through it carries a zero and is lost at the VM. Over IPv4 a zero
// means "no checksum" and the datagram is accepted, so IPv4 is left alone.
package udpcsum

import (
	"encoding/binary"
	"net/netip"

	"github.com/vmroam/vmroam/internal/csum"
)

// IPv6 next-header values.
const (
	protoHopByHop = 0
	protoRouting  = 43
	protoDestOpts = 60
	protoUDP      = 17
	ipv6HeaderLen = 40
	udpHeaderLen  = 8
)

// FixZero sets the checksum field of an IPv6 UDP datagram to 0xffff when it
// is zero and the datagram's one's-complement sum verifies with it (0 and
// 0xffff are the same number there), and reports whether it did. Anything
// else, a valid checksum most of all, costs a few comparisons and is left
// as it is: a zero that does not verify (a tunnel that sends zero checksums
// under RFC 6936), IPv4, fragments, truncated packets.
func FixZero(pkt []byte) bool {
	if len(pkt) < ipv6HeaderLen+udpHeaderLen || pkt[0]>>4 != 6 {
		return false
	}
	off, next := ipv6HeaderLen, pkt[6]
	for next != protoUDP {
		switch next {
		case protoHopByHop, protoDestOpts, protoRouting:
			if len(pkt) < off+8 {
				return false
			}
			next = pkt[off]
			off += 8 + int(pkt[off+1])*8
		default:
			// A fragment's checksum covers the whole datagram and
			// cannot be verified here; other protocols are not UDP.
			return false
		}
	}
	if len(pkt) < off+udpHeaderLen || pkt[off+6] != 0 || pkt[off+7] != 0 {
		return false
	}
	udpLen := int(binary.BigEndian.Uint16(pkt[off+4:]))
	if udpLen < udpHeaderLen || off+udpLen > len(pkt) {
		return false
	}
	// The pseudo-header: source, destination, upper-layer length, next
	// header. (Behind a routing header the destination would be the final
	// one; the sum then fails and the packet is left alone.)
	sum := csum.Add(0, pkt[8:40])
	sum += uint64(udpLen) + protoUDP
	sum = csum.Add(sum, pkt[off:off+udpLen])
	if csum.Fold(sum) != 0xffff {
		return false
	}
	pkt[off+6], pkt[off+7] = 0xff, 0xff
	return true
}

// ZeroSumPayload returns n bytes (n >= 2) that, sent as a UDP datagram's
// payload from src to dst, make the datagram's checksum come out as zero:
// a test sends them to see what a device completes that checksum to.
func ZeroSumPayload(src, dst netip.AddrPort, n int) []byte {
	p := make([]byte, n)
	for i := 2; i < n; i++ {
		p[i] = byte(i*7 + 3)
	}
	udpLen := udpHeaderLen + n
	sum := csum.Add(0, src.Addr().AsSlice())
	sum = csum.Add(sum, dst.Addr().AsSlice())
	sum += uint64(udpLen) + protoUDP
	sum += uint64(src.Port()) + uint64(dst.Port()) + uint64(udpLen)
	sum = csum.Add(sum, p)
	// The first two bytes are the missing word: the complement of the rest.
	binary.BigEndian.PutUint16(p, ^csum.Fold(sum))
	return p
}
