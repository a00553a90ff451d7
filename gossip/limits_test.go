package gossip

import (
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"testing"
)

// nthVIP is the i-th address of 100.64.0.0/10 (i < 2^22).
func nthVIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{100, 64 | byte(i>>16), byte(i >> 8), byte(i)})
}

func TestTableLimitsRecords(t *testing.T) {
	tb := NewTableLimits(Limits{Records: 10, RecordsPerOwner: 4})
	for i := range 4 {
		if !tb.Merge(Record{VIP: nthVIP(i), Owner: "a", Epoch: 1}) {
			t.Fatalf("record %d of a refused under its cap", i)
		}
	}
	// Over a's cap: a new VIP, and a VIP of another owner taken over.
	if tb.Merge(Record{VIP: nthVIP(4), Owner: "a", Epoch: 1}) {
		t.Error("a's fifth VIP merged, cap 4")
	}
	tb.Merge(Record{VIP: nthVIP(5), Owner: "b", Epoch: 1})
	if tb.Merge(Record{VIP: nthVIP(5), Owner: "a", Epoch: 2}) {
		t.Error("a took b's VIP over its cap")
	}
	if r, _ := tb.Get(nthVIP(5)); r.Owner != "b" {
		t.Errorf("b's VIP is now %v", r)
	}
	// A newer record of a VIP a owns already needs no room.
	if !tb.Merge(Record{VIP: nthVIP(0), Owner: "a", Epoch: 2}) {
		t.Error("a's newer record of its own VIP refused")
	}
	// A release frees a's room; its tombstone needs none.
	if !tb.Merge(Record{VIP: nthVIP(1), Epoch: 2}) {
		t.Fatal("tombstone of a's VIP refused")
	}
	if !tb.Merge(Record{VIP: nthVIP(4), Owner: "a", Epoch: 1}) {
		t.Error("a's VIP refused after a release made room")
	}
	// The whole table: 6 records now (5 VIPs of a and b, one tombstone).
	for i := 6; i < 10; i++ {
		if !tb.Merge(Record{VIP: nthVIP(i), Owner: fmt.Sprint("o", i), Epoch: 1}) {
			t.Fatalf("record %d refused under the total cap", i)
		}
	}
	if tb.Merge(Record{VIP: nthVIP(10), Owner: "c", Epoch: 1}) || tb.Merge(Record{VIP: nthVIP(11), Epoch: 3}) {
		t.Error("a record or tombstone of a new VIP merged into a full table")
	}
	// Replacing held records still works in a full table.
	if !tb.Merge(Record{VIP: nthVIP(6), Owner: "c", Epoch: 2}) || !tb.Merge(Record{VIP: nthVIP(7), Epoch: 2}) {
		t.Error("a held VIP's newer record refused in a full table")
	}
	if n, _ := tb.Size(); n != 10 {
		t.Errorf("table holds %d records, cap 10", n)
	}
	want := map[string]uint64{"a": 2, "c": 1, OverCapReleased: 1}
	if got := tb.OverCap(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("OverCap = %v, want %v", got, want)
	}
	// A local claim over a cap fails, saying which.
	_, _, err := tb.claim(nthVIP(20), "o6")
	if !errors.Is(err, ErrOverCap) {
		t.Fatalf("claim in a full table: %v", err)
	}
	t.Logf("full table: %v", err)
	tb2 := NewTableLimits(Limits{RecordsPerOwner: 1})
	tb2.claim(nthVIP(0), "me")
	if _, _, err := tb2.claim(nthVIP(1), "me"); !errors.Is(err, ErrOverCap) {
		t.Fatalf("claim over the owner's cap: %v", err)
	} else {
		t.Logf("owner at its cap: %v", err)
	}
	if len(tb2.OverCap()) != 0 {
		t.Errorf("local claims counted in OverCap: %v", tb2.OverCap())
	}
}

// TestTableFloodKeepsOthers floods a default table from one owner, then
// from 100,000 invented owners: every other owner's records stay as they
// were, the flood stops at the caps, and OverCap names a bounded number of
// owners.
func TestTableFloodKeepsOthers(t *testing.T) {
	tb := NewTable()
	var honest []Record
	for i := range 1000 {
		r := Record{VIP: nthVIP(i), Owner: fmt.Sprint("h", i%10), Epoch: 3}
		honest = append(honest, r)
		tb.Merge(r)
	}
	// One owner: new VIPs, and the honest ones at higher epochs.
	next := 1000
	for range DefaultMaxRecordsPerOwner + 5000 {
		tb.Merge(Record{VIP: nthVIP(next), Owner: "rogue", Epoch: 1})
		next++
	}
	for _, r := range honest {
		tb.Merge(Record{VIP: r.VIP, Owner: "rogue", Epoch: 9})
	}
	if got := tb.OverCap()["rogue"]; got != 5000+1000 {
		t.Errorf("rogue refused %d times, want %d", got, 6000)
	}
	// Invented owners, one VIP each, until the total is full.
	for i := range 200_000 {
		tb.Merge(Record{VIP: nthVIP(next), Owner: fmt.Sprint("x", i), Epoch: 1})
		next++
	}
	n, _ := tb.Size()
	if n != DefaultMaxRecords {
		t.Errorf("table holds %d records, cap %d", n, DefaultMaxRecords)
	}
	for _, r := range honest {
		if got, _ := tb.Get(r.VIP); got != r {
			t.Fatalf("honest record %v is now %v", r, got)
		}
	}
	oc := tb.OverCap()
	if len(oc) > maxOverCapOwners+1 || oc[OverCapOthers] == 0 {
		t.Errorf("OverCap names %d owners (others %d); want at most %d and the rest summed", len(oc), oc[OverCapOthers], maxOverCapOwners)
	}
	// An honest owner still moves its own VIPs and releases them.
	if !tb.Merge(Record{VIP: honest[0].VIP, Owner: "h1", Epoch: 4}) || !tb.Merge(Record{VIP: honest[1].VIP, Epoch: 4}) {
		t.Error("an honest owner's update refused in a full table")
	}
}

