package main

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// pkgFile is a file the packages hold: where, its mode and, for those
// copied from the repository, where from.
type pkgFile struct {
	path string
	mode fs.FileMode
	src  string
}

// debFiles is what the .deb installs, but for the directories.
var debFiles = []pkgFile{
	{"/usr/bin/vmroam", 0o755, ""},
	{"/lib/systemd/system/vmroam.service", 0o644, ""},
	{"/etc/vmroam/vmroam.toml", 0o644, "docs/vmroam.example.toml"},
	{"/usr/lib/vmroam/xen/vmroam.hook", 0o755, "scripts/xen/vmroam.hook"},
	{"/usr/lib/vmroam/libvirt/qemu", 0o755, "scripts/libvirt/qemu"},
	{"/usr/lib/vmroam/proxmox/vmroam-hookscript", 0o755, "scripts/proxmox/vmroam-hookscript"},
	{"/usr/share/man/man1/vmroam.1.gz", 0o644, ""},
	{"/usr/share/doc/vmroam/README.package", 0o644, "packaging/README.package"},
	{"/usr/share/doc/vmroam/README.md", 0o644, "README.md"},
	{"/usr/share/doc/vmroam/DESIGN.md", 0o644, "DESIGN.md"},
	{"/usr/share/doc/vmroam/config.md", 0o644, "docs/config.md"},
	{"/usr/share/doc/vmroam/metrics.md", 0o644, "docs/metrics.md"},
	{"/usr/share/doc/vmroam/security.md", 0o644, "docs/security.md"},
	{"/usr/share/doc/vmroam/vmroam.example.toml", 0o644, "docs/vmroam.example.toml"},
	{"/usr/share/doc/vmroam/monitoring/vmroam.rules.yml", 0o644, "monitoring/vmroam.rules.yml"},
	{"/usr/share/doc/vmroam/monitoring/vmroam-dashboard.json", 0o644, "monitoring/vmroam-dashboard.json"},
	{"/usr/share/doc/vmroam/copyright", 0o644, "LICENSE"},
}

// rpmPaths is what the .rpm holds, directories too: the .deb's files with
// the unit and the license where RPM distributions keep them.
func rpmPaths() []string {
	paths := []string{"/etc/vmroam", "/usr/lib/vmroam", "/usr/lib/vmroam/xen", "/usr/lib/vmroam/libvirt", "/usr/lib/vmroam/proxmox",
		"/usr/share/doc/vmroam", "/usr/share/doc/vmroam/monitoring",
		"/usr/lib/systemd/system/vmroam.service", "/usr/share/licenses/vmroam", "/usr/share/licenses/vmroam/LICENSE"}
	for _, f := range debFiles {
		switch f.path {
		case "/lib/systemd/system/vmroam.service", "/usr/share/doc/vmroam/copyright":
		default:
			paths = append(paths, f.path)
		}
	}
	slices.Sort(paths)
	return paths
}

// makePackage runs `make package` into a temporary PKGDIR and returns
// the .deb and the .rpm it made.
func makePackage(t *testing.T) (deb, rpm string) {
	t.Helper()
	makeTool, err := exec.LookPath("make")
	if err != nil {
		t.Skip("make not found")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("go not on PATH: make cannot build the binary and nfpm")
	}
	dir := t.TempDir()
	start := time.Now()
	out, err := exec.Command(makeTool, "-C", repoRoot, "package", "PKGDIR="+dir, "NFPM="+filepath.Join(dir, "nfpm")).CombinedOutput()
	if err != nil {
		t.Fatalf("make package: %v\n%s", err, out)
	}
	t.Logf("make package took %v", time.Since(start).Round(100*time.Millisecond))
	one := func(pattern string) string {
		m, _ := filepath.Glob(filepath.Join(dir, pattern))
		if len(m) != 1 {
			t.Fatalf("make package made %q, want one %s\n%s", m, pattern, out)
		}
		return m[0]
	}
	return one("vmroam_*.deb"), one("vmroam-*.rpm")
}

