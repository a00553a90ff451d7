package xenhook

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const (
	xenScripts = "/etc/xen/scripts"
	testSocket = "/run/vmroam-hook-test.sock"
)

// hookPath is the hook as the repository ships it.
func hookPath(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs("../scripts/xen/vmroam.hook")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

func writeScript(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte("#!/bin/bash\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
}

// fakeVmroam writes a vmroam that records its arguments and VMROAM_SOCKET
// and exits with code.
func fakeVmroam(t *testing.T, bin, rec string, code int) {
	t.Helper()
	writeScript(t, filepath.Join(bin, "vmroam"), fmt.Sprintf(`
printf '%%s\n' "$*" >>%[1]q/vmroam.calls
printf '%%s\n' "${VMROAM_SOCKET-unset}" >>%[1]q/vmroam.socket
if [ %[2]d -ne 0 ]; then
	echo "vmroam: no agent answers on ${VMROAM_SOCKET}" >&2
	exit %[2]d
fi
echo "$3 done"
`, rec, code))
}

func lines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimRight(string(b), "\n"), "\n")
}

// TestHookSourcedSafely sources the hook the way call_hooks does, under
// `set -e` and an ERR trap that ends the script, with a vmroam that fails:
// the caller must carry on, with its shell options intact and no function
// left behind.
func TestHookSourcedSafely(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	fakeVmroam(t, bin, dir, 1)
	caller := filepath.Join(dir, "caller")
	writeScript(t, caller, fmt.Sprintf(`
set -e
trap 'echo "ERR trap fired"; exit 9' ERR
log() { printf '%%s\n' "$*" >>%[1]q/log; }
call_hooks() { for f in %[2]q; do if [ -x "$f" ]; then . "$f"; fi; done; }
command=online dev=vif5.0 ip="100.64.7.5 10.1.0.0/24 fd00::5/128"
before=$-
call_hooks vif post
[ "$-" = "$before" ] || { echo "options changed: $before -> $-"; exit 3; }
if declare -F | grep vmroam_; then echo "functions left behind"; exit 4; fi
[ "$f" = %[2]q ] || { echo "call_hooks' loop variable clobbered"; exit 5; }
echo survived
`, dir, hookPath(t)))
	cmd := exec.Command("bash", caller)
	cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin", "VMROAM_SOCKET=" + testSocket}
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "survived") {
		t.Fatalf("caller: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "no agent answers") {
		t.Errorf("the CLI's complaint did not reach stderr:\n%s", out)
	}
	calls := lines(t, filepath.Join(dir, "vmroam.calls"))
	want := []string{"vip attach 100.64.7.5 --dev vif5.0", "vip attach fd00::5/128 --dev vif5.0"}
	if !slices.Equal(calls, want) {
		t.Errorf("vmroam calls %q, want %q", calls, want)
	}
	log := strings.Join(lines(t, filepath.Join(dir, "log")), "\n")
	for _, w := range []string{
		"err vmroam.hook: FAILED (exit 1): vmroam vip attach 100.64.7.5 --dev vif5.0",
		"err vmroam.hook: FAILED (exit 1): vmroam vip attach fd00::5/128 --dev vif5.0",
		"warning vmroam.hook: 10.1.0.0/24 on vif5.0 is a network",
	} {
		if !strings.Contains(log, w) {
			t.Errorf("log lacks %q:\n%s", w, log)
		}
	}
}

