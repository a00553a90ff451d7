// Package lab builds the namespace lab: hosts as network namespaces on one
// bridge, VMs as namespaces behind a vif (or as QEMU guests on a tap, see
// StartGuest), and agents as processes inside the host namespaces. The
// end-to-end tests, the benchmarks and the demo use it.
//
// Everything is done by shelling out to iproute2 (`ip`) and `sysctl -w` run
// through `ip netns exec`, so each step can be repeated by hand. Every error
// names the command and carries its output.
//
// Layout of a lab with id "1a2b":
//
//	vr1a2b-sw        switch namespace, bridge br0 (up)
//	vr1a2b-h1 ...    host namespaces; eth0 = 198.18.0.i/24, veth to br0
//	vr1a2b-vm-NAME   VM namespaces; eth0 (MTU 1420) = the VM's VIPs,
//	                 its peer "vr1a2bvNAME" (the vif) sits in the host namespace
//
// With Config.Sites = S >= 2 the hosts are spread over S sites, separate
// subnets joined through an emulated WAN: host i is in site
// s = ((i-1) % S) + 1, so h1, h2, ... go round the sites in turn.
//
//	vr1a2b-sw<s>     switch namespace of site s, bridge br0
//	vr1a2b-h<i>      eth0 = 198.18.s.i/24 on its site's bridge,
//	                 route 198.18.0.0/16 via 198.18.s.254
//	vr1a2b-wan       router: leg "s<s>" = 198.18.s.254/24 on site s's bridge
//	                 (its peer there is "wan"); TUN wan0 owned by the wanem
//	                 process (Dir/wanem.log, control socket Dir/wanem.sock).
//	                 Rule: in from any leg -> table 100 -> default dev wan0;
//	                 back out of wan0 -> main table -> the destination's leg.
//
// So a packet between two sites crosses the emulator exactly once: one-way
// delay Config.WAN.Delay, round trip twice that. Hosts of one site talk on
// their bridge without delay. Every leg and wan0 have MTU 1500; the router
// sends no ICMP redirects and carries IPv4 only.
//
// Host i's agent uses the WireGuard interface vr1a2bw<i> (unique machine-wide,
// because wireguard-go's UAPI sockets share /var/run/wireguard) and the overlay
// address 100.100.0.i/16.
//
// Only addresses inside namespaces the lab made are ever used.
package lab

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vmroam/vmroam/lab/wanem"
)

// Fixed parts of the lab's addressing and ports.
const (
	GossipPort = 7946  // memberlist port every agent binds on its underlay address
	WGPort     = 51820 // WireGuard listen port used by the baseline
	VifMTU     = 1420  // MTU of both ends of a VM's veth, equal to the tunnel MTU

	// MaxHosts is the largest Config.Hosts: host i takes 198.18.0.i and 100.100.0.i.
	MaxHosts = 250
)

// Addresses used by the lab.
var (
	UnderlayPrefix = netip.MustParsePrefix("198.18.0.0/24") // the hosts' subnet with one bridge; see SitePrefix
	WANPrefix      = netip.MustParsePrefix("198.18.0.0/16") // every site's subnet; hosts route it to their site's router leg
	OverlayPrefix  = netip.MustParsePrefix("100.100.0.0/16")
	VIPPrefix6     = netip.MustParsePrefix("fd76:6d72::/64") // the IPv6 VIPs tests use, outside the overlay prefix
	GatewayV4      = netip.MustParseAddr("169.254.0.1")      // anycast gateway on every vif
	GatewayV6      = netip.MustParseAddr("fe80::1")          // IPv6 gateway on every vif
)

// netnsDir is where iproute2 keeps named network namespaces.
const netnsDir = "/var/run/netns"

// wgSockDir is where wireguard-go (embedded or stand-alone) puts UAPI sockets.
const wgSockDir = "/var/run/wireguard"

// cmdTimeout bounds every ip/sysctl command the lab runs for itself.
const cmdTimeout = 30 * time.Second

// Config describes a lab to build.
type Config struct {
	Hosts  int                              // number of hosts, >= 1
	Binary string                           // path to the vmroam binary (required for StartAgent)
	Dir    string                           // work dir for data dirs, sockets, logs, key file; "" = os.MkdirTemp
	Logf   func(format string, args ...any) // progress log; nil = discard

	// Sites is the number of sites, 0..Hosts. 0 or 1: every host on one
	// bridge, no WAN. 2 or more: host i in site ((i-1) % Sites) + 1, the
	// sites joined by the WAN emulator (see the package doc).
	Sites int
	// WAN is what the emulator does to every packet between two sites,
	// with Sites >= 2.
	WAN wanem.Config
	// WANBinary is the wanem program (BuildWANEm), required with Sites >= 2.
	WANBinary string
}