// command runs name with args and returns its output; a failure fails
// the test.
func command(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// wantVersion is the package version the binary's version maps to.
func wantVersion(t *testing.T, binVersion string) string {
	t.Helper()
	return strings.TrimSpace(command(t, filepath.Join(repoRoot, "packaging", "version.sh"), binVersion)) + "-1"
}

// TestPackage builds the .deb and the .rpm with `make package`, reads the
// .rpm with rpm and installs and erases it in a scratch root, then installs
// the .deb on this machine, checks what it put where, and purges it: only
// what the operator made may stay. VMROAM_PACKAGE_TEST=0 skips it.
func TestPackage(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: make package and dpkg take seconds")
	}
	if os.Getenv("VMROAM_PACKAGE_TEST") == "0" {
		t.Skip("VMROAM_PACKAGE_TEST=0")
	}
	deb, rpm := makePackage(t)
	t.Run("rpm", func(t *testing.T) { checkRPM(t, rpm) })
	t.Run("deb", func(t *testing.T) { checkDeb(t, deb) })
}

// checkRPM reads the .rpm with rpm itself: its files, config file, scripts
// and version; it runs the binary it holds.
func checkRPM(t *testing.T, pkg string) {
	rpmTool, err := exec.LookPath("rpm")
	if err != nil {
		t.Skip("rpm not found (Debian package rpm; scripts/install-deps.sh installs it): the .rpm is not checked")
	}
	// Digests of header and payload.
	if out := command(t, rpmTool, "-K", "--nosignature", pkg); !strings.Contains(out, "digests OK") {
		t.Errorf("rpm -K: %s", out)
	}
	files := strings.Split(strings.TrimSpace(command(t, rpmTool, "-qlp", pkg)), "\n")
	slices.Sort(files)
	if want := rpmPaths(); !slices.Equal(files, want) {
		t.Errorf("rpm -qlp:\n%s\nwant:\n%s", strings.Join(files, "\n"), strings.Join(want, "\n"))
	}
	if out := strings.TrimSpace(command(t, rpmTool, "-qcp", pkg)); out != "/etc/vmroam/vmroam.toml" {
		t.Errorf("config files %q, want /etc/vmroam/vmroam.toml", out)
	}
	// %config(noreplace): an edited config survives an upgrade.
	if out := command(t, rpmTool, "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", pkg); !strings.Contains(out, "/etc/vmroam/vmroam.toml cn\n") {
		t.Errorf("file flags:\n%s\nwant /etc/vmroam/vmroam.toml cn (config, noreplace)", out)
	}
	scripts := command(t, rpmTool, "-qp", "--scripts", pkg)
	for _, s := range []string{"postinstall scriptlet", "preuninstall scriptlet", "postuninstall scriptlet"} {
		if !strings.Contains(scripts, s) {
			t.Errorf("no %s:\n%s", s, scripts)
		}
	}
	if strings.Contains(scripts, "systemctl enable") || strings.Contains(scripts, "systemctl start") || strings.Contains(scripts, "systemctl restart") {
		t.Errorf("a scriptlet enables or starts something:\n%s", scripts)
	}

	// The payload, unpacked: the binary runs and its version is the package's.
	dir := t.TempDir()
	cpio, err := exec.LookPath("cpio")
	if err != nil {
		t.Skip("cpio not found: the .rpm's payload is not unpacked")
	}
	unpack := exec.Command("sh", "-c", `rpm2cpio "$1" | "$2" -idm --quiet`, "sh", pkg, cpio)
	unpack.Dir = dir
	if out, err := unpack.CombinedOutput(); err != nil {
		t.Fatalf("rpm2cpio | cpio: %v\n%s", err, out)
	}
	ver := strings.TrimSpace(command(t, filepath.Join(dir, "usr", "bin", "vmroam"), "version"))
	if got := strings.TrimSpace(command(t, rpmTool, "-qp", "--qf", "%{VERSION}-%{RELEASE}", pkg)); got != wantVersion(t, strings.TrimPrefix(ver, "vmroam ")) {
		t.Errorf("the .rpm's version %s, its binary says %q", got, ver)
	}
	unit, err := os.ReadFile(filepath.Join(dir, "usr", "lib", "systemd", "system", "vmroam.service"))
	if err != nil || !bytes.Contains(unit, []byte("\nExecStart=/usr/bin/vmroam agent --config /etc/vmroam/vmroam.toml\n")) {
		t.Errorf("the .rpm's unit (%v):\n%s", err, unit)
	}
	rpmRoot(t, rpmTool, pkg)
}

