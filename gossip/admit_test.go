package gossip

import (
	"context"
	"net/netip"
	"testing"
	"time"
)

// TestAdmit: a member that Config.Admit refuses cannot move a VIP, declare
// or remove a network, or change keys at the members that refuse it; what
// it says is counted, and members that admit it still take it.
func TestAdmit(t *testing.T) {
	refuse := func(name string, m *Member) bool {
		// The member is known by the time its claims arrive.
		return name != "host-3" || m == nil
	}
	a := newNodeWith(t, 1, func(c *Config) { c.Keys, c.Admit = [][]byte{key1}, refuse })
	b := newNode(t, 2, key1) // admits everyone
	rogue := newNode(t, 3, key1)
	b.join(t, a)
	rogue.join(t, a)
	for _, n := range []*node{a, b, rogue} {
		waitFor(t, n.Name()+" to see 3 members", func() bool { return n.Stats().Members == 3 })
	}
	vip := netip.MustParseAddr("100.100.7.1")
	own := a.Claim(vip)
	waitFor(t, "a's claim at the rogue", hasRecord(rogue, own))
	if _, err := a.DeclareNetwork("blue", netip.MustParsePrefix("100.100.64.0/24")); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "blue at the rogue", func() bool { _, ok := rogue.Table().Network("blue"); return ok })

	stolen := rogue.Claim(vip)
	rogue.RemoveNetwork("blue")
	rogue.DeclareNetwork("red", netip.MustParsePrefix("100.100.65.0/24"))
	waitFor(t, "the rogue's claim at b, which admits it", hasRecord(b, stolen))
	waitFor(t, "a to count what it refused", func() bool { return a.Stats().Refused >= 3 })
	// b passes the rogue's news on to a as well, and push/pull repeats it:
	// a must keep refusing it all the while.
	time.Sleep(2 * time.Second)
	if r, _ := a.Table().Get(vip); r != own {
		t.Fatalf("a's record for %s is %+v, want its own %+v", vip, r, own)
	}
	if n, ok := a.Table().Network("blue"); !ok || n.Removed() {
		t.Fatalf("blue at a: %+v %v", n, ok)
	}
	if _, ok := a.Table().Network("red"); ok {
		t.Fatal("the rogue's network reached a")
	}
	if b.Stats().Refused != 0 {
		t.Fatalf("b refused %d", b.Stats().Refused)
	}
	// Key operations the rogue asks for are ignored by a: it does not
	// answer, and its keys stay as they were.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	rs, err := rogue.InstallKey(ctx, key2)
	if err == nil {
		t.Fatal("the rogue's key install worked everywhere")
	}
	for _, r := range rs {
		if r.Member == a.Name() && r.Err != ErrNoAnswer {
			t.Fatalf("a answered the rogue: %+v", r)
		}
	}
	if len(a.mc.Keyring.GetKeys()) != 1 {
		t.Fatal("a installed the rogue's key")
	}
}
