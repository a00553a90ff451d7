// Package e2e runs vmroam agents as real processes in network namespaces
// (the lab) and checks what an operator would: VMs reach each other through
// the tunnels, VIPs move, dead hosts drop out and come back, strangers stay
// out. It needs root; without it every test skips and says why.
package e2e

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

// binary is the vmroam binary built once for all tests, with the race
// detector; fastBinary is built without it, for tests that measure traffic
// (the race detector slows the data path several times over).
var binary, fastBinary string

func TestMain(m *testing.M) {
	if spec := os.Getenv(hostileEnv); spec != "" {
		// Not the tests: the hostile member of TestHostileClaims.
		if err := runHostile(spec); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(func() int {
		dir, err := os.MkdirTemp("", "vmroam-e2e-bin-")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		defer os.RemoveAll(dir)
		defer func() {
			if wanBinDir != "" {
				os.RemoveAll(wanBinDir)
			}
		}()
		binary = filepath.Join(dir, "vmroam")
		fastBinary = filepath.Join(dir, "vmroam-fast")
		for _, b := range [][]string{{"-race", "-o", binary}, {"-o", fastBinary}} {
			args := append(append([]string{"build"}, b...), "github.com/vmroam/vmroam/cmd/vmroam")
			if out, err := exec.Command("go", args...).CombinedOutput(); err != nil {
				fmt.Fprintf(os.Stderr, "build vmroam: %v\n%s", err, out)
				return 1
			}
		}
		return m.Run()
	}())
}

// newLab builds a lab of n hosts and removes it when the test ends; it skips
// the test when the lab cannot run here.
func newLab(t testing.TB, n int) *lab.Lab {
	t.Helper()
	return newLabWith(t, n, binary)
}

// newLabWith is newLab with another vmroam binary.
func newLabWith(t testing.TB, n int, bin string) *lab.Lab {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end: skipped with -short")
	}
	if err := lab.RequireRoot(); err != nil {
		t.Skipf("end-to-end needs root and network namespaces: %v", err)
	}
	l, err := lab.New(lab.Config{Hosts: n, Binary: bin, Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, l)
	return l
}

// closeAtEnd removes the lab when the test ends, first showing the end of
// every agent's log if the test failed.
func closeAtEnd(t testing.TB, l *lab.Lab) {
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range l.Hosts {
				if h.Agent != nil {
					b, _ := os.ReadFile(h.Agent.LogPath)
					t.Logf("---- log of %s ----\n%s", h.Name, tail(string(b), 60))
				}
			}
		}
		if err := l.Close(); err != nil {
			t.Errorf("lab close: %v", err)
		}
	})
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// cli runs a vmroam client command on h and fails the test on error.
func cli(t testing.TB, l *lab.Lab, h *lab.Host, args ...string) string {
	t.Helper()
	out, err := l.CLI(h, args...)
	if err != nil {
		t.Fatalf("%s: vmroam %s: %v", h.Name, strings.Join(args, " "), err)
	}
	return string(out)
}

func status(t testing.TB, l *lab.Lab, h *lab.Host) control.Status {
	t.Helper()
	var st control.Status
	if err := json.Unmarshal([]byte(cli(t, l, h, "status", "--json")), &st); err != nil {
		t.Fatalf("%s: status --json: %v", h.Name, err)
	}
	return st
}

// eventually polls cond every 200 ms until it returns nil or the deadline
// passes; then it fails with cond's last word.
func eventually(t testing.TB, deadline time.Duration, what string, cond func() error) {
	t.Helper()
	end := time.Now().Add(deadline)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(end) {
			t.Fatalf("%s: not within %v: %v", what, deadline, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func peerByName(st control.Status, name string) (control.Peer, bool) {
	for _, p := range st.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return control.Peer{}, false
}

// wgPeers lists the public keys `wg show IFACE peers` prints in h.
func wgPeers(t testing.TB, l *lab.Lab, h *lab.Host) []string {
	t.Helper()
	out, err := l.Exec(h.NS, "wg", "show", h.Iface, "peers")
	if err != nil {
		t.Fatalf("%s: wg show: %v", h.Name, err)
	}
	return strings.Fields(string(out))
}

func vipOwner(st control.Status, vip netip.Addr) string {
	for _, v := range st.VIPs {
		if v.VIP == vip.String() {
			return v.Owner
		}
	}
	return ""
}

// logHandBacks logs the agents' "migration delivered" lines, which say
// how the hand-back to the kernel went; for a test that saw reordering.
func logHandBacks(t testing.TB, l *lab.Lab) {
	t.Helper()
	for _, h := range l.Hosts {
		if h.Agent == nil {
			continue
		}
		b, _ := os.ReadFile(h.Agent.LogPath)
		for _, line := range strings.Split(string(b), "\n") {
			if strings.Contains(line, "migration delivered") {
				t.Logf("%s: %s", h.Name, line)
			}
		}
	}
}

// logPaths logs how each host reaches vip now (its kernel route and the
// neighbour entries on the way) and its WireGuard peers (session, bytes,
// gossip state, VIPs): for a flow that stopped arriving, it tells a route
// that never moved from a tunnel without a session or a hand-back that
// never resolved.
func logPaths(t testing.TB, l *lab.Lab, vip netip.Addr) {
	t.Helper()
	for _, h := range l.Hosts {
		out, err := l.Exec(h.NS, "ip", "route", "get", vip.String())
		t.Logf("%s: route to %s: %s (%v)", h.Name, vip, strings.TrimSpace(string(out)), err)
		// The VM's own and the hand-back's fence gateway entries: a
		// fence left unresolved holds, then drops, what the kernel
		// routes to the VM.
		out, _ = l.Exec(h.NS, "ip", "neigh", "show", "nud", "all")
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, vip.String()+" ") || strings.HasPrefix(line, "169.254.") {
				t.Logf("%s: neighbour %s", h.Name, line)
			}
		}
		if h.Agent == nil {
			continue
		}
		for _, p := range status(t, l, h).Peers {
			hs := "never"
			if p.LastHandshake != nil {
				hs = time.Since(*p.LastHandshake).Round(time.Millisecond).String() + " ago"
			}
			t.Logf("%s: peer %s %s, handshake %s, rx %d tx %d, VIPs %v", h.Name, p.Name, p.State, hs, p.RxBytes, p.TxBytes, p.VIPs)
		}
	}
}
