package main

import (
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/vmroam/vmroam/wgagent/control"
)

// pveCluster is a cluster's /etc/pve as pmxcfs shows it on every node: one
// tree, shared, with a directory per node.
type pveCluster struct {
	t   *testing.T
	dir string
}

func newPVECluster(t *testing.T, nodes ...string) *pveCluster {
	t.Helper()
	c := &pveCluster{t: t, dir: t.TempDir()}
	for _, n := range nodes {
		if err := os.MkdirAll(filepath.Join(c.dir, "nodes", n, "qemu-server"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	old := pveDir
	pveDir = c.dir
	t.Cleanup(func() { pveDir = old })
	return c
}

func (c *pveCluster) confPath(node, vmid string) string {
	return filepath.Join(c.dir, "nodes", node, "qemu-server", vmid+".conf")
}

// put writes VM vmid's config on node.
func (c *pveCluster) put(node, vmid string, conf []byte) {
	c.t.Helper()
	if err := os.WriteFile(c.confPath(node, vmid), conf, 0o640); err != nil {
		c.t.Fatal(err)
	}
}

// move moves VM vmid's config from one node to another, as a migration's
// source does before it resumes the VM at the target
// (QemuConfig->move_config_to_node).
func (c *pveCluster) move(vmid, from, to string) {
	c.t.Helper()
	if err := os.Rename(c.confPath(from, vmid), c.confPath(to, vmid)); err != nil {
		c.t.Fatal(err)
	}
}

func pveFixture(t *testing.T, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("..", "..", "xenhook", "testdata", "proxmox", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// pveHost is one Proxmox node: its agent (a recording fake) and its socket.
type pveHost struct {
	name   string
	agent  *recordingBackend
	socket string
	seen   int // calls already checked
}

func newPVEHost(t *testing.T, name string) *pveHost {
	t.Helper()
	h := &pveHost{name: name, agent: &recordingBackend{}, socket: filepath.Join(t.TempDir(), "agent.sock")}
	srv, err := control.Listen(h.socket, h.agent, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return h
}

// newCalls returns the calls the host's agent got since the last look.
func (h *pveHost) newCalls() []string {
	calls := h.agent.Calls()
	out := calls[h.seen:]
	h.seen = len(calls)
	return out
}

// pveHook runs `vmroam hook proxmox VMID PHASE` as Proxmox runs a VM's
// hookscript on host, with PVE_MIGRATED_FROM set when from is not empty
// (vm_start_nolock sets it on a migration's target), and returns what it
// printed and sent to syslog. The hook does not read PVE_MIGRATED_FROM (it
// finds the config on whichever node has it); the test sets it all the
// same so that the hook runs in the environment Proxmox gives it.
func pveHook(t *testing.T, host *pveHost, from, vmid, phase string) (code int, stdout, stderr string, syslog []string) {
	t.Helper()
	t.Setenv(control.SocketEnv, host.socket)
	t.Setenv("PVE_MIGRATED_FROM", from) // restored at the test's end
	if from == "" {
		os.Unsetenv("PVE_MIGRATED_FROM")
	}
	var mu sync.Mutex
	old := hookSyslog
	hookSyslog = func(line string) {
		mu.Lock()
		defer mu.Unlock()
		syslog = append(syslog, line)
	}
	defer func() { hookSyslog = old }()
	code, stdout, stderr = runCLI(t, "hook", "proxmox", vmid, phase)
	return code, stdout, stderr, syslog
}

// TestHookProxmoxMigration runs the hookscript's phases in the order and on
// the nodes where qemu-server runs them (QemuServer.pm, QemuMigrate.pm):
// a start, a live migration, a failed one and a stop, with VM 100's config
// (cloud-init ipconfig0, IPv4 and IPv6, behind net0) where pmxcfs has it
// at each step, and checks every call each node's agent gets, in order.
func TestHookProxmoxMigration(t *testing.T) {
	cluster := newPVECluster(t, "pve1", "pve2")
	cluster.put("pve1", "100", pveFixture(t, "100-web1.conf"))
	pve1, pve2 := newPVEHost(t, "pve1"), newPVEHost(t, "pve2")
	hosts := map[string]*pveHost{"pve1": pve1, "pve2": pve2}

	prepare := []string{"prepare 100.64.1.5", "prepare fd00:64::5"}
	attach := []string{"attach-when-announced 100.64.1.5 tap100i0", "attach-when-announced fd00:64::5 tap100i0"}
	detach := []string{"detach 100.64.1.5", "detach fd00:64::5"}
	type run struct{ host, from, phase string }
	for _, step := range []struct {
		name string
		runs []run
		// after the runs, as the migration's source does.
		moveTo string
		want   map[string][]string // calls per host; a host not named gets none
	}{
		{"start on pve1", []run{{"pve1", "", "pre-start"}, {"pve1", "", "post-start"}}, "",
			map[string][]string{"pve1": slices.Concat(prepare, attach)}},
		// The target starts the incoming QEMU (qm start --migratedfrom
		// pve1) while the config is still pve1's; then pve1 copies the
		// memory, moves the config and resumes the VM at pve2. The source
		// runs no phase: vm_stop with nocheck, cleanup with
		// skip_hookscript.
		{"live migration to pve2", []run{{"pve2", "pve1", "pre-start"}, {"pve2", "pve1", "post-start"}}, "pve2",
			map[string][]string{"pve2": slices.Concat(prepare, attach)}},
		// An incoming migration that fails: pve1 starts the incoming QEMU,
		// then the source pve2 stops it again (qm stop --migratedfrom
		// pve2), the config never having left pve2.
		{"failed migration back to pve1", []run{{"pve1", "pve2", "pre-start"}, {"pve1", "pve2", "post-start"}, {"pve1", "", "post-stop"}}, "",
			map[string][]string{"pve1": slices.Concat(prepare, attach, detach)}},
		{"stop on pve2", []run{{"pve2", "", "pre-stop"}, {"pve2", "", "post-stop"}}, "",
			map[string][]string{"pve2": detach}},
		{"shutdown from inside the guest", []run{{"pve2", "", "post-stop"}}, "",
			map[string][]string{"pve2": detach}},
	} {
		for _, r := range step.runs {
			code, stdout, stderr, syslog := pveHook(t, hosts[r.host], r.from, "100", r.phase)
			if code != 0 || strings.Contains(stderr, "ERROR") || len(syslog) > 0 || stdout != "" {
				t.Errorf("%s: %s on %s: exit %d, stdout %q, syslog %q, stderr:\n%s", step.name, r.phase, r.host, code, stdout, syslog, stderr)
			}
		}
		if step.moveTo != "" {
			cluster.move("100", step.runs[0].from, step.moveTo)
		}
		for name, h := range hosts {
			if got := h.newCalls(); !slices.Equal(got, step.want[name]) {
				t.Errorf("%s: %s's agent got %q, want %q", step.name, name, got, step.want[name])
			}
		}
	}
}

func TestHookProxmoxReports(t *testing.T) {
	cluster := newPVECluster(t, "pve1", "pve2")
	cluster.put("pve1", "205", pveFixture(t, "205-db1.conf"))
	cluster.put("pve1", "666", []byte("\x00\x01 not a config\n"))
	cluster.put("pve1", "777", []byte("name: twice\n"))
	cluster.put("pve1", "606", []byte("#vmroam-vip%3A 100.64.6.1 net0\nodd line\nnet0: virtio=BC:24:11:00:06:06,bridge=vmbr0\n"))
	cluster.put("pve2", "777", []byte("name: twice\n"))
	cluster.put("pve1", "888", []byte("#vmroam-vip%3A 100.64.8.1 net0\n#vmroam-vip%3A 100.64.8.2 net4\nnet0: virtio=BC:24:11:00:08:00,bridge=vmbr0\n"))
	host := newPVEHost(t, "pve1")
	for _, tc := range []struct {
		name, vmid, phase string
		calls             []string
		stderr            []string // each in stderr
		syslogged         int
	}{
		{"description VIPs", "205", "post-start",
			[]string{"attach-when-announced 100.64.2.10 tap205i1", "attach-when-announced fd00:64:2::10 tap205i1", "attach-when-announced 100.64.2.11 tap205i2"},
			[]string{"vmroam hook: VM 205, post-start: 100.64.2.10 attached on tap205i1 when the VM announces itself (h1 runs it until then)"}, 0},
		{"no config", "999", "pre-start", nil, []string{"vmroam hook: ERROR VM 999, pre-start: no config of VM 999: nothing matches "}, 1},
		{"garbage: skipped with a warning", "666", "post-start", nil, []string{"vmroam hook: VM 666, post-start: warning: VM config: line 1: ", "skipped (config " + cluster.confPath("pve1", "666") + ")"}, 0},
		{"an odd line: detached all the same", "606", "post-stop", []string{"detach 100.64.6.1"}, []string{"vmroam hook: VM 606, post-stop: warning: VM config: line 2: \"odd line\" is not `key: value`: skipped"}, 0},
		{"on two nodes", "777", "post-stop", nil, []string{"VM 777 has a config on several nodes"}, 1},
		{"a tap unknown", "888", "post-start", []string{"attach-when-announced 100.64.8.1 tap888i0"},
			[]string{"vmroam hook: ERROR VM 888, post-start: not attached, the tap is unknown: VIP 100.64.8.2: the VM has no net4"}, 1},
		{"pre-stop reads nothing", "999", "pre-stop", nil, nil, 0},
		{"a phase of a later Proxmox", "205", "pre-migrate", nil, nil, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, stdout, stderr, syslog := pveHook(t, host, "", tc.vmid, tc.phase)
			if code != 0 || stdout != "" {
				t.Errorf("exit %d, stdout %q: a failing pre-start would abort the VM's start; stderr:\n%s", code, stdout, stderr)
			}
			if got := host.newCalls(); !slices.Equal(got, tc.calls) {
				t.Errorf("agent calls %q, want %q", got, tc.calls)
			}
			for _, w := range tc.stderr {
				if !strings.Contains(stderr, w) {
					t.Errorf("stderr lacks %q:\n%s", w, stderr)
				}
			}
			if len(syslog) != tc.syslogged || strings.Count(stderr, "ERROR") != tc.syslogged {
				t.Errorf("syslog %q, want %d errors; stderr:\n%s", syslog, tc.syslogged, stderr)
			}
			for _, l := range syslog {
				if !strings.HasPrefix(l, "vmroam hook: ERROR VM "+tc.vmid+", "+tc.phase+": ") || !strings.Contains(stderr, l) {
					t.Errorf("syslog line %q is not one of stderr's errors", l)
				}
			}
		})
	}
	t.Run("agent down", func(t *testing.T) {
		down := &pveHost{socket: filepath.Join(t.TempDir(), "none.sock")}
		code, _, stderr, syslog := pveHook(t, down, "", "205", "post-stop")
		if code != 0 || len(syslog) != 3 || strings.Count(stderr, "vmroam hook: ERROR VM 205, post-stop: vip detach ") != 3 || !strings.Contains(stderr, "is the agent running?") {
			t.Errorf("exit %d, syslog %q; want 3 errors saying the agent is not running:\n%s", code, syslog, stderr)
		}
	})
}

func TestHookProxmoxUsage(t *testing.T) {
	for _, args := range [][]string{
		{"hook", "proxmox"},
		{"hook", "proxmox", "100"},
		{"hook", "proxmox", "100", "post-start", "extra"},
		{"hook", "proxmox", "web1", "post-start"},
		{"hook", "proxmox", "0100", "post-start"},
	} {
		code, stdout, stderr := runCLI(t, args...)
		if code != 2 || stdout != "" || !strings.Contains(stderr, "hook proxmox: ") {
			t.Errorf("%q: exit %d, stdout %q, stderr %q; want a usage error", args, code, stdout, stderr)
		}
	}
	code, stdout, _ := runCLI(t, "hook", "proxmox", "--help")
	if code != 0 || !strings.Contains(stdout, "vmroam hook proxmox VMID PHASE") {
		t.Errorf("help: exit %d, %q", code, stdout)
	}
	if _, stdout, _ := runCLI(t, "--help"); !strings.Contains(stdout, "vmroam hook proxmox VMID PHASE") {
		t.Error("the main usage does not list vmroam hook proxmox")
	}
}
