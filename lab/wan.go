package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"time"

	"github.com/vmroam/vmroam/lab/wanem"
)

// The WAN router's names and numbers (see the package doc).
const (
	wanTable = "100" // routing table that sends everything into the emulator
	wanPref  = "100" // priority of the rules that select it, one per leg
	wanDev   = "wan0"

	// wanRTPriority is the SCHED_FIFO priority the emulator runs at: on a
	// machine busy with other tests a normal process waited milliseconds
	// for a CPU, more than the emulator's whole error budget.
	wanRTPriority = 10
)

// wan is the router's emulator process.
type wan struct {
	p    *proc
	ns   string
	sock string // control socket
	log  string
}

// SitePrefix returns site s's subnet, 198.18.s.0/24 (with sites; a lab with
// one bridge uses UnderlayPrefix).
func SitePrefix(s int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(s), 0}), 24)
}

// routerAddr is the router's address in site s, the hosts' gateway to the
// other sites.
func routerAddr(s int) netip.Addr { return netip.AddrFrom4([4]byte{198, 18, byte(s), 254}) }

// buildWAN makes the router namespace, its legs into every site switch, and
// starts the emulator; then it routes the legs' traffic through it.
func (l *Lab) buildWAN(cfg Config, switches []string) error {
	bin, err := filepath.Abs(cfg.WANBinary)
	if err != nil {
		return fmt.Errorf("lab: WAN binary: %w", err)
	}
	w := &wan{
		ns:   l.nsName("wan"),
		sock: filepath.Join(l.Dir, "wanem.sock"),
		log:  filepath.Join(l.Dir, "wanem.log"),
	}
	if len(w.sock) > 107 {
		return fmt.Errorf("lab: socket path %q longer than 107 bytes; use a shorter Dir", w.sock)
	}
	if err := l.addNS(w.ns); err != nil {
		return err
	}
	// Before any interface exists, so that "default" covers them all. No
	// redirects: a host must keep sending through the router, never be
	// told to go around the emulator. rp_filter off: packets from site 1
	// come back in through wan0. IPv6 off: the kernel's own IPv6 chatter
	// (router solicitations, MLD) would otherwise go through the emulator.
	if err := l.sysctl(w.ns,
		"net.ipv4.ip_forward=1",
		"net.ipv4.conf.all.rp_filter=0",
		"net.ipv4.conf.default.rp_filter=0",
		"net.ipv4.conf.all.send_redirects=0",
		"net.ipv4.conf.default.send_redirects=0",
		"net.ipv6.conf.all.disable_ipv6=1",
		"net.ipv6.conf.default.disable_ipv6=1",
	); err != nil {
		return err
	}
	if err := l.ip(w.ns, "link", "set", "lo", "up"); err != nil {
		return err
	}
	for i, sw := range switches {
		s := i + 1
		leg := "s" + strconv.Itoa(s)
		steps := []struct {
			ns   string
			args []string
		}{
			{w.ns, []string{"link", "add", leg, "mtu", "1500", "type", "veth", "peer", "name", "wan", "mtu", "1500", "netns", sw}},
			{w.ns, []string{"addr", "add", netip.PrefixFrom(routerAddr(s), 24).String(), "dev", leg}},
			{w.ns, []string{"link", "set", leg, "up"}},
			{sw, []string{"link", "set", "wan", "master", "br0", "up"}},
		}
		for _, st := range steps {
			if err := l.ip(st.ns, st.args...); err != nil {
				return err
			}
		}
	}

	args := []string{bin,
		"-dev", wanDev,
		"-delay", cfg.WAN.Delay.String(),
		"-jitter", cfg.WAN.Jitter.String(),
		"-loss", strconv.FormatFloat(cfg.WAN.Loss, 'g', -1, 64),
		"-seed", strconv.FormatInt(cfg.WAN.Seed, 10),
		"-mtu", "1500",
		"-control", w.sock,
		"-rt", strconv.Itoa(wanRTPriority),
	}
	if w.p, err = l.startProc("wanem", w.ns, w.log, nil, args...); err != nil {
		return err
	}
	l.mu.Lock()
	l.wan = w
	l.mu.Unlock()
	if err := l.waitWAN(w); err != nil {
		return err
	}

	if err := l.ip(w.ns, "route", "add", "default", "dev", wanDev, "table", wanTable); err != nil {
		return err
	}
	for s := 1; s <= len(switches); s++ {
		if err := l.ip(w.ns, "rule", "add", "iif", "s"+strconv.Itoa(s), "lookup", wanTable, "pref", wanPref); err != nil {
			return err
		}
	}
	l.logf("lab %s: %d hosts in %d sites (%s..%s) joined by the WAN emulator: delay %v jitter %v loss %v",
		l.ID, len(l.Hosts), len(switches), SitePrefix(1), SitePrefix(len(switches)), cfg.WAN.Delay, cfg.WAN.Jitter, cfg.WAN.Loss)
	return nil
}

// waitWAN waits until the emulator answers on its control socket, which it
// opens once wan0 is up.
func (l *Lab) waitWAN(w *wan) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if w.p.exited() {
			return fmt.Errorf("lab: wanem in %s exited (%v); log tail:\n%s", w.ns, w.p.err, logTail(w.log, 20))
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := wanem.ControlStats(ctx, w.sock)
		cancel()
		if err == nil {
			l.logf("lab %s: wanem running in %s (pid %d)", l.ID, w.ns, w.p.cmd.Process.Pid)
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: wanem in %s not answering after 10s (%v); log tail:\n%s", w.ns, err, logTail(w.log, 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (l *Lab) wanOrErr() (*wan, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.wan == nil {
		return nil, errors.New("lab: no WAN (Config.Sites < 2)")
	}
	return l.wan, nil
}

// SetWANLoss changes the share of packets the WAN emulator drops, from now
// on, without restarting it (the packets it holds stay on their way).
func (l *Lab) SetWANLoss(p float64) error {
	w, err := l.wanOrErr()
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := wanem.ControlSetLoss(ctx, w.sock, p); err != nil {
		return fmt.Errorf("lab: set WAN loss: %w", err)
	}
	l.logf("lab %s: WAN loss now %v", l.ID, p)
	return nil
}

// WANStats returns the WAN emulator's counters so far.
func (l *Lab) WANStats() (wanem.Stats, error) {
	w, err := l.wanOrErr()
	if err != nil {
		return wanem.Stats{}, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := wanem.ControlStats(ctx, w.sock)
	if err != nil {
		return wanem.Stats{}, fmt.Errorf("lab: WAN stats: %w", err)
	}
	return st, nil
}

// BuildWANEm builds the WAN emulator program into dir/wanem and returns its
// path. It runs `go build`, so the current directory must be inside the
// vmroam module.
func BuildWANEm(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "wanem")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/vmroam/vmroam/lab/wanem/cmd/wanem")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("lab: %s: %w: %s", cmd, err, out)
	}
	return bin, nil
}

// removeWANSocket removes the control socket a killed emulator left behind.
func (l *Lab) removeWANSocket() {
	l.mu.Lock()
	w := l.wan
	l.mu.Unlock()
	if w != nil {
		if err := os.Remove(w.sock); err == nil {
			l.logf("lab %s: removed stale %s", l.ID, w.sock)
		}
	}
}
