package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vmroam/vmroam/wgagent/control"
)

// recordingBackend is an agent that lists the calls it gets. refuse makes
// Attach and Detach fail for a VIP.
type recordingBackend struct {
	mu         sync.Mutex
	calls      []string
	refuse     map[netip.Addr]bool
	migrations []control.Migration
}

func (b *recordingBackend) record(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.calls = append(b.calls, fmt.Sprintf(format, args...))
}

func (b *recordingBackend) Calls() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return slices.Clone(b.calls)
}

var errRefused = errors.New("refused by the test")

func (b *recordingBackend) Status(context.Context) (control.Status, error) {
	b.record("status")
	return control.Status{}, nil
}

func (b *recordingBackend) Attach(_ context.Context, vip netip.Addr, dev string) (control.VIP, error) {
	b.record("attach %s %s", vip, dev)
	if b.refuse[vip] {
		return control.VIP{}, errRefused
	}
	return control.VIP{VIP: vip.String(), Dev: dev, Epoch: 4, Local: true, State: "local"}, nil
}

func (b *recordingBackend) AttachWhenAnnounced(_ context.Context, vip netip.Addr, dev string) (control.VIP, error) {
	b.record("attach-when-announced %s %s", vip, dev)
	if b.refuse[vip] {
		return control.VIP{}, errRefused
	}
	return control.VIP{VIP: vip.String(), Dev: dev, Owner: "h1", Epoch: 4, State: "awaiting"}, nil
}

func (b *recordingBackend) Detach(_ context.Context, vip netip.Addr) (control.VIP, error) {
	b.record("detach %s", vip)
	if b.refuse[vip] {
		return control.VIP{}, errRefused
	}
	return control.VIP{VIP: vip.String(), Epoch: 5, State: "released"}, nil
}

func (b *recordingBackend) Suspend(_ context.Context, vip netip.Addr) (control.VIP, error) {
	b.record("suspend %s", vip)
	return control.VIP{}, nil
}

func (b *recordingBackend) Prepare(_ context.Context, vip netip.Addr) (control.VIP, error) {
	b.record("prepare %s", vip)
	return control.VIP{VIP: vip.String(), Owner: "h1", State: "remote"}, nil
}

func (b *recordingBackend) Abort(_ context.Context, vip netip.Addr) (control.VIP, error) {
	b.record("abort %s", vip)
	return control.VIP{}, nil
}

func (b *recordingBackend) AddNetwork(_ context.Context, name string, _ netip.Prefix) (control.Network, error) {
	b.record("network add %s", name)
	return control.Network{}, nil
}

func (b *recordingBackend) RemoveNetwork(_ context.Context, name string) (control.Network, error) {
	b.record("network remove %s", name)
	return control.Network{}, nil
}

func (b *recordingBackend) Allocate(_ context.Context, network, _ string) (control.VIP, error) {
	b.record("allocate %s", network)
	return control.VIP{}, nil
}

func (b *recordingBackend) Keys(context.Context) (control.Keys, error) {
	b.record("keys list")
	return control.Keys{Keys: []control.KeyUse{{Fingerprint: "0011223344556677", Members: 2, Primary: 2}},
		Members: []control.MemberKeys{{Member: "h1", Keys: []string{"0011223344556677"}}, {Member: "h2", Error: "no answer"}}}, nil
}

func (b *recordingBackend) ChangeKeys(_ context.Context, op string, key []byte, force bool) (control.Keys, error) {
	b.record("keys %s %x force=%v", op, key, force)
	return control.Keys{Members: []control.MemberKeys{{Member: "h1"}}}, nil
}

func (b *recordingBackend) Migrations(context.Context) ([]control.Migration, error) {
	b.record("migrations")
	out := []control.Migration{}
	for _, m := range b.migrations {
		m.Timeline = nil
		out = append(out, m)
	}
	return out, nil
}

func (b *recordingBackend) Migration(_ context.Context, id string) (control.Migration, error) {
	b.record("migration %s", id)
	for _, m := range b.migrations {
		if m.ID == id {
			return m, nil
		}
	}
	return control.Migration{}, fmt.Errorf("%w: no migration %q", control.ErrNotFound, id)
}

// fakeAgent serves b on a socket that VMROAM_SOCKET points at: libvirt
// gives the hook no flags, only that.
func fakeAgent(t *testing.T, b *recordingBackend) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	srv, err := control.Listen(path, b, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	t.Setenv(control.SocketEnv, path)
}

