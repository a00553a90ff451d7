package doctor

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/internal/netnstest"
	"github.com/vmroam/vmroam/wgagent/control"
)

// The network checks run inside a fresh namespace made by netnstest.Run,
// which locks the test's OS thread and switches it into the namespace. The
// checks read /proc/sys/net and talk netlink on that thread, and both follow
// the thread's namespace, so the problems the tests make there (with `ip`
// and sysctl writes, which inherit the thread's namespace too) are real to
// the checks and invisible to the machine. Nothing in these tests may run
// on another goroutine: no t.Run inside a namespace.

// testConfig is DefaultConfig with no probe, a quick agent timeout and no
// agent, for a check run on its own.
func testConfig(t *testing.T) Config {
	cfg := DefaultConfig()
	cfg.Probe = false
	cfg.AgentTimeout = 2 * time.Second
	cfg.Socket = filepath.Join(t.TempDir(), "none.sock")
	return cfg
}

// sh runs a command (in the calling thread's namespace) and fails the test
// with its output on error.
func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// setSysctl writes a sysctl of the calling thread's namespace.
func setSysctl(t *testing.T, rel string, v int) {
	t.Helper()
	if err := os.WriteFile(filepath.Join("/proc/sys", rel), []byte(fmt.Sprint(v)), 0o644); err != nil {
		t.Fatal(err)
	}
}

// one expects exactly one result and returns it.
func one(t *testing.T, rs []Result) Result {
	t.Helper()
	if len(rs) != 1 {
		t.Fatalf("want one result, got %d: %+v", len(rs), rs)
	}
	return rs[0]
}

func want(t *testing.T, r Result, level Level, found, fix string) {
	t.Helper()
	if r.Level != level || !strings.Contains(r.Found, found) || !strings.Contains(r.Fix, fix) {
		t.Errorf("%s: got %s %q (fix %q), want %s with %q (fix %q)", r.Check, r.Level, r.Found, r.Fix, level, found, fix)
	}
}

func TestForwarding(t *testing.T) {
	netnstest.Run(t, func() {
		cfg := testConfig(t)
		setSysctl(t, "net/ipv4/ip_forward", 0)
		setSysctl(t, "net/ipv6/conf/all/forwarding", 0)
		rs := checkForwarding(cfg, &control.Status{Address: "100.100.0.1/16"})
		want(t, one(t, rs[:1]), Fail, "net.ipv4.ip_forward = 0", "sysctl -w net.ipv4.ip_forward=1")
		// IPv6 forwarding off is a note while no IPv6 VIP needs it...
		want(t, one(t, rs[1:]), Info, "net.ipv6.conf.all.forwarding = 0", "net.ipv6.conf.all.forwarding=1")
		// ...and a failure once one does.
		rs = checkForwarding(cfg, &control.Status{Address: "100.100.0.1/16", VIPs: []control.VIP{{VIP: "fd00::5"}}})
		want(t, rs[1], Fail, "net.ipv6.conf.all.forwarding = 0", "sysctl -w net.ipv6.conf.all.forwarding=1")

		setSysctl(t, "net/ipv4/ip_forward", 1)
		setSysctl(t, "net/ipv6/conf/all/forwarding", 1)
		rs = checkForwarding(cfg, &control.Status{Address: "fd00::1/64"})
		if len(rs) != 2 || rs[0].Level != OK || rs[1].Level != OK {
			t.Errorf("forwarding on: %+v", rs)
		}
	})
}

// TestForwardingWithoutIPv6 plays a kernel booted with ipv6.disable=1 with
// a sysctl tree of its own.
func TestForwardingWithoutIPv6(t *testing.T) {
	cfg := testConfig(t)
	cfg.ProcSys = t.TempDir()
	os.MkdirAll(filepath.Join(cfg.ProcSys, "net/ipv4"), 0o755)
	os.WriteFile(filepath.Join(cfg.ProcSys, "net/ipv4/ip_forward"), []byte("1\n"), 0o644)
	want(t, one(t, checkForwarding(cfg, &control.Status{Address: "100.100.0.1/16"})), OK, "net.ipv4.ip_forward = 1", "")
	rs := checkForwarding(cfg, &control.Status{Address: "fd00::1/64"})
	if len(rs) != 2 {
		t.Fatalf("want two results, got %+v", rs)
	}
	want(t, rs[1], Fail, "this kernel runs without IPv6", "ipv6.disable=1")
}

