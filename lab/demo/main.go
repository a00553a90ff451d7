// Command demo runs vmroam in the namespace lab for someone with no Xen at
// hand: three hosts on one bridge, an agent on each, a client VM pinging a
// VM every 2 ms, and that VM pinging the client, while the VM
// live-migrates to another host, paused for one second on the way (it
// sends nothing then). It runs the move twice, with the migration cache and
// without it (--cache=false), counts the pings sent, answered and lost in
// both directions (the moving VM's own counters tell a request lost on its
// way in from a reply lost on its way out), and prints both results side
// by side with a conclusion computed from them. It exits with status 1
// when the cached move lost a ping. It removes the lab when it ends (or on
// Ctrl-C).
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
	"sync"
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

	say("Pings every 2 ms across the move: from c to the moving VM m, and from m to c")
	printResults(with, without)
	verdict, failed := conclude(with, without)
	fmt.Println()
	for _, line := range verdict {
		fmt.Println("  " + line)
	}
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
	if failed {
		return errors.New("the move with the cache lost or reordered pings (see above): that is a vmroam bug; -keep keeps the lab and its logs up to look at")
	}
	return nil
}

// moveResult is what one move did to the two ping streams, counted by the
// pingers and by the moving VM's kernel.
type moveResult struct {
	toVM, fromVM lab.PingStats
	// The moving VM's own counts over the move (/proc/net/snmp): echo
	// requests that reached it and replies it sent.
	inEchos, outEchoReps int64
}

// lostIn is the pings to the VM that never reached it; lostOut the
// replies it sent that never reached the client. A request that reached
// the VM and got no reply from it counts in neither.
func (r moveResult) lostIn() int64  { return max(0, int64(r.toVM.Sent)-r.inEchos) }
func (r moveResult) lostOut() int64 { return max(0, r.outEchoReps-int64(r.toVM.Received)) }
func (r moveResult) lost() int      { return r.toVM.LostCount + r.fromVM.LostCount }

// measure pings m from c, and c from m, every 2 ms while m migrates to
// `to`, printing a live count, and returns the final counts. announce
// tells the old host of the suspend first, which agents without the cache
// refuse.
func measure(ctx context.Context, l *lab.Lab, c, m *lab.VM, to *lab.Host, downtime time.Duration, announce bool) (moveResult, error) {
	var r moveResult
	before, err := l.SNMP(m)
	if err != nil {
		return r, err
	}
	in, err := l.StartPinger(c, vipM, 2*time.Millisecond)
	if err != nil {
		return r, err
	}
	out, err := l.StartPinger(m, vipC, 2*time.Millisecond)
	if err != nil {
		in.Stop(0)
		return r, err
	}
	// On a terminal the count updates in place; in a log, once a second.
	every, eol := time.Second, "\n"
	if fi, err := os.Stdout.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 {
		every, eol = 100*time.Millisecond, ""
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(every)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				a, b := in.Stats(), out.Stats()
				fmt.Printf("\r  to m: sent %5d  answered %5d  waiting or lost %5d   from m: sent %5d  answered %5d %s",
					a.Sent, a.Received, a.Sent-a.Received, b.Sent, b.Received, eol)
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
	wg.Wait()
	// Both stop sending at once; each then waits for its replies.
	wg.Add(1)
	go func() {
		defer wg.Done()
		r.fromVM = out.Stop(2 * time.Second)
	}()
	r.toVM = in.Stop(2 * time.Second)
	wg.Wait()
	after, serr := l.SNMP(m)
	if serr != nil && err == nil {
		err = serr
	}
	r.inEchos = after["Icmp"]["InEchos"] - before["Icmp"]["InEchos"]
	r.outEchoReps = after["Icmp"]["OutEchoReps"] - before["Icmp"]["OutEchoReps"]
	fmt.Printf("\r  to m: sent %5d  answered %5d  lost %5d   from m: sent %5d  answered %5d  lost %5d%s\n",
		r.toVM.Sent, r.toVM.Received, r.toVM.LostCount, r.fromVM.Sent, r.fromVM.Received, r.fromVM.LostCount, strings.Repeat(" ", 10))
	return r, err
}

// printResults prints both moves side by side. Of the pings to m that
// were lost, "in" never reached m and "out" are replies m sent that never
// reached c (m's own counters).
func printResults(with, without moveResult) {
	fmt.Printf("  %-24s %-40s %s\n", "", "c -> m (to the moving VM)", "m -> c (from it)")
	fmt.Printf("  %-24s %6s %8s %5s %4s %4s %7s   %6s %8s %5s %7s\n", "",
		"sent", "answered", "lost", "in", "out", "reorder", "sent", "answered", "lost", "reorder")
	for _, r := range []struct {
		name string
		m    moveResult
	}{{"with the cache", with}, {"without (--cache=false)", without}} {
		fmt.Printf("  %-24s %6d %8d %5d %4d %4d %7d   %6d %8d %5d %7d\n", r.name,
			r.m.toVM.Sent, r.m.toVM.Received, r.m.toVM.LostCount, r.m.lostIn(), r.m.lostOut(), r.m.toVM.Reordered,
			r.m.fromVM.Sent, r.m.fromVM.Received, r.m.fromVM.LostCount, r.m.fromVM.Reordered)
	}
}

// conclude says, from the figures alone, what the cache did; failed is
// set when the cached move lost or reordered a ping.
func conclude(with, without moveResult) (lines []string, failed bool) {
	reordered := with.toVM.Reordered + with.fromVM.Reordered
	switch {
	case with.lost() == 0 && reordered == 0:
		lines = append(lines, fmt.Sprintf("With the cache, no ping was lost or reordered in either direction: the pings sent to m while it was paused waited and were answered (the slowest after %v).",
			with.toVM.MaxRTT.Round(time.Millisecond)))
	default:
		failed = true
		lines = append(lines, fmt.Sprintf("With the cache, %d pings to m were lost (%d on their way in, %d replies on their way out, %d replies m did not send), %d from m were lost, and %d were reordered: the cache should have lost none.",
			with.toVM.LostCount, with.lostIn(), with.lostOut(), max(0, int64(with.toVM.LostCount)-with.lostIn()-with.lostOut()), with.fromVM.LostCount, reordered))
	}
	switch n := without.lost(); {
	case n == 0:
		lines = append(lines, "Without it, none was lost either: this move was too short for the cache to matter.")
	default:
		lines = append(lines, fmt.Sprintf("Without it, %d pings were lost: %d to m, %d from m.",
			n, without.toVM.LostCount, without.fromVM.LostCount))
	}
	return lines, failed
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
