package gossip

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestSupersedesTotalOrder(t *testing.T) {
	vip := netip.MustParseAddr("100.64.0.1")
	var rs []Record
	for e := range uint64(4) {
		for _, o := range []string{"", "a", "ab", "b"} {
			rs = append(rs, Record{VIP: vip, Owner: o, Epoch: e})
		}
	}
	for _, a := range rs {
		if a.Supersedes(a) {
			t.Errorf("%v supersedes itself", a)
		}
		for _, b := range rs {
			if a == b {
				continue
			}
			if a.Supersedes(b) == b.Supersedes(a) {
				t.Errorf("%v vs %v: exactly one must win", a, b)
			}
			for _, c := range rs {
				if a.Supersedes(b) && b.Supersedes(c) && !a.Supersedes(c) {
					t.Errorf("not transitive: %v > %v > %v", a, b, c)
				}
			}
		}
	}
	if !(Record{Epoch: 2}).Supersedes(Record{Epoch: 1, Owner: "zzz"}) {
		t.Error("a higher epoch must win over a greater owner")
	}
}

// reference computes what any merge order must end in: the greatest record
// per VIP, and as conflicts the non-empty owners at that greatest epoch when
// there are two or more.
func reference(rs []Record) ([]Record, []Conflict) {
	best := map[netip.Addr]Record{}
	for _, r := range rs {
		if cur, ok := best[r.VIP]; !ok || r.Supersedes(cur) {
			best[r.VIP] = r
		}
	}
	var out []Record
	var cs []Conflict
	for vip, b := range best {
		out = append(out, b)
		set := map[string]struct{}{}
		for _, r := range rs {
			if r.VIP == vip && r.Epoch == b.Epoch && r.Owner != "" {
				set[r.Owner] = struct{}{}
			}
		}
		if len(set) >= 2 {
			cs = append(cs, Conflict{VIP: vip, Epoch: b.Epoch, Owners: sortedOwners(set)})
		}
	}
	slices.SortFunc(out, func(a, b Record) int { return a.VIP.Compare(b.VIP) })
	slices.SortFunc(cs, func(a, b Conflict) int { return a.VIP.Compare(b.VIP) })
	if cs == nil {
		cs = []Conflict{}
	}
	return out, cs
}

func TestMergeOrderIndependent(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	vips := []netip.Addr{
		netip.MustParseAddr("100.64.0.1"),
		netip.MustParseAddr("100.64.0.2"),
		netip.MustParseAddr("fd7a::1"),
		netip.MustParseAddr("fd7a::2"),
	}
	owners := []string{"", "a", "b", "c"}
	for set := range 200 {
		n := 1 + rng.IntN(20)
		rs := make([]Record, 0, 2*n)
		for range n {
			rs = append(rs, Record{
				VIP:   vips[rng.IntN(len(vips))],
				Owner: owners[rng.IntN(len(owners))],
				Epoch: uint64(rng.IntN(4)),
			})
		}
		// Duplicates must not matter either.
		for range rng.IntN(n + 1) {
			rs = append(rs, rs[rng.IntN(len(rs))])
		}
		wantRecs, wantConf := reference(rs)
		for perm := range 30 {
			rng.Shuffle(len(rs), func(i, j int) { rs[i], rs[j] = rs[j], rs[i] })
			tb := NewTable()
			for _, r := range rs {
				tb.Merge(r)
			}
			if got := tb.Records(); !reflect.DeepEqual(got, wantRecs) {
				t.Fatalf("set %d perm %d: records\n got %v\nwant %v\ninput %v", set, perm, got, wantRecs, rs)
			}
			if got := tb.Conflicts(); !reflect.DeepEqual(got, wantConf) {
				t.Fatalf("set %d perm %d: conflicts\n got %v\nwant %v\ninput %v", set, perm, got, wantConf, rs)
			}
		}
	}
}

