package e2e

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
)

// TestAgentReload runs an agent as systemd would (Type=notify, a config
// file, SIGHUP to reload, SIGTERM to stop): it says READY only once it
// serves; a reload applies the new values live, keeps the old value of a
// key that needs a restart, and refuses a bad file whole.
func TestAgentReload(t *testing.T) {
	l := newLab(t, 2)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	if _, err := l.StartAgent(h2); err != nil {
		t.Fatal(err)
	}
	notifyPath := filepath.Join(t.TempDir(), "notify")
	notifications, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notifications.Close()
	// Wait for the next datagram, which must start with want.
	expect := func(want string) string {
		t.Helper()
		buf := make([]byte, 4096)
		notifications.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, err := notifications.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %q from the agent: %v", want, err)
		}
		if msg := string(buf[:n]); strings.HasPrefix(msg, want) {
			return msg
		}
		t.Fatalf("agent sent %q, want %q first", buf[:n], want)
		return ""
	}

	conf := filepath.Join(l.Dir, "h1.toml")
	writeConf := func(body string) {
		t.Helper()
		if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writeConf(`
log-level = "info"
keepalive = "25s"
cache-linger = "2s"
alloc-quarantine = "5m"
mtu = 1420
`)
	logPath := filepath.Join(l.Dir, "h1-notify.log")
	argv := append([]string{"env", "NOTIFY_SOCKET=" + notifyPath, binary}, l.AgentArgs(h1, "--config", conf)...)
	cmd, err := l.Spawn(h1.NS, logPath, argv...)
	if err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("---- log of h1 ----\n%s", tail(string(b), 60))
		}
	})
	hup := func() {
		t.Helper()
		if err := cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
	}

	expect("READY=1")
	// READY means serving: the control socket answers at once.
	st := status(t, l, h1)
	if c := st.Config; c == nil || c.Keepalive != "25s" || c.CacheLinger != "2s" || c.LogLevel != "info" || len(c.RestartNeeded) != 0 {
		t.Fatalf("config at start: %+v", st.Config)
	}
	h2key := status(t, l, h2).PublicKey
	waitKeepalive(t, l, h1, h2key, "25")

	// Live keys change; the MTU needs a restart; interface is on the
	// command line, which wins over the file, so it changes nothing.
	writeConf(`
log-level = "debug"
keepalive = "10s"
cache-linger = "3s"
alloc-quarantine = "1m"
mtu = 1400
interface = "vmrX"
`)
	hup()
	expect("RELOADING=1\nMONOTONIC_USEC=")
	if msg := expect("READY=1"); !strings.Contains(msg, "RESTART NEEDED for mtu") {
		t.Errorf("systemd status after the reload: %q", msg)
	}
	st = status(t, l, h1)
	c := st.Config
	if c.Keepalive != "10s" || c.CacheLinger != "3s" || c.LogLevel != "debug" || c.AllocQuarantine != "1m0s" || c.Reloaded == nil {
		t.Errorf("config after the reload: %+v", c)
	}
	if !slices.Equal(c.RestartNeeded, []string{"mtu"}) {
		t.Errorf("restart needed for %q, want only mtu (interface comes from the command line)", c.RestartNeeded)
	}
	waitKeepalive(t, l, h1, h2key, "10")
	if out, err := l.Exec(h1.NS, "ip", "-o", "link", "show", "dev", h1.Iface); err != nil || !strings.Contains(string(out), "mtu 1420") {
		t.Errorf("MTU changed without a restart: %s %v", out, err)
	}
	logText, _ := os.ReadFile(logPath)
	for _, want := range []string{"key=cache-linger from=2s to=3s", "key=mtu running=1420 file=1400", "needs a restart"} {
		if !strings.Contains(string(logText), want) {
			t.Errorf("log lacks %q", want)
		}
	}

	// A bad file changes nothing, not even its valid keys.
	for _, bad := range []string{
		"cache-linger = \"1s\"\nreconcile-interval = \"1ms\"\n", // invalid value
		"cache-linger = \"1s\"\ncache-lingr = \"1s\"\n",         // misspelt key
		"cache-linger = \"1s\"\nkeepalive = \n",                 // not TOML
	} {
		writeConf(bad)
		hup()
		expect("RELOADING=1")
		if msg := expect("READY=1"); !strings.Contains(msg, "refused") {
			t.Errorf("systemd status after a bad file: %q", msg)
		}
		if got := status(t, l, h1).Config; got.CacheLinger != "3s" || got.Keepalive != "10s" || got.LogLevel != "debug" {
			t.Errorf("bad file %q changed the config: %+v", bad, got)
		}
	}
	if logText, _ := os.ReadFile(logPath); strings.Count(string(logText), "config reload refused") != 3 {
		t.Errorf("want 3 refusals in the log:\n%s", tail(string(logText), 20))
	}

	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	expect("STOPPING=1")
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("agent exit after SIGTERM: %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("agent still running 20 s after SIGTERM")
	}
}

// waitKeepalive waits until h's WireGuard peer with key has the keepalive
// (seconds, as `wg show` prints it).
func waitKeepalive(t *testing.T, l *lab.Lab, h *lab.Host, key, secs string) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("%s: keepalive %s s on the peer", h.Name, secs), func() error {
		out, err := l.Exec(h.NS, "wg", "show", h.Iface, "persistent-keepalive")
		if err != nil {
			return err
		}
		for _, line := range strings.Split(string(out), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == key {
				if f[1] == secs {
					return nil
				}
				return fmt.Errorf("keepalive %s", f[1])
			}
		}
		return fmt.Errorf("no such peer in %q", out)
	})
}