// Lab is a running namespace lab. Its methods may be called from several
// goroutines, except that MoveVM changes VM.Host, which callers must not read
// concurrently with it.
type Lab struct {
	ID      string  // 4 hex characters, part of every name the lab makes
	Dir     string  // work dir
	KeyFile string  // gossip encryption key: 32 random bytes, base64, one line
	Hosts   []*Host // Hosts[i-1] is host i
	Sites   int     // number of sites: 1 with a single bridge

	binary     string
	logf       func(format string, args ...any)
	createdDir bool

	mu         sync.Mutex
	namespaces []string       // in creation order
	vms        map[string]*VM // by name
	daemons    []*proc        // agents and baseline wireguard-go: SIGTERM first
	spawned    []*exec.Cmd    // Spawn: SIGKILL to the process group on Close
	nextPort   int            // iperf3 ports
	nextProbe  int            // Reach ports
	closed     bool

	wan *wan // the WAN router's emulator, with Sites >= 2
}

// Host is one hypervisor host: a network namespace on its site's bridge.
type Host struct {
	Index    int          // 1-based
	Name     string       // "h1"
	Site     int          // 1-based; 1 for every host with a single bridge
	NS       string       // network namespace
	Underlay netip.Addr   // 198.18.0.i, or 198.18.s.i in site s with Sites >= 2
	Overlay  netip.Prefix // 100.100.0.i/16
	Iface    string       // WireGuard interface name for the agent
	Socket   string       // agent control socket
	DataDir  string       // agent data dir
	Agent    *Agent       // the running (or last started) agent, nil if none

	lab *Lab
}

// UnderlayPrefix returns the host's underlay address with its /24.
func (h *Host) UnderlayPrefix() netip.Prefix {
	return netip.PrefixFrom(h.Underlay, UnderlayPrefix.Bits())
}

// RequireRoot returns nil when the lab can run here: the effective user is
// root and `ip netns list` works. Otherwise it returns an error saying why;
// tests turn it into t.Skip.
func RequireRoot() error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("lab: needs root (euid is %d)", os.Geteuid())
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("lab: iproute2 `ip` not found: %w", err)
	}
	if _, err := run(context.Background(), "ip", "netns", "list"); err != nil {
		return fmt.Errorf("lab: network namespaces unusable: %w", err)
	}
	return nil
}

// New builds a lab: the switch namespace with bridge br0, and cfg.Hosts host
// namespaces, each with eth0 (a veth to the bridge) holding 198.18.0.i/24, lo
// up, IPv4 and IPv6 forwarding on and rp_filter off. It writes a fresh gossip
// key to Dir/gossip.key. With cfg.Sites >= 2 it builds the sites and the WAN
// router instead of the one bridge, and starts the emulator. On any error it
// tears down what it made.
func New(cfg Config) (*Lab, error) {
	if cfg.Hosts < 1 || cfg.Hosts > MaxHosts {
		return nil, fmt.Errorf("lab: Hosts must be 1..%d, got %d", MaxHosts, cfg.Hosts)
	}
	if cfg.Sites < 0 || cfg.Sites > cfg.Hosts {
		return nil, fmt.Errorf("lab: Sites must be 0..Hosts (%d), got %d", cfg.Hosts, cfg.Sites)
	}
	if cfg.Sites >= 2 {
		if cfg.WANBinary == "" {
			return nil, errors.New("lab: Sites >= 2 needs Config.WANBinary (see BuildWANEm)")
		}
		if err := cfg.WAN.Validate(); err != nil {
			return nil, fmt.Errorf("lab: WAN: %w", err)
		}
	}
	l := &Lab{
		Sites:    max(1, cfg.Sites),
		binary:   cfg.Binary,
		logf:     cfg.Logf,
		vms:      map[string]*VM{},
		nextPort: 5201,
	}
	if l.logf == nil {
		l.logf = func(string, ...any) {}
	}
	if err := l.build(cfg); err != nil {
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("lab: teardown after failed build: %w", cerr))
		}
		return nil, err
	}
	return l, nil
}