func TestMergeResult(t *testing.T) {
	vip := netip.MustParseAddr("100.64.0.1")
	tb := NewTable()
	steps := []struct {
		r    Record
		want bool
	}{
		{Record{VIP: vip, Owner: "b", Epoch: 2}, true},
		{Record{VIP: vip, Owner: "b", Epoch: 2}, false}, // duplicate
		{Record{VIP: vip, Owner: "z", Epoch: 1}, false}, // older
		{Record{VIP: vip, Owner: "a", Epoch: 2}, false}, // smaller owner
		{Record{VIP: vip, Owner: "c", Epoch: 2}, true},
		{Record{VIP: vip, Owner: "", Epoch: 3}, true}, // tombstone
	}
	for i, s := range steps {
		if got := tb.Merge(s.r); got != s.want {
			t.Errorf("step %d: Merge(%v) = %v, want %v", i, s.r, got, s.want)
		}
	}
	if r, ok := tb.Get(vip); !ok || r != steps[len(steps)-1].r {
		t.Errorf("Get = %v, %v", r, ok)
	}
	// A mapped VIP is the same VIP.
	if r, ok := tb.Get(netip.MustParseAddr("::ffff:100.64.0.1")); !ok || r.Epoch != 3 {
		t.Errorf("Get(mapped) = %v, %v", r, ok)
	}
	if tb.Merge(Record{VIP: netip.MustParseAddr("::ffff:100.64.0.1"), Owner: "d", Epoch: 4}) == false {
		t.Error("mapped VIP was not merged")
	}
	if r, _ := tb.Get(vip); r.Owner != "d" || !r.VIP.Is4() {
		t.Errorf("mapped merge stored %v", r)
	}
}

func TestMergeRejectsInvalid(t *testing.T) {
	tb := NewTable()
	for _, r := range []Record{
		{VIP: netip.Addr{}, Owner: "a", Epoch: 1},
		{VIP: netip.IPv4Unspecified(), Owner: "a", Epoch: 1},
		{VIP: netip.MustParseAddr("ff02::1"), Owner: "a", Epoch: 1},
		{VIP: netip.MustParseAddr("fe80::1%eth0"), Owner: "a", Epoch: 1},
		{VIP: netip.MustParseAddr("100.64.0.1"), Owner: strings.Repeat("o", MaxOwnerLen+1), Epoch: 1},
	} {
		if tb.Merge(r) {
			t.Errorf("merged invalid %v", r)
		}
	}
	if n := len(tb.Records()); n != 0 {
		t.Fatalf("%d records after invalid merges", n)
	}
}

func TestConflicts(t *testing.T) {
	vip := netip.MustParseAddr("100.64.0.7")
	other := netip.MustParseAddr("100.64.0.8")
	tb := NewTable()
	tb.Merge(Record{VIP: vip, Owner: "host-a", Epoch: 5})
	tb.Merge(Record{VIP: other, Owner: "host-a", Epoch: 5})
	if cs := tb.Conflicts(); len(cs) != 0 {
		t.Fatalf("conflicts before any: %v", cs)
	}
	tb.Merge(Record{VIP: vip, Owner: "host-b", Epoch: 5})
	tb.Merge(Record{VIP: vip, Owner: "", Epoch: 5})       // a tombstone is no claim
	tb.Merge(Record{VIP: vip, Owner: "host-c", Epoch: 4}) // older epoch
	tb.Merge(Record{VIP: vip, Owner: "host-a", Epoch: 5}) // already counted
	want := []Conflict{{VIP: vip, Epoch: 5, Owners: []string{"host-a", "host-b"}}}
	if cs := tb.Conflicts(); !reflect.DeepEqual(cs, want) {
		t.Fatalf("conflicts = %v, want %v", cs, want)
	}
	tb.Merge(Record{VIP: vip, Owner: "host-0", Epoch: 5}) // loses, still a claim
	want[0].Owners = []string{"host-0", "host-a", "host-b"}
	if cs := tb.Conflicts(); !reflect.DeepEqual(cs, want) {
		t.Fatalf("conflicts = %v, want %v", cs, want)
	}
	if r, _ := tb.Get(vip); r.Owner != "host-b" {
		t.Fatalf("winner %v, want host-b", r)
	}
	tb.Merge(Record{VIP: vip, Owner: "host-a", Epoch: 6})
	if cs := tb.Conflicts(); len(cs) != 0 {
		t.Fatalf("conflicts after a higher epoch: %v", cs)
	}
}

