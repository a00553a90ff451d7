// Package doctor checks whether a host is fit to run the vmroam agent and
// says, for each problem it finds, what to change. It only reads: sysctls,
// interfaces and routes, the kernel's clock state, the gossip key file and
// the agent's status; the one thing it sends is an optional ping per peer
// to probe the path MTU.
//
// The network checks see the network namespace of the calling thread:
// /proc/sys/net and netlink both follow the thread, so a caller (or a
// test) that locks its OS thread into a namespace checks that namespace.
// /sys/class/net follows the namespace sysfs was mounted in instead, which
// is why interfaces are listed and measured through netlink only.
package doctor

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/wgagent/control"
)

// Level says how much a finding matters.
type Level string

const (
	// OK: nothing to do.
	OK Level = "ok"
	// Info: worth knowing, nothing is broken (e.g. wireguard-go instead of
	// the kernel module).
	Info Level = "info"
	// Warn: works now, but something will go wrong or is going wrong
	// occasionally.
	Warn Level = "warn"
	// Fail: the agent cannot do its job here until this is fixed.
	Fail Level = "fail"
)

// Result is one finding of one check.
type Result struct {
	// Check names the check: wireguard, tun, ip_forward, ipv6_forward,
	// rp_filter, mtu, clock, gossip_key, agent.
	Check string `json:"check"`
	Level Level  `json:"level"`
	// Found says what the check saw, and for a problem why it matters.
	Found string `json:"found"`
	// Fix is the command or config line that removes the problem; empty
	// when there is nothing to fix.
	Fix string `json:"fix,omitempty"`
}

// Report is the outcome of all checks, in the order they ran.
type Report struct {
	Results []Result `json:"results"`
}

// Failed reports whether any check failed.
func (r Report) Failed() bool { return r.Count(Fail) > 0 }

// Count returns how many results have the level.
func (r Report) Count(l Level) int {
	n := 0
	for _, res := range r.Results {
		if res.Level == l {
			n++
		}
	}
	return n
}

// Config says where the checks look and what they measure against.
type Config struct {
	// ProcSys is the root of the sysctl tree, /proc/sys. Its net/ part is
	// that of the calling thread's network namespace.
	ProcSys string
	// SysModule lists loaded kernel modules, /sys/module.
	SysModule string
	// Modules is the running kernel's module directory,
	// /lib/modules/$(uname -r), read for modules.dep and modules.builtin.
	Modules string
	// TUN is the TUN clone device, /dev/net/tun.
	TUN string
	// Socket is the agent's control socket.
	Socket string
	// KeyFile is the gossip key file to check; "" skips the check.
	KeyFile string
	// Interface is the WireGuard interface, vmr0.
	Interface string
	// MTU is the tunnel MTU assumed while Interface does not exist (the
	// agent's --mtu, 1420 by default).
	MTU int
	// VIFPatterns are shell patterns (path.Match) naming the interfaces of
	// VMs, whose rp_filter matters: Xen's vif*, libvirt's vnet*. The
	// interfaces the agent reports VIPs on are checked too.
	VIFPatterns []string
	// Endpoints are underlay addresses of other hosts to check the path
	// MTU to, besides the endpoints of the agent's peers (for a host whose
	// agent is not running yet).
	Endpoints []netip.Addr
	// Probe sends one small and one full-size ping with Don't Fragment to
	// every endpoint, to find a smaller MTU beyond the first hop.
	Probe bool
	// ProbeWait is how long the probe waits for answers (all endpoints at
	// once).
	ProbeWait time.Duration
	// AgentTimeout bounds the call to the agent.
	AgentTimeout time.Duration

	// wgFamily looks up the generic netlink family "wireguard"; tests
	// replace it to play a kernel with or without the module.
	wgFamily func() error
	// adjtimex reads the kernel clock's state; tests replace it, because
	// making the real clock unsynchronized would disturb the machine.
	adjtimex func(*unix.Timex) (int, error)
}

// DefaultConfig returns the paths of a real host and the agent's defaults.
func DefaultConfig() Config {
	modules := "/lib/modules"
	var u unix.Utsname
	if unix.Uname(&u) == nil {
		modules = filepath.Join(modules, unix.ByteSliceToString(u.Release[:]))
	}
	return Config{
		ProcSys:      "/proc/sys",
		SysModule:    "/sys/module",
		Modules:      modules,
		TUN:          "/dev/net/tun",
		Socket:       control.DefaultSocket,
		Interface:    "vmr0",
		MTU:          1420,
		VIFPatterns:  []string{"vif*", "vnet*"},
		Probe:        true,
		ProbeWait:    time.Second,
		AgentTimeout: 5 * time.Second,
	}
}

// Validate checks the parts of the config an operator gives.
func (c Config) Validate() error {
	var errs []string
	if c.MTU < 1280 || c.MTU > 9000 {
		errs = append(errs, fmt.Sprintf("MTU %d: must be between 1280 and 9000", c.MTU))
	}
	if c.Interface == "" || len(c.Interface) > 15 {
		errs = append(errs, fmt.Sprintf("interface name %q: must be 1 to 15 bytes", c.Interface))
	}
	for _, p := range c.VIFPatterns {
		if _, err := path.Match(p, ""); err != nil {
			errs = append(errs, fmt.Sprintf("VM interface pattern %q: %v", p, err))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("doctor: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Run runs every check and returns their findings. Call it on the thread
// whose network namespace is to be checked (see the package doc); it does
// its netlink calls and /proc/sys reads on the calling goroutine.
func Run(ctx context.Context, cfg Config) Report {
	if cfg.wgFamily == nil {
		cfg.wgFamily = genlWireGuard
	}
	if cfg.adjtimex == nil {
		cfg.adjtimex = unix.Adjtimex
	}
	// The agent's status feeds other checks (its peers' endpoints, its
	// VMs' interfaces), so it is asked first and reported last.
	agent := askAgent(ctx, cfg)
	var rep Report
	add := func(rs ...Result) { rep.Results = append(rep.Results, rs...) }
	add(checkWireGuard(cfg, agent.status))
	add(checkTUN(cfg))
	add(checkForwarding(cfg, agent.status)...)
	add(checkRPFilter(cfg, agent.status))
	add(checkMTU(cfg, agent.status)...)
	add(checkClock(cfg))
	if cfg.KeyFile != "" {
		add(checkKeyFile(cfg.KeyFile))
	}
	add(agent.results...)
	return rep
}

// sysctlName is the dotted name `sysctl` takes for a path under /proc/sys:
// the dots in an interface name (vif5.0) become slashes.
func sysctlName(parts ...string) string {
	for i, p := range parts {
		parts[i] = strings.ReplaceAll(p, ".", "/")
	}
	return strings.Join(parts, ".")
}

// readSysctl reads an integer sysctl below root (e.g. net/ipv4/ip_forward).
func readSysctl(root, rel string) (int, error) {
	b, err := os.ReadFile(filepath.Join(root, rel))
	if err != nil {
		return 0, err
	}
	var v int
	if _, err := fmt.Sscan(string(b), &v); err != nil {
		return 0, fmt.Errorf("%s: %q is not a number", rel, strings.TrimSpace(string(b)))
	}
	return v, nil
}
