package e2e

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// unitCapabilities returns the capabilities the systemd unit leaves the
// agent (CapabilityBoundingSet=).
func unitCapabilities(t *testing.T) []string {
	t.Helper()
	f, err := os.Open(filepath.Join("..", "scripts", "systemd", "vmroam.service"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapabilityBoundingSet="); ok {
			return strings.Fields(v)
		}
	}
	t.Fatal("the unit sets no CapabilityBoundingSet=")
	return nil
}

// capNumbers knows the capabilities a unit for the agent might name.
var capNumbers = map[string]int{
	"CAP_NET_ADMIN": unix.CAP_NET_ADMIN, "CAP_NET_RAW": unix.CAP_NET_RAW,
	"CAP_NET_BIND_SERVICE": unix.CAP_NET_BIND_SERVICE, "CAP_DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE,
	"CAP_SYS_ADMIN": unix.CAP_SYS_ADMIN, "CAP_SYS_MODULE": unix.CAP_SYS_MODULE,
	"CAP_SYS_NICE": unix.CAP_SYS_NICE, "CAP_IPC_LOCK": unix.CAP_IPC_LOCK,
}

// TestAgentWithUnitCapabilities runs the agents as the systemd unit does:
// root with only the unit's capabilities and no new privileges (setpriv
// does what systemd's CapabilityBoundingSet= and NoNewPrivileges= do), and
// checks that everything the agent does works: tunnels, the nftables
// table of a virtual network, and a cached migration (TUN, routes,
// neighbours, net sysctls, packet sockets).
func TestAgentWithUnitCapabilities(t *testing.T) {
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not found: cannot limit the agent's capabilities")
	}
	caps := unitCapabilities(t)
	var mask uint64
	var names []string
	for _, c := range caps {
		n, ok := capNumbers[c]
		if !ok {
			t.Fatalf("unit names %s: add it to capNumbers", c)
		}
		mask |= 1 << n
		names = append(names, "+"+strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	wrapper := filepath.Join(t.TempDir(), "vmroam-unit-caps")
	script := fmt.Sprintf("#!/bin/sh\nexec %s --bounding-set=-all,%s --inh-caps=-all --no-new-privs %s \"$@\"\n",
		setpriv, strings.Join(names, ","), fastBinary)
	if err := os.WriteFile(wrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}

	// Three hosts: the client's host is neither end of the migration, as
	// in the migration tests.
	l := newLabWith(t, 3, wrapper)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h, "--network", "blue=100.100.20.0/24", "--log-level", "debug"); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", h.Agent.Pid()))
		if err != nil {
			t.Fatal(err)
		}
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
				eff, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
				if err != nil || eff != mask {
					t.Fatalf("%s: agent's effective capabilities %s, want %#x (%s)", h.Name, v, mask, caps)
				}
			}
		}
	}
	m, c := addPair(t, l, h1, "", h3)
	if out, err := l.Exec(h1.NS, "nft", "list", "table", "inet", "vmroam"); err != nil || !strings.Contains(string(out), "100.100.20.0/24") {
		t.Errorf("h1: vmroam's nftables table: %s %v", out, err)
	}

	pinger, err := l.StartPinger(c, vipM, 5*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	migrate(t, l, m, h2, 500*time.Millisecond, true)
	mig := waitMigrated(t, l, h2, vipM)
	ps := pinger.Stop(3 * time.Second)
	// The pings are the traffic the cache must carry; their loss is not
	// this test's business (the migration tests measure it).
	t.Logf("pings: %d sent, %d lost; migration %+v", ps.Sent, ps.LostCount, mig)
	if mig.Delivered == 0 || mig.Delivered != mig.Flushed+mig.Forwarded+mig.Held || sum(mig.Dropped)+mig.Lost != 0 {
		t.Errorf("the cache did not deliver everything it carried: %+v", mig)
	}
	if err := l.WaitPing(c, vipM, 10*time.Second); err != nil {
		t.Errorf("after the migration: %v", err)
	}
	for _, h := range l.Hosts {
		if st := status(t, l, h); len(st.Problems) > 0 {
			t.Errorf("%s: problems %q", h.Name, st.Problems)
		}
		b, _ := os.ReadFile(h.Agent.LogPath)
		for _, line := range strings.Split(string(b), "\n") {
			lower := strings.ToLower(line)
			if strings.Contains(lower, "not permitted") || strings.Contains(lower, "permission denied") {
				t.Errorf("%s: %s", h.Name, line)
			}
		}
	}
}