func TestRPFilter(t *testing.T) {
	netnstest.Run(t, func() {
		cfg := testConfig(t)
		// A Xen-like vif (with the dot that sysctl names spell as a slash),
		// an interface the agent has a VIP on, and an uplink no VM uses.
		sh(t, "ip", "link", "add", "vif7.0", "type", "veth", "peer", "name", "tap3")
		sh(t, "ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p")
		st := &control.Status{Interface: "vmr0", VIPs: []control.VIP{{VIP: "100.100.10.3", Local: true, Dev: "tap3"}}}
		for _, rel := range []string{"all", "default", "vif7.0", "tap3", "eth9"} {
			setSysctl(t, "net/ipv4/conf/"+rel+"/rp_filter", 0)
		}
		want(t, checkRPFilter(cfg, st), OK, "all=0; checked default, vmr0 and 2 VM interfaces", "")

		// Strict on the uplink is none of vmroam's business.
		setSysctl(t, "net/ipv4/conf/eth9/rp_filter", 1)
		want(t, checkRPFilter(cfg, st), OK, "no strict rp_filter", "")

		setSysctl(t, "net/ipv4/conf/vif7.0/rp_filter", 1)
		setSysctl(t, "net/ipv4/conf/tap3/rp_filter", 1)
		r := checkRPFilter(cfg, st)
		want(t, r, Fail, "strict rp_filter (1) on tap3, vif7.0", "sysctl -w net.ipv4.conf.tap3.rp_filter=2 net.ipv4.conf.vif7/0.rp_filter=2")
		if strings.Contains(r.Found, "eth9") {
			t.Errorf("eth9 matches no VM pattern but is reported: %q", r.Found)
		}

		// Loose on all makes every interface at least loose.
		setSysctl(t, "net/ipv4/conf/all/rp_filter", 2)
		want(t, checkRPFilter(cfg, st), OK, "all=2", "")

		setSysctl(t, "net/ipv4/conf/all/rp_filter", 1)
		want(t, checkRPFilter(cfg, st), Fail, "net.ipv4.conf.all.rp_filter = 1", "sysctl -w net.ipv4.conf.all.rp_filter=2")

		setSysctl(t, "net/ipv4/conf/all/rp_filter", 0)
		setSysctl(t, "net/ipv4/conf/vif7.0/rp_filter", 2)
		setSysctl(t, "net/ipv4/conf/tap3/rp_filter", 0)
		setSysctl(t, "net/ipv4/conf/default/rp_filter", 1)
		want(t, checkRPFilter(cfg, st), Fail, "on default (every VM interface created from now on)", "net.ipv4.conf.default.rp_filter=2")
	})
}

