package xenhook

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// The fixtures in testdata/proxmox are written by hand after the formats
// of qemu-server's write_vm_config (the .conf files, as in
// /etc/pve/nodes/<node>/qemu-server/) and of `qm config` (the .qm files),
// not taken from a Proxmox host.
func readPVE(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "proxmox", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestProxmoxVIPs(t *testing.T) {
	for _, tc := range []struct {
		name string
		vmid int
		conf []byte
		want []DomainVIP
	}{
		{"conf file: ipconfig, pending and snapshot ignored", 100, readPVE(t, "100-web1.conf"),
			[]DomainVIP{dv("100.64.1.5", "tap100i0"), dv("fd00:64::5", "tap100i0")}},
		{"qm config: the same VM", 100, readPVE(t, "100-web1.qm"),
			[]DomainVIP{dv("100.64.1.5", "tap100i0"), dv("fd00:64::5", "tap100i0")}},
		{"description wins over ipconfig", 205, readPVE(t, "205-db1.conf"),
			[]DomainVIP{dv("100.64.2.10", "tap205i1"), dv("fd00:64:2::10", "tap205i1"), dv("100.64.2.11", "tap205i2")}},
		{"dhcp, auto, manual: no VIPs", 300, readPVE(t, "300-dhcp.qm"), nil},
		{"no ipconfig, no description: no VIPs", 400, readPVE(t, "400-plain.conf"), nil},
		{"one NIC, VIPs without netN", 500, readPVE(t, "500-one.qm"),
			[]DomainVIP{dv("100.64.5.1", "tap500i3"), dv("100.64.5.2", "tap500i3")}},
		{"ipconfig by slot, not by key order", 7, []byte("ipconfig10: ip=100.64.0.10/24\nipconfig2: ip6=fd00::2/64,ip=100.64.0.2/24\nnet2: virtio=BC:24:11:00:00:02,bridge=vmbr0\nnet10: virtio=BC:24:11:00:00:10,bridge=vmbr0\n"),
			[]DomainVIP{dv("100.64.0.2", "tap7i2"), dv("fd00::2", "tap7i2"), dv("100.64.0.10", "tap7i10")}},
		{"link-local skipped, CRLF", 8, []byte("ipconfig0: ip6=fe80::1/64,ip=100.64.0.8/32\r\nnet0: virtio=BC:24:11:00:00:08,bridge=vmbr0\r\n"),
			[]DomainVIP{dv("100.64.0.8", "tap8i0")}},
		{"no bridge, no net, several nets", 9, []byte("#vmroam-vip%3A 100.64.0.1 net0\n#vmroam-vip%3A 100.64.0.2 net5\n#vmroam-vip%3A 100.64.0.3\nnet0: virtio=BC:24:11:00:00:09\nnet1: virtio=BC:24:11:00:00:0a,bridge=vmbr0\n"),
			[]DomainVIP{dv("100.64.0.1", ""), dv("100.64.0.2", ""), dv("100.64.0.3", "")}},
		{"the same VIP twice, one dev", 10, []byte("#vmroam-vip%3A 100.64.0.1\n#vmroam-vip%3A 100.64.0.1/32 net0\nnet0: virtio=BC:24:11:00:00:0b,bridge=vmbr0\n"),
			[]DomainVIP{dv("100.64.0.1", "tap10i0")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, warns, err := ProxmoxVIPs(tc.vmid, tc.conf)
			if err != nil {
				t.Fatal(err)
			}
			if len(warns) > 0 {
				t.Errorf("warnings %q", warns)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("got  %v\nwant %v", got, tc.want)
			}
		})
	}
}

func TestProxmoxVIPsRefused(t *testing.T) {
	for _, tc := range []struct{ name, conf, err string }{
		{"empty", " \n\n", "VM config: empty"},
		{"ipconfig not key=value", "ipconfig0: 100.64.0.1/24\n", "ipconfig0: \"100.64.0.1/24\" is not key=value"},
		{"ipconfig without prefix length", "ipconfig0: ip=100.64.0.1\n", "ipconfig0: ip=\"100.64.0.1\" is not an IPv4 address in CIDR form"},
		{"ipconfig IPv6 in ip=", "ipconfig0: ip=fd00::1/64\n", "is not an IPv4 address"},
		{"ipconfig IPv4 in ip6=", "ipconfig0: ip6=100.64.0.1/24\n", "is not an IPv6 address"},
		{"ipconfig ip twice", "ipconfig0: ip=100.64.0.1/24,ip=100.64.0.2/24\n", "ip twice"},
		{"description VIP not an address", "#vmroam-vip%3A web1\n", `VIP "web1" is not an IP address`},
		{"description VIP a network", "#vmroam-vip%3A 100.64.0.0/24 net0\n", "is a network"},
		{"description VIP bad net", "#vmroam-vip%3A 100.64.0.1 eth0\n", `"eth0" is not net0 to net31`},
		{"description VIP too many words", "description: vmroam-vip%3A 100.64.0.1 net0 and more\n", "want vmroam-vip: <address> [net<N>]"},
		{"description VIP nothing", "#vmroam-vip%3A\n", "want vmroam-vip:"},
		{"VIP behind two taps", "#vmroam-vip%3A 100.64.0.1 net0\n#vmroam-vip%3A 100.64.0.1 net1\nnet0: virtio=BC:24:11:00:00:01,bridge=vmbr0\nnet1: virtio=BC:24:11:00:00:02,bridge=vmbr0\n", "VIP 100.64.0.1 is behind both tap1i0 and tap1i1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, _, err := ProxmoxVIPs(1, []byte(tc.conf))
			if err == nil || !strings.Contains(err.Error(), tc.err) || got != nil {
				t.Errorf("got %v, %v; want an error saying %q", got, err, tc.err)
			}
		})
	}
}

