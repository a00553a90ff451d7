package wgagent

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/gossip"
)

func testKey(t *testing.T) wgtypes.Key {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func member(name string, pub wgtypes.Key, i byte) gossip.Member {
	return gossip.Member{Name: name, State: gossip.MemberAlive, Meta: gossip.Meta{
		Version:   gossip.ProtocolVersion,
		PublicKey: pub,
		Endpoint:  netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, 0, i}), 51820),
		Address:   netip.AddrFrom4([4]byte{100, 100, 0, i}),
	}}
}

func TestParsePeerAllowlist(t *testing.T) {
	k1, k2 := testKey(t).PublicKey(), testKey(t).PublicKey()
	l, err := parsePeerAllowlist([]byte("# hosts\n" + k1.String() + " h1  # the first\n\n" + k2.String() + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(l.keys) != 2 || l.keys[k1] != "h1" || l.keys[k2] != "" || l.names["h1"] != k1 {
		t.Fatalf("parsed %+v", l)
	}
	for _, bad := range []string{
		"nokey h1\n",
		k1.String() + " h1 extra\n",
		k1.String() + "\n" + k1.String() + " h1\n",
		k1.String() + " h1\n" + k2.String() + " h1\n",
	} {
		if _, err := parsePeerAllowlist([]byte(bad)); err == nil {
			t.Errorf("accepted %q", bad)
		}
	}
	if l, err := parsePeerAllowlist(nil); err != nil || len(l.keys) != 0 {
		t.Fatalf("empty file: %v %v", l, err)
	}
}

// TestAllowlistRefuses covers what a holder of the gossip key may try: join
// with a key of its own, announce a listed host's key (with its own
// endpoint) under another name, or a listed name with another key.
func TestAllowlistRefuses(t *testing.T) {
	k1, k2, rogue := testKey(t).PublicKey(), testKey(t).PublicKey(), testKey(t).PublicKey()
	any := testKey(t).PublicKey()
	l, err := parsePeerAllowlist([]byte(k1.String() + " h1\n" + k2.String() + " h2\n" + any.String() + "\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		key  wgtypes.Key
		want string // in the reason; "" = admitted
	}{
		{"h1", k1, ""},
		{"h2", k2, ""},
		{"h9", any, ""}, // an unnamed entry: any name
		{"rogue", rogue, "is not listed"},
		{"rogue", k2, "is listed for h2"},     // h2's key under another name
		{"h2", rogue, "not the key"},          // h2's name with another key
		{"h1", k2, "is listed for h2"},        // one listed host posing as another
		{"h1", any, "is listed with the key"}, // a bound name with the unbound key
	} {
		got := l.refuses(tc.name, tc.key)
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("%s with %s: %q, want %q", tc.name, tc.key, got, tc.want)
		}
	}
	if !l.admitsUnknown("h1") || !l.admitsUnknown("stranger") {
		t.Error("with an unbound key listed, unknown members' records must be taken")
	}
	named, _ := parsePeerAllowlist([]byte(k1.String() + " h1\n"))
	if !named.admitsUnknown("h1") || named.admitsUnknown("stranger") {
		t.Error("with names only, only listed names may be unknown")
	}
}

func testAgent(t *testing.T, list string) (*Agent, string) {
	t.Helper()
	a := &Agent{
		cfg:           Config{Name: "h1", Address: netip.MustParsePrefix("100.100.0.1/16")},
		key:           testKey(t),
		log:           slog.New(slog.NewTextHandler(io.Discard, nil)),
		refusedLogged: map[string]string{},
	}
	path := filepath.Join(t.TempDir(), "allow")
	if list != "" {
		if err := os.WriteFile(path, []byte(list), 0o644); err != nil {
			t.Fatal(err)
		}
		var err error
		if a.allow, err = loadAllowlistFile(path); err != nil {
			t.Fatal(err)
		}
	}
	return a, path
}

// TestWantPeersAllowlist: refused members get no tunnel and the VIPs they
// claim go to no peer; every refusal is a status problem; without a list
// every member is a peer.
func TestWantPeersAllowlist(t *testing.T) {
	k2, k3 := testKey(t).PublicKey(), testKey(t).PublicKey()
	list := testKey(t).PublicKey().String() + " h1\n" + k2.String() + " h2\n"
	a, path := testAgent(t, list) // h1's own key is not listed: see below
	members := []gossip.Member{
		member("h2", k2, 2),
		member("rogue", k3, 3),
		member("thief", k2, 4), // h2's key, its own endpoint
	}
	vip := netip.MustParseAddr("100.100.10.1")
	records := []gossip.Record{{VIP: vip, Owner: "rogue", Epoch: 9}}
	var problems []string
	problem := func(f string, args ...any) { problems = append(problems, f) }
	peers := a.wantPeers(members, records, problem)
	if len(peers) != 1 || peers[0].name != "h2" || len(peers[0].allowedIPs) != 1 {
		t.Fatalf("peers %+v", peers)
	}
	if len(problems) != 2 || len(a.refusedLogged) != 2 {
		t.Fatalf("problems %q, logged %v", problems, a.refusedLogged)
	}
	// gossip asks the same: the rogue's and the thief's claims are not taken.
	for _, m := range members {
		if got := a.admitMember(m.Name, &m); got != (m.Name == "h2") {
			t.Errorf("admit %s: %v", m.Name, got)
		}
	}
	// This host's own key not listed: said loudly.
	problems = nil
	a.checkAllowlistLocked(problem)
	if len(problems) != 1 {
		t.Fatalf("own key unlisted: problems %q", problems)
	}

	// Reload: the rogue's key added (a new mtime) makes it a peer; a file
	// that no longer parses keeps the last good list and says so.
	time.Sleep(10 * time.Millisecond)
	if err := os.WriteFile(path, []byte(list+k3.String()+" rogue\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	problems = nil
	a.checkAllowlistLocked(problem)
	if peers = a.wantPeers(members, records, problem); len(peers) != 2 || peers[1].name != "rogue" || len(peers[1].allowedIPs) != 2 {
		t.Fatalf("after reload: peers %+v", peers)
	}
	time.Sleep(10 * time.Millisecond)
	if err := os.WriteFile(path, []byte("garbage\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	problems = nil
	a.checkAllowlistLocked(problem)
	if len(problems) == 0 || !strings.Contains(problems[0], "last good list") {
		t.Fatalf("bad file: problems %q", problems)
	}
	if peers = a.wantPeers(members, records, func(string, ...any) {}); len(peers) != 2 {
		t.Fatalf("bad file: peers %+v", peers)
	}

	// No allowlist: everyone with the gossip key is a peer (the thief
	// loses to h2 only because its key is taken).
	open, _ := testAgent(t, "")
	if peers = open.wantPeers(members, records, func(string, ...any) {}); len(peers) != 2 {
		t.Fatalf("without a list: peers %+v", peers)
	}
}

// TestWantPeersOverlayClash: an overlay address two members announce (or
// one announces this host's) is nobody's: neither gets a peer, since
// whichever got it would take the other's tunnel traffic.
func TestWantPeersOverlayClash(t *testing.T) {
	a, _ := testAgent(t, "")
	m2, m3 := member("h2", testKey(t).PublicKey(), 2), member("h3", testKey(t).PublicKey(), 3)
	m3.Meta.Address = m2.Meta.Address
	self := member("h4", testKey(t).PublicKey(), 4)
	self.Meta.Address = a.cfg.Address.Addr()
	var problems []string
	peers := a.wantPeers([]gossip.Member{m2, m3, self}, nil, func(f string, _ ...any) { problems = append(problems, f) })
	if len(peers) != 0 || len(problems) != 3 {
		t.Fatalf("peers %+v problems %q", peers, problems)
	}
}

// TestWarnNoAllowlist: an agent without an allowlist warns once members
// of more than one site are seen, once per set of sites, naming what the
// gossip key grants and how to set the list.
func TestWarnNoAllowlist(t *testing.T) {
	var logged strings.Builder
	a := &Agent{log: slog.New(slog.NewTextHandler(&logged, nil))}
	at := func(site string, i byte) gossip.Member {
		m := member(fmt.Sprintf("h%d", i), testKey(t).PublicKey(), i)
		m.Meta.Site = site
		return m
	}
	unreadable := at("dc9", 9)
	unreadable.MetaErr = errors.New("bad meta")
	warnings := func() int { return strings.Count(logged.String(), "NO PEER ALLOWLIST") }

	a.warnNoAllowlistLocked([]gossip.Member{at("dc1", 1), at("dc1", 2), unreadable})
	if n := warnings(); n != 0 {
		t.Fatalf("one site: %d warnings:\n%s", n, logged.String())
	}
	two := []gossip.Member{at("dc1", 1), at("dc2", 2), at("dc1", 3)}
	a.warnNoAllowlistLocked(two)
	a.warnNoAllowlistLocked(two)
	if n := warnings(); n != 1 {
		t.Fatalf("two sites, twice: %d warnings:\n%s", n, logged.String())
	}
	for _, s := range []string{"level=WARN", "sites=\"[dc1 dc2]\"", "can claim any VIP and receive its VM's traffic", "peer-allowlist = "} {
		if !strings.Contains(logged.String(), s) {
			t.Errorf("the warning lacks %q:\n%s", s, logged.String())
		}
	}
	a.warnNoAllowlistLocked(append(two, at("", 4)))
	if n := warnings(); n != 2 {
		t.Fatalf("a host without a site joined: %d warnings:\n%s", n, logged.String())
	}
	if got := memberSites(append(two, at("", 4), unreadable)); !slices.Equal(got, []string{"", "dc1", "dc2"}) {
		t.Errorf("sites %q", got)
	}
}