func TestMTURoute(t *testing.T) {
	netnstest.Run(t, func() {
		cfg := testConfig(t)
		cfg.MTU = 1420
		uplink(t, "ul0")
		sh(t, "ip", "link", "set", "ul0", "mtu", "1400")
		sh(t, "ip", "addr", "add", "198.18.0.1/24", "dev", "ul0")
		sh(t, "ip", "addr", "add", "2001:db8::1/64", "dev", "ul0", "nodad")
		v4, v6 := netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("2001:db8::2")

		// The agent's peers are what is checked, by name.
		st := &control.Status{Interface: "vmr0", Endpoint: "198.18.0.1:51820", Peers: []control.Peer{
			{Name: "h2", Endpoint: "198.18.0.2:51820", State: "alive"},
			{Name: "gone", Endpoint: "198.18.0.3:51820", State: "dead"},
		}}
		r := one(t, checkMTU(cfg, st))
		want(t, r, Fail, "to peer h2 (198.18.0.2): a full tunnel packet is 1480 bytes (MTU 1420 + 60), the route via ul0 allows 1400",
			"--mtu 1340 (mtu = 1340 in the config file)")
		if !strings.Contains(r.Fix, "ip link set dev ul0 mtu 1480") {
			t.Errorf("fix does not offer the larger link MTU: %q", r.Fix)
		}

		// IPv6 costs 20 bytes more: 1480 fits IPv4 but not IPv6.
		sh(t, "ip", "link", "set", "ul0", "mtu", "1480")
		cfg.Endpoints = []netip.Addr{v4, v6}
		rs := checkMTU(cfg, nil)
		if len(rs) != 2 {
			t.Fatalf("want a failure and an OK, got %+v", rs)
		}
		want(t, rs[0], Fail, "to 2001:db8::2: a full tunnel packet is 1500 bytes (MTU 1420 + 80), the route via ul0 allows 1480", "--mtu 1400")
		want(t, rs[1], OK, "fits the route to 1 hosts", "")

		// The tunnel's real MTU wins over the configured one.
		sh(t, "ip", "link", "add", "vmr0", "type", "veth", "peer", "name", "vmr0p")
		sh(t, "ip", "link", "set", "vmr0", "mtu", "1400")
		want(t, one(t, checkMTU(cfg, nil)), OK, "tunnel MTU 1400 (vmr0)", "")
		sh(t, "ip", "link", "del", "vmr0")

		// A route's own mtu limits the path below the interface's.
		sh(t, "ip", "link", "set", "ul0", "mtu", "1500")
		sh(t, "ip", "route", "add", "198.18.7.0/24", "dev", "ul0", "mtu", "lock", "1400")
		cfg.Endpoints = []netip.Addr{netip.MustParseAddr("198.18.7.1")}
		r = one(t, checkMTU(cfg, nil))
		want(t, r, Fail, "the route via ul0 (its mtu, see ip route get 198.18.7.1) allows 1400", "--mtu 1340")
		if strings.Contains(r.Fix, "ip link set") {
			t.Errorf("the interface is not what limits the path, yet the fix raises its MTU: %q", r.Fix)
		}

		cfg.Endpoints = []netip.Addr{v4, v6}
		want(t, one(t, checkMTU(cfg, nil)), OK, "fits the route to 2 hosts", "")

		cfg.Endpoints = []netip.Addr{netip.MustParseAddr("203.0.113.9")}
		want(t, one(t, checkMTU(cfg, nil)), Warn, "no route to 203.0.113.9", "ip route get 203.0.113.9")
	})
}