func (l *Lab) build(cfg Config) error {
	if cfg.Dir == "" {
		dir, err := os.MkdirTemp("", "vmroam-lab-")
		if err != nil {
			return fmt.Errorf("lab: work dir: %w", err)
		}
		l.Dir, l.createdDir = dir, true
	} else {
		abs, err := filepath.Abs(cfg.Dir)
		if err != nil {
			return fmt.Errorf("lab: work dir: %w", err)
		}
		if err := os.MkdirAll(abs, 0o700); err != nil {
			return fmt.Errorf("lab: work dir: %w", err)
		}
		l.Dir = abs
	}
	if l.binary != "" {
		abs, err := filepath.Abs(l.binary)
		if err != nil {
			return fmt.Errorf("lab: binary: %w", err)
		}
		l.binary = abs
	}

	// Claim an id: creating the (first) switch namespace is the atomic claim.
	sw := ""
	for attempt := 0; l.ID == ""; attempt++ {
		if attempt == 50 {
			return errors.New("lab: no free lab id after 50 tries")
		}
		id, err := randomID()
		if err != nil {
			return err
		}
		if idInUse(id) {
			continue
		}
		sw = "vr" + id + "-" + l.switchSuffix(1)
		if err := l.addNS(sw); err != nil {
			if nsExists(sw) {
				continue // somebody else took it between the check and the add
			}
			return err
		}
		l.ID = id
	}
	l.logf("lab %s: work dir %s", l.ID, l.Dir)

	l.KeyFile = filepath.Join(l.Dir, "gossip.key")
	if err := writeKeyFile(l.KeyFile); err != nil {
		return err
	}

	switches := []string{sw}
	for s := 2; s <= l.Sites; s++ {
		ns := l.nsName(l.switchSuffix(s))
		if err := l.addNS(ns); err != nil {
			return err
		}
		switches = append(switches, ns)
	}
	for _, ns := range switches {
		if err := l.addSwitch(ns); err != nil {
			return err
		}
	}

	for i := 1; i <= cfg.Hosts; i++ {
		site := (i-1)%l.Sites + 1
		octet := byte(0) // with one bridge the addresses stay what they always were
		if l.Sites > 1 {
			octet = byte(site)
		}
		h := &Host{
			Index:    i,
			Name:     "h" + strconv.Itoa(i),
			Site:     site,
			NS:       l.nsName("h" + strconv.Itoa(i)),
			Underlay: netip.AddrFrom4([4]byte{198, 18, octet, byte(i)}),
			Overlay:  netip.PrefixFrom(netip.AddrFrom4([4]byte{100, 100, 0, byte(i)}), OverlayPrefix.Bits()),
			Iface:    "vr" + l.ID + "w" + strconv.Itoa(i),
			lab:      l,
		}
		h.Socket = filepath.Join(l.Dir, h.Name+".sock")
		h.DataDir = filepath.Join(l.Dir, h.Name)
		if len(h.Socket) > 107 {
			return fmt.Errorf("lab: socket path %q longer than 107 bytes; use a shorter Dir", h.Socket)
		}
		if err := os.MkdirAll(h.DataDir, 0o700); err != nil {
			return fmt.Errorf("lab: data dir: %w", err)
		}
		if err := l.addHost(h, switches[site-1]); err != nil {
			return err
		}
		l.Hosts = append(l.Hosts, h)
	}
	if l.Sites == 1 {
		l.logf("lab %s: %d hosts up on %s", l.ID, cfg.Hosts, UnderlayPrefix)
		return nil
	}
	return l.buildWAN(cfg, switches)
}

// switchSuffix names site s's switch namespace: "sw" with one bridge (as
// always), "sw<s>" with sites.
func (l *Lab) switchSuffix(s int) string {
	if l.Sites == 1 {
		return "sw"
	}
	return "sw" + strconv.Itoa(s)
}

func (l *Lab) addSwitch(ns string) error {
	for _, s := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "br0", "type", "bridge"},
		{"link", "set", "br0", "up"},
	} {
		if err := l.ip(ns, s...); err != nil {
			return err
		}
	}
	return nil
}

func (l *Lab) addHost(h *Host, sw string) error {
	if err := l.addNS(h.NS); err != nil {
		return err
	}
	// Sysctls first, so that "default" is inherited by every interface made later.
	if err := l.sysctl(h.NS,
		"net.ipv4.ip_forward=1",
		"net.ipv6.conf.all.forwarding=1",
		"net.ipv4.conf.all.rp_filter=0",
		"net.ipv4.conf.default.rp_filter=0",
	); err != nil {
		return err
	}
	steps := [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "eth0", "type", "veth", "peer", "name", h.Name, "netns", sw},
		{"addr", "add", h.UnderlayPrefix().String(), "dev", "eth0"},
		{"link", "set", "eth0", "up"},
	}
	if l.Sites > 1 {
		steps = append(steps, []string{"route", "add", WANPrefix.String(), "via", routerAddr(h.Site).String()})
	}
	for _, s := range steps {
		if err := l.ip(h.NS, s...); err != nil {
			return err
		}
	}
	return l.ip(sw, "link", "set", h.Name, "master", "br0", "up")
}

