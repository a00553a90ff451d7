package xenhook

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func readXML(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "libvirt", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func dv(vip, dev string) DomainVIP { return DomainVIP{VIP: netip.MustParseAddr(vip), Dev: dev} }

// withVIPs is a small domain with vmroam's metadata holding vips and the
// given <devices> content.
func withVIPs(vips, devices string) []byte {
	return fmt.Appendf(nil, `<domain type='kvm' id='3'>
  <name>db1</name>
  <metadata>
    <vmroam:vips xmlns:vmroam="https://vmroam.dev/xmlns/1">%s</vmroam:vips>
  </metadata>
  <devices>%s</devices>
</domain>
`, vips, devices)
}

const twoNICs = `
    <interface type='bridge'><mac address='52:54:00:00:00:01'/><source bridge='br0'/><target dev='vnet8'/><alias name='net0'/></interface>
    <interface type='network'><mac address='52:54:00:00:00:02'/><source network='default'/><target dev='vnet9'/><alias name='ua-backend'/></interface>`

func TestDomainVIPs(t *testing.T) {
	for _, tc := range []struct {
		name string
		xml  []byte
		want []DomainVIP
	}{
		{"running domain", readXML(t, "web1-live.xml"), []DomainVIP{
			dv("100.64.1.5", "vnet3"), // metadata, by MAC (in capitals)
			dv("fd00:64::5", "vnet3"), // metadata, by alias, with /128
			dv("100.64.1.7", "vnet4"), // metadata without interface, and <ip> on vnet4
			dv("100.64.1.8", "vnet4"), // <ip> only; the link-local one and <source>'s are not VIPs
		}},
		{"defined domain", readXML(t, "web1-inactive.xml"), []DomainVIP{
			dv("100.64.1.5", ""), dv("fd00:64::5", ""), dv("100.64.1.7", ""), dv("100.64.1.8", ""),
		}},
		{"by target dev and by user alias", withVIPs(`
      <vmroam:vip address="100.64.3.1" interface="vnet9"/>
      <vmroam:vip address="100.64.3.2" interface="ua-backend"/>
      <vmroam:vip address="100.64.3.3" interface="net0"/>`, twoNICs),
			[]DomainVIP{dv("100.64.3.1", "vnet9"), dv("100.64.3.2", "vnet9"), dv("100.64.3.3", "vnet8")}},
		{"stale or unknown interface", withVIPs(`
      <vmroam:vip address="100.64.3.1" interface="vnet3"/>
      <vmroam:vip address="100.64.3.2" interface="52:54:00:99:99:99"/>
      <vmroam:vip address="100.64.3.3"/>`, twoNICs),
			[]DomainVIP{dv("100.64.3.1", ""), dv("100.64.3.2", ""), dv("100.64.3.3", "")}},
		{"default namespace and unprefixed vip", []byte(`<?xml version="1.0"?>
<!-- written by hand -->
<domain type='kvm'><metadata><vips xmlns="https://vmroam.dev/xmlns/1"><vip address="100.64.4.1" interface="52:54:00:00:00:01" note="x"/></vips></metadata>
<devices><interface type='bridge'><mac address='52:54:00:00:00:01'/><target dev='vnet1'/></interface></devices></domain>
<!-- end -->
`), []DomainVIP{dv("100.64.4.1", "vnet1")}},
		{"another application's vips", []byte(`<domain type='kvm'><metadata>
<app:vips xmlns:app="http://example.com/app"><app:vip address="10.9.9.9"/></app:vips>
<vmroam:vips xmlns:vmroam="https://vmroam.dev/xmlns/2"><vmroam:vip address="10.9.9.8"/></vmroam:vips>
</metadata></domain>`), nil},
		{"no VIPs at all", []byte(`<domain type='kvm'><name>plain</name><devices><interface type='network'><source network='default'/><target dev='vnet0'/></interface></devices></domain>`), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DomainVIPs(tc.xml)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got  %v\nwant %v", got, tc.want)
			}
		})
	}
}

