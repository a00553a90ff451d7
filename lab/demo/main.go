// Command demo runs vmroam in the namespace lab for someone with no Xen at
// hand: three hosts on one bridge, an agent on each, a client VM pinging a
// VM every 2 ms while that VM live-migrates to another host, paused for one
// second on the way. It runs the move twice, with the migration cache and
// without it (--cache=false), counts the pings sent, answered and lost
// live, and prints both results side by side. It removes the lab when it
// ends (or on Ctrl-C).
//
// It draws the timeline of the cached move, both hosts' sides on one time
// axis, into an SVG picture (-svg, default migration.svg in the current
// directory; open it in a browser).
//
// With -rtt, each host is a site of its own and the sites are joined by the
// lab's WAN emulator with that round-trip time (one-way delay rtt/2), so the
// VM moves between datacenters rather than within a LAN.
//
//	make demo             (go run ./lab/demo -binary bin/vmroam)
//	make demo RTT=40ms    (go run ./lab/demo -binary bin/vmroam -rtt 40ms)
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

func main() {
	binary := flag.String("binary", "bin/vmroam", "path to the vmroam binary")
	downtime := flag.Duration("downtime", time.Second, "how long the VM is paused while it moves")
	keep := flag.Bool("keep", false, "keep the lab up at the end until Ctrl-C, to look around")
	verbose := flag.Bool("v", false, "show every lab step")
	rtt := flag.Duration("rtt", 0, "put each host in a site of its own, joined by an emulated WAN with this round-trip time (0 = one LAN)")
	svg := flag.String("svg", "migration.svg", "draw the cached migration's timeline into this SVG `file` (\"\" = none)")
	flag.Parse()
	if *rtt < 0 {
		fmt.Fprintln(os.Stderr, "demo: -rtt must not be negative")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, *binary, *svg, *downtime, *rtt, *keep, *verbose)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

var (
	vipM = netip.MustParseAddr("100.100.20.1") // the VM that moves
	vipC = netip.MustParseAddr("100.100.20.3") // the client pinging it
)

func run(ctx context.Context, binary, svg string, downtime, rtt time.Duration, keep, verbose bool) error {
	if err := lab.RequireRoot(); err != nil {
		return fmt.Errorf("%w (run it as root: sudo make demo)", err)
	}
	bin, err := filepath.Abs(binary)
	if err != nil {
		return err
	}
	if svg != "" {
		if svg, err = filepath.Abs(svg); err != nil {
			return err
		}
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("vmroam binary: %w (run make build first)", err)
	}
	cfg := lab.Config{Hosts: 3, Binary: bin}
	if verbose {
		cfg.Logf = func(format string, args ...any) { fmt.Printf("  lab: "+format+"\n", args...) }
	}
	if rtt > 0 {
		dir, err := os.MkdirTemp("", "vmroam-demo-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		say("Building the WAN emulator")
		if cfg.WANBinary, err = lab.BuildWANEm(ctx, dir); err != nil {
			return err
		}
		cfg.Sites = cfg.Hosts
		cfg.WAN.Delay = rtt / 2
		say("Building the lab: 3 hosts (network namespaces), each in a site of its own (198.18.s.0/24), joined by an emulated WAN: round trip %v between sites", rtt)
	} else {
		say("Building the lab: 3 hosts (network namespaces) on one bridge, underlay 198.18.0.0/24")
	}
	l, err := lab.New(cfg)
	if err != nil {
		return err
	}
	defer func() {
		say("Removing the lab")
		if err := l.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: cleanup:", err)
		}
	}()
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	for _, h := range l.Hosts {
		say("Starting the agent on %s (overlay %s, WireGuard interface %s)", h.Name, h.Overlay, h.Iface)
		if _, err := l.StartAgent(h); err != nil {
			return err
		}
	}
	m, err := l.AddVM("m", h1, vipM)
	if err != nil {
		return err
	}
	c, err := l.AddVM("c", h3, vipC)
	if err != nil {
		return err
	}
	say("VM m (%s) runs on h1, VM c (%s) on h3; their hypervisors' hooks call:", vipM, vipC)
	if err := cli(l, h1, "vip", "attach", vipM.String(), "--dev", m.Vif); err != nil {
		return err
	}
	if err := cli(l, h3, "vip", "attach", vipC.String(), "--dev", c.Vif); err != nil {
		return err
	}
	if err := l.WaitPing(c, vipM, 30*time.Second); err != nil {
		return err
	}

	say("Live-migrating m from h1 to h2 WITH the cache (VM paused %v)", downtime)
	with, err := measure(ctx, l, c, m, h2, downtime, true)
	if err != nil {
		return err
	}
	if err := cli(l, h2, "status"); err != nil {
		return err
	}
	if svg != "" {
		say("Drawing the migration's timeline: h1's side (the source) and h2's (the destination) on one time axis")
		if err := drawTimeline(ctx, l, h1, h2, svg); err != nil {
			// The picture is a bonus: the demo goes on without it.
			fmt.Fprintln(os.Stderr, "demo: no timeline picture:", err)
			svg = ""
		}
	}

	say("Restarting the agents with --cache=false: only re-routing, as without vmroam's cache")
	for _, h := range l.Hosts {
		if err := h.Agent.Stop(); err != nil {
			return err
		}
		if _, err := l.StartAgent(h, "--cache=false"); err != nil {
			return err
		}
	}
	if err := l.WaitPing(c, vipM, 30*time.Second); err != nil {
		return err
	}
	say("Live-migrating m from h2 back to h1 WITHOUT the cache (VM paused %v)", downtime)
	without, err := measure(ctx, l, c, m, h1, downtime, false)
	if err != nil {
		return err
	}

	say("Pings from c to m (every 2 ms) across the move")
	fmt.Printf("  %-22s %8s %8s %6s %9s %12s\n", "", "sent", "answered", "lost", "reordered", "slowest RTT")
	for _, r := range []struct {
		name string
		st   lab.PingStats
	}{{"with the cache", with}, {"without (--cache=false)", without}} {
		fmt.Printf("  %-22s %8d %8d %6d %9d %12v\n", r.name, r.st.Sent, r.st.Received, r.st.LostCount, r.st.Reordered, r.st.MaxRTT.Round(time.Millisecond))
	}
	fmt.Println("  With the cache, the pings sent while the VM was paused waited and were answered; without it they were lost.")
	if svg != "" {
		fmt.Printf("\n  The cached migration, millisecond by millisecond: %s (open it in a browser)\n", svg)
	}

	if keep {
		say("Lab kept up (work dir %s). Try: ip netns exec %s %s status --socket %s\nCtrl-C removes it.", l.Dir, h1.NS, bin, h1.Socket)
		<-ctx.Done()
	}
	if err := ctx.Err(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// measure pings m from c every 2 ms while m migrates to `to`, printing a
// live count, and returns the final counts. announce tells the old host of
// the suspend first, which agents without the cache refuse.
func measure(ctx context.Context, l *lab.Lab, c, m *lab.VM, to *lab.Host, downtime time.Duration, announce bool) (lab.PingStats, error) {
	p, err := l.StartPinger(c, vipM, 2*time.Millisecond)
	if err != nil {
		return lab.PingStats{}, err
	}
	// On a terminal the count updates in place; in a log, once a second.
	every, eol := time.Second, "\n"
	if fi, err := os.Stdout.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		every, eol = 100*time.Millisecond, ""
	}
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				st := p.Stats()
				fmt.Printf("\r  sent %5d  answered %5d  waiting or lost %5d %s", st.Sent, st.Received, st.Sent-st.Received, eol)
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	err = l.MigrateVM(m, to, downtime, announce)
	if err == nil {
		select {
		case <-ctx.Done():
			err = ctx.Err()
		case <-time.After(2*time.Second + downtime):
		}
	}
	close(done)
	st := p.Stop(2 * time.Second)
	fmt.Printf("\r  sent %5d  answered %5d  lost %5d  reordered %d%s\n", st.Sent, st.Received, st.LostCount, st.Reordered, strings.Repeat(" ", 10))
	return st, err
}

// drawTimeline waits until both sides of the last migration of the moving
// VM to `to` are over, saves the source's side to a file and has the
// destination draw both into svg, as an operator would.
func drawTimeline(ctx context.Context, l *lab.Lab, from, to *lab.Host, svg string) error {
	var id string
	var src control.Migration
	deadline := time.Now().Add(20 * time.Second)
	for {
		ms, err := migrations(l, to)
		if err != nil {
			return err
		}
		id = ""
		for _, m := range ms {
			if m.VIP == vipM.String() && m.Role == "destination" {
				id = m.ID
			}
		}
		srcDone, dstDone := false, false
		if id != "" {
			for _, m := range ms {
				dstDone = dstDone || m.ID == id && m.Role == "destination" && m.Done != nil
			}
			out, err := l.CLI(from, "migrations", "--json", id)
			if err == nil && json.Unmarshal(out, &src) == nil {
				srcDone = src.Done != nil
			}
		}
		if srcDone && dstDone {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the migration of %s (%q) is not over on both hosts after 20 s", vipM, id)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
	dump := filepath.Join(l.Dir, from.Name+"-migration.json")
	fmt.Printf("\n[%s] $ vmroam migrations --json %s > %s\n", from.Name, id, dump)
	b, err := json.Marshal(src)
	if err == nil {
		err = os.WriteFile(dump, b, 0o644)
	}
	if err != nil {
		return fmt.Errorf("save %s's side of the migration: %w", from.Name, err)
	}
	return cli(l, to, "migrations", "--svg", svg, "--with", dump, id)
}

func migrations(l *lab.Lab, h *lab.Host) ([]control.Migration, error) {
	out, err := l.CLI(h, "migrations", "--json")
	if err != nil {
		return nil, err
	}
	var ms []control.Migration
	if err := json.Unmarshal(out, &ms); err != nil {
		return nil, fmt.Errorf("%s: vmroam migrations --json: %w", h.Name, err)
	}
	return ms, nil
}

func say(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func cli(l *lab.Lab, h *lab.Host, args ...string) error {
	fmt.Printf("\n[%s] $ vmroam %s\n", h.Name, strings.Join(args, " "))
	out, err := l.CLI(h, args...)
	fmt.Print(string(out))
	return err
}