func TestTableClaimRelease(t *testing.T) {
	vip := netip.MustParseAddr("100.64.0.9")
	tb := NewTable()
	r, ok, _ := tb.claim(vip, "a")
	if !ok || r != (Record{VIP: vip, Owner: "a", Epoch: 1}) {
		t.Fatalf("first claim = %v, %v", r, ok)
	}
	if r, ok, _ = tb.claim(vip, "b"); !ok || r.Epoch != 2 {
		t.Fatalf("second claim = %v, %v", r, ok)
	}
	if _, ok := tb.release(vip, "a"); ok {
		t.Fatal("a released a VIP b owns")
	}
	if r, ok = tb.release(vip, "b"); !ok || r != (Record{VIP: vip, Epoch: 3}) {
		t.Fatalf("release = %v, %v", r, ok)
	}
	if _, ok := tb.release(vip, "b"); ok {
		t.Fatal("released twice")
	}
}

func ExampleRecord_Supersedes() {
	a := Record{Owner: "host-a", Epoch: 3}
	b := Record{Owner: "host-b", Epoch: 3}
	fmt.Println(b.Supersedes(a), a.Supersedes(b))
	// Output: true false
}

func TestMergeNetworkResult(t *testing.T) {
	tb := NewTable()
	p1, p2 := mp("100.64.0.0/16"), mp("100.65.0.0/16")
	steps := []struct {
		n    Network
		want bool
	}{
		{Network{Name: "a", Prefix: p1, Epoch: 2, Origin: "h2"}, true},
		{Network{Name: "a", Prefix: p1, Epoch: 2, Origin: "h2"}, false}, // duplicate
		{Network{Name: "a", Prefix: p2, Epoch: 1, Origin: "h9"}, false}, // older
		{Network{Name: "a", Prefix: p2, Epoch: 2, Origin: "h1"}, false}, // smaller origin
		{Network{Name: "a", Prefix: p2, Epoch: 2, Origin: "h3"}, true},
		{Network{Name: "a", Epoch: 3, Origin: "h1"}, true}, // tombstone
		{Network{Name: "a", Prefix: p1, Epoch: 3, Origin: "h0"}, false},
		{Network{Name: "A", Prefix: p1, Epoch: 9}, false},                  // invalid name
		{Network{Name: "b", Prefix: mp("100.64.0.1/16"), Epoch: 9}, false}, // unmasked
		{Network{Name: "b", Prefix: p2, Epoch: 0}, true},
	}
	for i, s := range steps {
		if got := tb.MergeNetwork(s.n); got != s.want {
			t.Errorf("step %d: MergeNetwork(%v) = %v, want %v", i, s.n, got, s.want)
		}
	}
	if n, ok := tb.Network("a"); !ok || n != steps[5].n || !n.Removed() {
		t.Errorf("Network(a) = %v, %v; want the tombstone", n, ok)
	}
	if _, ok := tb.Network("A"); ok {
		t.Error("an invalid network was stored")
	}
	if _, ok := tb.Network("never"); ok {
		t.Error("Network(never) ok")
	}
	if got, want := tb.Networks(), []Network{steps[9].n}; !reflect.DeepEqual(got, want) {
		t.Errorf("Networks = %v, want %v", got, want)
	}
	if got, want := tb.NetworkVersions(), []Network{steps[5].n, steps[9].n}; !reflect.DeepEqual(got, want) {
		t.Errorf("NetworkVersions = %v, want %v", got, want)
	}
}

