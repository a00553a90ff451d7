package gossip

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net/netip"
	"os"
	"reflect"
	"runtime"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
)

var (
	key1 = bytes.Repeat([]byte{1}, 32)
	key2 = bytes.Repeat([]byte{2}, 32)
)

// testLogger logs to stderr when VMROAM_TEST_LOG names a level (debug,
// info, warn, error), else nowhere: memberlist logs from its own
// goroutines, which may outlive a test, so t.Log cannot be used.
func testLogger() *slog.Logger {
	var level slog.Level
	if err := level.UnmarshalText([]byte(os.Getenv("VMROAM_TEST_LOG"))); err != nil {
		return slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
}

type countEvents struct {
	members, records atomic.Int64
}

func (e *countEvents) MembersChanged() { e.members.Add(1) }
func (e *countEvents) RecordsChanged() { e.records.Add(1) }

type node struct {
	*Cluster
	ev   *countEvents
	meta Meta
}

func newNode(t *testing.T, i int, keys ...[]byte) *node {
	t.Helper()
	return newNodeWith(t, i, func(c *Config) { c.Keys = keys })
}

// newNodeWith is newNode with a configuration that edit changes last.
func newNodeWith(t *testing.T, i int, edit func(*Config)) *node {
	t.Helper()
	n := &node{ev: &countEvents{}, meta: testMeta(i)}
	cfg := DefaultConfig()
	cfg.Name = fmt.Sprintf("host-%d", i)
	cfg.BindAddr = netip.MustParseAddr("127.0.0.1")
	cfg.BindPort = 0
	cfg.Profile = "local"
	cfg.Meta = n.meta
	cfg.Logger = testLogger()
	cfg.Events = n.ev
	edit(&cfg)
	c, err := New(cfg)
	if err != nil {
		t.Fatalf("new %s: %v", cfg.Name, err)
	}
	n.Cluster = c
	t.Cleanup(func() {
		if err := c.Shutdown(); err != nil {
			t.Errorf("shutdown %s: %v", cfg.Name, err)
		}
	})
	return n
}

func (n *node) addr() string { return fmt.Sprintf("127.0.0.1:%d", n.LocalPort()) }

func (n *node) join(t *testing.T, to *node) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	n.Join(ctx, []string{to.addr()})
	if ctx.Err() != nil {
		t.Fatalf("%s could not join %s", n.Name(), to.Name())
	}
}

func (n *node) member(name string) (Member, bool) {
	for _, m := range n.Members() {
		if m.Name == name {
			return m, true
		}
	}
	return Member{}, false
}

// waitFor polls cond until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	// Generous: CI runs this beside the namespace suites on two cores.
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func hasRecord(n *node, want Record) func() bool {
	return func() bool {
		r, ok := n.Table().Get(want.VIP)
		return ok && r == want
	}
}

