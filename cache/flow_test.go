package cache

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vmroam/vmroam/internal/barrier"
)

var (
	v4a, v4b = netip.MustParseAddr("100.64.0.1"), netip.MustParseAddr("100.64.1.2")
	v6a, v6b = netip.MustParseAddr("fd00::1"), netip.MustParseAddr("fd00:1::2")
)

func serialize(t testing.TB, ls ...gopacket.SerializableLayer) []byte {
	t.Helper()
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, ls...); err != nil {
		t.Fatalf("serialize: %v", err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

func ip4(proto layers.IPProtocol) *layers.IPv4 {
	return &layers.IPv4{Version: 4, IHL: 5, TTL: 64, Protocol: proto, SrcIP: v4a.AsSlice(), DstIP: v4b.AsSlice()}
}

func ip6(next layers.IPProtocol) *layers.IPv6 {
	return &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: next, SrcIP: v6a.AsSlice(), DstIP: v6b.AsSlice()}
}

func tcp(t testing.TB, net gopacket.NetworkLayer) *layers.TCP {
	l := &layers.TCP{SrcPort: 40000, DstPort: 80, Seq: 1, ACK: true, Window: 1000, DataOffset: 5}
	if err := l.SetNetworkLayerForChecksum(net); err != nil {
		t.Fatal(err)
	}
	return l
}

func udp(t testing.TB, net gopacket.NetworkLayer) *layers.UDP {
	l := &layers.UDP{SrcPort: 5001, DstPort: 5201}
	if err := l.SetNetworkLayerForChecksum(net); err != nil {
		t.Fatal(err)
	}
	return l
}

var payload = gopacket.Payload([]byte("0123456789abcdefghijklmnopqrstuvwxyz"))

// testPackets builds one packet per case, with the flow it must give.
func testPackets(t testing.TB) []struct {
	name string
	pkt  []byte
	want Flow
} {
	type tc = struct {
		name string
		pkt  []byte
		want Flow
	}
	var out []tc
	add := func(name string, want Flow, ls ...gopacket.SerializableLayer) {
		out = append(out, tc{name, serialize(t, ls...), want})
	}

	i := ip4(layers.IPProtocolTCP)
	add("ipv4-tcp", Flow{Src: v4a, Dst: v4b, Proto: 6, SrcPort: 40000, DstPort: 80}, i, tcp(t, i), payload)
	i = ip4(layers.IPProtocolUDP)
	add("ipv4-udp", Flow{Src: v4a, Dst: v4b, Proto: 17, SrcPort: 5001, DstPort: 5201}, i, udp(t, i), payload)
	i = ip4(layers.IPProtocolICMPv4)
	add("ipv4-icmp-echo", Flow{Src: v4a, Dst: v4b, Proto: 1, SrcPort: 777},
		i, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: 777, Seq: 3}, payload)
	i = ip4(layers.IPProtocolICMPv4)
	add("ipv4-icmp-unreachable", Flow{Src: v4a, Dst: v4b, Proto: 1},
		i, &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeDestinationUnreachable, 1)}, payload)
	i = ip4(layers.IPProtocolGRE)
	add("ipv4-other", Flow{Src: v4a, Dst: v4b, Proto: 47}, i, payload)
	i = ip4(layers.IPProtocolIPv4)
	add("ipv4-in-ipv4", Flow{Src: v4a, Dst: v4b, Proto: 4}, i, gopacket.Payload([]byte{0x45, 1, 2}))

	s := ip6(layers.IPProtocolTCP)
	add("ipv6-tcp", Flow{Src: v6a, Dst: v6b, Proto: 6, SrcPort: 40000, DstPort: 80}, s, tcp(t, s), payload)
	s = ip6(layers.IPProtocolUDP)
	add("ipv6-udp", Flow{Src: v6a, Dst: v6b, Proto: 17, SrcPort: 5001, DstPort: 5201}, s, udp(t, s), payload)
	s = ip6(layers.IPProtocolICMPv6)
	ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeEchoRequest, 0)}
	if err := ic.SetNetworkLayerForChecksum(s); err != nil {
		t.Fatal(err)
	}
	add("ipv6-icmp6-echo", Flow{Src: v6a, Dst: v6b, Proto: 58, SrcPort: 4242},
		s, ic, &layers.ICMPv6Echo{Identifier: 4242, SeqNumber: 1}, payload)
	s = ip6(layers.IPProtocolICMPv6)
	ic = &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(layers.ICMPv6TypeDestinationUnreachable, 0)}
	if err := ic.SetNetworkLayerForChecksum(s); err != nil {
		t.Fatal(err)
	}
	add("ipv6-icmp6-unreachable", Flow{Src: v6a, Dst: v6b, Proto: 58}, s, ic, payload)
	s = ip6(layers.IPProtocolIPv6Destination)
	dst := &layers.IPv6Destination{Options: []*layers.IPv6DestinationOption{{OptionType: 1, OptionData: []byte{0, 0, 0, 0}}}}
	dst.NextHeader = layers.IPProtocolUDP
	add("ipv6-destopts-udp", Flow{Src: v6a, Dst: v6b, Proto: 17, SrcPort: 5001, DstPort: 5201}, s, dst, udp(t, s), payload)
	s = ip6(layers.IPProtocolIPv6)
	add("ipv6-in-ipv6", Flow{Src: v6a, Dst: v6b, Proto: 41}, s, gopacket.Payload([]byte{0x60, 1, 2}))
	s = ip6(layers.IPProtocolIPv6Fragment)
	add("ipv6-atomic-fragment", Flow{Src: v6a, Dst: v6b, Proto: 17, SrcPort: 5001, DstPort: 5201},
		s, &layers.IPv6Fragment{NextHeader: layers.IPProtocolUDP, Identification: 9}, udp(t, s), payload)
	return out
}