// referenceActive computes the active networks straight from the rule:
// live networks by name, each kept unless it overlaps one kept before it.
func referenceActive(versions []Network) (live, active []Network) {
	best := map[string]Network{}
	for _, n := range versions {
		if cur, ok := best[n.Name]; !ok || n.Supersedes(cur) {
			best[n.Name] = n
		}
	}
	for _, n := range best {
		if !n.Removed() {
			live = append(live, n)
		}
	}
	slices.SortFunc(live, compareNetworkNames)
	active = []Network{}
next:
	for _, n := range live {
		for _, a := range active {
			if n.Prefix.Overlaps(a.Prefix) {
				continue next
			}
		}
		active = append(active, n)
	}
	if live == nil {
		live = []Network{}
	}
	return live, active
}

// checkOverlaps checks that ov pairs exactly each active network with each
// inactive live network it overlaps.
func checkOverlaps(t *testing.T, live, active []Network, ov []NetworkOverlap) {
	t.Helper()
	isActive := func(n Network) bool { return slices.Contains(active, n) }
	var want []NetworkOverlap
	for _, w := range active {
		for _, l := range live {
			if !isActive(l) && Overlaps(w.Prefix, l.Prefix) {
				want = append(want, NetworkOverlap{Winner: w, Loser: l})
			}
		}
	}
	if want == nil {
		want = []NetworkOverlap{}
	}
	if !reflect.DeepEqual(ov, want) {
		t.Fatalf("overlaps\n got %v\nwant %v", ov, want)
	}
	for _, l := range live {
		lost := slices.ContainsFunc(ov, func(o NetworkOverlap) bool { return o.Loser == l })
		if lost == isActive(l) {
			t.Fatalf("%v: active %v but loses %v", l, isActive(l), lost)
		}
	}
}

func TestMergeNetworkOrderIndependent(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	names := []string{"a", "b", "c", "d", "e"}
	prefixes := []netip.Prefix{
		{}, {},
		mp("10.0.0.0/8"), mp("10.0.0.0/16"), mp("10.0.1.0/24"), mp("10.0.2.0/24"), mp("10.1.0.0/16"),
		mp("fd00::/48"), mp("fd00:0:0:1::/64"), mp("fd00:1::/48"),
	}
	origins := []string{"", "h1", "h2"}
	for set := range 200 {
		n := 1 + rng.IntN(20)
		ns := make([]Network, 0, 2*n)
		for range n {
			ns = append(ns, Network{
				Name:   names[rng.IntN(len(names))],
				Prefix: prefixes[rng.IntN(len(prefixes))],
				Epoch:  uint64(rng.IntN(4)),
				Origin: origins[rng.IntN(len(origins))],
			})
		}
		// Duplicates must not matter either.
		for range rng.IntN(n + 1) {
			ns = append(ns, ns[rng.IntN(len(ns))])
		}
		wantLive, wantActive := referenceActive(ns)
		var wantOverlaps []NetworkOverlap
		var wantVersions []Network
		for perm := range 30 {
			rng.Shuffle(len(ns), func(i, j int) { ns[i], ns[j] = ns[j], ns[i] })
			tb := NewTable()
			for _, nw := range ns {
				tb.MergeNetwork(nw)
			}
			fail := func(what string, got, want any) {
				t.Fatalf("set %d perm %d: %s\n got %v\nwant %v\ninput %v", set, perm, what, got, want, ns)
			}
			if got := tb.Networks(); !reflect.DeepEqual(got, wantLive) {
				fail("networks", got, wantLive)
			}
			if got := tb.ActiveNetworks(); !reflect.DeepEqual(got, wantActive) {
				fail("active networks", got, wantActive)
			}
			ov, versions := tb.NetworkOverlaps(), tb.NetworkVersions()
			if perm == 0 {
				checkOverlaps(t, wantLive, wantActive, ov)
				wantOverlaps, wantVersions = ov, versions
			}
			if !reflect.DeepEqual(ov, wantOverlaps) {
				fail("overlaps", ov, wantOverlaps)
			}
			if !reflect.DeepEqual(versions, wantVersions) {
				fail("versions", versions, wantVersions)
			}
		}
	}
}