// Host returns host i (1-based), or nil.
func (l *Lab) Host(i int) *Host {
	if i < 1 || i > len(l.Hosts) {
		return nil
	}
	return l.Hosts[i-1]
}

// Namespaces returns the names of the namespaces the lab made and has not
// deleted yet, in creation order.
func (l *Lab) Namespaces() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.namespaces...)
}

// Prefix is the prefix of every namespace name of this lab ("vr1a2b-").
func (l *Lab) Prefix() string { return "vr" + l.ID + "-" }

func (l *Lab) nsName(suffix string) string { return l.Prefix() + suffix }

// Close stops every agent and the WAN emulator (SIGTERM, then SIGKILL after
// 5 s), kills every process started by Spawn that still runs, deletes every
// namespace the lab made and removes Dir if New created it. It is idempotent; later calls
// return nil. The returned error lists what could not be cleaned up.
func (l *Lab) Close() error {
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil
	}
	l.closed = true
	daemons := append([]*proc(nil), l.daemons...)
	spawned := append([]*exec.Cmd(nil), l.spawned...)
	namespaces := append([]string(nil), l.namespaces...)
	l.mu.Unlock()

	var errs []error

	// 0. Frozen VMs run again, so that their processes take SIGTERM.
	for _, vm := range l.VMs() {
		if err := l.ThawVM(vm); err != nil {
			errs = append(errs, err)
		}
	}

	// 1. Agents and wireguard-go daemons, in parallel.
	var wg sync.WaitGroup
	for _, p := range daemons {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := p.stop(5 * time.Second); err != nil {
				l.logf("lab %s: %v", l.ID, err)
			}
		}()
	}
	wg.Wait()
	for _, p := range daemons {
		if !p.exited() {
			errs = append(errs, fmt.Errorf("lab: %s (pid %d) did not exit", p.name, p.cmd.Process.Pid))
		}
	}

	// 2. Background processes from Spawn.
	for _, c := range spawned {
		if c.Process.Signal(syscall.Signal(0)) == nil { // not reaped yet: the group id is still ours
			_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		}
	}
	for _, c := range spawned {
		if !waitExit(c.Process.Pid, 5*time.Second) {
			errs = append(errs, fmt.Errorf("lab: spawned %q (pid %d) did not exit", c.String(), c.Process.Pid))
		}
	}

	// 3. Namespaces, newest first. Anything still running inside one was
	// started by this lab (or its processes): kill it by pid first.
	for i := len(namespaces) - 1; i >= 0; i-- {
		ns := namespaces[i]
		l.killNSProcs(ns)
		if err := l.delNS(ns); err != nil {
			errs = append(errs, err)
		}
	}

	// 4. UAPI sockets left by killed wireguard-go instances of this lab.
	for _, h := range l.Hosts {
		sock := filepath.Join(wgSockDir, h.Iface+".sock")
		if err := os.Remove(sock); err == nil {
			l.logf("lab %s: removed stale %s", l.ID, sock)
		}
	}

	// 5. The emulator's control socket, if it was killed.
	l.removeWANSocket()

	// 6. The work dir, if it is ours.
	if l.createdDir && l.Dir != "" {
		if err := os.RemoveAll(l.Dir); err != nil {
			errs = append(errs, fmt.Errorf("lab: remove %s: %w", l.Dir, err))
		}
	}
	if len(errs) == 0 {
		l.logf("lab %s: closed", l.ID)
	}
	return errors.Join(errs...)
}

