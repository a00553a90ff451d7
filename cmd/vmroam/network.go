package main

import (
	"context"
	"fmt"
	"io"
	"net/netip"
	"text/tabwriter"

	"github.com/vmroam/vmroam/wgagent/control"
)

func runNetwork(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("network: want a subcommand: add, remove or list")
	}
	sub, args := args[0], args[1:]
	if sub == "list" {
		st, asJSON, err := fetchStatus(ctx, "network list", args, stdout, stderr)
		if err != nil {
			return err
		}
		if asJSON {
			return writeJSON(stdout, st.Networks)
		}
		printNetworks(stdout, st.Networks)
		return nil
	}
	var synopsis string
	var want int
	switch sub {
	case "add":
		synopsis, want = "network add NAME CIDR [--socket PATH]", 2
	case "remove":
		synopsis, want = "network remove NAME [--socket PATH]", 1
	default:
		return usagef("network: unknown subcommand %q (want add, remove or list)", sub)
	}
	fs := newFlagSet("network "+sub, synopsis, stdout, stderr)
	var socket string
	socketFlag(fs, &socket)
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != want {
		return usagef("usage: vmroam %s", synopsis)
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	c := client(socket)
	if sub == "remove" {
		if _, err := c.RemoveNetwork(ctx, pos[0]); err != nil {
			return clientErr(err)
		}
		fmt.Fprintf(stdout, "network %s removed\n", pos[0])
		return nil
	}
	prefix, err := netip.ParsePrefix(pos[1])
	if err != nil {
		return usagef("network add: %q is not a CIDR prefix (e.g. 100.64.1.0/24)", pos[1])
	}
	if prefix != prefix.Masked() {
		return usagef("network add: %s has host bits set; did you mean %s?", prefix, prefix.Masked())
	}
	n, err := c.AddNetwork(ctx, pos[0], prefix)
	if err != nil {
		return clientErr(err)
	}
	fmt.Fprintf(stdout, "network %s is %s (epoch %d)\n", n.Name, n.Prefix, n.Epoch)
	return nil
}

func printNetworks(w io.Writer, ns []control.Network) {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "NETWORK\tPREFIX\tEPOCH\tDECLARED BY\tSTATE")
	if len(ns) == 0 {
		fmt.Fprintln(tw, "(none: VMs are not isolated from each other)")
	}
	for _, n := range ns {
		state := "active"
		if !n.Active {
			state = "INACTIVE: overlaps " + n.Overlaps
		}
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\n", n.Name, n.Prefix, n.Epoch, orDash(n.Origin), state)
	}
	tw.Flush()
}