// rpmRoot installs the .rpm into an empty root with rpm, edits its config
// and erases it: rpm keeps the edited config as .rpmsave and leaves
// nothing else of the package's. The scripts do not run (the root has no
// shell; TestMaintainerScripts runs them).
func rpmRoot(t *testing.T, rpmTool, pkg string) {
	if os.Geteuid() != 0 {
		t.Log("not root: the .rpm is not installed into a scratch root")
		return
	}
	root := t.TempDir()
	command(t, rpmTool, "--root", root, "--initdb")
	var db []string // rpm's own files
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			db = append(db, path)
		}
		return nil
	})
	command(t, rpmTool, "--root", root, "-i", "--nodeps", "--noscripts", pkg)
	for _, p := range rpmPaths() {
		if !exists(filepath.Join(root, p)) {
			t.Errorf("rpm -i put no %s", p)
		}
	}
	conf := filepath.Join(root, "etc", "vmroam", "vmroam.toml")
	if err := os.WriteFile(conf, []byte("# mine\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	command(t, rpmTool, "--root", root, "-e", "--noscripts", "vmroam")

	// What may stay: rpm's database, the edited config and the system's
	// directories, which a real system's packages own.
	keep := append(db, conf+".rpmsave")
	system := []string{"/etc", "/usr", "/usr/bin", "/usr/lib", "/usr/lib/systemd", "/usr/lib/systemd/system",
		"/usr/share", "/usr/share/doc", "/usr/share/licenses", "/usr/share/man", "/usr/share/man/man1"}
	filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil || path == root {
			return err
		}
		rel := strings.TrimPrefix(path, root)
		switch {
		case slices.Contains(keep, path), slices.Contains(system, rel):
		case d.IsDir() && slices.ContainsFunc(keep, func(k string) bool { return strings.HasPrefix(k, path+"/") }):
		default:
			t.Errorf("rpm -e left %s", rel)
		}
		return nil
	})
	if got, err := os.ReadFile(conf + ".rpmsave"); err != nil || string(got) != "# mine\n" {
		t.Errorf("rpm -e did not keep the edited config as .rpmsave: %q, %v", got, err)
	}
}

// dpkg runs dpkg with args, waiting out another package manager's lock
// (other work on this machine may be installing packages).
func dpkg(t *testing.T, args ...string) string {
	t.Helper()
	start := time.Now()
	deadline := start.Add(90 * time.Second)
	for {
		cmd := exec.Command("dpkg", args...)
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Logf("dpkg %s: %v (with any wait for the lock)", strings.Join(args, " "), time.Since(start).Round(100*time.Millisecond))
			return string(out)
		}
		if !bytes.Contains(out, []byte("lock")) || time.Now().After(deadline) {
			t.Fatalf("dpkg %s (after %v): %v\n%s", strings.Join(args, " "), time.Since(start).Round(100*time.Millisecond), err, out)
		}
		time.Sleep(time.Second)
	}
}

// dpkgKnows says whether dpkg has any record of the package vmroam
// (installed, or removed with its conffiles kept).
func dpkgKnows() (string, bool) {
	out, err := exec.Command("dpkg-query", "-W", "-f=${db:Status-Abbrev}", "vmroam").Output()
	return strings.TrimSpace(string(out)), err == nil && strings.TrimSpace(string(out)) != "un"
}

func exists(path string) bool {
	_, err := os.Lstat(path)
	return err == nil
}

