package wgagent

import (
	"errors"
	"net/netip"
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/internal/netnstest"
)

// TestClaimRefuse: every kind of address the rule refuses, each with the
// reason an operator reads, and the VIPs it lets through.
func TestClaimRefuse(t *testing.T) {
	rules := claimRules{
		prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.0.0/16"), netip.MustParsePrefix("fd76:6d72::/64")},
		hosts: map[netip.Addr]string{
			netip.MustParseAddr("100.100.0.2"): "the overlay address of host h2",
			netip.MustParseAddr("198.18.0.2"):  "the underlay address of host h2",
		},
		local:  map[netip.Addr]int{netip.MustParseAddr("100.100.9.9"): 7},
		ifName: func(i int) string { return map[int]string{7: "br0"}[i] },
	}
	for _, tc := range []struct {
		vip  string
		want string // "" = a VIP
	}{
		{"100.100.10.1", ""},
		{"fd76:6d72::a1", ""},
		{"100.100.0.2", "the overlay address of host h2"},
		{"198.18.0.2", "the underlay address of host h2"},
		{"100.100.9.9", "an address of this host's interface br0"},
		{"127.0.0.1", "loopback"},
		{"::1", "loopback"},
		{"169.254.169.254", "link-local"},
		{"169.254.0.1", "link-local"},
		{"fe80::1", "link-local"},
		{"224.0.0.251", "not a unicast address"},
		{"ff02::1", "not a unicast address"},
		{"0.0.0.0", "not a unicast address"},
		{"::", "not a unicast address"},
		{"255.255.255.255", "broadcast"},
		{"::ffff:100.100.10.1", "IPv4-mapped"},
		{"100.101.0.1", "outside the overlay (--vip-prefixes 100.100.0.0/16,fd76:6d72::/64)"},
		{"203.0.113.7", "outside the overlay"},
		{"fd76:6d73::1", "outside the overlay"},
	} {
		got := rules.refuse(netip.MustParseAddr(tc.vip))
		if (tc.want == "") != (got == "") || !strings.Contains(got, tc.want) {
			t.Errorf("refuse(%s) = %q, want %q", tc.vip, got, tc.want)
		}
	}
	if got := rules.refuse(netip.Addr{}); got == "" {
		t.Error("the zero address passed")
	}
}

// TestClaimRulesGathered: the rules name this host's and every member's
// overlay and underlay addresses (metadata and gossip address), and the
// interface addresses last read.
func TestClaimRulesGathered(t *testing.T) {
	a, _ := testAgent(t, "")
	a.cfg.BindAddr = netip.MustParseAddr("198.18.0.1")
	a.cfg.VIPPrefixes = []netip.Prefix{netip.MustParsePrefix("100.100.0.0/16")}
	a.localAddrs.Store(&hostAddrs{byAddr: map[netip.Addr]int{netip.MustParseAddr("100.100.9.9"): 1}})
	m2 := member("h2", testKey(t).PublicKey(), 2)
	m2.Addr = netip.MustParseAddrPort("198.18.0.22:7946")
	bad := gossip.Member{Name: "h5", Addr: netip.MustParseAddrPort("198.18.0.5:7946"), MetaErr: errors.New("bad metadata")}
	rules := a.claimRules([]gossip.Member{m2, bad})
	for vip, want := range map[string]string{
		"100.100.0.1": "this host's overlay address",
		"198.18.0.1":  "this host's underlay address",
		"100.100.0.2": "the overlay address of host h2",
		"198.18.0.2":  "the underlay address of host h2",
		"198.18.0.22": "the underlay address of host h2",
		"198.18.0.5":  "the underlay address of host h5",
		"100.100.9.9": "interface lo", // index 1
		"100.100.3.3": "",
	} {
		got := rules.refuse(netip.MustParseAddr(vip))
		if (want == "") != (got == "") || !strings.Contains(got, want) {
			t.Errorf("refuse(%s) = %q, want %q", vip, got, want)
		}
	}
}

// TestFollowedRecords: another host's record for an address that cannot
// be a VIP is refused; this host's own records and tombstones are kept.
func TestFollowedRecords(t *testing.T) {
	rules := claimRules{
		prefixes: []netip.Prefix{netip.MustParsePrefix("100.100.0.0/16")},
		hosts:    map[netip.Addr]string{netip.MustParseAddr("100.100.0.2"): "the overlay address of host h2"},
	}
	ok := gossip.Record{VIP: netip.MustParseAddr("100.100.10.1"), Owner: "h2", Epoch: 1}
	own := gossip.Record{VIP: netip.MustParseAddr("100.100.10.2"), Owner: "h1", Epoch: 1}
	tomb := gossip.Record{VIP: netip.MustParseAddr("127.0.0.1"), Epoch: 2}
	steal := gossip.Record{VIP: netip.MustParseAddr("100.100.0.2"), Owner: "evil", Epoch: 7}
	meta := gossip.Record{VIP: netip.MustParseAddr("169.254.169.254"), Owner: "evil", Epoch: 1}
	followed, refused := followedRecords([]gossip.Record{ok, steal, own, meta, tomb}, "h1", rules)
	if len(followed) != 3 || followed[0] != ok || followed[1] != own || followed[2] != tomb {
		t.Fatalf("followed %v", followed)
	}
	if len(refused) != 2 || refused[0].Record != steal || refused[1].Record != meta || !strings.Contains(refused[0].why, "host h2") {
		t.Fatalf("refused %+v", refused)
	}
	st := refusedStatus(refused)
	if p := st[0].Problem(); !strings.Contains(p, "host evil claims 100.100.0.2 (epoch 7)") || !strings.Contains(p, "the overlay address of host h2") {
		t.Errorf("problem line %q", p)
	}
}