func TestClassify(t *testing.T) {
	c := NewClassifier()
	for _, tc := range testPackets(t) {
		t.Run(tc.name, func(t *testing.T) {
			got, err := c.Classify(tc.pkt)
			if err != nil {
				t.Fatalf("classify: %v", err)
			}
			if got != tc.want {
				t.Fatalf("got %v (%+v), want %v", got, got, tc.want)
			}
			if d, ok := Destination(tc.pkt); !ok || d != tc.want.Dst {
				t.Fatalf("Destination %v %v", d, ok)
			}
			if s, ok := Source(tc.pkt); !ok || s != tc.want.Src {
				t.Fatalf("Source %v %v", s, ok)
			}
			t.Log(got)
		})
	}
}

func TestClassifyFragments(t *testing.T) {
	c := NewClassifier()
	// The datagram that is cut: a UDP header and data.
	i := ip4(layers.IPProtocolUDP)
	whole := serialize(t, i, udp(t, i), gopacket.Payload(make([]byte, 64)))[20:]

	first := ip4(layers.IPProtocolUDP)
	first.Id, first.Flags = 77, layers.IPv4MoreFragments
	later := ip4(layers.IPProtocolUDP)
	later.Id, later.FragOffset = 77, 4 // 32 bytes in
	pFirst := serialize(t, first, gopacket.Payload(whole[:32]))
	pLater := serialize(t, later, gopacket.Payload(whole[32:]))
	want := Flow{Src: v4a, Dst: v4b, Proto: 17, Fragment: true}
	for name, p := range map[string][]byte{"ipv4-first": pFirst, "ipv4-later": pLater} {
		if f, err := c.Classify(p); err != nil || f != want {
			t.Errorf("%s: %v %v, want %v", name, f, err, want)
		}
	}

	s := ip6(layers.IPProtocolUDP)
	whole6 := serialize(t, s, udp(t, s), gopacket.Payload(make([]byte, 64)))[40:]
	mk := func(off uint16, more bool, data []byte) []byte {
		return serialize(t, ip6(layers.IPProtocolIPv6Fragment),
			&layers.IPv6Fragment{NextHeader: layers.IPProtocolUDP, FragmentOffset: off, MoreFragments: more, Identification: 1234},
			gopacket.Payload(data))
	}
	want6 := Flow{Src: v6a, Dst: v6b, Proto: 17, Fragment: true}
	for name, p := range map[string][]byte{"ipv6-first": mk(0, true, whole6[:32]), "ipv6-later": mk(4, false, whole6[32:])} {
		if f, err := c.Classify(p); err != nil || f != want6 {
			t.Errorf("%s: %v %v, want %v", name, f, err, want6)
		}
	}
}

