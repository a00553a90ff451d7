package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/vmroam/vmroam/internal/timeline"
	"github.com/vmroam/vmroam/wgagent/control"
)

const migrationsSynopsis = `migrations [--json] [ID] [--socket PATH]
       vmroam migrations --svg FILE [--with OTHER.json] ID [--socket PATH]

Without an ID: this host's side of recent migrations and those under way,
with their timings. With an ID (the first column, VIP@EPOCH; both hosts
of a migration give it the same ID): that migration's events; with --json
also its packets per millisecond. --svg draws them as a picture; --with
adds the other host's side, saved there with 'vmroam migrations --json ID'
(the hosts' clocks should be in sync).`

func runMigrations(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("migrations", migrationsSynopsis, stdout, stderr)
	var socket string
	socketFlag(fs, &socket)
	asJSON := fs.Bool("json", false, "print JSON; with an ID, the migration with its timeline")
	svg := fs.String("svg", "", "draw the timeline of migration ID into `file` as SVG (- for stdout)")
	with := fs.String("with", "", "with --svg: the other host's side of the migration, a `file` from 'vmroam migrations --json ID' there")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	switch {
	case len(pos) > 1:
		return usagef("migrations: want at most one migration ID, got %d arguments", len(pos))
	case *svg != "" && len(pos) == 0:
		return usagef("migrations --svg: which migration? Give its ID ('vmroam migrations' lists them)")
	case *with != "" && *svg == "":
		return usagef("migrations: --with is for --svg")
	case *svg != "" && *asJSON:
		return usagef("migrations: --svg and --json: choose one")
	}
	var other *control.Migration
	if *with != "" {
		if other, err = readMigration(*with); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	if len(pos) == 0 {
		ms, err := client(socket).Migrations(ctx)
		if err != nil {
			return clientErr(err)
		}
		if *asJSON {
			return writeJSON(stdout, ms)
		}
		printMigrationTable(stdout, ms)
		return nil
	}
	m, err := client(socket).Migration(ctx, pos[0])
	if errors.Is(err, control.ErrNotFound) {
		return fmt.Errorf("no migration %q on this host ('vmroam migrations' lists them)", pos[0])
	}
	if err != nil {
		return clientErr(err)
	}
	switch {
	case *asJSON:
		return writeJSON(stdout, m)
	case *svg != "":
		return writeTimeline(stdout, stderr, *svg, m, other)
	}
	printMigration(stdout, m)
	return nil
}

// readMigration reads another host's `migrations --json ID`.
func readMigration(path string) (*control.Migration, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--with: %w", err)
	}
	m, err := parseMigration(b)
	if err != nil {
		return nil, fmt.Errorf("--with %s: %w", path, err)
	}
	return m, nil
}

// parseMigration decodes a `migrations --json ID`: one migration, with a
// VIP and a role.
func parseMigration(b []byte) (*control.Migration, error) {
	var m control.Migration
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("not the output of 'vmroam migrations --json ID': %w", err)
	}
	if m.VIP == "" || m.Role == "" {
		return nil, errors.New("not the output of 'vmroam migrations --json ID' (no VIP or role)")
	}
	return &m, nil
}

// writeTimeline draws m (and the other side) into path, whole or not at all.
func writeTimeline(stdout, stderr io.Writer, path string, m control.Migration, other *control.Migration) error {
	sides := []control.Migration{m}
	if other != nil {
		if other.Epoch != m.Epoch || other.ID != m.ID {
			fmt.Fprintf(stderr, "vmroam: warning: --with holds migration %s (epoch %d), this host's is %s (epoch %d)\n", other.ID, other.Epoch, m.ID, m.Epoch)
		}
		sides = append(sides, *other)
	}
	var b bytes.Buffer
	if err := timeline.Render(&b, sides...); err != nil {
		return err
	}
	if path == "-" {
		_, err := stdout.Write(b.Bytes())
		return err
	}
	if err := os.WriteFile(path, b.Bytes(), 0o644); err != nil {
		return fmt.Errorf("--svg: %w", err)
	}
	fmt.Fprintf(stdout, "timeline of %s written to %s\n", m.ID, path)
	return nil
}

// firstEvent is when a migration began on this host: the suspend at the
// source, the claim at the destination.
func firstEvent(m control.Migration) *time.Time {
	if m.Suspend != nil {
		return m.Suspend
	}
	return m.Claim
}

// span is the time from a to b, "-" unless both happened.
func span(a, b *time.Time) string {
	if a == nil || b == nil {
		return "-"
	}
	return roundDur(b.Sub(*a)).String()
}

func roundDur(d time.Duration) time.Duration {
	if d < time.Second && d > -time.Second {
		return d.Round(10 * time.Microsecond)
	}
	return d.Round(time.Millisecond)
}

func migrationState(m control.Migration) string {
	switch {
	case m.State != "":
		return string(m.State)
	case m.Aborted:
		return "aborted"
	case m.TimedOut:
		return "timed out"
	}
	return "done"
}

func printMigrationTable(w io.Writer, ms []control.Migration) {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tVIP\tROLE\tFROM\tTO\tSTATE\tSUSPEND>CLAIM\tCLAIM>FLUSH\tFLUSH\tHANDOVER\tTOTAL\tCACHED\tDELIVERED\tLATE\tLOST\tDROPPED")
	if len(ms) == 0 {
		fmt.Fprintln(tw, "(none)")
	}
	for _, m := range ms {
		var dropped uint64
		for _, n := range m.Dropped {
			dropped += n
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%d\n", orDash(m.ID), m.VIP, m.Role, orDash(m.From), orDash(m.To), migrationState(m),
			span(m.Suspend, m.Claim), span(m.Claim, m.FlushStart), span(m.FlushStart, m.FlushEnd), span(m.CarrierUp, m.FirstDelivery), span(firstEvent(m), m.Done),
			m.Cached, m.Delivered, m.Late, m.Lost, dropped)
	}
	tw.Flush()
	fmt.Fprintln(w, "\nHANDOVER is carrier up (the VM runs) to the first packet delivered. 'vmroam migrations ID' shows one.")
}

// printMigration shows one migration's events and counters.
func printMigration(w io.Writer, m control.Migration) {
	fmt.Fprintf(w, "migration %s: %s from %s to %s, epoch %d, this host is the %s, %s\n", m.ID, m.VIP, orDash(m.From), orDash(m.To), m.Epoch, m.Role, migrationState(m))
	t0 := firstEvent(m)
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	for _, e := range []struct {
		name string
		at   *time.Time
	}{{"suspend", m.Suspend}, {"claim", m.Claim}, {"flush start", m.FlushStart}, {"flush end", m.FlushEnd},
		{"carrier up", m.CarrierUp}, {"first delivery", m.FirstDelivery}, {"done", m.Done}} {
		if e.at != nil {
			fmt.Fprintf(tw, "  %s\t%s\t+%s\n", e.name, e.at.Format("15:04:05.000000"), span(t0, e.at))
		}
	}
	tw.Flush()
	var dropped uint64
	for _, n := range m.Dropped {
		dropped += n
	}
	ahead := ""
	if m.Ahead > 0 {
		ahead = fmt.Sprintf(" (%d of them ahead, on the prepared connection)", m.Ahead)
	}
	fmt.Fprintf(w, "  cached %d, flushed %d%s, forwarded %d, held %d, delivered %d, late %d, lost %d, dropped %d\n",
		m.Cached, m.Flushed, ahead, m.Forwarded, m.Held, m.Delivered, m.Late, m.Lost, dropped)
}