// TestMTUProbe builds doctor's namespace -> router -> peer, and finds what
// the route alone cannot see: a smaller link behind the router, with and
// without the router's ICMP getting through.
func TestMTUProbe(t *testing.T) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs nft (scripts/install-deps.sh)")
	}
	netnstest.Run(t, func() {
		router, peer := namedNS(t, "r"), namedNS(t, "p")
		// No duplicate address detection: link-local addresses would stay
		// tentative for seconds and hold up neighbour discovery.
		setSysctl(t, "net/ipv6/conf/default/accept_dad", 0)
		for _, ns := range []string{router, peer} {
			sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
		}
		sh(t, "ip", "link", "add", "ul0", "type", "veth", "peer", "name", "r0", "netns", router)
		sh(t, "ip", "-n", router, "link", "add", "r1", "type", "veth", "peer", "name", "p0", "netns", peer)
		for _, c := range [][]string{
			{"ip", "addr", "add", "198.18.0.1/24", "dev", "ul0"},
			{"ip", "addr", "add", "2001:db8::1/64", "dev", "ul0", "nodad"},
			{"ip", "link", "set", "ul0", "up"},
			{"ip", "route", "add", "198.18.1.0/24", "via", "198.18.0.2"},
			{"ip", "route", "add", "2001:db8:1::/64", "via", "2001:db8::2"},
			{"ip", "-n", router, "addr", "add", "198.18.0.2/24", "dev", "r0"},
			{"ip", "-n", router, "addr", "add", "2001:db8::2/64", "dev", "r0", "nodad"},
			{"ip", "-n", router, "addr", "add", "198.18.1.1/24", "dev", "r1"},
			{"ip", "-n", router, "addr", "add", "2001:db8:1::1/64", "dev", "r1", "nodad"},
			{"ip", "-n", router, "link", "set", "r0", "up"},
			{"ip", "-n", router, "link", "set", "r1", "up"},
			{"ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"},
			{"ip", "-n", peer, "addr", "add", "198.18.1.2/24", "dev", "p0"},
			{"ip", "-n", peer, "addr", "add", "2001:db8:1::2/64", "dev", "p0", "nodad"},
			{"ip", "-n", peer, "link", "set", "p0", "up"},
			{"ip", "-n", peer, "route", "add", "default", "via", "198.18.1.1"},
			{"ip", "-n", peer, "route", "add", "default", "via", "2001:db8:1::1"},
		} {
			sh(t, c...)
		}
		// Neighbours resolved, so the probe's wait is about MTU only.
		sh(t, "ping", "-c", "1", "-W", "5", "198.18.1.2")
		sh(t, "ping", "-c", "1", "-W", "5", "2001:db8:1::2")

		cfg := testConfig(t)
		cfg.Probe, cfg.ProbeWait = true, 2*time.Second
		v4, v6, nobody := netip.MustParseAddr("198.18.1.2"), netip.MustParseAddr("2001:db8:1::2"), netip.MustParseAddr("198.18.1.99")
		cfg.Endpoints = []netip.Addr{v4, v6, nobody}
		rs := checkMTU(cfg, nil)
		if len(rs) != 2 {
			t.Fatalf("healthy path: want a note and an OK, got %+v", rs)
		}
		want(t, rs[0], Info, "1 hosts answer no ping, their path MTU was checked on this host only: 198.18.1.99", "")
		want(t, rs[1], OK, "fits the route to 3 hosts; 2 answered a full-size ping", "")

		// The link behind the router shrinks, and the router's "fragmentation
		// needed" is filtered: small pings pass, full ones vanish.
		sh(t, "ip", "-n", router, "link", "set", "r1", "mtu", "1400")
		sh(t, "ip", "-n", peer, "link", "set", "p0", "mtu", "1400")
		nft := exec.Command("ip", "netns", "exec", router, "nft", "-f", "-")
		nft.Stdin = strings.NewReader(`table inet blackhole {
			chain out {
				type filter hook output priority 0;
				icmp type destination-unreachable drop
				icmpv6 type packet-too-big drop
			}
		}`)
		if out, err := nft.CombinedOutput(); err != nil {
			t.Fatalf("nft: %v\n%s", err, out)
		}
		cfg.Endpoints = []netip.Addr{v4, v6}
		rs = checkMTU(cfg, nil)
		if len(rs) != 2 {
			t.Fatalf("black hole: want two warnings, got %+v", rs)
		}
		want(t, rs[0], Warn, "198.18.1.2 answers small pings but not one of 1480 bytes", "ping -M do -c 1 -s $((MTU+32)) 198.18.1.2")
		want(t, rs[1], Warn, "2001:db8:1::2 answers small pings but not one of 1500 bytes", "ping -M do -c 1 -s $((MTU+32)) 2001:db8:1::2")

		// With the router's ICMP let through, the probe names the limit.
		sh(t, "ip", "netns", "exec", router, "nft", "delete", "table", "inet", "blackhole")
		rs = checkMTU(cfg, nil)
		if len(rs) != 2 {
			t.Fatalf("small link: want two failures, got %+v", rs)
		}
		want(t, rs[0], Fail, "to 198.18.1.2: router 198.18.0.2 on the path forwards at most 1400 bytes, a full tunnel packet is 1480", "--mtu 1340")
		want(t, rs[1], Fail, "to 2001:db8:1::2: router 2001:db8::2 on the path forwards at most 1400 bytes, a full tunnel packet is 1500", "--mtu 1320")

		// The kernel learnt the path MTU from the router: now the route
		// alone shows it, without probing.
		cfg.Probe = false
		cfg.Endpoints = []netip.Addr{v4}
		want(t, one(t, checkMTU(cfg, nil)), Fail, "the route via ul0 (its mtu, see ip route get 198.18.1.2) allows 1400", "--mtu 1340")
	})
}

// uplink makes a veth pair (this kernel may have no dummy devices), both
// ends up, so that routes through name are usable.
func uplink(t *testing.T, name string) {
	t.Helper()
	sh(t, "ip", "link", "add", name, "type", "veth", "peer", "name", name+"p")
	sh(t, "ip", "link", "set", name+"p", "up")
	sh(t, "ip", "link", "set", name, "up")
}

