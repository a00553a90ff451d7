package gossip

import (
	"fmt"
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
	r, ok := tb.claim(vip, "a")
	if !ok || r != (Record{VIP: vip, Owner: "a", Epoch: 1}) {
		t.Fatalf("first claim = %v, %v", r, ok)
	}
	if r, ok = tb.claim(vip, "b"); !ok || r.Epoch != 2 {
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
