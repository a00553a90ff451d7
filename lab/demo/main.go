// Command demo runs vmroam in the namespace lab for someone with no Xen at
// hand: three hosts on one bridge, an agent on each, two VMs that ping each
// other through WireGuard, then one VM moved to the third host. It prints
// what `vmroam status` says on every host along the way and removes the lab
// when it ends (or on Ctrl-C).
//
//	make demo        (go run ./lab/demo -binary bin/vmroam)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"github.com/vmroam/vmroam/lab"
)

func main() {
	binary := flag.String("binary", "bin/vmroam", "path to the vmroam binary")
	keep := flag.Bool("keep", false, "keep the lab up at the end until Ctrl-C, to look around")
	verbose := flag.Bool("v", false, "show every lab step")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, *binary, *keep, *verbose)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, binary string, keep, verbose bool) error {
	if err := lab.RequireRoot(); err != nil {
		return fmt.Errorf("%w (run it as root: sudo make demo)", err)
	}
	bin, err := filepath.Abs(binary)
	if err != nil {
		return err
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("vmroam binary: %w (run make build first)", err)
	}
	cfg := lab.Config{Hosts: 3, Binary: bin}
	if verbose {
		cfg.Logf = func(format string, args ...any) { fmt.Printf("  lab: "+format+"\n", args...) }
	}
	say("Building the lab: 3 hosts (network namespaces) on one bridge, underlay 198.18.0.0/24")
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
	vipA, vipB := netip.MustParseAddr("100.100.10.1"), netip.MustParseAddr("100.100.10.2")
	a, err := l.AddVM("a", h1, vipA)
	if err != nil {
		return err
	}
	b, err := l.AddVM("b", h2, vipB)
	if err != nil {
		return err
	}
	say("VM a (%s) runs on h1, VM b (%s) on h2; the hypervisor hook would now call:", vipA, vipB)
	for _, c := range []struct {
		h   *lab.Host
		vm  *lab.VM
		vip netip.Addr
	}{{h1, a, vipA}, {h2, b, vipB}} {
		if err := cli(l, c.h, "vip", "attach", c.vip.String(), "--dev", c.vm.Vif); err != nil {
			return err
		}
	}
	say("VM a pings VM b through the WireGuard mesh")
	if err := l.WaitPing(a, vipB, 30*time.Second); err != nil {
		return err
	}
	if err := l.Ping(a, vipB, 5, 0); err != nil {
		return err
	}
	fmt.Println("  5/5 replies")
	for _, h := range l.Hosts {
		if err := cli(l, h, "status"); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}

	say("Moving VM b from h2 to h3 (detach on h2, move the vif, attach on h3)")
	if err := cli(l, h2, "vip", "detach", vipB.String()); err != nil {
		return err
	}
	if err := l.MoveVM(b, h3); err != nil {
		return err
	}
	if err := cli(l, h3, "vip", "attach", vipB.String(), "--dev", b.Vif); err != nil {
		return err
	}
	start := time.Now()
	if err := l.WaitPing(a, vipB, 30*time.Second); err != nil {
		return err
	}
	fmt.Printf("  VM a reaches VM b on h3 again after %v\n", time.Since(start).Round(time.Millisecond))
	if err := cli(l, h1, "status"); err != nil {
		return err
	}
	say("The migration issue adds the cache: no packet lost while a VM moves.")

	if keep {
		say("Lab kept up (work dir %s). Try: ip netns exec %s %s status --socket %s\nCtrl-C removes it.", l.Dir, h1.NS, bin, h1.Socket)
		<-ctx.Done()
	}
	if err := ctx.Err(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

func say(format string, args ...any) {
	fmt.Printf("\n==> "+format+"\n", args...)
}

func cli(l *lab.Lab, h *lab.Host, args ...string) error {
	fmt.Printf("\n[%s] $ vmroam %s\n", h.Name, joinArgs(args))
	out, err := l.CLI(h, args...)
	fmt.Print(string(out))
	return err
}

func joinArgs(args []string) string {
	s := ""
	for i, a := range args {
		if i > 0 {
			s += " "
		}
		s += a
	}
	return s
}