// namedNS makes a named namespace for the test and removes it at the end.
func namedNS(t *testing.T, role string) string {
	t.Helper()
	name := fmt.Sprintf("vmrdoc%d-%s", os.Getpid(), role)
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v\n%s", name, err, out)
		}
	})
	return name
}

func TestTUN(t *testing.T) {
	cfg := testConfig(t)
	cfg.TUN = filepath.Join(t.TempDir(), "net", "tun")
	want(t, checkTUN(cfg), Fail, "no such file or directory", "mknod "+cfg.TUN+" c 10 200")

	os.MkdirAll(filepath.Dir(cfg.TUN), 0o755)
	if err := os.WriteFile(cfg.TUN, nil, 0o666); err != nil {
		t.Fatal(err)
	}
	want(t, checkTUN(cfg), Fail, "is not the TUN device", "rm "+cfg.TUN)

	if os.Geteuid() != 0 {
		t.Skip("opening the real TUN device needs root")
	}
	cfg.TUN = "/dev/net/tun"
	if _, err := os.Stat(cfg.TUN); err != nil {
		t.Skipf("this machine has no TUN device: %v", err)
	}
	want(t, checkTUN(cfg), OK, "/dev/net/tun opens", "")
}

func TestWireGuard(t *testing.T) {
	cfg := testConfig(t)
	cfg.SysModule, cfg.Modules = t.TempDir(), t.TempDir()
	absent := func() error { return errors.New("no such family") }
	cfg.wgFamily = absent
	want(t, checkWireGuard(cfg, nil), Info, "embedded wireguard-go", "modprobe wireguard")

	// Installed but not loaded: the agent's first link loads it.
	dep := "kernel/drivers/net/wireguard/wireguard.ko.xz: kernel/net/ipv6/ip6_udp_tunnel.ko.xz\n"
	if err := os.WriteFile(filepath.Join(cfg.Modules, "modules.dep"), []byte("kernel/drivers/net/tun.ko.xz:\n"+dep), 0o644); err != nil {
		t.Fatal(err)
	}
	want(t, checkWireGuard(cfg, nil), OK, "available, not loaded", "")

	// A listed module of another name is not WireGuard.
	os.WriteFile(filepath.Join(cfg.Modules, "modules.dep"), []byte("kernel/drivers/net/notwireguard.ko:\n"), 0o644)
	want(t, checkWireGuard(cfg, nil), Info, "no kernel WireGuard", "")

	os.Mkdir(filepath.Join(cfg.SysModule, "wireguard"), 0o755)
	want(t, checkWireGuard(cfg, nil), OK, "loaded ("+filepath.Join(cfg.SysModule, "wireguard")+")", "")

	cfg.SysModule = t.TempDir()
	cfg.wgFamily = func() error { return nil }
	want(t, checkWireGuard(cfg, nil), OK, "module loaded", "")
	// The module is there but the agent runs wireguard-go.
	want(t, checkWireGuard(cfg, &control.Status{Impl: "userspace", Interface: "vmr0"}), Info, "but the agent runs wireguard-go", "--wg-impl auto")
	want(t, checkWireGuard(cfg, &control.Status{Impl: "kernel"}), OK, "module loaded", "")
}

func TestClock(t *testing.T) {
	cfg := testConfig(t)
	cfg.adjtimex = func(tx *unix.Timex) (int, error) {
		tx.Status, tx.Maxerror = unix.STA_UNSYNC, 16_000_000
		return unix.TIME_ERROR, nil
	}
	want(t, checkClock(cfg), Warn, "not synchronized", "timedatectl set-ntp true")
	cfg.adjtimex = func(tx *unix.Timex) (int, error) {
		tx.Status, tx.Maxerror = unix.STA_PLL, 2500
		return unix.TIME_OK, nil
	}
	want(t, checkClock(cfg), OK, "synchronized (maximum error 2.5 ms)", "")
	cfg.adjtimex = func(*unix.Timex) (int, error) { return 0, unix.EPERM }
	want(t, checkClock(cfg), Warn, "cannot read the clock's state", "")

	// This machine's own clock, whichever state it is in, reads cleanly.
	cfg.adjtimex = unix.Adjtimex
	if r := checkClock(cfg); r.Level != OK && (r.Level != Warn || !strings.Contains(r.Found, "not synchronized")) {
		t.Errorf("real clock: %+v", r)
	}
}