func TestCluster(t *testing.T) {
	a, b, c := newNode(t, 1, key1), newNode(t, 2, key1), newNode(t, 3, key1)
	b.join(t, a)
	c.join(t, a)
	nodes := []*node{a, b, c}
	metaOf := map[string]Meta{a.Name(): a.meta, b.Name(): b.meta, c.Name(): c.meta}

	t.Run("members", func(t *testing.T) {
		for _, n := range nodes {
			waitFor(t, n.Name()+" to see 3 alive members", func() bool {
				ms := n.Members()
				if len(ms) != 3 {
					return false
				}
				for _, m := range ms {
					if m.State != MemberAlive {
						return false
					}
				}
				return true
			})
			for _, m := range n.Members() {
				if m.MetaErr != nil || m.Meta != metaOf[m.Name] {
					t.Errorf("%s sees %s with meta %+v (%v), want %+v", n.Name(), m.Name, m.Meta, m.MetaErr, metaOf[m.Name])
				}
				if m.Local != (m.Name == n.Name()) {
					t.Errorf("%s sees %s with Local %v", n.Name(), m.Name, m.Local)
				}
				if !m.Addr.Addr().IsLoopback() || m.Addr.Port() == 0 {
					t.Errorf("%s sees %s at %v", n.Name(), m.Name, m.Addr)
				}
			}
			if got := n.Stats().Members; got != 3 {
				t.Errorf("%s: Stats.Members = %d", n.Name(), got)
			}
			if n.ev.members.Load() == 0 {
				t.Errorf("%s: MembersChanged never called", n.Name())
			}
		}
	})

	vip := netip.MustParseAddr("100.64.1.10")
	t.Run("claim", func(t *testing.T) {
		r := a.Claim(vip)
		if want := (Record{VIP: vip, Owner: a.Name(), Epoch: 1}); r != want {
			t.Fatalf("Claim = %v, want %v", r, want)
		}
		for _, n := range nodes {
			waitFor(t, n.Name()+" to learn "+vip.String(), hasRecord(n, r))
			if n.ev.records.Load() == 0 {
				t.Errorf("%s: RecordsChanged never called", n.Name())
			}
		}
		// The VM migrates to b: b claims at the next epoch.
		r2 := b.Claim(vip)
		if r2.Epoch != 2 || r2.Owner != b.Name() {
			t.Fatalf("second Claim = %v", r2)
		}
		for _, n := range nodes {
			waitFor(t, n.Name()+" to learn the move", hasRecord(n, r2))
		}
	})

	t.Run("release", func(t *testing.T) {
		if r, ok := a.Release(vip); ok {
			t.Fatalf("a released a VIP b owns: %v", r)
		}
		r, ok := b.Release(vip)
		if want := (Record{VIP: vip, Epoch: 3}); !ok || r != want {
			t.Fatalf("Release = %v, %v; want %v", r, ok, want)
		}
		for _, n := range nodes {
			waitFor(t, n.Name()+" to learn the release", hasRecord(n, r))
		}
	})

	vip2 := netip.MustParseAddr("fd7a:115c::20")
	t.Run("double start", func(t *testing.T) {
		ra := Record{VIP: vip2, Owner: a.Name(), Epoch: 5}
		if !a.Assert(ra) {
			t.Fatal("Assert did not change the table")
		}
		for _, n := range nodes {
			waitFor(t, n.Name()+" to learn a's record", hasRecord(n, ra))
		}
		// b re-announces a persisted claim at the same epoch.
		rb := Record{VIP: vip2, Owner: b.Name(), Epoch: 5}
		b.Assert(rb)
		want := Conflict{VIP: vip2, Epoch: 5, Owners: []string{a.Name(), b.Name()}}
		for _, n := range nodes {
			waitFor(t, n.Name()+" to learn b's record", hasRecord(n, rb))
			if cs := n.Table().Conflicts(); len(cs) != 1 || cs[0].VIP != want.VIP ||
				cs[0].Epoch != want.Epoch || strings.Join(cs[0].Owners, ",") != strings.Join(want.Owners, ",") {
				t.Errorf("%s: conflicts %v, want %v", n.Name(), cs, want)
			}
		}
		r := c.Claim(vip2)
		for _, n := range nodes {
			waitFor(t, n.Name()+" to learn c's claim", hasRecord(n, r))
			waitFor(t, n.Name()+" to clear the conflict", func() bool { return len(n.Table().Conflicts()) == 0 })
		}
	})

	top := t
	t.Run("late joiner", func(t *testing.T) {
		d := newNode(top, 4, key1) // lives on for the leave test
		d.join(t, b)
		// Push/pull during the join carries the whole table: no polling.
		got, want := d.Table().Records(), a.Table().Records()
		if len(want) != 2 || fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("late joiner has %v, want %v", got, want)
		}
		nodes = append(nodes, d)
		// c's leave intent goes to the members c knows: all must know d.
		for _, n := range []*node{a, b, c} {
			waitFor(t, n.Name()+" to see d", func() bool {
				m, ok := n.member(d.Name())
				return ok && m.State == MemberAlive
			})
		}
	})

	t.Run("leave", func(t *testing.T) {
		if err := c.Leave(3 * time.Second); err != nil {
			t.Fatalf("leave: %v", err)
		}
		for _, n := range []*node{a, b, nodes[3]} {
			waitFor(t, n.Name()+" to see c left", func() bool {
				m, ok := n.member(c.Name())
				return ok && m.State == MemberLeft
			})
		}
		if err := c.Leave(time.Second); err != nil {
			t.Errorf("second leave: %v", err)
		}
	})

	for _, n := range nodes {
		if s := n.Stats(); s.DroppedMessages != 0 || s.DroppedMeta != 0 {
			t.Errorf("%s: %+v", n.Name(), s)
		}
	}
	if s := a.Stats(); s.Broadcasts == 0 {
		t.Errorf("a queued no broadcasts: %+v", s)
	}
}