// TestProxmoxVIPsSkipsOddLines: as Proxmox's parse_vm_config, a line of
// no known shape is skipped with a warning, and the rest still reads.
func TestProxmoxVIPsSkipsOddLines(t *testing.T) {
	got, warns, err := ProxmoxVIPs(600, readPVE(t, "600-odd.conf"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []DomainVIP{dv("100.64.6.1", "tap600i0")}; !slices.Equal(got, want) {
		t.Errorf("got  %v\nwant %v", got, want)
	}
	want := []string{
		"VM config: line 3: \"this line is not a config line\" is not `key: value`: skipped",
		"VM config: line 5: \"name:\" is not `key: value`: skipped",
		"VM config: line 7: \"\\x00\\x01 binary junk\" is not `key: value`: skipped",
		"VM config: line 9: \"[PENDING\" is not a [section]: skipped",
	}
	if !slices.Equal(warns, want) {
		t.Errorf("warnings\n%q\nwant\n%q", warns, want)
	}
	// At post-stop the VIPs are detached all the same, the warnings returned.
	acts, awarns, err := ProxmoxActions(ProxmoxEvent{VMID: 600, Phase: PhasePostStop, Config: readPVE(t, "600-odd.conf")})
	if err != nil || !slices.Equal(awarns, want) {
		t.Fatalf("post-stop: %v, warnings %q", err, awarns)
	}
	if wantActs := []Action{{Verb: "detach", VIP: dv("100.64.6.1", "").VIP}}; !slices.Equal(acts, wantActs) {
		t.Errorf("post-stop: %v, want %v", acts, wantActs)
	}
	// The vmroam-vip lines stay strict: one that does not read is an error.
	if _, _, err := ProxmoxVIPs(600, []byte("#vmroam-vip%3A web1\nodd line\n")); err == nil {
		t.Error("a bad vmroam-vip line beside an odd line read")
	}
}

func TestParseVMID(t *testing.T) {
	for _, s := range []string{"1", "100", "999999999"} {
		if _, err := ParseVMID(s); err != nil {
			t.Errorf("%q: %v", s, err)
		}
	}
	for _, s := range []string{"", "0", "-1", "+100", "0100", "1000000000", "100a", " 100", "1e3"} {
		if n, err := ParseVMID(s); err == nil {
			t.Errorf("%q: %d, want an error", s, n)
		}
	}
}

func TestDecodeText(t *testing.T) {
	for in, want := range map[string]string{
		"plain":            "plain",
		"a%3Ab%25c":        "a:b%c",
		"%0a%0D":           "\n\r",
		"100%":             "100%",
		"%zz%4":            "%zz%4",
		"%C3%A9t%C3%A9":    "été",
		"vmroam-vip%3A ::": "vmroam-vip: ::",
	} {
		if got := decodeText(in); got != want {
			t.Errorf("decodeText(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestProxmoxActions(t *testing.T) {
	web1 := readPVE(t, "100-web1.conf")
	both := func(verb string, announced bool) []Action {
		return []Action{
			{Verb: verb, VIP: dv("100.64.1.5", "").VIP, Dev: "tap100i0", WhenAnnounced: announced},
			{Verb: verb, VIP: dv("fd00:64::5", "").VIP, Dev: "tap100i0", WhenAnnounced: announced},
		}
	}
	detach := []Action{{Verb: "detach", VIP: dv("100.64.1.5", "").VIP}, {Verb: "detach", VIP: dv("fd00:64::5", "").VIP}}
	for _, tc := range []struct {
		name  string
		phase ProxmoxPhase
		conf  []byte
		want  []Action
		err   string
	}{
		{"pre-start", PhasePreStart, web1, both("prepare", false), ""},
		{"post-start", PhasePostStart, web1, both("attach", true), ""},
		{"pre-stop", PhasePreStop, web1, nil, ""},
		{"post-stop", PhasePostStop, web1, detach, ""},
		{"a later phase", "pre-migrate", web1, nil, ""},
		{"pre-stop does not read the config", PhasePreStop, []byte("garbage"), nil, ""},
		{"post-start with garbage", PhasePostStart, []byte("garbage"), nil, ""},
		{"post-start, empty config", PhasePostStart, []byte("\n"), nil, "xenhook: VM 100, post-start: VM config: empty"},
		{"post-start, a tap unknown", PhasePostStart, []byte("#vmroam-vip%3A 100.64.1.5 net0\n#vmroam-vip%3A 100.64.1.6 net1\nnet0: virtio=BC:24:11:2A:3B:4C,bridge=vmbr0\n"),
			[]Action{{Verb: "attach", VIP: dv("100.64.1.5", "").VIP, Dev: "tap100i0", WhenAnnounced: true}},
			"xenhook: VM 100, post-start: not attached, the tap is unknown: VIP 100.64.1.6: the VM has no net1"},
		{"pre-start, a tap unknown: prepared all the same", PhasePreStart, []byte("#vmroam-vip%3A 100.64.1.6 net1\n"),
			[]Action{{Verb: "prepare", VIP: dv("100.64.1.6", "").VIP}}, ""},
		{"no VIPs", PhasePostStart, readPVE(t, "400-plain.conf"), nil, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, _, err := ProxmoxActions(ProxmoxEvent{VMID: 100, Phase: tc.phase, Config: tc.conf})
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

// pveHookscript runs scripts/proxmox/vmroam-hookscript with sh, as Proxmox
// does (PVE/GuestHelpers.pm: `<script> <vmid> <phase>`, stdin /dev/null,
// PATH=/sbin:/bin:/usr/sbin:/usr/bin), with bin first on PATH, and returns
// its stderr. It fails the test when the script exits non-zero: at
// pre-start that would abort the VM's start.
func pveHookscript(t *testing.T, bin string, args ...string) string {
	t.Helper()
	sh, err := exec.LookPath("sh")
	if err != nil {
		t.Skip("no sh on PATH")
	}
	script, err := filepath.Abs("../scripts/proxmox/vmroam-hookscript")
	if err != nil {
		t.Fatal(err)
	}
	if st, err := os.Stat(script); err != nil || st.Mode()&0o111 == 0 {
		t.Fatalf("%s: %v: want an executable (Proxmox refuses others)", script, err)
	}
	cmd := exec.Command(sh, append([]string{script}, args...)...)
	cmd.Env = []string{"PATH=" + bin + ":/sbin:/bin:/usr/sbin:/usr/bin", "LC_ALL=C"}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("hookscript %q: %v (Proxmox would abort a start)\nstderr: %s", args, err, errb.String())
	}
	if out.Len() != 0 {
		t.Errorf("hookscript %q: stdout %q: vmroam writes nothing there", args, out.String())
	}
	return errb.String()
}

// fakePVEBin makes a bin directory with a vmroam that records its arguments
// (one per line) and PATH and exits with code, and a logger that records
// what it is asked to log.
func fakePVEBin(t *testing.T, code int) (bin, rec string) {
	t.Helper()
	rec = t.TempDir()
	bin = filepath.Join(rec, "bin")
	if err := os.Mkdir(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	writeScript(t, filepath.Join(bin, "vmroam"), fmt.Sprintf(`
printf '%%s\n' "$@" >%[1]q/argv
printf '%%s\n' "$PATH" >%[1]q/path
echo "vmroam: something to say" >&2
exit %[2]d
`, rec, code))
	writeScript(t, filepath.Join(bin, "logger"), fmt.Sprintf(`printf '%%s\n' "$*" >>%q/syslog`, rec))
	return bin, rec
}

func TestProxmoxHookscript(t *testing.T) {
	bin, rec := fakePVEBin(t, 0)
	for _, phase := range []string{"pre-start", "post-start", "pre-stop", "post-stop"} {
		stderr := pveHookscript(t, bin, "100", phase)
		if !strings.Contains(stderr, "something to say") {
			t.Errorf("%s: vmroam's stderr lost: %q", phase, stderr)
		}
		if got, want := lines(t, filepath.Join(rec, "argv")), []string{"hook", "proxmox", "100", phase}; !slices.Equal(got, want) {
			t.Errorf("vmroam ran with %q, want %q", got, want)
		}
	}
	// make install puts vmroam in /usr/local/bin, not on Proxmox's PATH.
	if p := lines(t, filepath.Join(rec, "path")); len(p) != 1 || !strings.HasSuffix(p[0], ":/usr/local/sbin:/usr/local/bin") {
		t.Errorf("vmroam ran with PATH %q: /usr/local/bin not added", p)
	}
	if _, err := os.Stat(filepath.Join(rec, "syslog")); err == nil {
		t.Errorf("the script logged although vmroam succeeded: %q", lines(t, filepath.Join(rec, "syslog")))
	}
}

func TestProxmoxHookscriptNeverFails(t *testing.T) {
	t.Run("vmroam fails", func(t *testing.T) {
		bin, rec := fakePVEBin(t, 3)
		stderr := pveHookscript(t, bin, "100", "pre-start")
		if !strings.Contains(stderr, "vmroam hook: ERROR: vmroam hook proxmox 100 pre-start exited 3") {
			t.Errorf("stderr %q", stderr)
		}
		if log := lines(t, filepath.Join(rec, "syslog")); len(log) != 1 || !strings.Contains(log[0], "-p daemon.err -t vmroam-hook") {
			t.Errorf("syslog %q", log)
		}
	})
	t.Run("vmroam missing", func(t *testing.T) {
		for _, d := range []string{"/usr/local/sbin", "/usr/local/bin", "/sbin", "/bin", "/usr/sbin", "/usr/bin"} {
			if _, err := os.Stat(filepath.Join(d, "vmroam")); err == nil {
				t.Skipf("a real vmroam is installed (%s)", d)
			}
		}
		bin, rec := fakePVEBin(t, 0)
		os.Remove(filepath.Join(bin, "vmroam"))
		stderr := pveHookscript(t, bin, "100", "pre-start")
		if !strings.Contains(stderr, "vmroam hook: ERROR: vmroam is not on PATH") || !strings.Contains(stderr, "VIPs of VM 100 not handled at pre-start") {
			t.Errorf("stderr %q", stderr)
		}
		if log := lines(t, filepath.Join(rec, "syslog")); len(log) != 1 || !strings.Contains(log[0], "vmroam is not on PATH") {
			t.Errorf("syslog %q", log)
		}
	})
}