func writeKey(t *testing.T, path string, mode os.FileMode, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil { // past the umask
		t.Fatal(err)
	}
}

func TestKeyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gossip.key")
	key := base64.StdEncoding.EncodeToString(make([]byte, 32)) + "\n"

	want(t, checkKeyFile(path), Fail, "no such file", "vmroam keygen --gossip > "+path)

	writeKey(t, path, 0o644, key)
	want(t, checkKeyFile(path), Fail, "has mode 0644", "chmod 600 "+path)
	writeKey(t, path, 0o640, key)
	want(t, checkKeyFile(path), Fail, "has mode 0640", "chmod 600 "+path)

	writeKey(t, path, 0o600, "not a key\n")
	want(t, checkKeyFile(path), Fail, "not base64", "vmroam keygen --gossip")

	writeKey(t, path, 0o600, key)
	if os.Geteuid() != 0 {
		t.Skip("the owner checks need root")
	}
	want(t, checkKeyFile(path), OK, "owned by root, 1 key(s)", "")
	if err := os.Chown(path, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	want(t, checkKeyFile(path), Warn, "owned by uid 65534", "chown root:root "+path)
}

// fakeAgent answers status on a control socket with st.
type fakeAgent struct{ st control.Status }

func (f fakeAgent) Status(context.Context) (control.Status, error) { return f.st, nil }
func (fakeAgent) Attach(context.Context, netip.Addr, string) (control.VIP, error) {
	return control.VIP{}, errors.ErrUnsupported
}
func (fakeAgent) AttachWhenAnnounced(context.Context, netip.Addr, string) (control.VIP, error) {
	return control.VIP{}, errors.ErrUnsupported
}
func (fakeAgent) Detach(context.Context, netip.Addr) (control.VIP, error) {
	return control.VIP{}, errors.ErrUnsupported
}
func (fakeAgent) Suspend(context.Context, netip.Addr) (control.VIP, error) {
	return control.VIP{}, errors.ErrUnsupported
}
func (fakeAgent) Abort(context.Context, netip.Addr) (control.VIP, error) {
	return control.VIP{}, errors.ErrUnsupported
}
func (fakeAgent) AddNetwork(context.Context, string, netip.Prefix) (control.Network, error) {
	return control.Network{}, errors.ErrUnsupported
}
func (fakeAgent) RemoveNetwork(context.Context, string) (control.Network, error) {
	return control.Network{}, errors.ErrUnsupported
}
func (fakeAgent) Allocate(context.Context, string, string) (control.VIP, error) {
	return control.VIP{}, errors.ErrUnsupported
}
func (fakeAgent) Prepare(context.Context, netip.Addr) (control.VIP, error) {
	return control.VIP{}, errors.ErrUnsupported
}
func (fakeAgent) Keys(context.Context) (control.Keys, error) {
	return control.Keys{}, errors.ErrUnsupported
}
func (fakeAgent) ChangeKeys(context.Context, string, []byte, bool) (control.Keys, error) {
	return control.Keys{}, errors.ErrUnsupported
}
func (fakeAgent) Migrations(context.Context) ([]control.Migration, error) {
	return nil, errors.ErrUnsupported
}
func (fakeAgent) Migration(context.Context, string) (control.Migration, error) {
	return control.Migration{}, errors.ErrUnsupported
}

func serveAgent(t *testing.T, st control.Status) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the control socket answers root only")
	}
	path := filepath.Join(t.TempDir(), "ctl.sock")
	srv, err := control.Listen(path, fakeAgent{st}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return path
}

