package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// buildVmroam builds the binary into a temporary directory.
func buildVmroam(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go not on PATH: cannot build the binary")
	}
	bin := filepath.Join(t.TempDir(), "vmroam")
	if out, err := exec.Command(goTool, "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// verifyUnit runs `systemd-analyze verify` on the unit file path and
// returns its error or the lines of its output that name one of about:
// verify exits 0 even when it ignores a bad line, so any word about the
// unit is a complaint. (Words about other units, which verify loads too,
// are the machine's business.)
func verifyUnit(analyze, path string, about ...string) string {
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil {
		return string(out) + err.Error()
	}
	var complaints []string
	for _, line := range strings.Split(string(out), "\n") {
		for _, a := range about {
			if strings.Contains(line, a) {
				complaints = append(complaints, line)
				break
			}
		}
	}
	return strings.Join(complaints, "\n")
}

// TestSystemdUnitVerifies runs `systemd-analyze verify` on the unit, its
// ExecStart pointed at a freshly built binary (verify wants it to exist);
// a broken copy shows that verifyUnit would see a mistake.
func TestSystemdUnitVerifies(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not found (Debian package systemd; scripts/install-deps.sh installs it): the unit is not checked")
	}
	unit, err := os.ReadFile(filepath.Join(repoRoot, "scripts", "systemd", "vmroam.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(unit, []byte("ExecStart=/usr/local/bin/vmroam agent --config /etc/vmroam/vmroam.toml\n")) {
		t.Fatal("the unit's ExecStart is not /usr/local/bin/vmroam agent --config /etc/vmroam/vmroam.toml")
	}
	bin := buildVmroam(t)
	verify := func(text string) string {
		t.Helper()
		dir := t.TempDir()
		path := filepath.Join(dir, "vmroam.service")
		if err := os.WriteFile(path, []byte(strings.ReplaceAll(text, "/usr/local/bin/vmroam", bin)), 0o644); err != nil {
			t.Fatal(err)
		}
		return verifyUnit(analyze, path, dir, "vmroam")
	}
	if out := verify(string(unit)); out != "" {
		t.Errorf("systemd-analyze verify:\n%s", out)
	}
	broken := strings.Replace(string(unit), "Type=notify", "Type=notifyy", 1)
	if out := verify(broken); !strings.Contains(out, "notifyy") {
		t.Errorf("a broken unit passed verify (output %q): this test would not see a mistake", out)
	}
}

// TestMakeInstall stages `make install` in a temporary DESTDIR: binary,
// unit (paths following PREFIX) and the example config, which a second
// install must not overwrite.
func TestMakeInstall(t *testing.T) {
	makeTool, err := exec.LookPath("make")
	if err != nil {
		t.Skip("make not found")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("go not on PATH: make cannot build the binary")
	}
	dest := t.TempDir()
	bin := filepath.Join(t.TempDir(), "vmroam")
	install := func(extra ...string) string {
		t.Helper()
		args := append([]string{"-C", repoRoot, "install", "DESTDIR=" + dest, "BIN=" + bin}, extra...)
		out, err := exec.Command(makeTool, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return string(out)
	}
	install()

	installed := filepath.Join(dest, "usr", "local", "bin", "vmroam")
	if out, err := exec.Command(installed, "version").CombinedOutput(); err != nil || !strings.HasPrefix(string(out), "vmroam ") {
		t.Errorf("installed binary: %q, %v", out, err)
	}
	unit, err := os.ReadFile(filepath.Join(dest, "usr", "local", "lib", "systemd", "system", "vmroam.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(unit, []byte("\nExecStart=/usr/local/bin/vmroam agent --config /etc/vmroam/vmroam.toml\n")) {
		t.Errorf("installed unit's ExecStart:\n%s", unit)
	}
	conf := filepath.Join(dest, "etc", "vmroam", "vmroam.toml")
	example, _ := os.ReadFile(filepath.Join(repoRoot, "docs", "vmroam.example.toml"))
	if got, err := os.ReadFile(conf); err != nil || !bytes.Equal(got, example) {
		t.Errorf("installed config is not the example: %v", err)
	}

	// The operator's file stays.
	mine := []byte("bind = \"198.51.100.10\"\n")
	if err := os.WriteFile(conf, mine, 0o600); err != nil {
		t.Fatal(err)
	}
	if out := install(); !strings.Contains(out, "kept") {
		t.Errorf("second install does not say it kept the config: %s", out)
	}
	if got, _ := os.ReadFile(conf); !bytes.Equal(got, mine) {
		t.Errorf("make install overwrote the operator's config: %q", got)
	}

	// Another prefix: the unit runs the binary where it went.
	install("PREFIX=/usr", "SYSCONFDIR=/etc/opt")
	unit, err = os.ReadFile(filepath.Join(dest, "usr", "lib", "systemd", "system", "vmroam.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(unit, []byte("\nExecStart=/usr/bin/vmroam agent --config /etc/opt/vmroam/vmroam.toml\n")) {
		t.Errorf("unit installed with PREFIX=/usr SYSCONFDIR=/etc/opt:\n%s", unit)
	}
	if _, err := os.Stat(filepath.Join(dest, "usr", "bin", "vmroam")); err != nil {
		t.Error(err)
	}
}

// TestMakeInstallProxmox stages `make install-proxmox`: the hookscript, as
// the repository has it and executable (Proxmox refuses a hookscript that
// is not), in the local storage's snippets or PROXMOX_SNIPPETS_DIR.
func TestMakeInstallProxmox(t *testing.T) {
	makeTool, err := exec.LookPath("make")
	if err != nil {
		t.Skip("make not found")
	}
	want, err := os.ReadFile(filepath.Join(repoRoot, "scripts", "proxmox", "vmroam-hookscript"))
	if err != nil {
		t.Fatal(err)
	}
	for dir, extra := range map[string][]string{
		"var/lib/vz/snippets":     nil,
		"mnt/pve/cephfs/snippets": {"PROXMOX_SNIPPETS_DIR=/mnt/pve/cephfs/snippets"},
	} {
		dest := t.TempDir()
		args := append([]string{"-C", repoRoot, "install-proxmox", "DESTDIR=" + dest}, extra...)
		if out, err := exec.Command(makeTool, args...).CombinedOutput(); err != nil {
			t.Fatalf("make %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		path := filepath.Join(dest, dir, "vmroam.sh")
		st, err := os.Stat(path)
		if err != nil {
			t.Errorf("make %s: %v", strings.Join(args, " "), err)
			continue
		}
		if got, err := os.ReadFile(path); err != nil || !bytes.Equal(got, want) || st.Mode().Perm() != 0o755 {
			t.Errorf("%s: %v, mode %v: want the hookscript, mode 0755", path, err, st.Mode())
		}
	}
}
