package gossip

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"
)

func testMeta(i int) Meta {
	m := Meta{
		Version:  ProtocolVersion,
		Endpoint: netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, byte(i)}), 51820),
		Address:  netip.AddrFrom4([4]byte{100, 64, 0, byte(i)}),
		Site:     "site-a",
	}
	for j := range m.PublicKey {
		m.PublicKey[j] = byte(i + j)
	}
	return m
}

func TestMetaRoundTrip(t *testing.T) {
	v6 := testMeta(7)
	v6.Endpoint = netip.MustParseAddrPort("[2001:db8::7]:51820")
	v6.Address = netip.MustParseAddr("fd7a:115c::7")
	v6.Site = ""
	long := testMeta(9)
	long.Site = strings.Repeat("s", MaxSiteLen)

	for name, m := range map[string]Meta{"ipv4": testMeta(3), "ipv6": v6, "site64": long} {
		t.Run(name, func(t *testing.T) {
			b, err := m.MarshalBinary()
			if err != nil {
				t.Fatalf("marshal: %v", err)
			}
			if len(b) > MetaMaxSize {
				t.Fatalf("encoded %d bytes, limit %d", len(b), MetaMaxSize)
			}
			if b[0] != metaFormat1 {
				t.Fatalf("format byte %#x", b[0])
			}
			var got Meta
			if err := got.UnmarshalBinary(b); err != nil {
				t.Fatalf("unmarshal: %v", err)
			}
			if got != m {
				t.Fatalf("round trip:\n got %+v\nwant %+v", got, m)
			}
		})
	}
}

func TestMetaMarshalUnmapsAddresses(t *testing.T) {
	m := testMeta(1)
	m.Endpoint = netip.AddrPortFrom(netip.MustParseAddr("::ffff:198.18.0.1"), 51820)
	m.Address = netip.MustParseAddr("::ffff:100.64.0.1")
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	var got Meta
	if err := got.UnmarshalBinary(b); err != nil {
		t.Fatal(err)
	}
	if got != testMeta(1) {
		t.Fatalf("got %+v, want the unmapped %+v", got, testMeta(1))
	}
}

func TestMetaMarshalErrors(t *testing.T) {
	cases := map[string]func(*Meta){
		"site65":      func(m *Meta) { m.Site = strings.Repeat("s", MaxSiteLen+1) },
		"no endpoint": func(m *Meta) { m.Endpoint = netip.AddrPort{} },
		"port 0":      func(m *Meta) { m.Endpoint = netip.AddrPortFrom(m.Endpoint.Addr(), 0) },
		"endpoint 0.0.0.0": func(m *Meta) {
			m.Endpoint = netip.AddrPortFrom(netip.IPv4Unspecified(), 51820)
		},
		"endpoint zone": func(m *Meta) {
			m.Endpoint = netip.AddrPortFrom(netip.MustParseAddr("fe80::1%eth0"), 51820)
		},
		"no address":        func(m *Meta) { m.Address = netip.Addr{} },
		"address ::":        func(m *Meta) { m.Address = netip.IPv6Unspecified() },
		"address multicast": func(m *Meta) { m.Address = netip.MustParseAddr("224.0.0.1") },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			m := testMeta(1)
			mutate(&m)
			if b, err := m.MarshalBinary(); err == nil {
				t.Fatalf("marshal succeeded: %x", b)
			}
		})
	}
}

func TestMetaUnmarshalErrors(t *testing.T) {
	valid, err := testMeta(5).MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	for n := range len(valid) {
		var m Meta
		if err := m.UnmarshalBinary(valid[:n]); err == nil {
			t.Errorf("truncated to %d bytes: no error", n)
		}
	}

	bad := map[string][]byte{
		"trailing":       append(bytes.Clone(valid), 0),
		"unknown format": append([]byte{0x02}, valid[1:]...),
		"too long":       make([]byte, MetaMaxSize+1),
	}
	// Endpoint family byte sits right after format, version and key.
	b := bytes.Clone(valid)
	b[34] = 5
	bad["bad family"] = b
	// Site length 65 with 65 bytes present.
	b = append(bytes.Clone(valid[:len(valid)-len("site-a")-1]), MaxSiteLen+1)
	bad["site65"] = append(b, bytes.Repeat([]byte("x"), MaxSiteLen+1)...)
	// IPv4-mapped address under the IPv6 family: a second encoding.
	m := testMeta(5)
	m.Address = netip.MustParseAddr("fd00::1")
	b, err = m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	mapped := netip.MustParseAddr("::ffff:100.64.0.5").As16()
	addrAt := 34 + 1 + 4 + 2 + 1
	copy(b[addrAt:], mapped[:])
	bad["mapped"] = b

	for name, b := range bad {
		t.Run(name, func(t *testing.T) {
			m := testMeta(9)
			if err := m.UnmarshalBinary(b); err == nil {
				t.Fatalf("decoded %+v", m)
			}
			if m != testMeta(9) {
				t.Fatalf("failed decode changed the value: %+v", m)
			}
		})
	}
}

func FuzzMetaUnmarshal(f *testing.F) {
	for i := range 3 {
		m := testMeta(i + 1)
		if i == 1 {
			m.Endpoint = netip.MustParseAddrPort("[2001:db8::1]:1")
			m.Address = netip.MustParseAddr("fd7a::1")
			m.Site = strings.Repeat("z", MaxSiteLen)
		}
		b, err := m.MarshalBinary()
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{metaFormat1})
	f.Fuzz(func(t *testing.T, b []byte) {
		strictRoundTrip(t, b,
			func(b []byte) (Meta, error) {
				var m Meta
				err := m.UnmarshalBinary(b)
				return m, err
			},
			Meta.MarshalBinary)
	})
}

func TestMetaTrustedFlag(t *testing.T) {
	m := testMeta(4)
	m.Trusted = true
	b, err := m.MarshalBinary()
	if err != nil {
		t.Fatal(err)
	}
	if b[0] != metaFormat2 || b[len(b)-1] != flagTrusted {
		t.Fatalf("trusted meta encoded as format %#x, last byte %#x", b[0], b[len(b)-1])
	}
	var got Meta
	if err := got.UnmarshalBinary(b); err != nil || got != m {
		t.Fatalf("round trip: %+v %v", got, err)
	}
	// Untrusted stays format 1: agents that know only format 1 read it.
	m.Trusted = false
	if b1, _ := m.MarshalBinary(); b1[0] != metaFormat1 || len(b1) != len(b)-1 {
		t.Fatalf("untrusted meta: format %#x, %d bytes", b1[0], len(b1))
	}
	for name, bad := range map[string][]byte{
		"no flags byte":     append([]byte{metaFormat2}, b[1:len(b)-1]...),
		"unknown flag":      append(append([]byte{}, b[:len(b)-1]...), 0x80|flagTrusted),
		"format 2, no flag": append(append([]byte{}, b[:len(b)-1]...), 0),
		"trailing":          append(append([]byte{}, b...), 0),
	} {
		if err := new(Meta).UnmarshalBinary(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