// TestXenVifRoute runs Debian's real vif-route (xen-utils-common) online and
// offline with the hook in its vif-post.d, inside fresh network and mount
// namespaces: veths named eth0 and vif5.0 stand in for dom0's uplink and
// the VM's vif, so vif-route's ifconfig and ip commands really
// run. Only what needs a hypervisor is stubbed: xenstore-read and friends
// answer from a map, logger records, vmroam records its calls.
func TestXenVifRoute(t *testing.T) {
	if testing.Short() {
		t.Skip("runs Xen's hotplug scripts in namespaces: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs Xen's vif-route in its own network and mount namespaces")
	}
	if _, err := os.Stat(filepath.Join(xenScripts, "vif-route")); err != nil {
		t.Skipf("Xen's hotplug scripts are not installed (%v): `make deps` installs Debian's xen-utils-common", err)
	}
	for _, tool := range []string{"unshare", "mount", "ip", "ifconfig", "cp"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not found: `make deps` installs what vif-route needs", tool)
		}
	}

	t.Run("agent answers", func(t *testing.T) {
		r := runVifRoute(t, vmroamExits(0))
		r.expectExit0(t)
		want := []string{
			"vip attach 100.64.7.5 --dev vif5.0",
			"vip attach 100.64.7.6 --dev vif5.0",
			"vip detach 100.64.7.5",
			"vip detach 100.64.7.6",
		}
		if got := lines(t, r.file("vmroam.calls")); !slices.Equal(got, want) {
			t.Errorf("vmroam calls:\n got %q\nwant %q", got, want)
		}
		for _, s := range lines(t, r.file("vmroam.socket")) {
			if s != testSocket {
				t.Errorf("vmroam ran with VMROAM_SOCKET=%q, want %q", s, testSocket)
			}
		}
		// vif-route itself worked: its routes came and went.
		for _, addr := range []string{"100.64.7.5", "100.64.7.6"} {
			route := addr + " dev vif5.0"
			if !strings.Contains(r.read(t, "routes.online"), route) {
				t.Errorf("after online, no route %q:\n%s", route, r.read(t, "routes.online"))
			}
			if strings.Contains(r.read(t, "routes.offline"), route) {
				t.Errorf("after offline, route %q remains", route)
			}
		}
		if errs := r.syslog(t, "daemon.err"); len(errs) != 0 {
			t.Errorf("errors logged:\n%s", strings.Join(errs, "\n"))
		}
		if info := r.syslog(t, "vmroam vip attach 100.64.7.5 --dev vif5.0 done"); len(info) != 1 {
			t.Errorf("success not logged; syslog:\n%s", r.read(t, "syslog"))
		}
	})

	t.Run("agent down", func(t *testing.T) {
		r := runVifRoute(t, vmroamExits(1))
		// Loud, but the VM starts: vif-route succeeds and tells libxl so.
		r.expectExit0(t)
		if got := lines(t, r.file("vmroam.calls")); len(got) != 4 {
			t.Errorf("vmroam calls %q, want all four tried", got)
		}
		errs := strings.Join(r.syslog(t, "daemon.err"), "\n")
		for _, w := range []string{
			"FAILED (exit 1): vmroam vip attach 100.64.7.5 --dev vif5.0",
			"FAILED (exit 1): vmroam vip attach 100.64.7.6 --dev vif5.0",
			"FAILED (exit 1): vmroam vip detach 100.64.7.5",
			"FAILED (exit 1): vmroam vip detach 100.64.7.6",
		} {
			if !strings.Contains(errs, w) {
				t.Errorf("no error %q logged; errors:\n%s", w, errs)
			}
		}
		if hl := r.read(t, "log/xen/xen-hotplug.log"); !strings.Contains(hl, "no agent answers on "+testSocket) {
			t.Errorf("the CLI's message is not in xen-hotplug.log:\n%s", hl)
		}
	})

	t.Run("vmroam missing", func(t *testing.T) {
		if p, err := exec.LookPath("vmroam"); err == nil {
			t.Skipf("a real vmroam is installed (%s)", p)
		}
		r := runVifRoute(t, nil)
		r.expectExit0(t)
		errs := strings.Join(r.syslog(t, "daemon.err"), "\n")
		if !strings.Contains(errs, "vmroam is not on PATH") || !strings.Contains(errs, "FAILED (exit 127): vmroam vip attach 100.64.7.5") {
			t.Errorf("missing vmroam not logged as an error:\n%s", errs)
		}
	})
}

func vmroamExits(code int) func(t *testing.T, bin, rec string) {
	return func(t *testing.T, bin, rec string) { fakeVmroam(t, bin, rec, code) }
}

// vifRun is the record of one vif-route online + offline.
type vifRun struct {
	dir string
	out []byte
}

func (r *vifRun) file(name string) string { return filepath.Join(r.dir, name) }

func (r *vifRun) read(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(r.file(name))
	if err != nil {
		t.Fatalf("%v; driver output:\n%s", err, r.out)
	}
	return string(b)
}

func (r *vifRun) expectExit0(t *testing.T) {
	t.Helper()
	for _, c := range []string{"online", "offline"} {
		if rc := strings.TrimSpace(r.read(t, "rc."+c)); rc != "0" {
			t.Fatalf("vif-route %s exited %s\nhotplug log:\n%s\nsyslog:\n%s\ndriver:\n%s",
				c, rc, r.read(t, "log/xen/xen-hotplug.log"), r.read(t, "syslog"), r.out)
		}
	}
	writes := r.read(t, "xenstore.writes")
	if !strings.Contains(writes, "backend/vif/5/0/hotplug-status connected") || strings.Contains(writes, "hotplug-error") {
		t.Fatalf("vif-route did not report success to libxl; xenstore writes:\n%s", writes)
	}
}