func TestClassifyGarbage(t *testing.T) {
	c := NewClassifier()
	i := ip4(layers.IPProtocolTCP)
	good4 := serialize(t, i, tcp(t, i), payload)
	s := ip6(layers.IPProtocolUDP)
	good6 := serialize(t, s, udp(t, s), payload)
	badTCP := append([]byte(nil), good4...)
	badTCP[20+12] = 0x20 // data offset 2 < 5
	badIHL := append([]byte(nil), good4...)
	badIHL[0] = 0x43
	cases := map[string][]byte{
		"empty":           nil,
		"version-0":       make([]byte, 60),
		"version-5":       append([]byte{0x50}, good4[1:]...),
		"ipv4-short":      good4[:19],
		"ipv4-truncated":  good4[:len(good4)-1],
		"ipv4-no-l4":      good4[:30],
		"ipv4-bad-ihl":    badIHL,
		"tcp-bad-offset":  badTCP,
		"ipv6-short":      good6[:39],
		"ipv6-truncated":  good6[:len(good6)-3],
		"ipv6-udp-cut":    good6[:44],
		"ipv6-len-0":      append(append([]byte{0x60, 0, 0, 0, 0, 0, 17, 64}, make([]byte, 32)...), make([]byte, 8)...),
		"ipv6-ext-cut":    append(append([]byte{0x60, 0, 0, 0, 0, 4, 60, 64}, make([]byte, 32)...), 17, 9, 0, 0),
		"ipv6-frag-short": append(append([]byte{0x60, 0, 0, 0, 0, 4, 44, 64}, make([]byte, 32)...), 17, 0, 0, 0),
	}
	for name, p := range cases {
		if f, err := c.Classify(p); err == nil {
			t.Errorf("%s: no error, flow %v", name, f)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
	if _, err := c.Classify(nil); !errors.Is(err, ErrNotIP) {
		t.Errorf("empty: %v, want ErrNotIP", err)
	}
	for _, p := range [][]byte{nil, {0x45}, make([]byte, 19), append([]byte{0x60}, make([]byte, 38)...), {0x70, 0, 0}} {
		if a, ok := Destination(p); ok {
			t.Errorf("Destination(%x) = %v", p, a)
		}
		if a, ok := Source(p); ok {
			t.Errorf("Source(%x) = %v", p, a)
		}
	}
}

func TestClassifyNoAlloc(t *testing.T) {
	c := NewClassifier()
	for _, tc := range testPackets(t) {
		if n := testing.AllocsPerRun(100, func() {
			if _, err := c.Classify(tc.pkt); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Errorf("%s: %v allocations per packet", tc.name, n)
		}
	}
}

func TestFlowString(t *testing.T) {
	for _, tc := range []struct {
		f    Flow
		want string
	}{
		{Flow{Src: v4a, Dst: v4b, Proto: 6, SrcPort: 1, DstPort: 2}, "tcp 100.64.0.1:1 > 100.64.1.2:2"},
		{Flow{Src: v6a, Dst: v6b, Proto: 17, SrcPort: 1, DstPort: 2}, "udp [fd00::1]:1 > [fd00:1::2]:2"},
		{Flow{Src: v6a, Dst: v6b, Proto: 17, Fragment: true}, "udp-frag [fd00::1] > [fd00:1::2]"},
		{Flow{Src: v4a, Dst: v4b, Proto: 1, SrcPort: 7}, "icmp 100.64.0.1 > 100.64.1.2 id 7"},
		{Flow{Src: v4a, Dst: v4b, Proto: 47}, "proto47 100.64.0.1 > 100.64.1.2"},
	} {
		if got := tc.f.String(); got != tc.want {
			t.Errorf("got %q, want %q", got, tc.want)
		}
	}
}

func FuzzClassify(f *testing.F) {
	for _, tc := range testPackets(f) {
		f.Add(tc.pkt)
	}
	f.Add([]byte{})
	f.Add([]byte{0x45, 0, 0, 20})
	for _, b := range barrierPackets(f) {
		f.Add(b)
	}
	f.Add(append([]byte{0x60, 0, 0, 0, 0, 8, 0, 64}, make([]byte, 40)...))
	c := NewClassifier()
	f.Fuzz(func(t *testing.T, pkt []byte) {
		fl, err := c.Classify(pkt)
		d, dok := Destination(pkt)
		s, sok := Source(pkt)
		if err != nil {
			return
		}
		if !dok || !sok {
			t.Fatalf("Classify succeeded (%v) but Destination %v / Source %v failed", fl, dok, sok)
		}
		if d != fl.Dst || s != fl.Src {
			t.Fatalf("Destination %v Source %v, Classify %v", d, s, fl)
		}
		if fl.Fragment && (fl.SrcPort != 0 || fl.DstPort != 0) {
			t.Fatalf("fragment with ports: %v", fl)
		}
		_ = fl.String()
		// The cache device's barrier parser agrees with the classifier.
		if _, ok := cacheBarrier.Match(pkt); ok && (!fl.Src.Is4() || fl.Proto != 17 || fl.Fragment || fl.DstPort != barrier.Port) {
			t.Fatalf("barrier packet of flow %v", fl)
		}
	})
}

// cacheBarrier parses the cache device's barrier packets.
var cacheBarrier = barrier.New(BarrierAddr, "cache device", nil)

func BenchmarkClassify(b *testing.B) {
	c := NewClassifier()
	for _, tc := range testPackets(b) {
		if tc.name != "ipv4-udp" && tc.name != "ipv6-tcp" {
			continue
		}
		b.Run(tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, err := c.Classify(tc.pkt); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	b.Run("destination", func(b *testing.B) {
		p := testPackets(b)[0].pkt
		for i := 0; i < b.N; i++ {
			if _, ok := Destination(p); !ok {
				b.Fatal("no destination")
			}
		}
	})
}

func TestClassifyHopByHop(t *testing.T) {
	s := ip6(layers.IPProtocolUDP)
	p := serialize(t, s, udp(t, s), payload)
	// Insert a hop-by-hop header (PadN only) between IPv6 and UDP by hand:
	// gopacket's IPv6 layer folds it into itself, and so must Classify.
	hbh := []byte{17, 0, 1, 4, 0, 0, 0, 0}
	p = append(append(append([]byte(nil), p[:40]...), hbh...), p[40:]...)
	p[6] = 0
	p[5] += 8
	f, err := NewClassifier().Classify(p)
	if want := (Flow{Src: v6a, Dst: v6b, Proto: 17, SrcPort: 5001, DstPort: 5201}); err != nil || f != want {
		t.Fatalf("got %v %v, want %v", f, err, want)
	}
}