func hasNetwork(n *node, want Network) func() bool {
	return func() bool {
		got, ok := n.Table().Network(want.Name)
		return ok && got == want
	}
}

func TestClusterNetworks(t *testing.T) {
	a, b, c := newNode(t, 1, key1), newNode(t, 2, key1), newNode(t, 3, key1)
	b.join(t, a)
	c.join(t, a)
	nodes := []*node{a, b, c}
	for _, n := range nodes {
		waitFor(t, n.Name()+" to see 3 members", func() bool { return n.Stats().Members == 3 })
	}

	// told counts the RecordsChanged calls of each node.
	told := func(nodes []*node) []int64 {
		counts := make([]int64, len(nodes))
		for i, n := range nodes {
			counts[i] = n.ev.records.Load()
		}
		return counts
	}
	// learn waits until every node has want and was told about a change
	// since the counts before.
	learn := func(t *testing.T, nodes []*node, before []int64, what string, want Network) {
		t.Helper()
		for i, n := range nodes {
			waitFor(t, n.Name()+" to learn "+what, hasNetwork(n, want))
			waitFor(t, n.Name()+" to be told about "+what, func() bool { return n.ev.records.Load() > before[i] })
		}
	}

	blue := Network{Name: "blue", Prefix: mp("100.64.0.0/16"), Epoch: 1, Origin: a.Name()}
	six := Network{Name: "six", Prefix: mp("fd7a:115c:1::/48"), Epoch: 1, Origin: c.Name()}
	t.Run("declare", func(t *testing.T) {
		before := told(nodes)
		got, err := a.DeclareNetwork(blue.Name, blue.Prefix)
		if err != nil || got != blue {
			t.Fatalf("DeclareNetwork = %v, %v; want %v", got, err, blue)
		}
		learn(t, nodes, before, "blue", blue)
		before = told(nodes)
		if got, err := c.DeclareNetwork(six.Name, six.Prefix); err != nil || got != six {
			t.Fatalf("DeclareNetwork = %v, %v; want %v", got, err, six)
		}
		learn(t, nodes, before, "six", six)
		for _, n := range nodes {
			if got, want := n.Table().ActiveNetworks(), []Network{blue, six}; !reflect.DeepEqual(got, want) {
				t.Errorf("%s: active %v, want %v", n.Name(), got, want)
			}
		}
	})

	t.Run("refused", func(t *testing.T) {
		broadcasts := b.Stats().Broadcasts
		refusals := []struct {
			name   string
			prefix netip.Prefix
			want   string
		}{
			{"green", mp("100.64.1.0/24"), `network "green" (100.64.1.0/24) overlaps network "blue" (100.64.0.0/16)`},
			{"green", mp("fd7a:115c::/32"), `network "green" (fd7a:115c::/32) overlaps network "six" (fd7a:115c:1::/48)`},
			{"blue", mp("100.65.0.0/16"), "remove it first"},
			{"Green", mp("100.65.0.0/16"), "must start with"},
			{"green", mp("127.0.0.0/8"), "loopback"},
		}
		for _, r := range refusals {
			got, err := b.DeclareNetwork(r.name, r.prefix)
			if err == nil || !strings.Contains(err.Error(), r.want) {
				t.Errorf("DeclareNetwork(%s, %s) = %v, %v; want an error with %q", r.name, r.prefix, got, err, r.want)
			}
		}
		// The same declaration again, from another member: a no-op.
		if got, err := b.DeclareNetwork(blue.Name, blue.Prefix); err != nil || got != blue {
			t.Errorf("declaring blue again = %v, %v; want %v", got, err, blue)
		}
		if got := b.Stats().Broadcasts; got != broadcasts {
			t.Errorf("refusals and a no-op queued %d broadcasts", got-broadcasts)
		}
	})

	t.Run("remove", func(t *testing.T) {
		before := told(nodes)
		rm, ok := b.RemoveNetwork(six.Name)
		if want := (Network{Name: six.Name, Epoch: 2, Origin: b.Name()}); !ok || rm != want {
			t.Fatalf("RemoveNetwork = %v, %v; want %v", rm, ok, want)
		}
		learn(t, nodes, before, "the removal of six", rm)
		for _, n := range nodes {
			if got, want := n.Table().Networks(), []Network{blue}; !reflect.DeepEqual(got, want) {
				t.Errorf("%s: networks %v, want %v", n.Name(), got, want)
			}
		}
		if _, ok := c.RemoveNetwork(six.Name); ok {
			t.Error("removed six twice")
		}
		if _, ok := c.RemoveNetwork("never"); ok {
			t.Error("removed a network never declared")
		}
	})

	t.Run("late joiner across a partition", func(t *testing.T) {
		d := newNode(t, 4, key1)
		all := append(slices.Clone(nodes), d)
		before := told(all)
		// d, alone (a partition of one), declares a network that overlaps
		// blue. Its name sorts first: once the partition heals it wins
		// everywhere and blue is inactive.
		aqua, err := d.DeclareNetwork("aqua", mp("100.64.0.0/12"))
		if err != nil {
			t.Fatalf("d declares aqua: %v", err)
		}
		known := b.Table().NetworkVersions()
		d.join(t, b)
		// Push/pull during the join carries every version, removals
		// included: no polling.
		for _, want := range known {
			if got, ok := d.Table().Network(want.Name); !ok || got != want {
				t.Errorf("late joiner has %v, %v; want %v", got, ok, want)
			}
		}
		learn(t, all, before, "aqua", aqua)
		wantOverlaps := []NetworkOverlap{{Winner: aqua, Loser: blue}}
		for _, n := range all {
			waitFor(t, n.Name()+" to resolve the overlap", func() bool {
				return reflect.DeepEqual(n.Table().ActiveNetworks(), []Network{aqua}) &&
					reflect.DeepEqual(n.Table().NetworkOverlaps(), wantOverlaps)
			})
			if got, ok := n.Table().NetworkOf(netip.MustParseAddr("100.64.1.1")); !ok || got != aqua {
				t.Errorf("%s: NetworkOf = %v, %v; want aqua", n.Name(), got, ok)
			}
		}

		// The operator removes aqua anywhere: blue is active again.
		before = told(all)
		rm, ok := c.RemoveNetwork(aqua.Name)
		if !ok {
			t.Fatal("c could not remove aqua")
		}
		learn(t, all, before, "the removal of aqua", rm)
		for _, n := range all {
			if got, want := n.Table().ActiveNetworks(), []Network{blue}; !reflect.DeepEqual(got, want) {
				t.Errorf("%s: active %v, want %v", n.Name(), got, want)
			}
			if got := n.Table().NetworkOverlaps(); len(got) != 0 {
				t.Errorf("%s: overlaps %v", n.Name(), got)
			}
			if s := n.Stats(); s.DroppedMessages != 0 {
				t.Errorf("%s: %+v", n.Name(), s)
			}
		}
	})
}

