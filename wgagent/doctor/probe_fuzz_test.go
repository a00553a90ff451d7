package doctor

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// icmpEcho is an ICMP echo message (request or reply) as the wire has it.
func icmpEcho(typ byte, id, seq uint16) []byte {
	b := make([]byte, 8, 16)
	b[0] = typ
	binary.BigEndian.PutUint16(b[4:], id)
	binary.BigEndian.PutUint16(b[6:], seq)
	return append(b, "payload!"...)
}

// ipv4 puts an IPv4 header (protocol ICMP, ihl 5 words) before payload.
func ipv4(payload []byte) []byte {
	h := make([]byte, 20)
	h[0], h[9] = 0x45, 1
	return append(h, payload...)
}

// tooBig4 is a router's "fragmentation needed" about our request seq, as
// the raw IPv4 socket delivers it (with the outer IP header).
func tooBig4(id, seq uint16, mtu int) []byte {
	icmp := []byte{3, 4, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint16(icmp[6:], uint16(mtu))
	return ipv4(append(icmp, ipv4(icmpEcho(8, id, seq))...))
}

// tooBig6 is an ICMPv6 "packet too big" about our request seq (a raw IPv6
// socket delivers no IP header).
func tooBig6(id, seq uint16, mtu int) []byte {
	icmp := []byte{2, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(icmp[4:], uint32(mtu))
	ip := make([]byte, 40)
	ip[0], ip[6] = 0x60, 58
	return append(append(icmp, ip...), icmpEcho(128, id, seq)...)
}

func TestParseICMP(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    []byte
		v4   bool
		kind icmpKind
		mtu  int
	}{
		{"echo reply v4", ipv4(icmpEcho(0, 7, 3)), true, echoReply, 0},
		{"echo reply v6", icmpEcho(129, 7, 3), false, echoReply, 0},
		{"too big v4", tooBig4(7, 3, 1400), true, tooBig, 1400},
		{"too big v6", tooBig6(7, 3, 1280), false, tooBig, 1280},
	} {
		seq, kind, mtu, ok := parseICMP(tc.b, tc.v4, 7)
		if !ok || seq != 3 || kind != tc.kind || mtu != tc.mtu {
			t.Errorf("%s: seq %d kind %d mtu %d ok %v", tc.name, seq, kind, mtu, ok)
		}
		if _, _, _, ok := parseICMP(tc.b, tc.v4, 8); ok {
			t.Errorf("%s: another prober's id accepted", tc.name)
		}
		for i := range tc.b {
			if _, _, _, ok := parseICMP(tc.b[:i], tc.v4, 7); ok && i < len(tc.b)-len("payload!") {
				t.Errorf("%s: %d of %d bytes accepted", tc.name, i, len(tc.b))
			}
		}
	}
}

// FuzzParseICMP: whatever a raw ICMP socket delivers, parseICMP does not
// panic or change it, accepts only an echo reply with our id or an error
// quoting our request with our id, and reads the sequence number and MTU
// from where the packet carries them.
func FuzzParseICMP(f *testing.F) {
	f.Add(ipv4(icmpEcho(0, 7, 3)), true, uint16(7))
	f.Add(icmpEcho(129, 7, 3), false, uint16(7))
	f.Add(tooBig4(7, 3, 1400), true, uint16(7))
	f.Add(tooBig6(7, 3, 1280), false, uint16(7))
	f.Add(tooBig4(7, 3, 0), true, uint16(7))
	f.Add([]byte{0x4f}, true, uint16(0))
	f.Fuzz(func(t *testing.T, b []byte, v4 bool, id uint16) {
		in := bytes.Clone(b)
		seq, kind, mtu, ok := parseICMP(b, v4, id)
		if !bytes.Equal(in, b) {
			t.Fatal("parsing changed the packet")
		}
		if !ok {
			if seq != 0 || kind != 0 || mtu != 0 {
				t.Fatalf("rejected packet gave seq %d kind %d mtu %d", seq, kind, mtu)
			}
			return
		}
		icmp := b
		if v4 {
			icmp = b[int(b[0]&0x0f)*4:]
		}
		switch kind {
		case echoReply:
			if want := map[bool]byte{true: 0, false: 129}[v4]; icmp[0] != want || binary.BigEndian.Uint16(icmp[4:]) != id || binary.BigEndian.Uint16(icmp[6:]) != seq || mtu != 0 {
				t.Fatalf("echo reply: type %d id %d seq %d mtu %d", icmp[0], binary.BigEndian.Uint16(icmp[4:]), seq, mtu)
			}
		case tooBig:
			inner := icmp[8:]
			want := binary.BigEndian.Uint32(icmp[4:])
			if v4 {
				inner = inner[int(inner[0]&0x0f)*4:]
				want = uint32(binary.BigEndian.Uint16(icmp[6:]))
			} else {
				inner = inner[40:]
			}
			if binary.BigEndian.Uint16(inner[4:]) != id || binary.BigEndian.Uint16(inner[6:]) != seq || uint32(mtu) != want {
				t.Fatalf("too big: inner id %d seq %d (%d), mtu %d (%d)", binary.BigEndian.Uint16(inner[4:]), binary.BigEndian.Uint16(inner[6:]), seq, mtu, want)
			}
		default:
			t.Fatalf("accepted with kind %d", kind)
		}
		// The same message built from what was read parses the same way.
		var rebuilt []byte
		switch {
		case kind == echoReply && v4:
			rebuilt = ipv4(icmpEcho(0, id, seq))
		case kind == echoReply:
			rebuilt = icmpEcho(129, id, seq)
		case v4:
			rebuilt = tooBig4(id, seq, mtu)
		default:
			rebuilt = tooBig6(id, seq, mtu)
		}
		if s2, k2, m2, ok2 := parseICMP(rebuilt, v4, id); !ok2 || s2 != seq || k2 != kind || m2 != mtu {
			t.Fatalf("rebuilt %x: seq %d kind %d mtu %d ok %v", rebuilt, s2, k2, m2, ok2)
		}
	})
}
