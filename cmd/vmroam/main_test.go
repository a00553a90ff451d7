package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(context.Background(), args, &out, &errb)
	return code, out.String(), errb.String()
}

func keyFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "gossip.key")
	if err := os.WriteFile(p, []byte(base64.StdEncoding.EncodeToString(make([]byte, 32))+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestUsageErrors(t *testing.T) {
	kf := keyFile(t)
	good := []string{"agent", "--bind", "198.18.0.1", "--address", "100.100.0.1/16", "--encrypt-key-file", kf}
	cases := []struct {
		name string
		args []string
		want string // in stderr
	}{
		{"no command", nil, "no command"},
		{"unknown command", []string{"frobnicate"}, `unknown command "frobnicate"`},
		{"agent without bind", []string{"agent", "--address", "100.100.0.1/16", "--encrypt-key-file", kf}, "--bind is required"},
		{"agent bad bind", append(good, "--bind", "nope"), `--bind "nope"`},
		{"agent bad address", append(good, "--address", "100.100.0.1"), "--address"},
		{"agent prefix as address", append(good, "--address", "100.100.0.0/16"), "100.100.0.1/16"},
		{"agent bad mtu", append(good, "--mtu", "abc"), "invalid value"},
		{"agent tiny mtu", append(good, "--mtu", "500"), "--mtu 500"},
		{"agent bad port", append(good, "--wg-port", "70000"), "--wg-port 70000"},
		{"agent bad impl", append(good, "--wg-impl", "magic"), "--wg-impl"},
		{"agent long iface", append(good, "--interface", "averyveryverylongname"), "--interface"},
		{"agent no key", []string{"agent", "--bind", "198.18.0.1", "--address", "100.100.0.1/16"}, "vmroam keygen --gossip"},
		{"agent missing key file", append(good, "--encrypt-key-file", "/nonexistent/key"), "--encrypt-key-file"},
		{"agent unspecified bind", append(good, "--bind", "0.0.0.0"), "--advertise is required"},
		{"agent unknown flag", append(good, "--frob"), "flag provided but not defined"},
		{"agent stray argument", append(good, "extra"), "no arguments"},
		{"keygen nothing", []string{"keygen"}, "exactly one"},
		{"vip no sub", []string{"vip"}, "subcommand"},
		{"vip attach no dev", []string{"vip", "attach", "100.100.10.1"}, "--dev IFACE is required"},
		{"vip attach bad ip", []string{"vip", "attach", "100.100.10.x", "--dev", "vif1"}, "not an IP address"},
		{"vip attach two ips", []string{"vip", "attach", "100.100.10.1", "100.100.10.2", "--dev", "vif1"}, "exactly one VIP"},
		{"vip detach none", []string{"vip", "detach"}, "exactly one VIP"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, c.args...)
			if code != 2 {
				t.Errorf("exit %d, want 2; stderr: %s", code, stderr)
			}
			if !strings.Contains(stderr, c.want) {
				t.Errorf("stderr %q does not say %q", stderr, c.want)
			}
			if strings.Count(strings.TrimSpace(stderr), "\n") > 0 && c.name != "no command" {
				t.Errorf("reason is more than one line: %q", stderr)
			}
		})
	}
}

func TestHelpExitsZero(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"agent", "--help"}, {"status", "-h"}, {"vip", "attach", "--help"}, {"keygen", "--help"}} {
		code, stdout, stderr := runCLI(t, args...)
		if code != 0 || strings.Count(stdout, "Usage:") != 1 {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, code, stdout, stderr)
		}
		if n := strings.Count(stdout, "Usage"); n > 1 {
			t.Errorf("%v: the usage printed %d times", args, n)
		}
	}
}

func TestNoAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	for _, args := range [][]string{
		{"status", "--socket", sock},
		{"vip", "list", "--socket", sock},
		{"vip", "attach", "100.100.10.1", "--dev", "vif1", "--socket", sock},
		{"vip", "detach", "100.100.10.1", "--socket", sock},
	} {
		code, _, stderr := runCLI(t, args...)
		if code != 1 || !strings.Contains(stderr, "is the agent running?") {
			t.Errorf("%v: exit %d, stderr %q", args, code, stderr)
		}
	}
	t.Setenv("VMROAM_SOCKET", sock)
	if code, _, stderr := runCLI(t, "status"); code != 1 || !strings.Contains(stderr, sock) {
		t.Errorf("VMROAM_SOCKET not used: exit %d, %q", code, stderr)
	}
}

func TestKeygen(t *testing.T) {
	code, stdout, _ := runCLI(t, "keygen", "--gossip")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(stdout))
	if err != nil || len(k) != 32 {
		t.Fatalf("gossip key %q: %v, %d bytes", stdout, err, len(k))
	}
	_, again, _ := runCLI(t, "keygen", "--gossip")
	if again == stdout {
		t.Fatal("two keygen runs gave the same key")
	}
	code, stdout, _ = runCLI(t, "keygen", "--wireguard")
	if k, err := base64.StdEncoding.DecodeString(strings.TrimSpace(stdout)); code != 0 || err != nil || len(k) != 32 {
		t.Fatalf("wireguard key %q: exit %d, %v", stdout, code, err)
	}
}

func TestConfigFile(t *testing.T) {
	kf := keyFile(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "vmroam.toml")
	os.WriteFile(conf, []byte(`
name = "h7"
bind = "198.18.0.7"
address = "100.100.0.7/16"
join = ["198.18.0.1", "198.18.0.2:7947"]
mtu = 1380
insecure-gossip = false
encrypt-key-file = "`+kf+`"
reconcile-interval = "5s"
vip-prefixes = ["100.100.0.0/16", "fd76:6d72::/64"]
`), 0o600)
	cfg, err := agentConfig([]string{"--config", conf, "--mtu", "1400"}, &bytes.Buffer{}, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Name != "h7" || cfg.BindAddr.String() != "198.18.0.7" || cfg.Address.String() != "100.100.0.7/16" {
		t.Errorf("file values not applied: %+v", cfg)
	}
	if cfg.MTU != 1400 {
		t.Errorf("MTU %d: the flag must win over the file", cfg.MTU)
	}
	if len(cfg.Join) != 2 || cfg.Join[1] != "198.18.0.2:7947" {
		t.Errorf("join = %q", cfg.Join)
	}
	if cfg.ReconcileInterval != 5*time.Second || len(cfg.GossipKeys) != 1 {
		t.Errorf("interval %v, keys %d", cfg.ReconcileInterval, len(cfg.GossipKeys))
	}
	if len(cfg.VIPPrefixes) != 2 || cfg.VIPPrefixes[1].String() != "fd76:6d72::/64" {
		t.Errorf("vip-prefixes = %v", cfg.VIPPrefixes)
	}
	if _, err := agentConfig([]string{"--config", conf, "--vip-prefixes", "100.100.0.0"}, &bytes.Buffer{}, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), "--vip-prefixes") {
		t.Errorf("--vip-prefixes without a length: %v", err)
	}

	os.WriteFile(conf, []byte("bnid = \"198.18.0.7\"\n"), 0o600)
	if _, err := agentConfig([]string{"--config", conf}, &bytes.Buffer{}, &bytes.Buffer{}); err == nil || !strings.Contains(err.Error(), `unknown key "bnid"`) {
		t.Errorf("misspelt key: %v", err)
	}
	os.WriteFile(conf, []byte("mtu = [1]\n"), 0o600)
	if _, err := agentConfig([]string{"--config", conf}, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Error("a list for mtu was accepted")
	}
	os.WriteFile(conf, []byte("mtu = \n"), 0o600)
	if _, err := agentConfig([]string{"--config", conf}, &bytes.Buffer{}, &bytes.Buffer{}); err == nil {
		t.Error("broken TOML accepted")
	}
}
