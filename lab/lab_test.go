package lab

import (
	"context"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func requireLab(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("namespace lab: skipped with -short")
	}
	if err := RequireRoot(); err != nil {
		t.Skipf("namespace lab unavailable: %v", err)
	}
}

// labNamespaces lists the namespaces on the machine that belong to l.
func labNamespaces(t *testing.T, prefix string) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, out)
	}
	var ours []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			ours = append(ours, f[0])
		}
	}
	return ours
}

func newLab(t *testing.T, hosts int) *Lab {
	t.Helper()
	l, err := New(Config{Hosts: hosts, Dir: t.TempDir(), Logf: t.Logf})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if left := labNamespaces(t, l.Prefix()); len(left) > 0 {
			t.Errorf("namespaces left after Close: %v", left)
		}
	})
	return l
}

func TestNewLayout(t *testing.T) {
	requireLab(t)
	l := newLab(t, 2)
	if len(l.ID) != 4 || len(l.Hosts) != 2 {
		t.Fatalf("ID %q hosts %d", l.ID, len(l.Hosts))
	}
	h2 := l.Hosts[1]
	if h2.Name != "h2" || h2.Underlay != netip.MustParseAddr("198.18.0.2") ||
		h2.Overlay != netip.MustParsePrefix("100.100.0.2/16") || h2.Iface != "vr"+l.ID+"w2" {
		t.Fatalf("host 2: %+v", h2)
	}
	st, err := os.Stat(l.KeyFile)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file %s: %v %v", l.KeyFile, st, err)
	}
	key, _ := os.ReadFile(l.KeyFile)
	if len(strings.TrimSpace(string(key))) != 44 {
		t.Fatalf("key file content %q", key)
	}
	out, err := l.Exec(h2.NS, "sysctl", "-n", "net.ipv4.ip_forward", "net.ipv4.conf.all.rp_filter", "net.ipv6.conf.all.forwarding")
	if err != nil || strings.Join(strings.Fields(string(out)), " ") != "1 0 1" {
		t.Fatalf("sysctls: %q %v", out, err)
	}
	// Underlay: h2 reaches h1 through the bridge (proved with a raw-socket ping
	// from a VM on h2 would need a route; use the host ns directly).
	vm, err := l.AddVM("a", h2, netip.MustParseAddr("100.100.10.9"))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.WaitPing(vm, netip.MustParseAddr("198.18.0.2"), 5*time.Second); err != nil {
		t.Fatalf("VM to its host's underlay address: %v", err)
	}
	args := strings.Join(l.AgentArgs(h2, "--site", "x"), " ")
	want := "agent --name h2 --bind 198.18.0.2 --address 100.100.0.2/16 --interface " + h2.Iface +
		" --wg-impl userspace --data-dir " + h2.DataDir + " --socket " + h2.Socket +
		" --encrypt-key-file " + l.KeyFile + " --vip-prefixes 100.100.0.0/16,fd76:6d72::/64 --join 198.18.0.1:7946 --site x"
	if args != want {
		t.Fatalf("AgentArgs:\n got %s\nwant %s", args, want)
	}
}