func TestDomainVIPsMerges(t *testing.T) {
	got, err := DomainVIPs(withVIPs(`
      <vmroam:vip address="100.64.3.1"/>
      <vmroam:vip address="100.64.3.1/32" interface="vnet8"/>
      <vmroam:vip address="::ffff:100.64.3.1"/>
      <vmroam:vip address="fd00::7/128"/>`, twoNICs+`
    <interface type='ethernet'><target dev='tap1'/><ip address='fd00::7'/></interface>`))
	want := []DomainVIP{dv("100.64.3.1", "vnet8"), dv("fd00::7", "tap1")}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("got %v, %v; want %v", got, err, want)
	}
}

func TestDomainVIPsErrors(t *testing.T) {
	live := readXML(t, "web1-live.xml")
	for _, tc := range []struct {
		name string
		xml  []byte
		want string
	}{
		{"empty", nil, "empty"},
		{"blank", []byte(" \n"), "empty"},
		{"truncated", live[:len(live)/2], "domain XML"},
		{"unclosed", []byte(`<domain><devices></domain>`), "domain XML"},
		{"not a domain", []byte(`<network><name>default</name></network>`), "not <domain>"},
		{"namespaced root", []byte(`<x:domain xmlns:x="http://example.com"/>`), "not <domain>"},
		{"two domains", append(bytes.Clone(live), "<domain/>"...), "after </domain>"},
		{"text after", append(bytes.Clone(live), "junk"...), "text outside"},
		{"doctype", []byte(`<!DOCTYPE domain [<!ENTITY a "100.64.1.5">]><domain/>`), "directive"},
		{"bad metadata address", withVIPs(`<vmroam:vip address="100.64.1.x"/>`, ""), `"100.64.1.x" is not an IP address`},
		{"network as VIP", withVIPs(`<vmroam:vip address="100.64.1.0/24"/>`, ""), "is a network"},
		{"unspecified VIP", withVIPs(`<vmroam:vip address="0.0.0.0"/>`, ""), "cannot be routed"},
		{"link-local VIP", withVIPs(`<vmroam:vip address="fe80::1"/>`, ""), "cannot be routed"},
		{"zone", withVIPs(`<vmroam:vip address="fd00::1%eth0"/>`, ""), "not an IP address"},
		{"empty address", withVIPs(`<vmroam:vip interface="vnet8"/>`, twoNICs), `"" is not an IP address`},
		{"bad interface ip", withVIPs("", `<interface type='ethernet'><target dev='tap1'/><ip address='100.64.1'/></interface>`), `tap1: <ip address="100.64.1">`},
		{"behind two interfaces", withVIPs(`<vmroam:vip address="100.64.3.1" interface="vnet8"/>`,
			twoNICs+`<interface type='ethernet'><target dev='tap1'/><ip address='100.64.3.1'/></interface>`), "behind both vnet8 and tap1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := DomainVIPs(tc.xml)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("DomainVIPs = %v, %v; want an error saying %q", got, err, tc.want)
			}
		})
	}
}

func act(verb, vip, dev string) Action {
	// libvirt's only attach comes before the memory copy: it always
	// waits for the VM to announce itself.
	return Action{Verb: verb, VIP: netip.MustParseAddr(vip), Dev: dev, WhenAnnounced: verb == "attach"}
}

