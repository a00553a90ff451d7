package gossip

import (
	"bytes"
	"encoding/binary"
	"math"
	"net/netip"
	"reflect"
	"strings"
	"testing"
)

var mp = netip.MustParsePrefix

func TestValidNetworkName(t *testing.T) {
	for _, name := range []string{"a", "0", "blue", "tenant-1", "a.b_c-d", "9lives", strings.Repeat("n", MaxNetworkNameLen)} {
		if err := ValidNetworkName(name); err != nil {
			t.Errorf("ValidNetworkName(%q) = %v", name, err)
		}
	}
	for name, want := range map[string]string{
		"":                                   "empty",
		strings.Repeat("n", 64):              "limit is 63",
		"-a":                                 "must start",
		".a":                                 "must start",
		"_a":                                 "must start",
		"Blue":                               "must start",
		"blUe":                               `"U" at byte 2`,
		"a b":                                `" " at byte 1`,
		"a/b":                                `"/"`,
		"a\x00":                              `"\x00"`,
		"caf\xc3\xa9":                        `"\xc3"`,
		"tenant:1":                           `":"`,
		strings.Repeat("n", 62) + "\xff\xff": "limit is 63",
	} {
		err := ValidNetworkName(name)
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("ValidNetworkName(%q) = %v, want an error with %q", name, err, want)
		}
	}
}

func TestValidNetworkPrefix(t *testing.T) {
	for _, s := range []string{
		"100.64.0.0/16", "100.64.1.0/24", "10.0.0.0/8", "192.168.7.4/30", "198.18.0.0/15",
		"fd7a:115c::/48", "fd00::/16", "2001:db8::/32", "fd7a::4/126", "2001:db8:1::/48",
	} {
		if err := ValidNetworkPrefix(mp(s)); err != nil {
			t.Errorf("ValidNetworkPrefix(%s) = %v", s, err)
		}
	}
	cases := []struct {
		p    netip.Prefix
		want string
	}{
		{netip.Prefix{}, "not set"},
		{netip.PrefixFrom(netip.MustParseAddr("10.0.0.0"), 33), "not valid"},
		{mp("100.64.1.5/24"), "host bits set; the network is 100.64.1.0/24"},
		{mp("fd7a::1/64"), "host bits set; the network is fd7a::/64"},
		{mp("::ffff:100.64.0.0/112"), "IPv4-mapped; use 100.64.0.0/16"},
		{netip.PrefixFrom(netip.MustParseAddr("::ffff:10.0.0.0"), 64), "is IPv4-mapped"},
		{mp("10.0.0.0/7"), "IPv4 network is /8 to /30"},
		{mp("0.0.0.0/0"), "IPv4 network is /8 to /30"},
		{mp("10.0.0.0/31"), "IPv4 network is /8 to /30"},
		{mp("10.0.0.1/32"), "IPv4 network is /8 to /30"},
		{mp("fd00::/8"), "IPv6 network is /16 to /126"},
		{mp("::/0"), "IPv6 network is /16 to /126"},
		{mp("fd7a::/127"), "IPv6 network is /16 to /126"},
		{mp("fd7a::1/128"), "IPv6 network is /16 to /126"},
		{mp("0.0.0.0/8"), "unspecified range 0.0.0.0/8"},
		{mp("127.0.0.0/16"), "loopback range 127.0.0.0/8"},
		{mp("169.254.0.0/24"), "link-local range 169.254.0.0/16"},
		{mp("169.0.0.0/8"), "link-local range 169.254.0.0/16"},
		{mp("224.0.0.0/24"), "multicast range 224.0.0.0/4"},
		{mp("239.255.0.0/16"), "multicast range"},
		{mp("255.255.255.252/30"), "broadcast address"},
		{mp("::/16"), "unspecified address ::/128"},
		{mp("::/127"), "IPv6 network is"},
		{mp("::fffe:0:0/95"), "IPv4-mapped range ::ffff:0.0.0.0/96"},
		{mp("fe80::/64"), "link-local range fe80::/10"},
		{mp("fe00::/8"), "IPv6 network is"},
		{mp("febf::/16"), "link-local range"},
		{mp("ff02::/16"), "multicast range ff00::/8"},
	}
	for _, c := range cases {
		err := ValidNetworkPrefix(c.p)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("ValidNetworkPrefix(%v) = %v, want an error with %q", c.p, err, c.want)
		}
	}
}