func TestTableLimitsNetworks(t *testing.T) {
	tb := NewTableLimits(Limits{Networks: 4, NetworksPerOrigin: 2})
	pfx := func(i int) netip.Prefix { return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i), 0, 0}), 16) }
	net := func(i int, origin string, epoch uint64) Network {
		return Network{Name: fmt.Sprint("n", i), Prefix: pfx(i), Epoch: epoch, Origin: origin}
	}
	if !tb.MergeNetwork(net(0, "a", 1)) || !tb.MergeNetwork(net(1, "a", 1)) {
		t.Fatal("a's networks refused under its cap")
	}
	if tb.MergeNetwork(net(2, "a", 1)) {
		t.Error("a's third network merged, cap 2")
	}
	// A removal of a held network takes no room, whoever writes it.
	if !tb.MergeNetwork(Network{Name: "n0", Epoch: 2, Origin: "a"}) {
		t.Error("a's removal of its own network refused")
	}
	if !tb.MergeNetwork(net(2, "b", 1)) || !tb.MergeNetwork(net(3, "b", 1)) {
		t.Fatal("b's networks refused under the caps")
	}
	if !tb.MergeNetwork(Network{Name: "n1", Epoch: 2, Origin: "b"}) {
		t.Error("b's removal of a's network refused")
	}
	if tb.MergeNetwork(net(4, "c", 1)) {
		t.Error("a fifth network merged, cap 4")
	}
	if _, _, err := tb.declareNetwork("n9", pfx(9), "c"); !errors.Is(err, ErrOverCap) {
		t.Errorf("declaring a network in a full table: %v", err)
	}
	if _, n := tb.Size(); n != 4 {
		t.Errorf("table holds %d networks, cap 4", n)
	}
	if got := tb.OverCap(); got["a"] != 1 || got["c"] != 1 {
		t.Errorf("OverCap = %v", got)
	}
}

// TestTableLimitsMemory measures what a full default table of records
// costs, the figure Limits' comment states.
func TestTableLimitsMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a table of 200,000 records")
	}
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	tb := NewTable()
	for i := range DefaultMaxRecords {
		tb.Merge(Record{VIP: nthVIP(i), Owner: fmt.Sprintf("host-%03d", i%1000), Epoch: 1})
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	n, _ := tb.Size()
	per := (int64(after.HeapAlloc) - int64(before.HeapAlloc)) / int64(n)
	runtime.KeepAlive(tb)
	t.Logf("%d records: %d bytes each, %.1f MiB", n, per, float64(per*int64(n))/(1<<20))
	if n != DefaultMaxRecords || per > 400 {
		t.Errorf("%d records at %d bytes each", n, per)
	}
}

// TestClusterOverCap: a member that claims more VIPs than a member's cap
// allows has the excess refused there, counted by owner, while the
// member's own claims beyond its cap fail with an error naming the cap.
func TestClusterOverCap(t *testing.T) {
	a := newNodeWith(t, 1, func(c *Config) { c.Keys, c.MaxRecordsPerOwner = [][]byte{key1}, 3 })
	flood := newNodeWith(t, 2, func(c *Config) { c.Keys, c.MaxRecordsPerOwner = [][]byte{key1}, 100 })
	flood.join(t, a)
	for _, n := range []*node{a, flood} {
		waitFor(t, n.Name()+" to see 2 members", func() bool { return n.Stats().Members == 2 })
	}
	mine := a.Claim(netip.MustParseAddr("100.100.9.1"))
	waitFor(t, "a's claim at the flooder", hasRecord(flood, mine))
	var last Record
	for i := range 10 {
		r, err := flood.TryClaim(netip.AddrFrom4([4]byte{100, 100, 8, byte(i)}))
		if err != nil {
			t.Fatal(err)
		}
		last = r
	}
	waitFor(t, "a to refuse the flooder's excess", func() bool { return a.Stats().OverCap >= 7 })
	owned := 0
	for _, r := range a.Table().Records() {
		if r.Owner == flood.Name() {
			owned++
		}
	}
	if owned != 3 {
		t.Errorf("a holds %d of the flooder's records, cap 3", owned)
	}
	if got := a.Table().OverCap()[flood.Name()]; got < 7 {
		t.Errorf("a counts %d refusals for %s, want at least 7: %v", got, flood.Name(), a.Table().OverCap())
	}
	if r, _ := a.Table().Get(mine.VIP); r != mine {
		t.Errorf("a's own record is %v", r)
	}
	if _, ok := a.Table().Get(last.VIP); ok {
		t.Errorf("the flooder's tenth VIP reached a")
	}
	for i := range 2 {
		if _, err := a.TryClaim(netip.AddrFrom4([4]byte{100, 100, 9, byte(2 + i)})); err != nil {
			t.Fatal(err)
		}
	}
	_, err := a.TryClaim(netip.MustParseAddr("100.100.9.9"))
	if !errors.Is(err, ErrOverCap) {
		t.Fatalf("a's fourth claim: %v", err)
	}
	t.Logf("a's fourth claim: %v", err)
	if r := a.Claim(netip.MustParseAddr("100.100.9.9")); r != (Record{}) {
		t.Errorf("Claim over the cap returned %v", r)
	}
}