func TestJoinRefusedWithoutTheKey(t *testing.T) {
	a, b := newNode(t, 1, key1), newNode(t, 2, key1)
	b.join(t, a)
	waitFor(t, "a to see b", func() bool { return a.Stats().Members == 2 })

	wrong, plain := newNode(t, 3, key2), newNode(t, 4)
	done := make(chan struct{}, 2)
	for _, n := range []*node{wrong, plain} {
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2500*time.Millisecond)
			defer cancel()
			n.Join(ctx, []string{a.addr()})
			done <- struct{}{}
		}()
	}
	<-done
	<-done

	for _, n := range []*node{wrong, plain} {
		if got := n.Stats().Members; got != 1 {
			t.Errorf("%s has %d members, want only itself", n.Name(), got)
		}
	}
	for _, n := range []*node{a, b} {
		if got := n.Stats().Members; got != 2 {
			t.Errorf("%s has %d members, want 2", n.Name(), got)
		}
		for _, m := range n.Members() {
			if m.Name == wrong.Name() || m.Name == plain.Name() {
				t.Errorf("%s lists %s", n.Name(), m.Name)
			}
		}
	}
}

// junkDelegate is a bare memberlist delegate with metadata that is not a
// Meta, standing for a broken or foreign agent.
type junkDelegate struct{}