func TestOverlaps(t *testing.T) {
	cases := []struct {
		a, b string
		want bool
	}{
		{"100.64.0.0/16", "100.64.1.0/24", true},
		{"100.64.0.0/16", "100.64.0.0/16", true},
		{"100.64.0.0/16", "100.65.0.0/16", false},
		{"100.64.0.0/24", "100.64.1.0/24", false},
		{"100.64.0.0/10", "100.127.255.252/30", true},
		{"fd7a::/48", "fd7a:0:0:1::/64", true},
		{"fd7a::/48", "fd7b::/48", false},
		{"100.64.0.0/16", "::ffff:100.64.0.0/112", false}, // different families
		{"100.64.0.0/16", "fd7a::/48", false},
	}
	for _, c := range cases {
		a, b := mp(c.a), mp(c.b)
		if got := Overlaps(a, b); got != c.want {
			t.Errorf("Overlaps(%s, %s) = %v, want %v", a, b, got, c.want)
		}
		if got := Overlaps(b, a); got != c.want {
			t.Errorf("Overlaps(%s, %s) = %v, want %v", b, a, got, c.want)
		}
	}
	if Overlaps(netip.Prefix{}, mp("10.0.0.0/8")) || Overlaps(netip.Prefix{}, netip.Prefix{}) {
		t.Error("the zero prefix overlaps something")
	}
}

func TestNetworkSupersedesTotalOrder(t *testing.T) {
	var ns []Network
	for e := range uint64(3) {
		for _, o := range []string{"", "a", "ab", "b"} {
			for _, p := range []netip.Prefix{{}, mp("10.0.0.0/16"), mp("10.0.0.0/24"), mp("9.0.0.0/8"), mp("fd00::/48")} {
				ns = append(ns, Network{Name: "n", Prefix: p, Epoch: e, Origin: o})
			}
		}
	}
	for _, a := range ns {
		if a.Supersedes(a) {
			t.Errorf("%v supersedes itself", a)
		}
		for _, b := range ns {
			if a == b {
				continue
			}
			if a.Supersedes(b) == b.Supersedes(a) {
				t.Errorf("%v vs %v: exactly one must win", a, b)
			}
			for _, c := range ns {
				if a.Supersedes(b) && b.Supersedes(c) && !a.Supersedes(c) {
					t.Errorf("not transitive: %v > %v > %v", a, b, c)
				}
			}
		}
	}
	old := Network{Name: "n", Prefix: mp("10.0.0.0/16"), Epoch: 1, Origin: "zzz"}
	if !(Network{Name: "n", Epoch: 2}).Supersedes(old) {
		t.Error("a higher epoch must win over a greater origin")
	}
	if !(Network{Name: "n", Epoch: 1, Origin: "zzz"}).Supersedes(old) {
		t.Error("at one epoch and origin, removal must win")
	}
}

func sampleNetworks() []Network {
	return []Network{
		{Name: "blue", Prefix: mp("100.64.0.0/16"), Epoch: 1, Origin: "host-a"},
		{Name: "gone", Epoch: 7, Origin: "host-b"},
		{Name: "v6", Prefix: mp("fd7a:115c::/48"), Epoch: math.MaxUint64, Origin: ""},
		{Name: strings.Repeat("n", MaxNetworkNameLen), Prefix: mp("10.0.0.0/8"), Epoch: 300, Origin: strings.Repeat("o", MaxOwnerLen)},
		{Name: "0", Prefix: mp("192.168.0.0/30"), Epoch: 0, Origin: "h"},
	}
}

func TestNetworksRoundTrip(t *testing.T) {
	for name, ns := range map[string][]Network{"empty": {}, "one": sampleNetworks()[:1], "mixed": sampleNetworks()} {
		t.Run(name, func(t *testing.T) {
			b := EncodeNetworks(ns)
			if b[0] != msgNetworks {
				t.Fatalf("type byte %#x", b[0])
			}
			got, err := DecodeNetworks(b)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !reflect.DeepEqual(got, ns) {
				t.Fatalf("round trip:\n got %v\nwant %v", got, ns)
			}
		})
	}
}

func TestEncodeNetworksSkipsInvalid(t *testing.T) {
	good := sampleNetworks()[0]
	ns := []Network{
		{Name: "", Prefix: mp("10.0.0.0/8"), Epoch: 1},
		good,
		{Name: "Bad", Prefix: mp("10.0.0.0/8"), Epoch: 1},
		{Name: "unmasked", Prefix: mp("10.0.0.1/8"), Epoch: 1},
		{Name: "loopback", Prefix: mp("127.0.0.0/8"), Epoch: 1},
		{Name: "mapped", Prefix: mp("::ffff:10.0.0.0/104"), Epoch: 1},
		{Name: "origin", Prefix: mp("10.0.0.0/8"), Epoch: 1, Origin: strings.Repeat("o", MaxOwnerLen+1)},
	}
	got, err := DecodeNetworks(EncodeNetworks(ns))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, []Network{good}) {
		t.Fatalf("got %v, want only %v", got, good)
	}
}

// rawNetwork builds a one-network message byte by byte, to express
// encodings EncodeNetworks refuses to produce. prefix is the family byte,
// the address and the bits, or just familyNone.
func rawNetwork(name string, prefix []byte, epoch []byte, origin string) []byte {
	b := []byte{msgNetworks, 1, byte(len(name))}
	b = append(b, name...)
	b = append(b, prefix...)
	b = append(b, epoch...)
	b = append(b, byte(len(origin)))
	return append(b, origin...)
}

func v4Prefix(a, b, c, d, bits byte) []byte { return []byte{family4, a, b, c, d, bits} }

