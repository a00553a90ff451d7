package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/vmroam/vmroam/wgagent/control"
)

// clientTimeout bounds every call to the agent: hooks must not hang.
const clientTimeout = 15 * time.Second

func socketFlag(fs *flag.FlagSet, p *string) {
	fs.StringVar(p, "socket", "", "control socket `path` (default $VMROAM_SOCKET, else "+control.DefaultSocket+")")
}

func client(socket string) *control.Client {
	return control.NewClient(control.SocketPath(socket))
}

func runStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("status", "status [--json] [--watch [--interval 2s]] [--socket PATH]", stdout, stderr)
	var socket string
	socketFlag(fs, &socket)
	asJSON := fs.Bool("json", false, "print JSON")
	watch := fs.Bool("watch", false, "print the status again every --interval, in place on a terminal, until interrupted")
	interval := fs.Duration("interval", 2*time.Second, "time between two refreshes with --watch")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("status takes no arguments, got %q", pos)
	}
	if *interval <= 0 {
		return usagef("status: --interval %v: must be positive", *interval)
	}
	if !*watch && isSet(fs, "interval") {
		return usagef("status: --interval goes with --watch")
	}
	if *watch {
		return watchStatus(ctx, client(socket), *interval, *asJSON, stdout, stderr)
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	st, err := client(socket).Status(ctx)
	if err != nil {
		return err
	}
	if *asJSON {
		return writeJSON(stdout, st)
	}
	printStatus(stdout, st)
	return nil
}