func (junkDelegate) NodeMeta(int) []byte                 { return []byte{0xee, 1, 2, 3} }
func (junkDelegate) NotifyMsg([]byte)                    {}
func (junkDelegate) GetBroadcasts(int, int) [][]byte     { return nil }
func (junkDelegate) LocalState(bool) []byte              { return []byte{msgRecords, 9, 9} }
func (junkDelegate) MergeRemoteState(buf []byte, _ bool) {}

func TestHostilePeer(t *testing.T) {
	a := newNode(t, 1, key1)

	mc := memberlist.DefaultLocalConfig()
	mc.Name = "junk"
	mc.BindAddr = "127.0.0.1"
	mc.BindPort = 0
	mc.AdvertisePort = 0
	mc.Delegate = junkDelegate{}
	mc.Logger = log.New(io.Discard, "", 0)
	kr, err := memberlist.NewKeyring(nil, key1)
	if err != nil {
		t.Fatal(err)
	}
	mc.Keyring = kr
	junk, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = junk.Shutdown() })
	if _, err := junk.Join([]string{a.addr()}); err != nil {
		t.Fatalf("junk join: %v", err)
	}

	waitFor(t, "a to list junk", func() bool { _, ok := a.member("junk"); return ok })
	m, _ := a.member("junk")
	if m.MetaErr == nil || m.Meta != (Meta{}) {
		t.Errorf("junk member: meta %+v, err %v", m.Meta, m.MetaErr)
	}
	// The junk push/pull state was dropped during the join.
	if s := a.Stats(); s.DroppedMeta != 1 || s.DroppedMessages != 1 {
		t.Errorf("after join: %+v, want 1 dropped meta and 1 dropped state", s)
	}

	var self *memberlist.Node
	for _, n := range junk.Members() {
		if n.Name == a.Name() {
			self = n
		}
	}
	if self == nil {
		t.Fatal("junk does not see a")
	}
	// (memberlist does not deliver empty messages over a stream.)
	bad := [][]byte{
		{0x7f},
		{msgRecords, 200},
		append(EncodeRecords(sampleRecords()), 1),
		{msgLeave, 0},
		{msgLeave, 3, 'a', 'b'},
		{msgNetworks, 200},
		rawNetwork("A", v4Prefix(10, 0, 0, 0, 8), []byte{1}, "junk"),
		append(EncodeNetworks(sampleNetworks()), 1),
		encodeState(nil, nil), // a state is no broadcast
	}
	for _, msg := range bad {
		if err := junk.SendReliable(self, msg); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	waitFor(t, "a to drop the bad messages", func() bool {
		return a.Stats().DroppedMessages == 1+uint64(len(bad))
	})
	// A good message from the same peer still counts.
	good := Record{VIP: netip.MustParseAddr("100.64.9.9"), Owner: "junk", Epoch: 1}
	if err := junk.SendReliable(self, EncodeRecords([]Record{good})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a to take the good record", hasRecord(a, good))
	goodNet := Network{Name: "junk-net", Prefix: mp("100.80.0.0/16"), Epoch: 1, Origin: "junk"}
	if err := junk.SendReliable(self, EncodeNetworks([]Network{goodNet})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "a to take the good network", hasNetwork(a, goodNet))
}

func TestKeepJoined(t *testing.T) {
	seed, b := newNode(t, 1, key1), newNode(t, 2, key1)
	b.aloneAfter, b.aloneCheck = 300*time.Millisecond, 50*time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	b.KeepJoined(ctx, []string{seed.addr()})
	waitFor(t, "b to join the seed on its own", func() bool { return seed.Stats().Members == 2 })
	if el := time.Since(start); el < b.aloneAfter {
		t.Errorf("joined after %v, before being alone for %v", el, b.aloneAfter)
	}
}

// leakedGoroutines returns the stacks of goroutines running this package's
// code outside of tests.
func leakedGoroutines() []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var leaks []string
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "vmroam/gossip.") && !strings.Contains(g, "_test.go") {
			leaks = append(leaks, g)
		}
	}
	return leaks
}