func TestDecodeNetworksErrors(t *testing.T) {
	valid := EncodeNetworks(sampleNetworks())
	for n := range len(valid) {
		if _, err := DecodeNetworks(valid[:n]); err == nil {
			t.Errorf("truncated to %d of %d bytes: no error", n, len(valid))
		}
	}
	if _, err := DecodeNetworks(rawNetwork("a", v4Prefix(10, 0, 0, 0, 8), []byte{1}, "h")); err != nil {
		t.Fatalf("the raw builder is wrong: %v", err)
	}
	mapped := append([]byte{family6}, netip.MustParseAddr("::ffff:10.0.0.0").AsSlice()...)
	v6 := append([]byte{family6}, netip.MustParseAddr("fd7a::").AsSlice()...)
	cases := map[string][]byte{
		"trailing":           append(bytes.Clone(valid), 0),
		"wrong type":         append([]byte{msgRecords}, valid[1:]...),
		"state type":         append([]byte{msgState}, valid[1:]...),
		"empty name":         rawNetwork("", v4Prefix(10, 0, 0, 0, 8), []byte{1}, "h"),
		"long name":          rawNetwork(strings.Repeat("n", 64), v4Prefix(10, 0, 0, 0, 8), []byte{1}, "h"),
		"upper-case name":    rawNetwork("A", v4Prefix(10, 0, 0, 0, 8), []byte{1}, "h"),
		"name past end":      {msgNetworks, 1, 200, 'a', familyNone, 1, 0},
		"bad family":         rawNetwork("a", []byte{5, 10, 0, 0, 0, 8}, []byte{1}, "h"),
		"unmasked":           rawNetwork("a", v4Prefix(10, 0, 0, 1, 8), []byte{1}, "h"),
		"bits past v4":       rawNetwork("a", v4Prefix(10, 0, 0, 0, 33), []byte{1}, "h"),
		"bits past v6":       rawNetwork("a", append(v6, 129), []byte{1}, "h"),
		"short v4":           rawNetwork("a", v4Prefix(10, 0, 0, 0, 31), []byte{1}, "h"),
		"short v6":           rawNetwork("a", append(v6, 127), []byte{1}, "h"),
		"wide v4":            rawNetwork("a", v4Prefix(10, 0, 0, 0, 7), []byte{1}, "h"),
		"mapped under v6":    rawNetwork("a", append(mapped, 104), []byte{1}, "h"),
		"loopback":           rawNetwork("a", v4Prefix(127, 0, 0, 0, 8), []byte{1}, "h"),
		"multicast v6":       rawNetwork("a", append(append([]byte{family6, 0xff, 0x02}, make([]byte, 14)...), 16), []byte{1}, "h"),
		"no bits":            rawNetwork("a", []byte{family4, 10, 0, 0, 0}, nil, "")[:9],
		"padded epoch":       rawNetwork("a", v4Prefix(10, 0, 0, 0, 8), []byte{0x81, 0x00}, "h"),
		"overflowing epoch":  rawNetwork("a", v4Prefix(10, 0, 0, 0, 8), bytes.Repeat([]byte{0xff}, 11), "h"),
		"origin past end":    append(rawNetwork("a", []byte{familyNone}, []byte{1}, "")[:6], 200, 'h'),
		"tombstone and addr": rawNetwork("a", []byte{familyNone, 10, 0, 0, 0, 8}, []byte{1}, "h"),
		"padded count":       {msgNetworks, 0x80, 0x00},
		"count too big":      {msgNetworks, 2, 1, 'a', familyNone, 1, 0},
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			if ns, err := DecodeNetworks(b); err == nil {
				t.Fatalf("decoded %v", ns)
			}
		})
	}
}

func TestDecodeNetworksHostileCount(t *testing.T) {
	for _, count := range []uint64{2, 1000, 1 << 40, math.MaxUint64} {
		b := binary.AppendUvarint([]byte{msgNetworks}, count)
		// One real network: the count claims more than the bytes hold.
		b = append(b, rawNetwork("a", v4Prefix(10, 0, 0, 0, 8), []byte{1}, "h")[2:]...)
		// Bytes, not allocations: one make() of a count's worth of
		// records would be a single allocation too. (The count of
		// allocations also varies under the race detector.)
		if n := allocatedBytes(func() {
			if _, err := DecodeNetworks(b); err == nil {
				t.Fatalf("count %d: no error", count)
			}
		}); n > 1024 {
			t.Errorf("count %d: %d bytes allocated for a rejected message of %d bytes", count, n, len(b))
		}
	}
}

// The seed corpus is also in testdata/fuzz/FuzzDecodeNetworks.
func FuzzDecodeNetworks(f *testing.F) {
	f.Add(EncodeNetworks(nil))
	f.Add(EncodeNetworks(sampleNetworks()))
	f.Add(rawNetwork("a", v4Prefix(10, 0, 0, 1, 8), []byte{1}, "h"))
	f.Fuzz(func(t *testing.T, b []byte) {
		strictRoundTrip(t, b, DecodeNetworks, noErr(EncodeNetworks))
	})
}