// fetchStatus parses the flags of a command that reads the agent's status
// ([--json] [--socket PATH], no arguments) and fetches it.
func fetchStatus(ctx context.Context, name string, args []string, stdout, stderr io.Writer) (control.Status, bool, error) {
	fs := newFlagSet(name, name+" [--json] [--socket PATH]", stdout, stderr)
	var socket string
	socketFlag(fs, &socket)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parse(fs, args)
	if err != nil {
		return control.Status{}, false, err
	}
	if len(pos) > 0 {
		return control.Status{}, false, usagef("%s takes no arguments, got %q", name, pos)
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	st, err := client(socket).Status(ctx)
	return st, *asJSON, err
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStatus(w io.Writer, st control.Status) {
	fmt.Fprintf(w, "host      %s (site %s)\n", st.Name, orDash(st.Site))
	fmt.Fprintf(w, "overlay   %s on %s (%s WireGuard)\n", st.Address, st.Interface, st.Impl)
	fmt.Fprintf(w, "endpoint  %s  public key %s\n", st.Endpoint, st.PublicKey)
	enc := "encrypted"
	if !st.Gossip.Encrypted {
		enc = "NOT ENCRYPTED"
	}
	fmt.Fprintf(w, "gossip    %d members, %s, %d bad messages dropped\n", st.Gossip.Members, enc, st.Gossip.DroppedMessages+st.Gossip.DroppedMeta)
	if len(st.Gossip.OverCap) > 0 {
		fmt.Fprintf(w, "OVER CAP  %d of at most %d records held; refused beyond the caps: %s\n", st.Gossip.Records, st.Gossip.MaxRecords, st.Gossip.OverCapList())
	}
	if st.Gossip.Refused > 0 || st.HandoverRefused > 0 {
		fmt.Fprintf(w, "REFUSED   %d claims of members the peer allowlist refuses ignored, %d handover connections not from a peer\n", st.Gossip.Refused, st.HandoverRefused)
	}
	for _, p := range st.Problems {
		fmt.Fprintf(w, "PROBLEM   %s\n", p)
	}
	if st.Config != nil && len(st.Config.RestartNeeded) > 0 {
		fmt.Fprintf(w, "RESTART   the config changed %s: the agent runs with the old values until restarted\n", strings.Join(st.Config.RestartNeeded, ", "))
	}
	for _, c := range st.Conflicts {
		fmt.Fprintf(w, "CONFLICT  %s claimed by %s at epoch %d; %s wins\n", c.VIP, strings.Join(c.Owners, " and "), c.Epoch, c.Winner)
	}

	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER\tSTATE\tPATH\tENDPOINT\tADDRESS\tHANDSHAKE\tRX\tTX\tVIPS")
	if len(st.Peers) == 0 {
		fmt.Fprintln(tw, "(none)")
	}
	for _, p := range st.Peers {
		hs := "never"
		if p.LastHandshake != nil {
			hs = time.Since(*p.LastHandshake).Truncate(time.Second).String() + " ago"
		}
		state := p.State
		if p.Refused != "" {
			state += " REFUSED"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", p.Name, state, orDash(p.Path), p.Endpoint, p.Address, hs, bytesStr(p.RxBytes), bytesStr(p.TxBytes), orDash(strings.Join(p.VIPs, ",")))
	}
	tw.Flush()
	fmt.Fprintln(w)
	printVIPs(w, st.VIPs)
	if len(st.Networks) > 0 {
		fmt.Fprintln(w)
		printNetworks(w, st.Networks)
	}
	if len(st.Migrations) > 0 {
		fmt.Fprintln(w)
		printMigrations(w, st.Migrations)
	}
}

func printMigrations(w io.Writer, ms []control.Migration) {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "MIGRATION\tROLE\tFROM\tTO\tEPOCH\tSTATE\tCACHED\tFLUSHED\tHELD\tFORWARDED\tDELIVERED\tDROPPED\tHANDOVER")
	for _, m := range ms {
		state := m.State
		switch {
		case state != "":
		case m.Aborted:
			state = "aborted"
		case m.TimedOut:
			state = "timed out"
		case m.CacheLost:
			state = "cache lost"
		default:
			state = "done"
		}
		var dropped uint64
		for _, n := range m.Dropped {
			dropped += n
		}
		handover := "-"
		if m.CarrierUp != nil && m.FirstDelivery != nil {
			handover = m.FirstDelivery.Sub(*m.CarrierUp).Round(10 * time.Microsecond).String()
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%d\t%s\n", m.VIP, m.Role, orDash(m.From), orDash(m.To), m.Epoch, state,
			m.Cached, m.Flushed, m.Held, m.Forwarded, m.Delivered, dropped+m.Lost, handover)
	}
	tw.Flush()
}

func printVIPs(w io.Writer, vips []control.VIP) {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "VIP\tOWNER\tEPOCH\tSTATE\tDEV")
	if len(vips) == 0 {
		fmt.Fprintln(tw, "(none)")
	}
	for _, v := range vips {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", v.VIP, orDash(v.Owner), v.Epoch, v.State, orDash(v.Dev))
	}
	tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func bytesStr(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

func runVIP(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("vip: want a subcommand: attach, allocate, detach or list")
	}
	sub, args := args[0], args[1:]
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	switch sub {
	case "attach":
		fs := newFlagSet("vip attach", "vip attach VIP --dev IFACE [--when now|announced] [--socket PATH]", stdout, stderr)
		var socket string
		socketFlag(fs, &socket)
		dev := fs.String("dev", "", "the VM's `interface` on this host (required)")
		when := fs.String("when", control.WhenNow, "`when` to claim the VIP: now, or announced: while another host runs the VM, only once the VM announces itself on IFACE (RARP or gratuitous ARP after an incoming migration; libvirt's hook uses it)")
		vip, err := oneVIP(fs, args)
		if err != nil {
			return err
		}
		if *dev == "" {
			return usagef("vip attach: --dev IFACE is required")
		}
		var v control.VIP
		switch *when {
		case control.WhenNow:
			v, err = client(socket).Attach(ctx, vip, *dev)
		case control.WhenAnnounced:
			v, err = client(socket).AttachWhenAnnounced(ctx, vip, *dev)
		default:
			return usagef("vip attach: --when %q: want now or announced", *when)
		}
		if err != nil {
			return clientErr(err)
		}
		if v.State == control.VIPAwaiting {
			fmt.Fprintf(stdout, "%s will be attached on %s when the VM announces itself there; %s runs it until then\n", v.VIP, v.Dev, v.Owner)
			return nil
		}
		fmt.Fprintf(stdout, "%s attached on %s (epoch %d)\n", v.VIP, v.Dev, v.Epoch)
		return nil
	case "allocate":
		fs := newFlagSet("vip allocate", "vip allocate --network NAME [--dev IFACE] [--json] [--socket PATH]", stdout, stderr)
		var socket string
		socketFlag(fs, &socket)
		network := fs.String("network", "", "the virtual `network` to take a free address from (required)")
		dev := fs.String("dev", "", "attach the address to this `interface`; without, it is reserved on this host")
		asJSON := fs.Bool("json", false, "print JSON")
		pos, err := parse(fs, args)
		if err != nil {
			return err
		}
		if len(pos) > 0 || *network == "" {
			return usagef("usage: vmroam vip allocate --network NAME [--dev IFACE]")
		}
		v, err := client(socket).Allocate(ctx, *network, *dev)
		if err != nil {
			return clientErr(err)
		}
		if *asJSON {
			return writeJSON(stdout, v)
		}
		fmt.Fprintln(stdout, v.VIP) // alone on its line: scripts read it
		return nil
	case "detach":
		fs := newFlagSet("vip detach", "vip detach VIP [--socket PATH]", stdout, stderr)
		var socket string
		socketFlag(fs, &socket)
		vip, err := oneVIP(fs, args)
		if err != nil {
			return err
		}
		v, err := client(socket).Detach(ctx, vip)
		if err != nil {
			return clientErr(err)
		}
		if v.Local {
			return fmt.Errorf("%s is still attached here", v.VIP)
		}
		switch v.State {
		case control.VIPReleased:
			fmt.Fprintf(stdout, "%s released (epoch %d)\n", v.VIP, v.Epoch)
		case control.VIPCaching, control.VIPForwarding:
			fmt.Fprintf(stdout, "%s\n", detachedCached(ctx, client(socket), v))
		case control.VIPRemote:
			fmt.Fprintf(stdout, "%s is not attached here (owner %s, epoch %d); nothing to do\n", v.VIP, v.Owner, v.Epoch)
		default:
			fmt.Fprintf(stdout, "%s is not attached here; nothing to do\n", v.VIP)
		}
		return nil
	case "list":
		st, asJSON, err := fetchStatus(ctx, "vip list", args, stdout, stderr)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(stdout, st.VIPs)
		}
		printVIPs(stdout, st.VIPs)
		return nil
	}
	return usagef("vip: unknown subcommand %q (want attach, allocate, detach or list)", sub)
}

// oneVIP parses flags and exactly one VIP argument.
func oneVIP(fs *flag.FlagSet, args []string) (netip.Addr, error) {
	pos, err := parse(fs, args)
	if err != nil {
		return netip.Addr{}, err
	}
	if len(pos) != 1 {
		return netip.Addr{}, usagef("%s: want exactly one VIP, got %d arguments", fs.Name(), len(pos))
	}
	s := strings.TrimSuffix(strings.TrimSuffix(pos[0], "/32"), "/128")
	vip, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, usagef("%s: %q is not an IP address", fs.Name(), pos[0])
	}
	return vip.Unmap(), nil
}