func TestShutdownLeavesNoGoroutine(t *testing.T) {
	a, b := newNode(t, 1, key1), newNode(t, 2, key1)
	b.join(t, a)
	for _, n := range []*node{a, b} {
		n.aloneCheck = 10 * time.Millisecond
		n.KeepJoined(context.Background(), []string{a.addr(), b.addr()})
	}
	r := a.Claim(netip.MustParseAddr("100.64.3.3"))
	waitFor(t, "b to learn the claim", hasRecord(b, r))
	if len(leakedGoroutines()) == 0 {
		t.Fatal("the goroutine check finds nothing while KeepJoined runs")
	}

	if err := b.Leave(2 * time.Second); err != nil {
		t.Fatalf("leave: %v", err)
	}
	for range 2 {
		if err := a.Shutdown(); err != nil {
			t.Fatalf("shutdown: %v", err)
		}
	}
	if err := a.Leave(time.Second); err != nil {
		t.Errorf("leave after shutdown: %v", err)
	}
	if err := a.UpdateMeta(testMeta(1)); err == nil {
		t.Error("UpdateMeta after shutdown succeeded")
	}
	a.KeepJoined(context.Background(), []string{b.addr()}) // must start nothing

	var leaks []string
	deadline := time.Now().Add(5 * time.Second)
	for {
		if leaks = leakedGoroutines(); len(leaks) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines of this package left after shutdown:\n%s", len(leaks), strings.Join(leaks, "\n\n"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestUpdateMeta(t *testing.T) {
	a, b := newNode(t, 1, key1), newNode(t, 2, key1)
	b.join(t, a)
	m := testMeta(1)
	m.Site = "site-b"
	m.Endpoint = netip.MustParseAddrPort("[2001:db8::1]:51821")
	before := b.ev.members.Load()
	if err := a.UpdateMeta(m); err != nil {
		t.Fatalf("update: %v", err)
	}
	waitFor(t, "b to see a's new meta", func() bool {
		got, ok := b.member(a.Name())
		return ok && got.Meta == m
	})
	if b.ev.members.Load() == before {
		t.Error("MembersChanged not called for a metadata change")
	}
	if got, _ := a.member(a.Name()); got.Meta != m {
		t.Errorf("a sees itself with %+v", got.Meta)
	}
	bad := m
	bad.Site = strings.Repeat("x", MaxSiteLen+1)
	if err := a.UpdateMeta(bad); err == nil {
		t.Error("UpdateMeta took a 65-byte site")
	}
}

func TestNewValidates(t *testing.T) {
	base := DefaultConfig()
	base.Name = "x"
	base.BindAddr = netip.MustParseAddr("127.0.0.1")
	base.BindPort = 0
	base.Meta = testMeta(1)
	base.Logger = testLogger()
	cases := map[string]func(*Config){
		"no name":     func(c *Config) { c.Name = "" },
		"long name":   func(c *Config) { c.Name = strings.Repeat("n", MaxOwnerLen+1) },
		"no bind":     func(c *Config) { c.BindAddr = netip.Addr{} },
		"bad port":    func(c *Config) { c.BindPort = 70000 },
		"bad key":     func(c *Config) { c.Keys = [][]byte{make([]byte, 15)} },
		"bad meta":    func(c *Config) { c.Meta = Meta{} },
		"bad profile": func(c *Config) { c.Profile = "moon" },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			cfg := base
			mutate(&cfg)
			if c, err := New(cfg); err == nil {
				_ = c.Shutdown()
				t.Fatal("New succeeded")
			}
		})
	}
}