func TestLibvirtActions(t *testing.T) {
	live, inactive := readXML(t, "web1-live.xml"), readXML(t, "web1-inactive.xml")
	bad := []byte("<domain><devices>")
	for _, tc := range []struct {
		name          string
		op, sub, xtra string
		xml           []byte
		want          []Action
		err           string // in the error, "" for none
	}{
		{"destination: migrate", "migrate", "begin", "-", inactive, nil, ""},
		{"destination: prepare", "prepare", "begin", "-", inactive, []Action{
			act("prepare", "100.64.1.5", ""), act("prepare", "fd00:64::5", ""), act("prepare", "100.64.1.7", ""), act("prepare", "100.64.1.8", ""),
		}, ""},
		{"destination: start", "start", "begin", "-", live, []Action{
			act("prepare", "100.64.1.5", "vnet3"), act("prepare", "fd00:64::5", "vnet3"), act("prepare", "100.64.1.7", "vnet4"), act("prepare", "100.64.1.8", "vnet4"),
		}, ""},
		{"destination: started", "started", "begin", "-", live, []Action{
			act("attach", "100.64.1.5", "vnet3"), act("attach", "fd00:64::5", "vnet3"), act("attach", "100.64.1.7", "vnet4"), act("attach", "100.64.1.8", "vnet4"),
		}, ""},
		{"source: stopped", "stopped", "end", "-", live, nil, ""},
		{"source: stopped, whatever the XML", "stopped", "end", "-", bad, nil, ""},
		{"source: release after migration", "release", "end", "migrated", live, []Action{
			act("detach", "100.64.1.5", ""), act("detach", "fd00:64::5", ""), act("detach", "100.64.1.7", ""), act("detach", "100.64.1.8", ""),
		}, ""},
		{"release before libvirt 10.5", "release", "end", "-", inactive, []Action{
			act("detach", "100.64.1.5", ""), act("detach", "fd00:64::5", ""), act("detach", "100.64.1.7", ""), act("detach", "100.64.1.8", ""),
		}, ""},
		{"reconnect", "reconnect", "begin", "-", live, nil, ""},
		{"attach", "attach", "begin", "-", live, nil, ""},
		{"restore", "restore", "begin", "-", live, nil, ""},
		{"started with another sub-op", "started", "end", "-", live, nil, ""},
		{"malformed at started", "started", "begin", "-", bad, nil, "domain web1, started begin: domain XML"},
		{"malformed at release", "release", "end", "-", bad, nil, "domain web1, release end: domain XML"},
		{"started without target devs", "started", "begin", "-", inactive, nil, "not attached, the interface is unknown: VIP 100.64.1.5"},
		{"started with a stale interface", "started", "begin", "-",
			withVIPs(`<vmroam:vip address="100.64.3.1" interface="vnet3"/><vmroam:vip address="100.64.3.2" interface="ua-backend"/><vmroam:vip address="100.64.3.3"/>`, twoNICs),
			[]Action{act("attach", "100.64.3.2", "vnet9")},
			`VIP 100.64.3.1: the domain has no interface "vnet3" with a target dev (it has vnet8: MAC 52:54:00:00:00:01, alias net0; vnet9: MAC 52:54:00:00:00:02, alias ua-backend); VIP 100.64.3.3: no interface named`},
		{"no VIPs", "started", "begin", "-", []byte(`<domain><devices/></domain>`), nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := LibvirtActions(LibvirtEvent{Domain: "web1", Op: tc.op, SubOp: tc.sub, Extra: tc.xtra, XML: tc.xml})
			switch {
			case tc.err == "" && err != nil:
				t.Fatalf("error: %v", err)
			case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
				t.Fatalf("error %v, want one saying %q", err, tc.err)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got  %v\nwant %v", got, tc.want)
			}
		})
	}
}

// qemuHookPath is the libvirt hook as the repository ships it.
func qemuHookPath(t *testing.T) string {
	t.Helper()
	p, err := filepath.Abs("../scripts/libvirt/qemu")
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(p); err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("%s: %v, mode %v: want an executable", p, err, st.Mode())
	}
	return p
}

// hookRun runs scripts/libvirt/qemu with bash, as libvirt would (a bare
// environment, the XML on stdin), with bin first on PATH.
func hookRun(t *testing.T, bin string, stdin []byte, args ...string) (stdout, stderr string) {
	t.Helper()
	cmd := exec.Command("bash", append([]string{qemuHookPath(t)}, args...)...)
	cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin", "LC_ALL=C", "HOME=/root"}
	cmd.Stdin = bytes.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("hook %q: %v (libvirt would abort)\nstderr: %s", args, err, errb.String())
	}
	return out.String(), errb.String()
}

