package wanem

import (
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
