package udpcsum

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
)

var (
	src = netip.MustParseAddr("fd76:6d72::e2")
	dst = netip.MustParseAddr("fd76:6d72::e1")
)

// datagram builds an IPv6 UDP packet whose checksum field is zero and
// whose sum is zero too, as wireguard-go completes one datagram in 65,536:
// ZeroSumPayload makes it so. hopByHop, if not nil, is
// a hop-by-hop options header put before the UDP header.
func datagram(payloadLen int, hopByHop []byte) []byte {
	exts := hopByHop
	udpLen := udpHeaderLen + payloadLen
	pkt := make([]byte, ipv6HeaderLen+len(exts)+udpLen)
	pkt[0] = 6 << 4
	binary.BigEndian.PutUint16(pkt[4:], uint16(len(exts)+udpLen))
	pkt[6] = protoUDP
	if hopByHop != nil {
		pkt[6] = protoHopByHop
	}
	pkt[7] = 64
	copy(pkt[8:], src.AsSlice())
	copy(pkt[24:], dst.AsSlice())
	copy(pkt[40:], exts)
	u := pkt[40+len(exts):]
	binary.BigEndian.PutUint16(u[0:], 5201)
	binary.BigEndian.PutUint16(u[2:], 40000)
	binary.BigEndian.PutUint16(u[4:], uint16(udpLen))
	copy(u[8:], ZeroSumPayload(netip.AddrPortFrom(src, 5201), netip.AddrPortFrom(dst, 40000), payloadLen))
	return pkt
}

// naiveSum is the RFC 1071 sum of the pseudo-header and u, written
// independently of the package's (byte by byte, 32-bit).
func naiveSum(addrs []byte, udpLen uint32, u []byte) uint16 {
	var s uint32
	words := append(append([]byte{}, addrs...), byte(udpLen>>24), byte(udpLen>>16), byte(udpLen>>8), byte(udpLen), 0, 0, 0, protoUDP)
	words = append(words, u...)
	if len(words)%2 == 1 {
		words = append(words, 0)
	}
	for i := 0; i < len(words); i += 2 {
		s += uint32(words[i])<<8 | uint32(words[i+1])
		s = s&0xffff + s>>16
	}
	return uint16(s)
}

func TestFixZero(t *testing.T) {
	for _, n := range []int{2, 3, 192, 1391} {
		pkt := datagram(n, nil)
		u := pkt[40:]
		if got := naiveSum(pkt[8:40], uint32(len(u)), u); got != 0xffff || u[6] != 0 || u[7] != 0 {
			t.Fatalf("payload %d: test datagram sums to %#x with field %x; want 0xffff with 0", n, got, u[6:8])
		}
		before := bytes.Clone(pkt)
		if !FixZero(pkt) {
			t.Fatalf("payload %d: a zero checksum that verifies was not mended", n)
		}
		if binary.BigEndian.Uint16(u[6:]) != 0xffff {
			t.Errorf("payload %d: checksum %x, want ffff", n, u[6:8])
		}
		if got := naiveSum(pkt[8:40], uint32(len(u)), u); got != 0xffff {
			t.Errorf("payload %d: mended datagram sums to %#x", n, got)
		}
		before[46], before[47] = 0xff, 0xff
		if !bytes.Equal(before, pkt) {
			t.Errorf("payload %d: bytes other than the checksum changed", n)
		}
		if FixZero(pkt) {
			t.Errorf("payload %d: a valid checksum was mended again", n)
		}
	}
}

func TestFixZeroBehindOptions(t *testing.T) {
	// A hop-by-hop header of 8 bytes (next header UDP, PadN).
	hbh := []byte{protoUDP, 0, 1, 4, 0, 0, 0, 0}
	pkt := datagram(100, hbh)
	if !FixZero(pkt) {
		t.Fatal("not mended behind a hop-by-hop header")
	}
	if got := pkt[40+8+6 : 40+8+8]; !bytes.Equal(got, []byte{0xff, 0xff}) {
		t.Errorf("checksum %x, want ffff", got)
	}
}

func TestFixZeroLeavesAlone(t *testing.T) {
	zeroNotSum := datagram(100, nil)
	zeroNotSum[60] ^= 0x40 // a tunnel's zero checksum (RFC 6936): nothing to verify
	fragment := datagram(100, nil)
	fragment[6] = 44
	ipv4 := datagram(100, nil)
	ipv4[0] = 4<<4 | 5
	tcp := datagram(100, nil)
	tcp[6] = 6
	valid := datagram(100, nil)
	valid[46], valid[47] = 0xff, 0xff
	longUDPLen := datagram(100, nil)
	binary.BigEndian.PutUint16(longUDPLen[44:], 200)
	shortUDPLen := datagram(100, nil)
	binary.BigEndian.PutUint16(shortUDPLen[44:], 7)
	hugeExt := datagram(100, []byte{protoUDP, 200, 1, 4, 0, 0, 0, 0})
	for name, pkt := range map[string][]byte{
		"zero that does not verify": zeroNotSum,
		"fragment":                  fragment,
		"IPv4":                      ipv4,
		"TCP":                       tcp,
		"valid":                     valid,
		"UDP length past the end":   longUDPLen,
		"UDP length under 8":        shortUDPLen,
		"extension past the end":    hugeExt,
		"truncated":                 datagram(100, nil)[:47],
		"empty":                     nil,
	} {
		before := bytes.Clone(pkt)
		if FixZero(pkt) {
			t.Errorf("%s: mended", name)
		}
		if !bytes.Equal(before, pkt) {
			t.Errorf("%s: changed", name)
		}
	}
}

// FuzzFixZero: no input panics it, and what it mends differs only in the
// checksum field, which then holds 0xffff and verifies.
func FuzzFixZero(f *testing.F) {
	f.Add(datagram(10, nil))
	f.Add(datagram(100, []byte{protoUDP, 0, 1, 4, 0, 0, 0, 0}))
	f.Add([]byte{0x60})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		before := bytes.Clone(pkt)
		if !FixZero(pkt) {
			if !bytes.Equal(before, pkt) {
				t.Fatal("changed without mending")
			}
			return
		}
		diff := 0
		for i := range pkt {
			if pkt[i] != before[i] {
				diff++
				if pkt[i] != 0xff || before[i] != 0 {
					t.Fatalf("byte %d: %#x -> %#x", i, before[i], pkt[i])
				}
			}
		}
		if diff != 2 {
			t.Fatalf("%d bytes changed, want the checksum's 2", diff)
		}
	})
}

// BenchmarkFixZero: what every packet read from the tunnel's device pays
// (a datagram with a checksum, or IPv4: a few comparisons), and what a
// zero costs (a sum over the datagram).
func BenchmarkFixZero(b *testing.B) {
	valid := datagram(1392, nil)
	FixZero(valid)
	ipv4 := datagram(1392, nil)
	ipv4[0] = 4<<4 | 5
	for _, c := range []struct {
		name string
		pkt  []byte
		zero bool
	}{{"ipv6-valid", valid, false}, {"ipv4", ipv4, false}, {"ipv6-zero", datagram(1392, nil), true}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(len(c.pkt)))
			for b.Loop() {
				if c.zero {
					c.pkt[46], c.pkt[47] = 0, 0
				}
				FixZero(c.pkt)
			}
		})
	}
}
