package filter

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

func TestPrefixRange(t *testing.T) {
	for _, tc := range []struct {
		prefix     string
		start, end string // end "" = runs to the family's last address
	}{
		{"100.64.1.0/24", "100.64.1.0", "100.64.2.0"},
		{"100.64.1.7/32", "100.64.1.7", "100.64.1.8"},
		{"100.64.0.0/10", "100.64.0.0", "100.128.0.0"},
		{"0.0.0.0/0", "0.0.0.0", ""},
		{"255.255.255.0/24", "255.255.255.0", ""},
		{"fd00:64:1::/64", "fd00:64:1::", "fd00:64:1:1::"},
		{"fd00:64:1:ffff:ffff:ffff:ffff:ffff/128", "fd00:64:1:ffff:ffff:ffff:ffff:ffff", "fd00:64:2::"},
		{"::/0", "::", ""},
		{"ffff::/16", "ffff::", ""},
	} {
		got := prefixRange(netip.MustParsePrefix(tc.prefix))
		var want interval
		want.start = netip.MustParseAddr(tc.start)
		if tc.end != "" {
			want.end = netip.MustParseAddr(tc.end)
		}
		if got != want {
			t.Errorf("prefixRange(%s) = [%v, %v), want [%v, %v)", tc.prefix, got.start, got.end, want.start, want.end)
		}
	}
}

func TestMergeIntervals(t *testing.T) {
	pp := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	a := netip.MustParseAddr
	for _, tc := range []struct {
		name string
		in   []netip.Prefix
		want []interval
	}{
		{"none", nil, nil},
		{"unsorted, apart", pp("100.64.3.0/24", "100.64.1.0/24"), []interval{
			{a("100.64.1.0"), a("100.64.2.0")}, {a("100.64.3.0"), a("100.64.4.0")},
		}},
		{"adjacent merge", pp("100.64.2.0/24", "100.64.1.0/24"), []interval{{a("100.64.1.0"), a("100.64.3.0")}}},
		{"contained", pp("100.64.0.0/16", "100.64.9.0/24"), []interval{{a("100.64.0.0"), a("100.65.0.0")}}},
		{"unmasked input", pp("100.64.1.9/24"), []interval{{a("100.64.1.0"), a("100.64.2.0")}}},
		{"to the top swallows the rest", pp("255.0.0.0/8", "255.255.0.0/16", "10.0.0.0/8"), []interval{
			{a("10.0.0.0"), a("11.0.0.0")}, {start: a("255.0.0.0")},
		}},
		{"v6 everything", pp("::/0", "fd00::/8"), []interval{{start: a("::")}}},
	} {
		got := mergeIntervals(tc.in)
		if len(got) != len(tc.want) {
			t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
			continue
		}
		for i := range got {
			if got[i] != tc.want[i] {
				t.Errorf("%s: got %v, want %v", tc.name, got, tc.want)
				break
			}
		}
	}
}

func TestSetElements(t *testing.T) {
	a := netip.MustParseAddr
	type el struct {
		key string
		end bool
	}
	check := func(name string, got []nftables.SetElement, want []el) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: %d elements, want %d: %v", name, len(got), len(want), got)
		}
		for i, w := range want {
			k, _ := netip.AddrFromSlice(got[i].Key)
			if k != a(w.key) || got[i].IntervalEnd != w.end {
				t.Errorf("%s: element %d = %v end=%v, want %s end=%v", name, i, k, got[i].IntervalEnd, w.key, w.end)
			}
		}
	}
	check("two v4", setElements([]interval{{a("100.64.1.0"), a("100.64.2.0")}, {a("100.64.3.0"), a("100.64.4.0")}}, 4), []el{
		{"0.0.0.0", true}, {"100.64.1.0", false}, {"100.64.2.0", true}, {"100.64.3.0", false}, {"100.64.4.0", true},
	})
	check("from zero to top", setElements([]interval{{start: a("::")}}, 16), []el{{"::", false}})
	check("to top", setElements([]interval{{start: a("ff00::")}}, 16), []el{{"::", true}, {"ff00::", false}})
	if got := setElements(nil, 4); len(got) != 0 {
		t.Errorf("empty: %v", got)
	}
}