func TestAgent(t *testing.T) {
	cfg := testConfig(t)
	v := askAgent(context.Background(), cfg)
	if v.status != nil {
		t.Fatalf("status from nowhere: %+v", v.status)
	}
	want(t, one(t, v.results), Fail, "no agent answers on "+cfg.Socket, "systemctl start vmroam")

	// A socket file nobody listens on (an agent that died).
	stale := filepath.Join(t.TempDir(), "stale.sock")
	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: stale}); err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	cfg.Socket = stale
	want(t, one(t, askAgent(context.Background(), cfg).results), Fail, "no agent answers on "+stale, "systemctl start vmroam")

	hs := time.Now().Add(-10 * time.Second)
	refused := control.RefusedRecord{VIP: "169.254.169.254", Owner: "evil", Epoch: 1, Reason: "a link-local address"}
	cfg.Socket = serveAgent(t, control.Status{
		Name: "h1", Interface: "vmr0", Impl: "userspace", Started: time.Now().Add(-5 * time.Minute),
		Peers: []control.Peer{
			{Name: "h2", Endpoint: "198.18.0.2:51820", State: "alive", LastHandshake: &hs},
			{Name: "h3", Endpoint: "198.18.0.3:51821", State: "alive"},
			{Name: "h4", Endpoint: "198.18.0.4:51820", State: "dead"},
			{Name: "h5", Endpoint: "198.18.0.5:51820", State: "alive", LastHandshake: &hs, SessionCheck: "gave up"},
		},
		Problems:       []string{"VIP 100.100.10.1: interface vif9.0 not found", refused.Problem()},
		RefusedRecords: []control.RefusedRecord{refused},
		Conflicts:      []control.Conflict{{VIP: "100.100.10.2", Epoch: 4, Owners: []string{"h1", "h2"}, Winner: "h2"}},
		Gossip:         control.Gossip{Encrypted: false, Records: 200000, MaxRecords: 200000, OverCap: map[string]uint64{"evil": 1200, "(others)": 7}},
	})
	v = askAgent(context.Background(), cfg)
	if v.status == nil || v.status.Name != "h1" {
		t.Fatalf("status = %+v", v.status)
	}
	// The refused record is one finding of its own, not also a problem's.
	if len(v.results) != 8 {
		t.Fatalf("want 8 findings, got %+v", v.results)
	}
	want(t, v.results[0], OK, "agent h1 answers on "+cfg.Socket+": 4 peers, 0 VIPs, userspace WireGuard on vmr0", "")
	want(t, v.results[1], Warn, "host evil claims 169.254.169.254 (epoch 1), which cannot be a VIP: a link-local address", "rotate it (vmroam keys")
	want(t, v.results[2], Warn, "the agent reports: VIP 100.100.10.1: interface vif9.0 not found", "journalctl -u vmroam")
	want(t, v.results[3], Warn, "VIP 100.100.10.2 claimed by h1 and h2 at epoch 4 (h2 wins)", "vmroam vip attach 100.100.10.2 --dev IFACE")
	want(t, v.results[4], Warn, "the location table refused 1207 records or networks beyond its caps, by owner: evil 1200, (others) 7; it holds 200000 of at most 200000 records", "raise --max-vips")
	want(t, v.results[5], Warn, "gossip is not encrypted", "--encrypt-key-file")
	want(t, v.results[6], Warn, "the WireGuard session with peer h5 carries no round trip", "let the handover port")
	want(t, v.results[7], Warn, "no WireGuard handshake with peer h3 (198.18.0.3:51821)", "let UDP port 51821 through")
}