func TestNetworkOverlapsChain(t *testing.T) {
	a := Network{Name: "a", Prefix: mp("10.1.0.0/16"), Epoch: 1}
	b := Network{Name: "b", Prefix: mp("10.0.0.0/8"), Epoch: 1}
	c := Network{Name: "c", Prefix: mp("10.2.0.0/16"), Epoch: 1}
	d := Network{Name: "d", Prefix: mp("10.1.2.0/24"), Epoch: 1}
	e := Network{Name: "e", Prefix: mp("100.64.0.0/16"), Epoch: 1}
	tb := NewTable()
	for _, n := range []Network{e, d, c, b, a} {
		tb.MergeNetwork(n)
	}
	if got, want := tb.ActiveNetworks(), []Network{a, c, e}; !reflect.DeepEqual(got, want) {
		t.Errorf("active %v, want %v", got, want)
	}
	// b and d overlap each other too, but neither holds its prefix.
	want := []NetworkOverlap{{a, b}, {a, d}, {c, b}}
	if got := tb.NetworkOverlaps(); !reflect.DeepEqual(got, want) {
		t.Errorf("overlaps %v, want %v", got, want)
	}
	// The operator removes a: b wins over c and d now.
	tb.MergeNetwork(Network{Name: "a", Epoch: 2})
	if got, want := tb.ActiveNetworks(), []Network{b, e}; !reflect.DeepEqual(got, want) {
		t.Errorf("after removing a: active %v, want %v", got, want)
	}
	want = []NetworkOverlap{{b, c}, {b, d}}
	if got := tb.NetworkOverlaps(); !reflect.DeepEqual(got, want) {
		t.Errorf("after removing a: overlaps %v, want %v", got, want)
	}
}

func TestNetworkOf(t *testing.T) {
	blue := Network{Name: "blue", Prefix: mp("100.64.0.0/16"), Epoch: 1}
	shadow := Network{Name: "shadow", Prefix: mp("100.64.1.0/24"), Epoch: 1}
	six := Network{Name: "six", Prefix: mp("fd7a:115c::/48"), Epoch: 1}
	tb := NewTable()
	if _, ok := tb.NetworkOf(netip.MustParseAddr("100.64.1.1")); ok {
		t.Error("NetworkOf in an empty table")
	}
	for _, n := range []Network{shadow, blue, six, {Name: "gone", Epoch: 1}} {
		tb.MergeNetwork(n)
	}
	cases := []struct {
		addr string
		want Network
		ok   bool
	}{
		{"100.64.0.1", blue, true},
		{"100.64.1.1", blue, true}, // shadow lost to blue
		{"::ffff:100.64.255.255", blue, true},
		{"fd7a:115c::10", six, true},
		{"100.65.0.1", Network{}, false},
		{"fd7a:115d::1", Network{}, false},
	}
	for _, c := range cases {
		got, ok := tb.NetworkOf(netip.MustParseAddr(c.addr))
		if ok != c.ok || got != c.want {
			t.Errorf("NetworkOf(%s) = %v, %v; want %v, %v", c.addr, got, ok, c.want, c.ok)
		}
	}
	if _, ok := tb.NetworkOf(netip.Addr{}); ok {
		t.Error("NetworkOf(zero) ok")
	}
}