// clientErr turns the agent's refusal of bad input into a usage error.
func clientErr(err error) error {
	if errors.Is(err, control.ErrBadRequest) {
		return usageError{strings.TrimPrefix(err.Error(), control.ErrBadRequest.Error()+": ")}
	}
	return err
}

func runMigrate(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("migrate: want a subcommand: suspend, abort or prepare")
	}
	sub, args := args[0], args[1:]
	var call func(*control.Client, context.Context, netip.Addr) (control.VIP, error)
	switch sub {
	case "suspend":
		call = (*control.Client).Suspend
	case "abort":
		call = (*control.Client).Abort
	case "prepare":
		call = (*control.Client).Prepare
	default:
		return usagef("migrate: unknown subcommand %q (want suspend, abort or prepare)", sub)
	}
	fs := newFlagSet("migrate "+sub, "migrate "+sub+" VIP [--socket PATH]", stdout, stderr)
	var socket string
	socketFlag(fs, &socket)
	vip, err := oneVIP(fs, args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	v, err := call(client(socket), ctx, vip)
	if err != nil {
		return clientErr(err)
	}
	fmt.Fprintf(stdout, "%s is %s\n", v.VIP, v.State)
	return nil
}

// detachedCached says what happens to a VIP detached here while the cache
// holds it: its packets wait for the host it moves to, then it is released.
func detachedCached(ctx context.Context, c *control.Client, v control.VIP) string {
	if v.State == control.VIPForwarding {
		return fmt.Sprintf("%s detached: %s claimed it (epoch %d); its cached packets go there", v.VIP, v.Owner, v.Epoch)
	}
	age := "--cache-max-age"
	if st, err := c.Status(ctx); err == nil && st.Config != nil {
		age += " (" + st.Config.CacheMaxAge + ")"
	}
	return fmt.Sprintf("%s detached: its packets are cached for the host it moves to; if none claims it within %s, they are dropped and %s is released", v.VIP, age, v.VIP)
}