func TestClampMSS(t *testing.T) {
	if got := clampMSS(fam4, 1420); got != 1380 {
		t.Errorf("IPv4 MSS for MTU 1420 = %d, want 1380", got)
	}
	if got := clampMSS(fam6, 1420); got != 1360 {
		t.Errorf("IPv6 MSS for MTU 1420 = %d, want 1360", got)
	}
}

func TestBuildRejectsBadInput(t *testing.T) {
	for name, r := range map[string]Ruleset{
		"zero prefix":   {Networks: []Network{{Name: "a", Prefix: netip.Prefix{}}}},
		"mapped prefix": {Networks: []Network{{Name: "a", Prefix: netip.MustParsePrefix("::ffff:100.64.1.0/120")}}},
		"long device":   {TunnelDev: "an-interface-name-too-long", TunnelMTU: 1420},
		"NUL in device": {TunnelDev: "wg\x000", TunnelMTU: 1420},
		"no MTU":        {TunnelDev: "vmr0"},
		"MTU too small": {TunnelDev: "vmr0", TunnelMTU: 100},
		"MTU too large": {TunnelDev: "vmr0", TunnelMTU: 70000},
		"negative MTU":  {TunnelDev: "vmr0", TunnelMTU: -1},
		"one good, one bad": {Networks: []Network{
			{Name: "a", Prefix: netip.MustParsePrefix("100.64.1.0/24")},
			{Name: "b"},
		}},
	} {
		if _, err := build("vmroam", r); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := New(strings.Repeat("x", 300)); err == nil {
		t.Error("New with a 300-byte name: no error")
	}
	if _, err := NewInNamespace("", -1); err == nil {
		t.Error("NewInNamespace with fd -1: no error")
	}
}

func TestBuildLayout(t *testing.T) {
	p, err := build("vmroam", Ruleset{
		Networks: []Network{
			{Name: "A", Prefix: netip.MustParsePrefix("100.64.1.0/24")},
			{Name: "A6", Prefix: netip.MustParsePrefix("fd00:64:1::/64")},
			{Name: "B", Prefix: netip.MustParsePrefix("100.64.2.0/24")},
		},
		TunnelDev: "vmr0", TunnelMTU: 1420,
	})
	if err != nil {
		t.Fatal(err)
	}
	l := p.layout()
	// forward: 2 ICMP accepts + 1 per network; mangle: 2 directions x 2 families.
	if l.rules[chainForward] != 5 || l.rules[chainMangle] != 4 || len(l.rules) != 2 {
		t.Errorf("rules per chain = %v", l.rules)
	}
	// nets4: zero end, then one merged interval (A and B are adjacent).
	if l.elems[setNets4] != 3 || l.elems[setNets6] != 3 {
		t.Errorf("elements per set = %v", l.elems)
	}

	// The MSS rules write exactly the clamp value, per family.
	var mss []int
	for _, r := range p.rules {
		if r.Chain.Name != chainMangle {
			continue
		}
		for _, e := range r.Exprs {
			if im, ok := e.(*expr.Immediate); ok {
				mss = append(mss, int(im.Data[0])<<8|int(im.Data[1]))
			}
		}
	}
	if len(mss) != 4 || mss[0] != 1380 || mss[1] != 1360 || mss[2] != 1380 || mss[3] != 1360 {
		t.Errorf("clamped MSS values = %v", mss)
	}

	// Without a tunnel device there is no mangle chain at all.
	p, err = build("vmroam", Ruleset{})
	if err != nil {
		t.Fatal(err)
	}
	if l := p.layout(); len(l.rules) != 1 || l.rules[chainForward] != 2 {
		t.Errorf("empty ruleset: rules per chain = %v", l.rules)
	}
}

func TestIsolateMasksBothAddresses(t *testing.T) {
	exprs := isolate(netip.MustParsePrefix("fd00:64:1::/64"))
	var masks, cmps int
	for _, e := range exprs {
		switch e := e.(type) {
		case *expr.Bitwise:
			masks++
			if !bytes.Equal(e.Mask, append(bytes.Repeat([]byte{0xff}, 8), make([]byte, 8)...)) {
				t.Errorf("mask %x", e.Mask)
			}
		case *expr.Lookup:
			if e.SetName != setNets6 {
				t.Errorf("looks up %s", e.SetName)
			}
		case *expr.Cmp:
			cmps++
		}
	}
	if masks != 2 || cmps != 3 {
		t.Errorf("%d masks and %d compares, want 2 and 3", masks, cmps)
	}
}
