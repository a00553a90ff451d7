// Command wanem is the lab's WAN emulator as a program: it creates a TUN
// device, brings it up, and delays (with optional jitter) or drops every
// packet the kernel routes into it before writing it back, until SIGTERM or
// SIGINT. Policy routing around the device decides where packets come from
// and go to; see package github.com/vmroam/vmroam/lab/wanem.
//
//	wanem -dev wan0 -delay 20ms [-jitter 2ms] [-loss 0.01] [-seed 1]
//	      [-control /path/wanem.sock] [-rt 10]
//
// On exit it prints its counters on one line. Exit status: 2 for bad flags,
// 1 for any other failure, 0 after a signal.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/lab/wanem"
)

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// usageError is a mistake in the command line: exit status 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{fmt.Sprintf(format, args...)}
}

const usage = `Usage: wanem -dev NAME -delay D [flags]

wanem creates the TUN device NAME in the current network namespace, sets its
MTU and transmit queue, brings it up, and writes every packet the kernel
routes into it back into it after the one-way delay (plus jitter, keeping
each flow's order), dropping a share of them at random. Route packets into
the device and pick up what comes out of it by input interface (ip rule
iif). It runs until SIGTERM or SIGINT, then prints its counters.

With -control, it answers on a Unix socket, one request per line:
"loss P" changes the loss probability, "stats" returns the counters as JSON.

Flags:
`

type options struct {
	dev        string
	cfg        wanem.Config
	mtu        int
	txqueuelen int
	control    string
	rt         int
}

// parse reads the command line; -h writes the usage to stdout and returns
// flag.ErrHelp.
func parse(args []string, stdout io.Writer) (options, error) {
	var o options
	fs := flag.NewFlagSet("wanem", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are reported once, by run
	fs.StringVar(&o.dev, "dev", "wan0", "name of the TUN device to create")
	fs.DurationVar(&o.cfg.Delay, "delay", 0, "one-way delay added to every packet")
	fs.DurationVar(&o.cfg.Jitter, "jitter", 0, "uniform random extra delay, 0..jitter, that never reorders a flow")
	fs.Float64Var(&o.cfg.Loss, "loss", 0, "probability of dropping a packet, 0 <= loss < 1")
	fs.Int64Var(&o.cfg.Seed, "seed", 0, "seed of jitter and loss; 0 = random")
	fs.IntVar(&o.mtu, "mtu", 1500, "MTU of the device; 0 = leave the kernel's")
	fs.IntVar(&o.txqueuelen, "txqueuelen", 10000, "transmit queue of the device, packets; absorbs bursts while the reader is busy")
	fs.StringVar(&o.control, "control", "", "Unix socket for the control requests; empty = none")
	fs.IntVar(&o.rt, "rt", 0, "run as real-time (SCHED_FIFO) at this priority, 1..99, for accuracy on a busy machine (a warning if not allowed); 0 = normal")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fmt.Fprint(stdout, usage)
			fs.PrintDefaults()
			return o, err
		}
		return o, usagef("%v", err)
	}
	switch {
	case fs.NArg() > 0:
		return o, usagef("unexpected arguments %q", fs.Args())
	case o.dev == "":
		return o, usagef("-dev is empty")
	case o.mtu < 0 || o.txqueuelen < 0:
		return o, usagef("-mtu and -txqueuelen must not be negative")
	case o.rt < 0 || o.rt > 99:
		return o, usagef("-rt %d outside 0..99", o.rt)
	}
	if err := o.cfg.Validate(); err != nil {
		return o, usagef("%s", strings.TrimPrefix(err.Error(), "wanem: "))
	}
	return o, nil
}

func run(args []string, stdout, stderr io.Writer) int {
	o, err := parse(args, stdout)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "wanem: %v (wanem -h explains the flags)\n", err)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	st, err := emulate(ctx, o, stdout, stderr)
	fmt.Fprintln(stdout, "wanem:", st)
	if err != nil {
		fmt.Fprintln(stderr, "wanem:", err)
		return 1
	}
	return 0
}

func emulate(ctx context.Context, o options, stdout, stderr io.Writer) (wanem.Stats, error) {
	if o.rt > 0 {
		// First, so that every thread started later inherits it. Without
		// it the emulator still works, only less precisely on a busy machine.
		if err := wanem.SetRealtime(o.rt); err != nil {
			fmt.Fprintf(stderr, "wanem: warning: staying at normal priority: %v\n", err)
			o.rt = 0
		}
	}
	e, err := wanem.New(o.cfg)
	if err != nil {
		return wanem.Stats{}, err
	}
	// The emulator's reader and writer each keep a P while they sleep;
	// the rest (control socket, signals, the garbage collector) needs its
	// own.
	runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 2)
	tun, err := wanem.OpenTUN(o.dev)
	if err != nil {
		return wanem.Stats{}, err
	}
	defer tun.Close()
	if err := setUp(o); err != nil {
		return wanem.Stats{}, err
	}

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := e.Run(ctx, tun)
		done <- err
	}()

	// The control socket comes last: once it answers, the device is up and
	// packets flow.
	if o.control != "" {
		// A socket file left by a killed predecessor would make Listen fail.
		if err := os.Remove(o.control); err != nil && !errors.Is(err, os.ErrNotExist) {
			cancel()
			<-done
			return e.Stats(), fmt.Errorf("control socket: %w", err)
		}
		ln, err := net.Listen("unix", o.control)
		if err != nil {
			cancel()
			<-done
			return e.Stats(), fmt.Errorf("control socket: %w", err)
		}
		served := make(chan error, 1)
		go func() { served <- e.ServeControl(ln) }()
		defer func() {
			ln.Close()
			<-served
		}()
	}
	fmt.Fprintf(stdout, "wanem: %s up: delay %v jitter %v loss %v rt %d\n", o.dev, o.cfg.Delay, o.cfg.Jitter, o.cfg.Loss, o.rt)

	err = <-done
	return e.Stats(), err
}

// setUp sets the device's MTU and queue length and brings it up.
func setUp(o options) error {
	link, err := netlink.LinkByName(o.dev)
	if err != nil {
		return fmt.Errorf("find %s: %w", o.dev, err)
	}
	if o.mtu > 0 {
		if err := netlink.LinkSetMTU(link, o.mtu); err != nil {
			return fmt.Errorf("%s mtu %d: %w", o.dev, o.mtu, err)
		}
	}
	if o.txqueuelen > 0 {
		if err := netlink.LinkSetTxQLen(link, o.txqueuelen); err != nil {
			return fmt.Errorf("%s txqueuelen %d: %w", o.dev, o.txqueuelen, err)
		}
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("%s up: %w", o.dev, err)
	}
	return nil
}