// TestRun makes a namespace healthy, then breaks everything doctor claims to
// find and sees each problem reported as a failure, with the exit status a
// CLI derives from it.
func TestRun(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "gossip.key")
	writeKey(t, key, 0o600, base64.StdEncoding.EncodeToString(make([]byte, 32))+"\n")
	agentSock := serveAgent(t, control.Status{
		Name: "h1", Interface: "vmr0", Impl: "userspace", Endpoint: "198.18.0.1:51820", Started: time.Now(),
		Peers:  []control.Peer{{Name: "h2", Endpoint: "198.18.0.2:51820", State: "alive"}},
		Gossip: control.Gossip{Encrypted: true},
	})
	netnstest.Run(t, func() {
		cfg := testConfig(t)
		cfg.Socket, cfg.KeyFile = agentSock, key
		cfg.wgFamily = func() error { return nil }
		cfg.adjtimex = func(tx *unix.Timex) (int, error) { return unix.TIME_OK, nil }
		uplink(t, "ul0")
		sh(t, "ip", "addr", "add", "198.18.0.1/24", "dev", "ul0")
		sh(t, "ip", "link", "add", "vif3.0", "type", "veth", "peer", "name", "vm3")
		setSysctl(t, "net/ipv4/ip_forward", 1)
		for _, rel := range []string{"all", "default", "vif3.0"} {
			setSysctl(t, "net/ipv4/conf/"+rel+"/rp_filter", 0)
		}
		if _, err := os.Stat(cfg.TUN); err != nil {
			t.Skipf("this machine has no TUN device: %v", err)
		}

		rep := Run(context.Background(), cfg)
		for _, r := range rep.Results {
			if r.Level == Fail || r.Level == Warn {
				t.Errorf("healthy namespace: %+v", r)
			}
		}
		if rep.Failed() {
			t.Errorf("healthy namespace failed")
		}

		setSysctl(t, "net/ipv4/ip_forward", 0)
		setSysctl(t, "net/ipv4/conf/vif3.0/rp_filter", 1)
		sh(t, "ip", "link", "set", "ul0", "mtu", "1400")
		os.Chmod(key, 0o644)
		cfg.TUN = filepath.Join(dir, "no-tun")
		rep = Run(context.Background(), cfg)
		failed := map[string]bool{}
		for _, r := range rep.Results {
			if r.Level == Fail {
				failed[r.Check] = true
			}
		}
		for _, c := range []string{"tun", "ip_forward", "rp_filter", "mtu", "gossip_key"} {
			if !failed[c] {
				t.Errorf("broken namespace: %s did not fail: %+v", c, rep.Results)
			}
		}
		if !rep.Failed() || rep.Count(Fail) != 5 {
			t.Errorf("broken namespace: %d failures, want 5", rep.Count(Fail))
		}
	})
}

func TestAllowlistFinding(t *testing.T) {
	peers := func(sites ...string) []control.Peer {
		var ps []control.Peer
		for i, s := range sites {
			ps = append(ps, control.Peer{Name: fmt.Sprintf("h%d", i+2), Site: s, State: "alive"})
		}
		return ps
	}
	for _, tc := range []struct {
		name  string
		st    control.Status
		found string // "" for no finding
	}{
		{"one site", control.Status{Site: "dc1", Peers: peers("dc1", "dc1")}, ""},
		{"no sites", control.Status{Peers: peers("", "")}, ""},
		{"alone", control.Status{Site: "dc1"}, ""},
		{"two sites", control.Status{Site: "dc1", Peers: peers("dc1", "dc2")}, `in 2 sites ("dc1", "dc2")`},
		{"a host without a site", control.Status{Site: "dc1", Peers: peers("")}, `in 2 sites ("", "dc1")`},
		{"three sites, this one unnamed", control.Status{Peers: peers("b", "a", "b")}, `in 3 sites ("", "a", "b")`},
		{"two sites, allowlist", control.Status{Site: "dc1", Peers: peers("dc2"), Gossip: control.Gossip{PeerAllowlist: true}}, ""},
	} {
		r, ok := allowlistFinding(tc.st)
		if ok != (tc.found != "") {
			t.Errorf("%s: finding %v: %+v", tc.name, ok, r)
			continue
		}
		if ok {
			want(t, r, Warn, tc.found, "--peer-allowlist")
			for _, s := range []string{"any host holding the gossip key can claim any VIP and receive its VM's traffic", "docs/security.md"} {
				if !strings.Contains(r.Found, s) {
					t.Errorf("%s: %q lacks %q", tc.name, r.Found, s)
				}
			}
			if !strings.Contains(r.Fix, "KEY NAME") || !strings.Contains(r.Fix, "vmroam status") {
				t.Errorf("%s: fix %q", tc.name, r.Fix)
			}
		}
	}

	// Through the control socket, as vmroam doctor asks.
	cfg := testConfig(t)
	cfg.Socket = serveAgent(t, control.Status{Name: "h1", Site: "dc1", Interface: "vmr0", Impl: "kernel",
		Peers: peers("dc2"), Gossip: control.Gossip{Encrypted: true}})
	v := askAgent(context.Background(), cfg)
	if len(v.results) != 2 {
		t.Fatalf("want 2 findings, got %+v", v.results)
	}
	want(t, v.results[1], Warn, "no peer allowlist (--peer-allowlist) on a cluster whose hosts are in 2 sites", "peer-allowlist =")
}