// hookCLI runs `vmroam hook libvirt ARGS` with xml on stdin and returns
// what it printed and sent to syslog.
func hookCLI(t *testing.T, xml []byte, args ...string) (code int, stdout, stderr string, syslog []string) {
	t.Helper()
	in := bytes.NewReader(xml)
	var mu sync.Mutex
	oldIn, oldLog := hookInput, hookSyslog
	hookInput = in
	hookSyslog = func(line string) {
		mu.Lock()
		defer mu.Unlock()
		syslog = append(syslog, line)
	}
	defer func() { hookInput, hookSyslog = oldIn, oldLog }()
	code, stdout, stderr = runCLI(t, append([]string{"hook", "libvirt"}, args...)...)
	if in.Len() != 0 {
		t.Errorf("%q: %d bytes of stdin left unread", args, in.Len())
	}
	return code, stdout, stderr, syslog
}

func domainXML(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "xenhook", "testdata", "libvirt", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestHookLibvirt(t *testing.T) {
	live, inactive := domainXML(t, "web1-live.xml"), domainXML(t, "web1-inactive.xml")
	for _, tc := range []struct {
		name      string
		xml       []byte
		args      []string
		calls     []string
		stderr    []string // each in stderr
		syslogged bool
	}{
		{"destination: migrate", inactive, []string{"web1", "migrate", "begin", "-"}, nil, nil, false},
		{"destination: prepare", inactive, []string{"web1", "prepare", "begin", "-"},
			[]string{"prepare 100.64.1.5", "prepare fd00:64::5", "prepare 100.64.1.7", "prepare 100.64.1.8"},
			[]string{"domain web1, prepare begin: prepare 100.64.1.5: ready (owner h1)", "prepare 100.64.1.8: ready (owner h1)"}, false},
		{"destination: start", live, []string{"web1", "start", "begin", "-"},
			[]string{"prepare 100.64.1.5", "prepare fd00:64::5", "prepare 100.64.1.7", "prepare 100.64.1.8"}, []string{"ready"}, false},
		{"destination: started", live, []string{"web1", "started", "begin", "-"},
			[]string{"attach-when-announced 100.64.1.5 vnet3", "attach-when-announced fd00:64::5 vnet3", "attach-when-announced 100.64.1.7 vnet4", "attach-when-announced 100.64.1.8 vnet4"},
			[]string{"domain web1, started begin: 100.64.1.5 attached on vnet3 when the VM announces itself (h1 runs it until then)"}, false},
		{"source: stopped", live, []string{"web1", "stopped", "end", "-"}, nil, nil, false},
		{"source: release", live, []string{"web1", "release", "end", "migrated"},
			[]string{"detach 100.64.1.5", "detach fd00:64::5", "detach 100.64.1.7", "detach 100.64.1.8"},
			[]string{"domain web1, release end: 100.64.1.5 released (epoch 5)"}, false},
		{"reconnect", live, []string{"web1", "reconnect", "begin", "-"}, nil, nil, false},
		{"malformed XML", []byte("<domain><devices>"), []string{"web1", "started", "begin", "-"}, nil,
			[]string{"vmroam hook: ERROR domain web1, started begin: domain XML: "}, true},
		{"no XML", nil, []string{"web1", "release", "end", "-"}, nil,
			[]string{"vmroam hook: ERROR domain web1, release end: domain XML: empty"}, true},
		{"a VIP without interface", []byte(`<domain type='kvm'><metadata>
  <vmroam:vips xmlns:vmroam="https://vmroam.dev/xmlns/1"><vmroam:vip address="100.64.9.1"/><vmroam:vip address="100.64.9.2" interface="ua-net0"/></vmroam:vips>
</metadata><devices>
  <interface type='bridge'><mac address='52:54:00:00:00:01'/><target dev='vnet1'/><alias name='ua-net0'/></interface>
  <interface type='bridge'><mac address='52:54:00:00:00:02'/><target dev='vnet2'/></interface>
</devices></domain>`), []string{"db1", "started", "begin", "-"},
			[]string{"attach-when-announced 100.64.9.2 vnet1"},
			[]string{"vmroam hook: ERROR domain db1, started begin: not attached, the interface is unknown: VIP 100.64.9.1: no interface named"}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := &recordingBackend{}
			fakeAgent(t, b)
			code, stdout, stderr, syslog := hookCLI(t, tc.xml, tc.args...)
			if code != 0 {
				t.Errorf("exit %d: libvirt would abort the operation; stderr:\n%s", code, stderr)
			}
			if stdout != "" {
				t.Errorf("stdout %q: libvirt would take it for the domain XML", stdout)
			}
			if got := b.Calls(); !slices.Equal(got, tc.calls) {
				t.Errorf("agent calls %q, want %q", got, tc.calls)
			}
			for _, w := range tc.stderr {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
			if hasErr := strings.Contains(stderr, "ERROR"); hasErr != tc.syslogged || (len(syslog) > 0) != tc.syslogged {
				t.Errorf("errors on stderr: %v, syslog %q; want errors: %v\nstderr:\n%s", hasErr, syslog, tc.syslogged, stderr)
			}
			for _, l := range syslog {
				if !strings.HasPrefix(l, "vmroam hook: ERROR ") || !strings.Contains(stderr, l) {
					t.Errorf("syslog line %q is not one of stderr's errors", l)
				}
			}
		})
	}
}

func TestHookLibvirtAgentTrouble(t *testing.T) {
	live := domainXML(t, "web1-live.xml")
	t.Run("agent down", func(t *testing.T) {
		t.Setenv(control.SocketEnv, filepath.Join(t.TempDir(), "none.sock"))
		for _, op := range [][]string{{"started", "begin"}, {"release", "end"}} {
			code, stdout, stderr, syslog := hookCLI(t, live, "web1", op[0], op[1], "-")
			if code != 0 || stdout != "" {
				t.Errorf("%s: exit %d, stdout %q: the VM's %s must not depend on the agent", op, code, stdout, op[0])
			}
			// Loud: one error per VIP, saying why.
			if n := strings.Count(stderr, "vmroam hook: ERROR domain web1, "+op[0]+" "+op[1]+": vip "); n != 4 || !strings.Contains(stderr, "is the agent running?") {
				t.Errorf("%s: %d errors, want 4 saying the agent is not running:\n%s", op, n, stderr)
			}
			if len(syslog) != 4 {
				t.Errorf("%s: syslog %q, want the 4 errors", op, syslog)
			}
		}
	})
	t.Run("agent refuses one VIP", func(t *testing.T) {
		b := &recordingBackend{refuse: map[netip.Addr]bool{netip.MustParseAddr("fd00:64::5"): true}}
		fakeAgent(t, b)
		code, _, stderr, syslog := hookCLI(t, live, "web1", "started", "begin", "-")
		want := []string{"attach-when-announced 100.64.1.5 vnet3", "attach-when-announced fd00:64::5 vnet3", "attach-when-announced 100.64.1.7 vnet4", "attach-when-announced 100.64.1.8 vnet4"}
		if got := b.Calls(); code != 0 || !slices.Equal(got, want) {
			t.Errorf("exit %d, calls %q: want every VIP tried, %q", code, got, want)
		}
		if len(syslog) != 1 || !strings.Contains(syslog[0], "vip attach fd00:64::5 --dev vnet3 --when announced: ") || !strings.Contains(syslog[0], "refused by the test") {
			t.Errorf("syslog %q; stderr:\n%s", syslog, stderr)
		}
	})
}

func TestHookUsage(t *testing.T) {
	for _, args := range [][]string{
		{"hook"},
		{"hook", "xen"},
		{"hook", "libvirt"},
		{"hook", "libvirt", "web1", "started", "begin"},
		{"hook", "libvirt", "web1", "started", "begin", "-", "extra"},
	} {
		code, stdout, stderr := runCLI(t, args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, "hook") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want a usage error", args, code, stdout, stderr)
		}
	}
	code, stdout, _ := runCLI(t, "hook", "libvirt", "--help")
	if code != 0 || !strings.Contains(stdout, "vmroam hook libvirt DOMAIN OP SUBOP EXTRA") {
		t.Errorf("help: exit %d, %q", code, stdout)
	}
	if _, stdout, _ := runCLI(t, "--help"); !strings.Contains(stdout, "vmroam hook libvirt DOMAIN OP SUBOP EXTRA") {
		t.Error("the main usage does not list vmroam hook")
	}
}