// TestWantPeersOverlayRecord: a record naming a member's overlay address
// (which followedRecords refuses first) still never reaches another
// member's AllowedIPs.
func TestWantPeersOverlayRecord(t *testing.T) {
	a, _ := testAgent(t, "")
	m2, m3 := member("h2", testKey(t).PublicKey(), 2), member("h3", testKey(t).PublicKey(), 3)
	records := []gossip.Record{
		{VIP: m2.Meta.Address, Owner: "h3", Epoch: 9},
		{VIP: a.cfg.Address.Addr(), Owner: "h3", Epoch: 9},
		{VIP: netip.MustParseAddr("100.100.10.1"), Owner: "h3", Epoch: 1},
	}
	var problems []string
	peers := a.wantPeers([]gossip.Member{m2, m3}, records, func(f string, args ...any) { problems = append(problems, f) })
	if len(peers) != 2 || len(peers[0].allowedIPs) != 1 || len(peers[1].allowedIPs) != 2 || len(problems) != 2 {
		t.Fatalf("peers %+v problems %q", peers, problems)
	}
	if peers[1].allowedIPs[1] != netip.MustParsePrefix("100.100.10.1/32") {
		t.Fatalf("h3's AllowedIPs %v", peers[1].allowedIPs)
	}
}

// TestHostAddrs reads a namespace's addresses: the interface on the
// underlay's subnet carries it, a VM interface with dom0's address as a
// /32 (Xen's vif-route) does not, and every address names its interface.
// checkAttach then refuses --dev on the underlay and a VIP that is this
// host's address.
func TestHostAddrs(t *testing.T) {
	netnstest.Run(t, func() {
		for _, args := range [][]string{
			// veths: this kernel may have no dummy devices.
			{"link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"},
			{"addr", "add", "198.18.0.1/24", "dev", "eth0"},
			{"link", "add", "vif5.0", "type", "veth", "peer", "name", "vm5"},
			{"addr", "add", "198.18.0.1/32", "dev", "vif5.0"},
			{"link", "add", "br0", "type", "veth", "peer", "name", "br0p"},
			{"addr", "add", "100.100.9.9/24", "dev", "br0"},
		} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
		a, _ := testAgent(t, "")
		a.cfg.BindAddr = netip.MustParseAddr("198.18.0.1")
		a.cfg.Interface = "vmr0"
		if err := a.refreshLocalAddrs(nil); err != nil {
			t.Fatal(err)
		}
		l := a.localAddrs.Load()
		idx := func(name string) int {
			link, err := netlink.LinkByName(name)
			if err != nil {
				t.Fatal(err)
			}
			return link.Attrs().Index
		}
		if !l.underlay[idx("eth0")] || len(l.underlay) != 1 {
			t.Errorf("underlay interfaces %v, want eth0 (%d) only", l.underlay, idx("eth0"))
		}
		if l.byAddr[netip.MustParseAddr("100.100.9.9")] != idx("br0") {
			t.Errorf("addresses %v", l.byAddr)
		}
		if err := a.checkDev("eth0"); err == nil || !strings.Contains(err.Error(), "carries this host's underlay") {
			t.Errorf("checkDev(eth0) = %v", err)
		}
		if err := a.checkDev("vif5.0"); err != nil {
			t.Errorf("checkDev(vif5.0) = %v", err)
		}
		a.cfg.VIPPrefixes = []netip.Prefix{netip.MustParsePrefix("100.100.0.0/16")}
		if got := a.claimRules(nil).refuse(netip.MustParseAddr("100.100.9.9")); !strings.Contains(got, "interface br0") {
			t.Errorf("refuse(100.100.9.9) = %q", got)
		}
	})
}

// BenchmarkRefreshLocalAddrs is what an attach adds to read this host's
// addresses (two netlink dumps), in the namespace the benchmark runs in.
func BenchmarkRefreshLocalAddrs(b *testing.B) {
	a := &Agent{cfg: Config{Name: "h1", BindAddr: netip.MustParseAddr("198.18.0.1"), Interface: "vmr0"}}
	for b.Loop() {
		if err := a.refreshLocalAddrs(nil); err != nil {
			b.Fatal(err)
		}
	}
}

// TestWantPeersRefusedPoser: a member the allowlist refuses that announces
// a listed host's overlay address takes nothing from that host: it is no
// would-be peer, so the address stays the listed host's.
func TestWantPeersRefusedPoser(t *testing.T) {
	k2 := testKey(t).PublicKey()
	a, _ := testAgent(t, k2.String()+" h2\n")
	m2, poser := member("h2", k2, 2), member("poser", testKey(t).PublicKey(), 9)
	poser.Meta.Address = m2.Meta.Address
	peers := a.wantPeers([]gossip.Member{poser, m2}, nil, func(string, ...any) {})
	if len(peers) != 1 || peers[0].name != "h2" || peers[0].allowedIPs[0] != netip.PrefixFrom(m2.Meta.Address, 32) {
		t.Fatalf("peers %+v", peers)
	}
}
