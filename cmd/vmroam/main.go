// Command vmroam is the one binary of vmroam: the host agent and the
// commands that talk to it. It holds no logic of its own; each subcommand
// parses its flags and calls a package.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

const usage = `vmroam keeps VMs reachable, without losing packets, while they live-migrate
between hosts in different LANs or datacenters.

Usage:
  vmroam agent --bind IP --address CIDR --encrypt-key-file FILE [flags]
                                 run the host agent (one per hypervisor host)
  vmroam status [--json] [--watch [--interval 2s]]
                                 show this host's agent, its peers and VIPs
  vmroam vip attach VIP --dev IFACE
                                 this host now runs the VM with VIP behind IFACE
  vmroam vip allocate --network NAME [--dev IFACE]
                                 a free address of the network, unique cluster-wide
  vmroam vip detach VIP          this host no longer runs the VM with VIP
  vmroam vip list [--json]       show every VIP and its owner
  vmroam network add NAME CIDR   declare a virtual network (isolated from the others)
  vmroam network remove NAME     remove a virtual network
  vmroam network list [--json]   show the virtual networks
  vmroam migrate suspend VIP     the VM stopped here: cache its packets
  vmroam migrate abort VIP       the VM stays here: deliver its cache to it
  vmroam migrate prepare VIP     the VM is about to arrive here: connect to
                                 its host now, so that the handover is quicker
  vmroam migrations [--json] [ID]
                                 past and current migrations here, with their timings
  vmroam migrations --svg FILE [--with OTHER.json] ID
                                 draw one migration's packets per ms as a picture
  vmroam keygen --gossip         print a new gossip encryption key
  vmroam keys list|add|use|remove [KEY]
                                 rotate the gossip key cluster-wide, without a partition
  vmroam doctor [--json] [--encrypt-key-file FILE]
                                 check this host (WireGuard, TUN, forwarding,
                                 rp_filter, MTU to peers, clock, agent, key file)
                                 and say what to fix
  vmroam hook libvirt DOMAIN OP SUBOP EXTRA
                                 libvirt's qemu hook runs this; people do not
  vmroam hook proxmox VMID PHASE
                                 a Proxmox VE hookscript runs this; people do not
  vmroam version                 print the version

Client commands find the agent through --socket, else $VMROAM_SOCKET, else
/run/vmroam/vmroam.sock. Run 'vmroam COMMAND --help' for a command's flags.
`

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// usageError is a mistake in the command line: exit status 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return usageError{fmt.Sprintf(format, args...)}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one command line and returns the exit status: 0 success,
// 1 failure, 2 bad usage.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	err := dispatch(ctx, args, stdout, stderr)
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, new(usageError)):
		fmt.Fprintf(stderr, "vmroam: %v\n", err)
		return 2
	default:
		fmt.Fprintf(stderr, "vmroam: %v\n", err)
		return 1
	}
}

func dispatch(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return usagef("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "agent":
		return runAgent(ctx, rest, stdout, stderr)
	case "status":
		return runStatus(ctx, rest, stdout, stderr)
	case "vip":
		return runVIP(ctx, rest, stdout, stderr)
	case "migrate":
		return runMigrate(ctx, rest, stdout, stderr)
	case "migrations":
		return runMigrations(ctx, rest, stdout, stderr)
	case "network":
		return runNetwork(ctx, rest, stdout, stderr)
	case "keygen":
		return runKeygen(rest, stdout, stderr)
	case "keys":
		return runKeys(ctx, rest, stdout, stderr)
	case "hook":
		return runHook(ctx, rest, stdout, stderr)
	case "doctor":
		return runDoctor(ctx, rest, stdout, stderr)
	case "version", "--version":
		fmt.Fprintln(stdout, "vmroam", version)
		return nil
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	return usagef("unknown command %q (run 'vmroam --help')", cmd)
}

// newFlagSet makes a flag set that reports errors instead of exiting, and
// prints its help to stdout when asked.
func newFlagSet(name, synopsis string, stdout, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.Usage = func() {
		fmt.Fprintf(stdout, "Usage: vmroam %s\n\nFlags:\n", synopsis)
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	return fs
}

// parse parses flags that may stand before, between or after positional
// arguments (`vip attach VIP --dev X`) and returns the positional ones.
func parse(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return nil, err // the flag package printed the usage
			}
			return nil, usagef("%s: %v", fs.Name(), err)
		}
		args = fs.Args()
		if len(args) == 0 {
			return pos, nil
		}
		if args[0] == "--" {
			return append(pos, args[1:]...), nil
		}
		pos = append(pos, args[0])
		args = args[1:]
	}
}