// killNSProcs SIGKILLs, by pid, every process left inside a lab namespace.
func (l *Lab) killNSProcs(ns string) {
	pids, err := nsPIDs(ns) // an error also when ns is gone
	if err != nil {
		return
	}
	for _, pid := range pids {
		l.logf("lab %s: killing leftover pid %d in %s", l.ID, pid, ns)
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	for _, pid := range pids {
		waitExit(pid, 2*time.Second)
	}
}

func (l *Lab) addNS(ns string) error {
	_, err := run(context.Background(), "ip", "netns", "add", ns)
	if err == nil || nsExistsAfterFailedAdd(ns, err) {
		l.mu.Lock()
		l.namespaces = append(l.namespaces, ns)
		l.mu.Unlock()
	}
	return err
}

// nsExistsAfterFailedAdd reports whether a failed `ip netns add` still left a
// namespace that is ours to delete (it never is when the name existed before).
func nsExistsAfterFailedAdd(ns string, err error) bool {
	return !strings.Contains(err.Error(), "File exists") && nsExists(ns)
}

func (l *Lab) delNS(ns string) error {
	if nsExists(ns) {
		if _, err := run(context.Background(), "ip", "netns", "del", ns); err != nil {
			return err
		}
	}
	l.mu.Lock()
	for i, n := range l.namespaces {
		if n == ns {
			l.namespaces = append(l.namespaces[:i], l.namespaces[i+1:]...)
			break
		}
	}
	l.mu.Unlock()
	return nil
}

func nsExists(ns string) bool {
	_, err := os.Stat(filepath.Join(netnsDir, ns))
	return err == nil
}

// idInUse reports whether anything on the machine already uses names of id.
func idInUse(id string) bool {
	for _, pat := range []string{
		filepath.Join(netnsDir, "vr"+id+"-*"),
		filepath.Join(wgSockDir, "vr"+id+"*"),
	} {
		if m, _ := filepath.Glob(pat); len(m) > 0 {
			return true
		}
	}
	return false
}

func randomID() (string, error) {
	var b [2]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("lab: random id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

func writeKeyFile(path string) error {
	var key [32]byte
	if _, err := rand.Read(key[:]); err != nil {
		return fmt.Errorf("lab: gossip key: %w", err)
	}
	line := base64.StdEncoding.EncodeToString(key[:]) + "\n"
	if err := os.WriteFile(path, []byte(line), 0o600); err != nil {
		return fmt.Errorf("lab: gossip key: %w", err)
	}
	return os.Chmod(path, 0o600) // WriteFile keeps the mode of an existing file
}

// ip runs `ip -n ns args...`.
func (l *Lab) ip(ns string, args ...string) error {
	_, err := run(context.Background(), "ip", append([]string{"-n", ns}, args...)...)
	return err
}

// sysctl runs `ip netns exec ns sysctl -w settings...`.
func (l *Lab) sysctl(ns string, settings ...string) error {
	_, err := l.Exec(ns, append([]string{"sysctl", "-q", "-w"}, settings...)...)
	return err
}

// Exec runs `ip netns exec ns args...` and returns its combined output. The
// error names the command and includes the output.
func (l *Lab) Exec(ns string, args ...string) ([]byte, error) {
	return l.ExecContext(context.Background(), ns, args...)
}

// ExecContext is Exec with a context; when ctx ends the command's whole
// process group is killed.
func (l *Lab) ExecContext(ctx context.Context, ns string, args ...string) ([]byte, error) {
	if len(args) == 0 {
		return nil, errors.New("lab: Exec: no command")
	}
	return runCtx(ctx, "ip", append([]string{"netns", "exec", ns}, args...)...)
}

// Spawn starts `ip netns exec ns args...` in the background, in its own
// process group, with stdout and stderr appended to logPath ("" = discard).
// The caller may Wait for the returned Cmd; Close kills its process group if
// it still runs.
func (l *Lab) Spawn(ns string, logPath string, args ...string) (*exec.Cmd, error) {
	if len(args) == 0 {
		return nil, errors.New("lab: Spawn: no command")
	}
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return nil, errors.New("lab: Spawn after Close")
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	var logFile *os.File
	if logPath != "" {
		f, err := openLog(logPath, cmd)
		if err != nil {
			return nil, err
		}
		logFile = f
		cmd.Stdout, cmd.Stderr = f, f
	}
	err := cmd.Start()
	if logFile != nil {
		logFile.Close() // the child has its own copy
	}
	if err != nil {
		return nil, fmt.Errorf("lab: start %s: %w", cmd, err)
	}
	l.mu.Lock()
	l.spawned = append(l.spawned, cmd)
	l.mu.Unlock()
	return cmd, nil
}

// openLog opens path for appending and writes a header naming the command.
func openLog(path string, cmd *exec.Cmd) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lab: log: %w", err)
	}
	fmt.Fprintf(f, "=== %s %s\n", time.Now().Format(time.RFC3339Nano), cmd.String())
	return f, nil
}

// run runs a command with the lab's default timeout.
func run(ctx context.Context, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, cmdTimeout)
	defer cancel()
	return runCtx(ctx, name, args...)
}

// runCtx runs a command in its own process group and returns its combined
// output; the error names the command and includes the output.
func runCtx(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", err, ctx.Err())
		}
		return out.Bytes(), fmt.Errorf("%s: %w: %s", cmd.String(), err, strings.TrimSpace(out.String()))
	}
	return out.Bytes(), nil
}

// logTail returns the last lines of a log file, for error messages.
func logTail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return fmt.Sprintf("(no log: %v)", err)
	}
	const maxBytes = 8 << 10
	if len(b) > maxBytes {
		b = b[len(b)-maxBytes:]
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}
