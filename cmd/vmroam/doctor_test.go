package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vmroam/vmroam/internal/netnstest"
	"github.com/vmroam/vmroam/wgagent/doctor"
)

func TestDoctorUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"doctor", "extra"}, "no arguments"},
		{[]string{"doctor", "--vif-pattern", "vif["}, `pattern "vif["`},
		{[]string{"doctor", "--endpoint", "host.example"}, `--endpoint "host.example"`},
		{[]string{"doctor", "--mtu", "100"}, "MTU 100"},
		{[]string{"doctor", "--interface", "averyveryverylongname"}, "interface name"},
	} {
		code, _, stderr := runCLI(t, c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%v: exit %d, stderr %q, want 2 and %q", c.args, code, stderr, c.want)
		}
	}
	code, stdout, _ := runCLI(t, "doctor", "--help")
	if code != 0 || !strings.Contains(stdout, "--encrypt-key-file") || strings.Count(stdout, "Usage:") != 1 {
		t.Errorf("doctor --help: exit %d, %q", code, stdout)
	}
}

// TestDoctorCommand runs the command in a fresh namespace where IPv4
// forwarding is off and no agent listens: both fail, each on its own line,
// and the exit status is 1.
func TestDoctorCommand(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	netnstest.Run(t, func() {
		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("0"), 0o644); err != nil {
			t.Fatal(err)
		}
		code, stdout, stderr := runCLI(t, "doctor", "--socket", sock, "--probe=false")
		if code != 1 || !strings.Contains(stderr, "check(s) failed") {
			t.Errorf("exit %d, stderr %q", code, stderr)
		}
		for _, w := range []string{"FAIL  ip_forward   net.ipv4.ip_forward = 0", "fix: sysctl -w net.ipv4.ip_forward=1", "FAIL  agent        no agent answers on " + sock} {
			if !strings.Contains(stdout, w) {
				t.Errorf("output lacks %q:\n%s", w, stdout)
			}
		}

		code, stdout, _ = runCLI(t, "doctor", "--socket", sock, "--probe=false", "--json")
		var rep doctor.Report
		if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
			t.Fatalf("--json: %v\n%s", err, stdout)
		}
		if code != 1 || !rep.Failed() {
			t.Errorf("--json: exit %d, report %+v", code, rep)
		}
		checks := map[string]doctor.Level{}
		for _, r := range rep.Results {
			checks[r.Check] = r.Level
		}
		if checks["ip_forward"] != doctor.Fail || checks["agent"] != doctor.Fail || checks["tun"] == "" || checks["clock"] == "" {
			t.Errorf("--json: levels by check %v", checks)
		}

		if err := os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
		_, stdout, _ = runCLI(t, "doctor", "--socket", sock, "--probe=false")
		if !strings.Contains(stdout, "OK    ip_forward   net.ipv4.ip_forward = 1") {
			t.Errorf("forwarding on:\n%s", stdout)
		}
	})
}