// TestPlainUnderlayAndMove checks the vif/gateway/proxy-ARP setup without
// any agent: static routes between the hosts' underlay addresses carry
// VM-to-VM traffic, and still do after the second VM moves to host 3.
func TestPlainUnderlayAndMove(t *testing.T) {
	requireLab(t)
	l := newLab(t, 3)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	vip1, vip2 := netip.MustParseAddr("100.100.10.1"), netip.MustParseAddr("100.100.10.2")
	v6a, v6b := netip.MustParseAddr("fd76:6d72::a1"), netip.MustParseAddr("fd76:6d72::a2")

	vm1, err := l.AddVM("vm1", h1, vip1, v6a)
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := l.AddVM("vm2", h2, vip2, v6b)
	if err != nil {
		t.Fatal(err)
	}
	if vm1.Vif != "vr"+l.ID+"vvm1" || len(vm1.Vif) > 15 {
		t.Fatalf("vif name %q", vm1.Vif)
	}
	route := func(h *Host, vip netip.Addr, via *Host, op string) {
		t.Helper()
		if _, err := l.Exec(h.NS, "ip", "route", op, hostPrefix(vip).String(), "via", via.Underlay.String()); err != nil {
			t.Fatal(err)
		}
	}
	route6 := func(h *Host, vip netip.Addr, via *Host, op string) {
		t.Helper()
		// IPv6 over the IPv4 underlay: route via the neighbour's link-local.
		out, err := l.Exec(via.NS, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link")
		if err != nil {
			t.Fatal(err)
		}
		f := strings.Fields(string(out))
		if len(f) < 4 {
			t.Fatalf("no link-local on %s: %q", via.Name, out)
		}
		ll := strings.Split(f[3], "/")[0]
		if _, err := l.Exec(h.NS, "ip", "-6", "route", op, hostPrefix(vip).String(), "via", ll, "dev", "eth0"); err != nil {
			t.Fatal(err)
		}
	}
	route(h1, vip2, h2, "add")
	route(h2, vip1, h1, "add")

	if err := l.WaitPing(vm1, vip2, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(vm1, vip2, 3, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(vm2, vip1, 3, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	waitLinkLocal(t, l, h1, h2, h3)
	route6(h1, v6b, h2, "add")
	route6(h2, v6a, h1, "add")
	if err := l.WaitPing(vm1, v6b, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(vm2, v6a, 3, 3*time.Second); err != nil {
		t.Fatal(err)
	}

	// Continuous pinger across the move: the VM is away for a moment only.
	p, err := l.StartPinger(vm1, vip2, 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.MoveVM(vm2, h3); err != nil {
		t.Fatal(err)
	}
	if vm2.Host != h3 {
		t.Fatalf("vm2.Host = %v", vm2.Host)
	}
	if out, _ := l.Exec(h2.NS, "ip", "route", "show", hostPrefix(vip2).String()); strings.TrimSpace(string(out)) != "" {
		t.Fatalf("route to vip2 left on h2: %s", out)
	}
	out, err := l.Exec(h3.NS, "ip", "route", "show", hostPrefix(vip2).String())
	if err != nil || !strings.Contains(string(out), "dev "+vm2.Vif) || !strings.Contains(string(out), "metric 2") {
		t.Fatalf("route to vip2 on h3: %q %v", out, err)
	}
	route(h1, vip2, h3, "replace")
	route(h3, vip1, h1, "add")
	route6(h1, v6b, h3, "replace")
	route6(h3, v6a, h1, "add")

	if err := l.WaitPing(vm1, vip2, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(vm2, vip1, 3, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitPing(vm2, v6a, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	st := p.Stop(time.Second)
	t.Logf("pinger across MoveVM (10 ms): %v", st)
	if st.Received == 0 || st.Duplicates != 0 {
		t.Fatalf("pinger: %v", st)
	}

	// Suspend/resume: no reply while suspended, replies after.
	if err := l.SuspendVM(vm2); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(vm1, vip2, 1, 500*time.Millisecond); err == nil {
		t.Fatal("ping answered by a suspended VM")
	}
	if err := l.ResumeVM(vm2); err != nil {
		t.Fatal(err)
	}
	if err := l.WaitPing(vm1, vip2, 10*time.Second); err != nil {
		t.Fatal(err)
	}
}

// waitLinkLocal waits until the hosts' eth0 link-local addresses finished DAD.
func waitLinkLocal(t *testing.T, l *Lab, hosts ...*Host) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for _, h := range hosts {
		for {
			out, err := l.Exec(h.NS, "ip", "-6", "addr", "show", "dev", "eth0", "scope", "link")
			if err == nil && strings.Contains(string(out), "fe80") && !strings.Contains(string(out), "tentative") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: link-local not ready: %s %v", h.Name, out, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

func TestCloseIdempotentAndCleansUp(t *testing.T) {
	requireLab(t)
	l, err := New(Config{Hosts: 2, Logf: t.Logf}) // Dir created by the lab
	if err != nil {
		t.Fatal(err)
	}
	dir := l.Dir
	vm, err := l.AddVM("x", l.Hosts[0], netip.MustParseAddr("100.100.10.7"))
	if err != nil {
		t.Fatal(err)
	}
	sleeper, err := l.Spawn(vm.NS, filepath.Join(dir, "sleep.log"), "sleep", "300")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if err := l.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := sleeper.Wait(); err == nil {
		t.Fatal("spawned sleep exited cleanly; want killed")
	}
	if left := labNamespaces(t, l.Prefix()); len(left) > 0 {
		t.Fatalf("namespaces left: %v", left)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("work dir %s still there: %v", dir, err)
	}
}

func TestBadInput(t *testing.T) {
	requireLab(t)
	if _, err := New(Config{Hosts: 0}); err == nil {
		t.Fatal("New with 0 hosts succeeded")
	}
	l := newLab(t, 1)
	if len(l.AgentArgs(l.Hosts[0])) != 19 { // no --join with one host
		t.Fatalf("AgentArgs: %v", l.AgentArgs(l.Hosts[0]))
	}
	if _, err := l.AddVM("Bad_Name", l.Hosts[0], netip.MustParseAddr("100.100.10.1")); err == nil {
		t.Fatal("bad name accepted")
	}
	if _, err := l.AddVM("ok", l.Hosts[0]); err == nil {
		t.Fatal("VM without VIP accepted")
	}
	if _, err := l.AddVM("ok", l.Hosts[0], netip.MustParseAddr("100.100.10.1")); err != nil {
		t.Fatal(err)
	}
	if _, err := l.AddVM("ok", l.Hosts[0], netip.MustParseAddr("100.100.10.2")); err == nil {
		t.Fatal("duplicate VM accepted")
	}
	if _, err := l.StartAgent(l.Hosts[0]); err == nil {
		t.Fatal("StartAgent without binary succeeded")
	}
	if _, err := l.Exec(l.Hosts[0].NS, "false"); err == nil || !strings.Contains(err.Error(), "false") {
		t.Fatalf("Exec error does not name the command: %v", err)
	}
}

// TestStartAgentFakeBinary drives StartAgent, CLI, Stop and Kill with a shell
// script standing in for vmroam: "agent" creates the socket file and sleeps,
// "status" succeeds once the socket exists.
func TestStartAgentFakeBinary(t *testing.T) {
	requireLab(t)
	dir := t.TempDir()
	fake := filepath.Join(dir, "fake-vmroam")
	script := `#!/bin/sh
cmd=$1; shift
sock=""; prev=""
for a in "$@"; do [ "$prev" = "--socket" ] && sock=$a; prev=$a; done
case $cmd in
agent) echo "agent $*"; sleep 0.3; : > "$sock"; trap 'rm -f "$sock"; exit 0' TERM; while :; do sleep 0.1; done ;;
status) [ -e "$sock" ] && echo '{"ok":true}' ;;
crash) exit 3 ;;
esac
`
	if err := os.WriteFile(fake, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := New(Config{Hosts: 2, Binary: fake, Dir: filepath.Join(dir, "lab"), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	h1 := l.Hosts[0]
	a, err := l.StartAgent(h1, "--extra")
	if err != nil {
		t.Fatal(err)
	}
	if h1.Agent != a {
		t.Fatal("h1.Agent not set")
	}
	if _, err := l.StartAgent(h1); err == nil {
		t.Fatal("second StartAgent on a running host succeeded")
	}
	out, err := l.CLI(h1, "status", "--json")
	if err != nil || !strings.Contains(string(out), "ok") {
		t.Fatalf("CLI: %q %v", out, err)
	}
	if _, err := l.CLI(h1, "crash"); err == nil || !strings.Contains(err.Error(), "exit status 3") {
		t.Fatalf("CLI crash: %v", err)
	}
	if err := a.Stop(); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	log, _ := os.ReadFile(a.LogPath)
	if !strings.Contains(string(log), "--join 198.18.0.2:7946 --extra") {
		t.Fatalf("log: %s", log)
	}
	// Restart, then Kill.
	a, err = l.StartAgent(h1)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.Kill(); err != nil {
		t.Fatal(err)
	}
	// An agent that never becomes ready fails fast with the log tail.
	h2 := l.Hosts[1]
	bad := filepath.Join(dir, "bad-vmroam")
	if err := os.WriteFile(bad, []byte("#!/bin/sh\necho boom >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	l.binary = bad
	start := time.Now()
	if _, err := l.StartAgent(h2); err == nil || !strings.Contains(err.Error(), "boom") {
		t.Fatalf("failing agent: %v", err)
	}
	if time.Since(start) > 5*time.Second {
		t.Fatalf("failing agent took %v to report", time.Since(start))
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	if left := labNamespaces(t, l.Prefix()); len(left) > 0 {
		t.Fatalf("namespaces left: %v", left)
	}
}

// buildWireguardGo builds the stand-alone wireguard-go from the module the
// project depends on.
func buildWireguardGo(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	bin, err := BuildWireguardGo(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

func TestBaseline(t *testing.T) {
	requireLab(t)
	for _, tool := range []string{"wg", "iperf3", "go"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: %v", tool, err)
		}
	}
	wgGo := buildWireguardGo(t)
	l, vm1, vm2, err := NewBaseline(Config{Dir: t.TempDir(), Logf: t.Logf}, wgGo)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if left := labNamespaces(t, l.Prefix()); len(left) > 0 {
			t.Errorf("namespaces left: %v", left)
		}
		for _, h := range l.Hosts {
			if _, err := os.Stat(filepath.Join(wgSockDir, h.Iface+".sock")); err == nil {
				t.Errorf("UAPI socket of %s left", h.Iface)
			}
		}
	})
	if err := l.WaitPing(vm1, vm2.VIPs[0], 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := l.Ping(vm1, vm2.VIPs[0], 5, 3*time.Second); err != nil {
		t.Fatal(err)
	}
	out, err := l.Exec(l.Hosts[0].NS, "wg", "show", l.Hosts[0].Iface, "latest-handshakes")
	if err != nil {
		t.Fatal(err)
	}
	if f := strings.Fields(string(out)); len(f) != 2 || f[1] == "0" {
		t.Fatalf("no handshake in wg show: %q", out)
	}
	bps, err := l.IperfTCP(vm1, vm2, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if bps <= 0 {
		t.Fatalf("IperfTCP: %v bit/s", bps)
	}
	t.Logf("baseline TCP vm1 -> vm2 through wireguard-go: %.0f Mbit/s", bps/1e6)
	u, err := l.IperfUDP(vm1, vm2, time.Second, "200M")
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("baseline UDP 200M vm1 -> vm2: received %.0f Mbit/s, lost %d/%d", u.ReceivedBPS/1e6, u.LostPackets, u.Packets)
	if u.ReceivedBPS <= 0 {
		t.Fatalf("IperfUDP: %+v", u)
	}
}

func TestFlowStall(t *testing.T) {
	for _, tc := range []struct {
		iv   []float64
		want time.Duration
	}{
		{nil, 0},
		{[]float64{0, 5, 5, 0}, 0}, // start and end do not count
		{[]float64{5, 0, 0, 5, 0, 5}, 2 * FlowInterval}, // the longest run
		{[]float64{5, 0, 0, 0, 5, 0, 0, 5}, 3 * FlowInterval},
	} {
		if got := (FlowResult{Intervals: tc.iv}).Stall(); got != tc.want {
			t.Errorf("Stall(%v) = %v, want %v", tc.iv, got, tc.want)
		}
	}
}

// TestFreezeVM checks that a frozen VM runs nothing until it is thawed,
// and that a lab closes with a VM left frozen.
func TestFreezeVM(t *testing.T) {
	requireLab(t)
	l := newLab(t, 1)
	vm, err := l.AddVM("f", l.Hosts[0], netip.MustParseAddr("100.100.21.1"))
	if err != nil {
		t.Fatal(err)
	}
	ticks := filepath.Join(l.Dir, "ticks")
	if _, err := l.Spawn(vm.NS, "", "sh", "-c", "while :; do echo . >> "+ticks+"; sleep 0.01; done"); err != nil {
		t.Fatal(err)
	}
	size := func() int64 {
		fi, err := os.Stat(ticks)
		if err != nil {
			return 0
		}
		return fi.Size()
	}
	grows := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for n := size(); size() <= n; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: the VM's process wrote nothing in 10 s", what)
			}
		}
	}
	grows("before the freeze")
	if err := l.FreezeVM(vm); err != nil {
		t.Fatal(err)
	}
	if !l.Frozen(vm) {
		t.Fatal("Frozen is false after FreezeVM")
	}
	time.Sleep(50 * time.Millisecond) // a write under way when it stopped
	n := size()
	time.Sleep(300 * time.Millisecond)
	if m := size(); m != n {
		t.Fatalf("the frozen VM's process wrote %d bytes in 300 ms", m-n)
	}
	if err := l.ThawVM(vm); err != nil {
		t.Fatal(err)
	}
	grows("after the thaw")

	// The lab's own pinger in a frozen VM sends nothing either, and the
	// VM's kernel counted what it sent.
	p, err := l.StartPinger(vm, GatewayV4, 5*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	if err := l.FreezeVM(vm); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	sent := p.Stats().Sent
	time.Sleep(200 * time.Millisecond)
	if n := p.Stats().Sent; n != sent {
		t.Errorf("the pinger of a frozen VM sent %d requests in 200 ms", n-sent)
	}
	if err := l.ThawVM(vm); err != nil {
		t.Fatal(err)
	}
	time.Sleep(100 * time.Millisecond)
	st := p.Stop(time.Second)
	if st.Sent <= sent || st.Received != st.Sent {
		t.Errorf("pinger after the thaw: %v; want more sent than %d, all answered", st, sent)
	}
	snmp, err := l.SNMP(vm)
	if err != nil {
		t.Fatal(err)
	}
	if out, in := snmp["Icmp"]["OutEchos"], snmp["Icmp"]["InEchoReps"]; out < int64(st.Sent) || in < int64(st.Received) {
		t.Errorf("VM counters: Icmp OutEchos %d InEchoReps %d; the pinger sent %d, got %d", out, in, st.Sent, st.Received)
	}

	// Left frozen: Close must still end its process and remove it all
	// (newLab's cleanup checks).
	if err := l.FreezeVM(vm); err != nil {
		t.Fatal(err)
	}
}
