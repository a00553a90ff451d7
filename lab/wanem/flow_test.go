package wanem

import (
	"bytes"
	"encoding/binary"
	"testing"
)

func TestFlowHash(t *testing.T) {
	a := udp4(1, 2, 1000, 2000, 1)
	if flowHash(a) != flowHash(udp4(1, 2, 1000, 2000, 99)) {
		t.Error("payload changes the flow")
	}
	for name, b := range map[string][]byte{
		"source port":      udp4(1, 2, 1001, 2000, 1),
		"destination port": udp4(1, 2, 1000, 2001, 1),
		"source":           udp4(3, 2, 1000, 2000, 1),
		"destination":      udp4(1, 3, 1000, 2000, 1),
		"reverse":          udp4(2, 1, 2000, 1000, 1),
	} {
		if flowHash(b) == flowHash(a) {
			t.Errorf("%s: same flow", name)
		}
	}
	tcp := udp4(1, 2, 1000, 2000, 1)
	tcp[9] = protoTCP
	if flowHash(tcp) == flowHash(a) {
		t.Error("protocol ignored")
	}
	// ICMP has no ports: bytes 20..24 (type, code, checksum) do not count.
	icmp1, icmp2 := udp4(1, 2, 1, 2, 1), udp4(1, 2, 3, 4, 1)
	icmp1[9], icmp2[9] = 1, 1
	if flowHash(icmp1) != flowHash(icmp2) {
		t.Error("ICMP hashed with ports")
	}
	// Fragments go without ports, so that the ones without a UDP header
	// stay with the first.
	frag1, frag2 := udp4(1, 2, 1000, 2000, 1), udp4(1, 2, 5, 6, 1)
	frag1[6] = 0x20                            // MF
	binary.BigEndian.PutUint16(frag2[6:], 185) // offset 1480
	if flowHash(frag1) != flowHash(frag2) {
		t.Error("IPv4 fragments of one datagram in different flows")
	}

	// IPv6: ports found behind the destination options header.
	v6 := udp6(1)
	if flowHash(v6) != flowHash(udp6(2)) {
		t.Error("IPv6 payload changes the flow")
	}
	v6b := udp6(1)
	v6b[49]++ // source port
	if flowHash(v6b) == flowHash(v6) {
		t.Error("IPv6 port behind an extension header ignored")
	}
	// A fragment header: no ports.
	f1, f2 := udp6(1), udp6(1)
	f1[40], f2[40] = 44, 44
	f2[49]++
	if flowHash(f1) != flowHash(f2) {
		t.Error("IPv6 fragments hashed with ports")
	}

	// Garbage does not panic.
	for _, b := range [][]byte{nil, {0x45}, {0x60, 0}, {0x4f, 0, 0, 0, 0, 0, 0, 0, 0, 17, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}, make([]byte, 3)} {
		flowHash(b)
	}
	trunc := udp6(1)
	trunc[40+1] = 200 // options header claims 1608 bytes
	flowHash(trunc)
}

func BenchmarkFlowHash(b *testing.B) {
	p := udp4(1, 2, 1000, 2000, 1)
	for b.Loop() {
		flowHash(p)
	}
}

// FuzzFlowHash feeds the emulator's flow hash arbitrary packets. What
// changes from packet to packet of one flow, or hop to hop, never moves a
// packet to another flow: IPv4's TOS, length, ID, TTL and checksum, IPv6's
// traffic class, flow label, length and hop limit. Every fragment of an
// IPv4 datagram hashes alike, whatever the bytes where a first fragment
// has its ports.
func FuzzFlowHash(f *testing.F) {
	f.Add(udp4(1, 2, 1000, 2000, 1))
	f.Add(udp6(1))
	tcp := udp4(1, 2, 1000, 2000, 1)
	tcp[0], tcp[9] = 0x46, protoTCP // one word of options
	f.Add(tcp)
	frag := udp6(1)
	frag[40] = 44
	f.Add(frag)
	f.Add([]byte{0x45})
	f.Fuzz(func(t *testing.T, b []byte) {
		h := flowHash(b)
		if flowHash(bytes.Clone(b)) != h {
			t.Fatal("flowHash is not a function of the bytes")
		}
		// mutate flips bits of the bytes at idx; of byte 0 only the
		// low nibble, not the version.
		mutate := func(what string, idx ...int) {
			c := bytes.Clone(b)
			for _, i := range idx {
				if i == 0 {
					c[i] ^= 0x05
				} else {
					c[i] ^= 0xa5
				}
			}
			if flowHash(c) != h {
				t.Fatalf("changing the %s moves %x to another flow", what, b)
			}
		}
		switch {
		case len(b) >= 20 && b[0]>>4 == 4:
			mutate("TOS", 1)
			mutate("total length", 2, 3)
			mutate("ID", 4, 5)
			mutate("TTL", 8)
			mutate("checksum", 10, 11)
			ihl := int(b[0]&0x0f) * 4
			if ihl < 20 || len(b) < ihl+4 {
				return
			}
			frag := func(flags, off byte, ports uint16) uint64 {
				c := bytes.Clone(b)
				c[6], c[7] = flags, off
				binary.BigEndian.PutUint16(c[ihl:], ports)
				binary.BigEndian.PutUint16(c[ihl+2:], ^ports)
				return flowHash(c)
			}
			if first, later := frag(0x20, 0, 1000), frag(0, 185, 7); first != later {
				t.Fatalf("fragments of %x in two flows", b)
			}
		case len(b) >= 40 && b[0]>>4 == 6:
			mutate("traffic class and flow label", 0, 1, 2, 3)
			mutate("payload length", 4, 5)
			mutate("hop limit", 7)
		}
	})
}