func checkDeb(t *testing.T, pkg string) {
	if os.Geteuid() != 0 {
		t.Skip("not root: the .deb is not installed")
	}
	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("no dpkg (not Debian): the .deb is not installed")
	}
	// Never touch a vmroam this machine has.
	if status, ok := dpkgKnows(); ok {
		t.Skipf("dpkg knows a package vmroam already (%s): not installing over it", status)
	}
	for _, f := range append(debFiles, pkgFile{path: "/etc/vmroam"}, pkgFile{path: "/usr/lib/vmroam"}) {
		if exists(f.path) {
			t.Skipf("%s exists (make install?): not installing the package over it", f.path)
		}
	}
	// The package's paths, directories too, and whether each was there
	// before: afterwards, exactly those may be.
	var paths []string
	for _, l := range strings.Split(strings.TrimSpace(command(t, "dpkg-deb", "-c", pkg)), "\n") {
		f := strings.Fields(l)
		if p := strings.TrimSuffix(strings.TrimPrefix(f[len(f)-1], "."), "/"); p != "" {
			paths = append(paths, p)
		}
	}
	before := map[string]bool{}
	for _, p := range paths {
		before[p] = exists(p)
	}
	// Hooks are enabled by linking them: the package must not.
	hookLinks := []string{"/etc/xen/scripts/vif-post.d/vmroam.hook", "/etc/libvirt/hooks/qemu.d/vmroam", "/var/lib/vz/snippets/vmroam.sh", "/etc/systemd/system/multi-user.target.wants/vmroam.service"}
	for _, p := range hookLinks {
		before[p] = exists(p)
	}
	operatorKey := "/etc/vmroam/gossip.key"
	t.Cleanup(func() {
		if _, ok := dpkgKnows(); ok {
			exec.Command("dpkg", "-P", "vmroam").Run()
		}
		os.Remove(operatorKey)
		os.Remove("/etc/vmroam")
	})
	left := func(when string, allowed ...string) {
		t.Helper()
		if status, ok := dpkgKnows(); ok {
			t.Errorf("%s: dpkg still knows vmroam (%s)", when, status)
		}
		for _, p := range paths {
			if exists(p) != before[p] && !slices.Contains(allowed, p) {
				t.Errorf("%s: %s was there before the install: %v, now: %v", when, p, before[p], exists(p))
			}
		}
	}

	start := time.Now()
	dpkg(t, "-i", pkg)
	checkInstalled(t)
	for _, p := range hookLinks {
		if exists(p) != before[p] {
			t.Errorf("installing the package made %s: it must not enable anything", p)
		}
	}
	dpkg(t, "-P", "vmroam")
	left("after dpkg -P")

	// Again, and the operator edits the config and adds a key: removing
	// keeps the conffile, installing again keeps the operator's version,
	// purging removes it and leaves theirs.
	dpkg(t, "-i", pkg)
	mine := []byte("# mine\nbind = \"198.51.100.10\"\n")
	if err := os.WriteFile("/etc/vmroam/vmroam.toml", mine, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(operatorKey, []byte("key\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	dpkg(t, "-r", "vmroam")
	if exists("/usr/bin/vmroam") {
		t.Error("dpkg -r left /usr/bin/vmroam")
	}
	if got, _ := os.ReadFile("/etc/vmroam/vmroam.toml"); !bytes.Equal(got, mine) {
		t.Errorf("dpkg -r did not keep the edited conffile: %.60q", got)
	}
	dpkg(t, "-i", pkg)
	if got, _ := os.ReadFile("/etc/vmroam/vmroam.toml"); !bytes.Equal(got, mine) {
		t.Errorf("installing again replaced the edited conffile: %.60q", got)
	}
	dpkg(t, "-P", "vmroam")
	if !exists(operatorKey) {
		t.Errorf("dpkg -P removed the operator's %s", operatorKey)
	}
	left("after dpkg -P with an operator's file", "/etc/vmroam")
	t.Logf("installs and purges took %v", time.Since(start).Round(100*time.Millisecond))
}

// checkInstalled checks the installed package's files, its conffile, the
// binary and the unit.
func checkInstalled(t *testing.T) {
	t.Helper()
	for _, f := range debFiles {
		st, err := os.Stat(f.path)
		if err != nil {
			t.Error(err)
			continue
		}
		if st.Mode() != f.mode {
			t.Errorf("%s: mode %v, want %v", f.path, st.Mode(), f.mode)
		}
		if f.src == "" {
			continue
		}
		want, err := os.ReadFile(filepath.Join(repoRoot, f.src))
		if err != nil {
			t.Fatal(err)
		}
		if got, _ := os.ReadFile(f.path); !bytes.Equal(got, want) {
			t.Errorf("%s is not %s", f.path, f.src)
		}
	}
	if out := command(t, "dpkg-query", "-W", "-f=${Conffiles}", "vmroam"); !strings.Contains(out, " /etc/vmroam/vmroam.toml ") {
		t.Errorf("conffiles: %q, want /etc/vmroam/vmroam.toml", out)
	}

	ver := strings.TrimSpace(command(t, "/usr/bin/vmroam", "version"))
	if got := strings.TrimSpace(command(t, "dpkg-query", "-W", "-f=${Version}", "vmroam")); !strings.HasPrefix(ver, "vmroam ") || got != wantVersion(t, strings.TrimPrefix(ver, "vmroam ")) {
		t.Errorf("package version %s, vmroam version says %q", got, ver)
	}
	if out, err := exec.Command("ldd", "/usr/bin/vmroam").CombinedOutput(); err == nil && !bytes.Contains(out, []byte("not a dynamic executable")) {
		t.Errorf("/usr/bin/vmroam links shared libraries, which the package does not depend on:\n%s", out)
	}

	man, err := os.Open("/usr/share/man/man1/vmroam.1.gz")
	if err == nil {
		defer man.Close()
		var zr *gzip.Reader
		if zr, err = gzip.NewReader(man); err == nil {
			var page []byte
			if page, err = io.ReadAll(zr); err == nil && !bytes.Contains(page, []byte(`.SS "vmroam vip attach"`)) {
				t.Errorf("the man page has no vip attach:\n%s", page)
			}
		}
	}
	if err != nil {
		t.Errorf("man page: %v", err)
	}

	unitPath := "/lib/systemd/system/vmroam.service"
	unit, err := os.ReadFile(unitPath)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(unit, []byte("\nExecStart=/usr/bin/vmroam agent --config /etc/vmroam/vmroam.toml\n")) || bytes.Contains(unit, []byte("/usr/local")) {
		t.Errorf("installed unit:\n%s", unit)
	}
	if analyze, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Log("systemd-analyze not found (Debian package systemd): the installed unit is not verified")
	} else if out := verifyUnit(analyze, unitPath, "vmroam"); out != "" {
		t.Errorf("systemd-analyze verify %s:\n%s", unitPath, out)
	}
}

// TestPackageVersion: packaging/version.sh maps every form of `git
// describe` to a version both dpkg and rpm take, in the order of the
// commits.
func TestPackageVersion(t *testing.T) {
	script := filepath.Join(repoRoot, "packaging", "version.sh")
	// In the order dpkg and rpm must sort them.
	ordered := [][2]string{
		{"0.0.0+7d1e06b", "7d1e06b"},
		{"0.0.0+7d1e06b.dirty", "7d1e06b-dirty"},
		{"1.2~rc1", "v1.2-rc1"},
		{"1.2~rc.2+3.gabc1234", "v1.2-rc.2-3-gabc1234"},
		{"1.2", "v1.2"},
		{"1.2+4.gabc1234", "v1.2-4-gabc1234"},
		{"1.2+4.gabc1234.dirty", "v1.2-4-gabc1234-dirty"},
		{"1.2+10.gdef5678", "v1.2-10-gdef5678"},
		{"1.10.0", "1.10.0"},
	}
	var versions []string
	for _, c := range ordered {
		got := strings.TrimSpace(command(t, script, c[1]))
		if got != c[0] {
			t.Errorf("version.sh %s = %s, want %s", c[1], got, c[0])
		}
		versions = append(versions, got)
	}
	// Uncommitted changes have no place in that order.
	for in, want := range map[string]string{"v1.2-dirty": "1.2+dirty", "dev": "0.0.0+dev"} {
		got := strings.TrimSpace(command(t, script, in))
		if got != want {
			t.Errorf("version.sh %s = %s, want %s", in, got, want)
		}
		if out, err := exec.Command("dpkg", "--validate-version", got+"-1").CombinedOutput(); err != nil && !errors.Is(err, exec.ErrNotFound) {
			t.Errorf("dpkg --validate-version %s-1: %v %s", got, err, out)
		}
	}
	if out, err := exec.Command(script).CombinedOutput(); err == nil {
		t.Errorf("version.sh without VERSION succeeded: %s", out)
	}

	if _, err := exec.LookPath("dpkg"); err != nil {
		t.Skip("no dpkg: the versions are not checked with it")
	}
	for i, v := range versions {
		if out, err := exec.Command("dpkg", "--validate-version", v+"-1").CombinedOutput(); err != nil {
			t.Errorf("dpkg --validate-version %s-1: %v %s", v, err, out)
		}
		if i > 0 {
			if err := exec.Command("dpkg", "--compare-versions", versions[i-1], "lt", v).Run(); err != nil {
				t.Errorf("dpkg: %s is not before %s", versions[i-1], v)
			}
		}
	}
	if _, err := exec.LookPath("rpm"); err != nil {
		t.Skip("no rpm (Debian package rpm): the versions are not compared as rpm does")
	}
	for i := 1; i < len(versions); i++ {
		expr := fmt.Sprintf(`%%{lua: print(rpm.vercmp(%q, %q))}`, versions[i-1], versions[i])
		if out := strings.TrimSpace(command(t, "rpm", "--eval", expr)); out != "-1" {
			t.Errorf("rpm: %s is not before %s (vercmp %s)", versions[i-1], versions[i], out)
		}
	}
}

// TestMaintainerScripts runs the packages' scripts with every argument dpkg
// and rpm give them, with a systemctl that records its calls, once as if
// systemd ran (/run/systemd/system, on a /run of their own) and once as
// if not: they reload systemd and stop the agent when they should, never
// enable or start it, and a failing systemctl does not fail them.
func TestMaintainerScripts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("not root: cannot give the scripts a /run of their own")
	}
	unshare, err := exec.LookPath("unshare")
	if err != nil {
		t.Skip("unshare not found (Debian package util-linux)")
	}
	dir := t.TempDir()
	calls := filepath.Join(dir, "calls")
	fake := "#!/bin/sh\necho \"$*\" >> " + calls + "\nexit 1\n"
	if err := os.WriteFile(filepath.Join(dir, "systemctl"), []byte(fake), 0o755); err != nil {
		t.Fatal(err)
	}
	const reload, stop = "daemon-reload", "stop vmroam.service"
	for _, c := range []struct {
		script, arg, want string // want: under systemd
	}{
		{"postinstall.sh", "configure", reload}, // dpkg
		{"postinstall.sh", "1", reload},         // rpm: install
		{"postinstall.sh", "2", reload},         // rpm: upgrade
		{"preremove.sh", "remove", stop},
		{"preremove.sh", "upgrade", ""},
		{"preremove.sh", "0", stop},
		{"preremove.sh", "1", ""},
		{"postremove.sh", "remove", reload},
		{"postremove.sh", "purge", reload},
		{"postremove.sh", "upgrade", ""},
		{"postremove.sh", "0", reload},
		{"postremove.sh", "1", ""},
	} {
		for _, systemd := range []bool{true, false} {
			os.Remove(calls)
			setup := "mount -t tmpfs vmroam-pkg-test /run"
			if systemd {
				setup += " && mkdir -p /run/systemd/system"
			}
			script := filepath.Join(repoRoot, "packaging", c.script)
			cmd := exec.Command(unshare, "--mount", "--propagation", "private", "sh", "-c", setup+` && PATH="$0:$PATH" exec sh "$1" "$2"`, dir, script, c.arg)
			if out, err := cmd.CombinedOutput(); err != nil {
				t.Errorf("%s %s (systemd %v): %v\n%s", c.script, c.arg, systemd, err, out)
				continue
			}
			got, _ := os.ReadFile(calls)
			want := c.want
			if !systemd {
				want = ""
			}
			if strings.TrimSpace(string(got)) != want {
				t.Errorf("%s %s (systemd %v) called systemctl %q, want %q", c.script, c.arg, systemd, got, want)
			}
		}
	}
}
