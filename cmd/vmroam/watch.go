package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/wgagent/control"
)

// watchStatus prints the agent's status every interval until ctx ends
// (Ctrl-C), then returns nil. An agent that does not answer (restarting)
// is said in the frame, or on stderr with JSON, and asked again.
func watchStatus(ctx context.Context, c *control.Client, interval time.Duration, asJSON bool, stdout, stderr io.Writer) error {
	tty := isTerminal(stdout)
	if tty {
		io.WriteString(stdout, "\x1b[H\x1b[2J") // once: later frames overwrite
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for first := true; ; first = false {
		var frame bytes.Buffer
		if !asJSON {
			fmt.Fprintf(&frame, "vmroam status every %v, %s (Ctrl-C ends)\n\n", interval, time.Now().Format(time.TimeOnly))
		}
		fctx, cancel := context.WithTimeout(ctx, clientTimeout)
		st, err := c.Status(fctx)
		cancel()
		if ctx.Err() != nil {
			return nil
		}
		switch {
		case err != nil && asJSON:
			fmt.Fprintf(stderr, "vmroam: %v (asking again in %v)\n", err, interval)
		case err != nil:
			fmt.Fprintf(&frame, "vmroam: %v (asking again in %v)\n", err, interval)
		case asJSON:
			writeJSON(&frame, st)
		default:
			printStatus(&frame, st)
		}
		if frame.Len() > 0 {
			if _, err := stdout.Write(renderFrame(frame.Bytes(), tty, first)); err != nil {
				return err
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

// renderFrame returns what to write for one frame. On a terminal it moves
// the cursor home and overwrites the last frame line by line, clearing each
// line's end and, after the frame, the rest of the screen: nothing is blank
// between two frames, so nothing flickers. Elsewhere (a pipe, a file) a
// blank line separates a frame from the one before.
func renderFrame(frame []byte, tty, first bool) []byte {
	var b bytes.Buffer
	if !tty {
		if !first {
			b.WriteByte('\n')
		}
		b.Write(frame)
		return b.Bytes()
	}
	b.WriteString("\x1b[H")
	for line := range bytes.Lines(frame) {
		b.Write(bytes.TrimSuffix(line, []byte("\n")))
		b.WriteString("\x1b[K\n")
	}
	b.WriteString("\x1b[J")
	return b.Bytes()
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// isSet reports whether the command line gave the flag.
func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}