// fakeHookBin makes a bin directory with a vmroam that records its
// arguments (one per line) and stdin and exits with code, and a logger
// that records what it is asked to log.
func fakeHookBin(t *testing.T, code int) (bin, rec string) {
	t.Helper()
	rec = t.TempDir()
	bin = filepath.Join(rec, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	writeScript(t, filepath.Join(bin, "vmroam"), fmt.Sprintf(`
printf '%%s\n' "$@" >%[1]q/argv
cat >%[1]q/stdin
echo "vmroam: something to say" >&2
exit %[2]d
`, rec, code))
	writeScript(t, filepath.Join(bin, "logger"), fmt.Sprintf(`printf '%%s\n' "$*" >>%q/syslog`, rec))
	return bin, rec
}

func TestQemuHookScript(t *testing.T) {
	xml := readXML(t, "web1-live.xml")
	bin, rec := fakeHookBin(t, 0)
	for _, args := range [][]string{
		{"web1", "started", "begin", "-"},
		{"web1", "release", "end", "migrated"},
		{"my vm", "migrate", "begin", "-"}, // names may hold spaces
		{"-dash", "prepare", "begin", "-"},
	} {
		stdout, stderr := hookRun(t, bin, xml, args...)
		if stdout != "" {
			t.Errorf("%q: stdout %q: libvirt would take it for the domain XML", args, stdout)
		}
		if !strings.Contains(stderr, "something to say") {
			t.Errorf("%q: vmroam's stderr lost: %q", args, stderr)
		}
		want := append([]string{"hook", "libvirt"}, args...)
		if got := lines(t, filepath.Join(rec, "argv")); !slices.Equal(got, want) {
			t.Errorf("vmroam ran with %q, want %q", got, want)
		}
		if got, _ := os.ReadFile(filepath.Join(rec, "stdin")); !bytes.Equal(got, xml) {
			t.Errorf("%q: vmroam read %d bytes of stdin, want the %d of the XML", args, len(got), len(xml))
		}
	}
	if _, err := os.Stat(filepath.Join(rec, "syslog")); err == nil {
		t.Errorf("the script logged although vmroam succeeded: %q", lines(t, filepath.Join(rec, "syslog")))
	}
}

func TestQemuHookScriptNeverFails(t *testing.T) {
	xml := readXML(t, "web1-live.xml")
	t.Run("vmroam fails", func(t *testing.T) {
		bin, rec := fakeHookBin(t, 3)
		stdout, stderr := hookRun(t, bin, xml, "web1", "prepare", "begin", "-")
		if stdout != "" || !strings.Contains(stderr, "vmroam hook: ERROR: vmroam hook libvirt web1 prepare begin - exited 3") {
			t.Errorf("stdout %q, stderr %q", stdout, stderr)
		}
		if log := lines(t, filepath.Join(rec, "syslog")); len(log) != 1 || !strings.Contains(log[0], "-p daemon.err -t vmroam-hook") {
			t.Errorf("syslog %q", log)
		}
	})
	t.Run("vmroam missing", func(t *testing.T) {
		if p, err := exec.LookPath("vmroam"); err == nil {
			t.Skipf("a real vmroam is installed (%s)", p)
		}
		_, rec := fakeHookBin(t, 0)
		bin := filepath.Join(rec, "bin")
		os.Remove(filepath.Join(bin, "vmroam"))
		stdout, stderr := hookRun(t, bin, xml, "web1", "start", "begin", "-")
		if stdout != "" || !strings.Contains(stderr, "vmroam hook: ERROR: vmroam is not on PATH") || !strings.Contains(stderr, "domain web1 not handled at start begin") {
			t.Errorf("stdout %q, stderr %q", stdout, stderr)
		}
		if log := lines(t, filepath.Join(rec, "syslog")); len(log) != 1 || !strings.Contains(log[0], "vmroam is not on PATH") {
			t.Errorf("syslog %q", log)
		}
	})
	t.Run("stdin drained", func(t *testing.T) {
		// libvirt writes the whole XML whatever the hook does; a hook
		// that stops reading would make that write fail. 1 MB is more
		// than a pipe holds.
		_, rec := fakeHookBin(t, 0)
		bin := filepath.Join(rec, "bin")
		writeScript(t, filepath.Join(bin, "vmroam"), "exit 1\n") // reads nothing
		driver := fmt.Sprintf(`set -o pipefail
head -c 1000000 /dev/zero | bash %q web1 started begin - 2>/dev/null
echo "${PIPESTATUS[*]}"`, qemuHookPath(t))
		cmd := exec.Command("bash", "-c", driver)
		cmd.Env = []string{"PATH=" + bin + ":/usr/bin:/bin"}
		out, err := cmd.CombinedOutput()
		if strings.TrimSpace(string(out)) != "0 0" {
			t.Errorf("writer and hook exited %q (%v), want 0 0", out, err)
		}
	})
}
