package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/vmroam/vmroam/wgagent"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/doctor"
)

func runDoctor(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("doctor", "doctor [--json] [--socket PATH] [--encrypt-key-file FILE] [--interface NAME] [--mtu N] [--vif-pattern GLOB,...] [--endpoint IP,...] [--probe=false]", stdout, stderr)
	d := doctor.DefaultConfig()
	agent := wgagent.DefaultConfig()
	var socket string
	socketFlag(fs, &socket)
	asJSON := fs.Bool("json", false, "print JSON")
	fs.StringVar(&d.KeyFile, "encrypt-key-file", "", "gossip key `file` to check (mode, owner, contents); unchecked if not given")
	fs.StringVar(&d.Interface, "interface", agent.Interface, "WireGuard interface `name`, when the agent does not answer")
	fs.IntVar(&d.MTU, "mtu", agent.MTU, "tunnel `MTU` to check the paths against while the WireGuard interface does not exist")
	var vifs listFlag
	fs.Var(&vifs, "vif-pattern", "`GLOB,...` naming VMs' interfaces, whose rp_filter matters (default "+strings.Join(d.VIFPatterns, ",")+"; those the agent has VIPs on are checked too)")
	var eps listFlag
	fs.Var(&eps, "endpoint", "`IP,...` underlay addresses of other hosts to check the path MTU to, besides the agent's peers")
	fs.BoolVar(&d.Probe, "probe", d.Probe, "ping each peer with Don't Fragment, small and full tunnel size, to find a smaller MTU beyond this host")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("doctor takes no arguments, got %q", pos)
	}
	d.Socket = control.SocketPath(socket)
	if len(vifs) > 0 {
		d.VIFPatterns = vifs
	}
	for _, e := range eps {
		a, err := parseHostAddr(e)
		if err != nil {
			return usagef("--endpoint %q: want an IP address (optionally with :PORT)", e)
		}
		d.Endpoints = append(d.Endpoints, a)
	}
	if err := d.Validate(); err != nil {
		return usagef("%v", err)
	}
	rep := doctor.Run(ctx, d)
	if *asJSON {
		if err := writeJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		printReport(stdout, rep)
	}
	if n := rep.Count(doctor.Fail); n > 0 {
		return fmt.Errorf("doctor: %d check(s) failed", n)
	}
	return nil
}

// parseHostAddr takes an IP address with or without a port.
func parseHostAddr(s string) (netip.Addr, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap.Addr().Unmap(), nil
	}
	a, err := netip.ParseAddr(s)
	return a.Unmap(), err
}

// printReport prints one line per finding: level, check, what was found
// and, after "fix:", what to do.
func printReport(w io.Writer, rep doctor.Report) {
	for _, r := range rep.Results {
		line := fmt.Sprintf("%-4s  %-12s %s", strings.ToUpper(string(r.Level)), r.Check, r.Found)
		if r.Fix != "" {
			line += "; fix: " + r.Fix
		}
		fmt.Fprintln(w, line)
	}
	fmt.Fprintf(w, "\n%d fail, %d warn, %d info, %d ok\n", rep.Count(doctor.Fail), rep.Count(doctor.Warn), rep.Count(doctor.Info), rep.Count(doctor.OK))
}
