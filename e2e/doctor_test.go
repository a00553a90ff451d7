package e2e

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"

	"github.com/vmroam/vmroam/wgagent/doctor"
)

// TestDoctor runs `vmroam doctor` the way an operator does, in a host of a
// running cluster (`ip netns exec`, so the whole process sees the host's
// namespace): first healthy, then with forwarding off, strict rp_filter on
// a Xen-named vif and an underlay MTU too small for the tunnel.
func TestDoctor(t *testing.T) {
	l := newLab(t, 2)
	h1 := l.Hosts[0]
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.AddVMWithVif("a", "vif5.0", h1, vipA); err != nil {
		t.Fatal(err)
	}
	cli(t, l, h1, "vip", "attach", vipA.String(), "--dev", "vif5.0")
	waitSessions(t, l)

	run := func() (doctor.Report, map[string]doctor.Result, error) {
		t.Helper()
		out, err := l.CLI(h1, "doctor", "--json", "--encrypt-key-file", l.KeyFile)
		var rep doctor.Report
		// stdout is the JSON; a failing run adds one line on stderr after it.
		if derr := json.NewDecoder(bytes.NewReader(out)).Decode(&rep); derr != nil {
			t.Fatalf("doctor --json: %v\n%s", derr, out)
		}
		rank := map[doctor.Level]int{doctor.OK: 0, doctor.Info: 1, doctor.Warn: 2, doctor.Fail: 3}
		worst := map[string]doctor.Result{}
		for _, r := range rep.Results {
			if w, ok := worst[r.Check]; !ok || rank[r.Level] > rank[w.Level] {
				worst[r.Check] = r
			}
		}
		return rep, worst, err
	}

	rep, by, err := run()
	if err != nil || rep.Failed() {
		t.Fatalf("healthy host: %v\n%+v", err, rep.Results)
	}
	for check, found := range map[string]string{
		"ip_forward": "net.ipv4.ip_forward = 1",
		"rp_filter":  "1 VM interfaces",
		"mtu":        "fits the route to 1 hosts; 1 answered a full-size ping",
		"agent":      "agent h1 answers",
		"gossip_key": "owned by root, 1 key(s)",
		"tun":        "opens",
	} {
		if r := by[check]; r.Level != doctor.OK || !strings.Contains(r.Found, found) {
			t.Errorf("healthy host: %s: %+v, want OK with %q", check, r, found)
		}
	}

	if _, err := l.Exec(h1.NS, "sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv4.conf.vif5/0.rp_filter=1"); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Exec(h1.NS, "ip", "link", "set", "eth0", "mtu", "1400"); err != nil {
		t.Fatal(err)
	}
	rep, by, err = run()
	if err == nil || !rep.Failed() {
		t.Fatalf("broken host: exit status 0\n%+v", rep.Results)
	}
	peer := l.Hosts[1]
	for check, found := range map[string]string{
		"ip_forward": "net.ipv4.ip_forward = 0",
		"rp_filter":  "strict rp_filter (1) on vif5.0",
		"mtu":        "to peer h2 (" + peer.Underlay.String() + "): a full tunnel packet is 1480 bytes (MTU 1420 + 60), the route via eth0 allows 1400",
	} {
		if r := by[check]; r.Level != doctor.Fail || !strings.Contains(r.Found, found) || r.Fix == "" {
			t.Errorf("broken host: %s: %+v, want FAIL with %q and a fix", check, r, found)
		}
	}
	if rep.Count(doctor.Fail) != 3 {
		t.Errorf("broken host: %d failures, want 3: %+v", rep.Count(doctor.Fail), rep.Results)
	}
}