func TestTableDeclareRemoveNetwork(t *testing.T) {
	tb := NewTable()
	blue := mp("100.64.0.0/16")
	n, changed, err := tb.declareNetwork("blue", blue, "h1")
	if want := (Network{Name: "blue", Prefix: blue, Epoch: 1, Origin: "h1"}); err != nil || !changed || n != want {
		t.Fatalf("declare = %v, %v, %v; want %v", n, changed, err, want)
	}
	// Again, from another member: a no-op that returns the current version.
	if again, changed, err := tb.declareNetwork("blue", blue, "h2"); err != nil || changed || again != n {
		t.Fatalf("declaring again = %v, %v, %v", again, changed, err)
	}
	refusals := []struct {
		name   string
		prefix netip.Prefix
		want   string
	}{
		{"green", mp("100.64.1.0/24"), `network "green" (100.64.1.0/24) overlaps network "blue" (100.64.0.0/16)`},
		{"green", mp("100.0.0.0/8"), `network "green" (100.0.0.0/8) overlaps network "blue" (100.64.0.0/16)`},
		{"blue", mp("100.65.0.0/16"), `network "blue" already has prefix 100.64.0.0/16; remove it first`},
		{"Green", mp("100.65.0.0/16"), "must start"},
		{"green", mp("100.65.0.1/16"), `network "green": prefix 100.65.0.1/16 has host bits set`},
		{"green", netip.Prefix{}, "prefix is not set"},
	}
	for _, r := range refusals {
		if n, _, err := tb.declareNetwork(r.name, r.prefix, "h1"); err == nil || !strings.Contains(err.Error(), r.want) {
			t.Errorf("declare %s %s = %v, %v; want an error with %q", r.name, r.prefix, n, err, r.want)
		}
	}
	if got := tb.NetworkVersions(); len(got) != 1 {
		t.Fatalf("refusals changed the table: %v", got)
	}

	if _, ok := tb.removeNetwork("green", "h1"); ok {
		t.Error("removed an unknown network")
	}
	rm, ok := tb.removeNetwork("blue", "h2")
	if want := (Network{Name: "blue", Epoch: 2, Origin: "h2"}); !ok || rm != want {
		t.Fatalf("remove = %v, %v; want %v", rm, ok, want)
	}
	if _, ok := tb.removeNetwork("blue", "h2"); ok {
		t.Error("removed twice")
	}
	// Removed, the name and the space are free again, at the next epoch.
	n, changed, err = tb.declareNetwork("green", mp("100.64.1.0/24"), "h1")
	if err != nil || !changed || n.Epoch != 1 {
		t.Fatalf("declare green after removing blue = %v, %v, %v", n, changed, err)
	}
	n, changed, err = tb.declareNetwork("blue", mp("fd7a::/48"), "h3")
	if want := (Network{Name: "blue", Prefix: mp("fd7a::/48"), Epoch: 3, Origin: "h3"}); err != nil || !changed || n != want {
		t.Fatalf("declare blue again = %v, %v, %v; want %v", n, changed, err, want)
	}

	// Nothing can follow the last epoch.
	tb.MergeNetwork(Network{Name: "last", Epoch: math.MaxUint64})
	if _, _, err := tb.declareNetwork("last", mp("10.0.0.0/8"), "h1"); err == nil || !strings.Contains(err.Error(), "epoch exhausted") {
		t.Errorf("declare at the last epoch: %v", err)
	}
	tb.MergeNetwork(Network{Name: "end", Prefix: mp("10.0.0.0/8"), Epoch: math.MaxUint64})
	if _, ok := tb.removeNetwork("end", "h1"); ok {
		t.Error("removed at the last epoch")
	}
}

func ExampleTable_ActiveNetworks() {
	tb := NewTable()
	// Two members declared overlapping networks during a partition.
	tb.MergeNetwork(Network{Name: "red", Prefix: netip.MustParsePrefix("100.64.0.0/16"), Epoch: 1, Origin: "host-a"})
	tb.MergeNetwork(Network{Name: "blue", Prefix: netip.MustParsePrefix("100.64.8.0/24"), Epoch: 1, Origin: "host-b"})
	for _, n := range tb.ActiveNetworks() {
		fmt.Println("active:", n.Name, n.Prefix)
	}
	for _, o := range tb.NetworkOverlaps() {
		fmt.Println("inactive:", o.Loser.Name, "overlaps", o.Winner.Name)
	}
	// Output:
	// active: blue 100.64.8.0/24
	// inactive: red overlaps blue
}