// TestMergeRemoteState feeds the push/pull delegate directly: the state an
// agent sends, an older agent's bare records, and junk.
func TestMergeRemoteState(t *testing.T) {
	a := newNode(t, 1, key1)
	d := delegate{a.Cluster}

	old := Record{VIP: netip.MustParseAddr("100.64.5.1"), Owner: "old-agent", Epoch: 3}
	d.MergeRemoteState(EncodeRecords([]Record{old}), false)
	if !hasRecord(a, old)() {
		t.Fatal("a bare records state was not merged")
	}
	if a.ev.records.Load() == 0 {
		t.Error("RecordsChanged not called")
	}

	r := Record{VIP: netip.MustParseAddr("fd7a::5"), Owner: "new-agent", Epoch: 1}
	n := Network{Name: "blue", Prefix: mp("100.64.0.0/16"), Epoch: 4, Origin: "new-agent"}
	gone := Network{Name: "gone", Epoch: 2, Origin: "new-agent"}
	before := a.ev.records.Load()
	d.MergeRemoteState(encodeState([]Record{r}, []Network{n, gone}), false)
	if !hasRecord(a, r)() {
		t.Error("the record of a state was not merged")
	}
	if got, want := a.Table().NetworkVersions(), []Network{n, gone}; !reflect.DeepEqual(got, want) {
		t.Errorf("networks %v, want %v", got, want)
	}
	if a.ev.records.Load() != before+1 {
		t.Errorf("RecordsChanged called %d times for one state, want once", a.ev.records.Load()-before)
	}
	before = a.ev.records.Load()
	d.MergeRemoteState(encodeState([]Record{r}, []Network{n, gone}), false)
	if a.ev.records.Load() != before {
		t.Error("RecordsChanged called for a state that changed nothing")
	}

	// What a member sends back carries all of it.
	rs, ns, err := decodeState(d.LocalState(false))
	if err != nil {
		t.Fatalf("LocalState does not decode: %v", err)
	}
	if !reflect.DeepEqual(rs, a.Table().Records()) || !reflect.DeepEqual(ns, []Network{n, gone}) {
		t.Errorf("LocalState holds %v %v", rs, ns)
	}

	for i, junk := range [][]byte{
		{0x7f},
		EncodeNetworks([]Network{n}), // a networks message is not a state
		append(encodeState(nil, nil), 0),
	} {
		d.MergeRemoteState(junk, true)
		if got := a.Stats().DroppedMessages; got != uint64(i+1) {
			t.Errorf("junk state %d: %d dropped", i, got)
		}
	}
}