// syslog returns the lines the logger stub recorded that contain s.
func (r *vifRun) syslog(t *testing.T, s string) []string {
	var out []string
	for _, l := range lines(t, r.file("syslog")) {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// vifDriver runs inside `unshare --net --mount`: it puts the copied scripts
// where call_hooks looks (the path is built into xen-hotplug-common.sh),
// gives Xen's log its own /var/log, lays the stubs over the real binaries
// (Xen's scripts put /usr/bin ahead of PATH), builds eth0 and vif5.0, and
// runs vif-route once per argument.
const vifDriver = `set -euo pipefail
T=$1
shift
mount --make-rprivate /
mount --bind "$T/scripts" /etc/xen/scripts
mount --bind "$T/log" /var/log
. "$T/scripts/hotplugpath.sh"
for stub in "$T"/bin/*; do
	name=${stub##*/}
	for d in "$bindir" "$sbindir" "$LIBEXEC_BIN" /usr/bin /usr/sbin /bin /sbin; do
		if [ ! -L "$d" ] && [ -e "$d/$name" ] && ! mountpoint -q "$d/$name"; then
			mount --bind "$stub" "$d/$name"
		fi
	done
done
ip link set lo up
ip link add name eth0 type veth peer name uplink
ip addr add 198.18.0.1/24 dev eth0
ip link set eth0 up
ip link set uplink up
ip link add name vif5.0 type veth peer name vm5
ip link set vm5 up
export PATH="$T/bin:$PATH" vif=vif5.0 XENBUS_PATH=backend/vif/5/0
for c in "$@"; do
	rc=0
	/etc/xen/scripts/vif-route "$c" >"$T/out.$c" || rc=$?
	echo "$rc" >"$T/rc.$c"
	ip route show >"$T/routes.$c"
done
`

func runVifRoute(t *testing.T, vmroam func(t *testing.T, bin, rec string)) *vifRun {
	t.Helper()
	dir := t.TempDir()
	r := &vifRun{dir: dir}
	if out, err := exec.Command("cp", "-a", xenScripts, r.file("scripts")).CombinedOutput(); err != nil {
		t.Fatalf("copy %s: %v\n%s", xenScripts, err, out)
	}
	postd := r.file("scripts/vif-post.d")
	if err := os.MkdirAll(postd, 0o755); err != nil {
		t.Fatal(err)
	}
	hook, err := os.ReadFile(hookPath(t))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(postd, "vmroam.hook"), hook, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"bin", "log/xen"} {
		if err := os.MkdirAll(r.file(d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	bin := r.file("bin")
	// The store as libxl leaves it for a vif with two addresses.
	store := map[string]string{"backend/vif/5/0/ip": "100.64.7.5 100.64.7.6"}
	var reads, exists strings.Builder
	for k, v := range store {
		fmt.Fprintf(&reads, "%q) printf '%%s\\n' %q ;;\n", k, v)
		fmt.Fprintf(&exists, "%q) exit 0 ;;\n", k)
	}
	writeScript(t, filepath.Join(bin, "xenstore-read"), fmt.Sprintf(`
case "$1" in
%s*) echo "couldn't read path $1" >&2; exit 1 ;;
esac
`, reads.String()))
	writeScript(t, filepath.Join(bin, "xenstore-exists"), fmt.Sprintf(`
case "$1" in
%s*) exit 1 ;;
esac
`, exists.String()))
	writeScript(t, filepath.Join(bin, "xenstore-write"), fmt.Sprintf(`printf '%%s\n' "$*" >>%q/xenstore.writes`, dir))
	writeScript(t, filepath.Join(bin, "xenstore-rm"), fmt.Sprintf(`printf 'rm %%s\n' "$*" >>%q/xenstore.writes`, dir))
	writeScript(t, filepath.Join(bin, "logger"), fmt.Sprintf(`printf '%%s\n' "$*" >>%q/syslog`, dir))
	if vmroam != nil {
		vmroam(t, bin, dir)
	}
	driver := r.file("driver.sh")
	if err := os.WriteFile(driver, []byte(vifDriver), 0o755); err != nil {
		t.Fatal(err)
	}
	// The files the assertions read exist even if nothing wrote them.
	for _, f := range []string{"syslog", "xenstore.writes", "log/xen/xen-hotplug.log"} {
		if err := os.WriteFile(r.file(f), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "unshare", "--net", "--mount", "--propagation", "private",
		"bash", driver, dir, "online", "offline")
	// A clean environment: vif-common.sh takes ip, dev and more from it.
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "VMROAM_SOCKET=" + testSocket}
	r.out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("driver: %v\n%s", err, r.out)
	}
	return r
}
