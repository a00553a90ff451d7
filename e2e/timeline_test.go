package e2e

import (
	"encoding/json"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

// TestMigrationTimeline moves a VM under 12,500 UDP datagrams a second
// and checks what both hosts recorded of it: one ID, per-millisecond
// counts that add up to the counters, events in the order they happen,
// packets only in the milliseconds they can happen in; and that the
// destination draws both sides into a picture.
func TestMigrationTimeline(t *testing.T) {
	l, m, c := migrationLab(t, 3)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	flow, err := l.StartUDPFlow(c, m, 5*time.Second, "20M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // traffic flowing before the move
	migrate(t, l, m, h2, 300*time.Millisecond, true)
	rec := waitMigrated(t, l, h2, vipM)
	if _, err := flow.Wait(); err != nil {
		t.Fatal(err)
	}
	var src control.Migration
	// The source is done once its linger for stragglers is over.
	eventually(t, 30*time.Second, "the source's side over", func() error {
		src = migrationByID(t, l, h1, rec.ID)
		if src.Done == nil {
			return fmt.Errorf("%s is %s on %s", rec.ID, src.State, h1.Name)
		}
		return nil
	})
	dst := migrationByID(t, l, h2, rec.ID)
	if src.Role != "source" || dst.Role != "destination" || src.ID != dst.ID || src.Epoch != dst.Epoch {
		t.Fatalf("the two sides disagree: %s %s %q epoch %d, %s %s %q epoch %d", h1.Name, src.Role, src.ID, src.Epoch, h2.Name, dst.Role, dst.ID, dst.Epoch)
	}
	if src.Timeline == nil || dst.Timeline == nil {
		t.Fatalf("no timeline: source %v, destination %v", src.Timeline != nil, dst.Timeline != nil)
	}
	t.Logf("source %+v", summary(src))
	t.Logf("destination %+v", summary(dst))

	// Counts add up.
	for _, c := range []struct {
		side       control.Migration
		series     string
		want       uint64
		mustNotBe0 bool
	}{
		{src, control.SeriesCached, src.Cached, true},
		{src, control.SeriesFlushed, src.Flushed + src.Forwarded, true},
		{dst, control.SeriesHeld, dst.Held, true},
		{dst, control.SeriesReceived, dst.Flushed + dst.Forwarded, true},
		{dst, control.SeriesDelivered, dst.Delivered, true},
	} {
		s, _ := series(c.side, c.series)
		if s.Total() != c.want || c.mustNotBe0 && c.want == 0 {
			t.Errorf("%s %s: the timeline counts %d packets, the counter %d", c.side.Role, c.series, s.Total(), c.want)
		}
	}

	// Events in order, on each host and across them (one clock here).
	order := func(what string, ts ...*time.Time) {
		for i := 1; i < len(ts); i++ {
			if ts[i-1] == nil || ts[i] == nil {
				t.Errorf("%s: event %d or %d missing", what, i-1, i)
			} else if ts[i].Before(*ts[i-1]) {
				t.Errorf("%s: event %d at %v is before event %d at %v", what, i, ts[i].Format("15:04:05.000000"), i-1, ts[i-1].Format("15:04:05.000000"))
			}
		}
	}
	order("source: suspend, claim, flush start, flush end, done", src.Suspend, src.Claim, src.FlushStart, src.FlushEnd, src.Done)
	order("destination: claim, flush start, flush end, done", dst.Claim, dst.FlushStart, dst.FlushEnd, dst.Done)
	order("destination: carrier up, first delivery, done", dst.CarrierUp, dst.FirstDelivery, dst.Done)
	order("suspend, claim here, claim there", src.Suspend, dst.Claim, src.Claim)
	// (Not the flush's end: the destination may read the end marker
	// before the source's write of it returns.)
	order("flush sent, flush received", src.FlushStart, dst.FlushStart)

	// Packets only when they can be: nothing delivered before the VM ran,
	// nothing flushed before the flush, nothing after the side was done.
	within := func(side control.Migration, name string, from, to *time.Time) {
		s, _ := series(side, name)
		if len(s.Counts) == 0 || from == nil || to == nil {
			return
		}
		first := side.Timeline.Start.Add(time.Duration(s.First) * time.Millisecond)
		last := first.Add(time.Duration(len(s.Counts)) * time.Millisecond)
		if first.Before(from.Add(-time.Millisecond)) || last.After(to.Add(time.Millisecond)) {
			t.Errorf("%s %s: packets from %v to %v, outside %v to %v", side.Role, name,
				first.Format("15:04:05.000"), last.Format("15:04:05.000"), from.Format("15:04:05.000"), to.Format("15:04:05.000"))
		}
	}
	within(src, control.SeriesCached, src.Suspend, src.Done)
	within(src, control.SeriesFlushed, src.FlushStart, src.Done)
	within(dst, control.SeriesReceived, dst.FlushStart, dst.Done)
	within(dst, control.SeriesDelivered, dst.CarrierUp, dst.Done)

	// The picture, from the destination with the source's side.
	dir := t.TempDir()
	dump, out := filepath.Join(dir, h1.Name+".json"), filepath.Join(dir, "migration.svg")
	b, _ := json.Marshal(src)
	if err := os.WriteFile(dump, b, 0o644); err != nil {
		t.Fatal(err)
	}
	cli(t, l, h2, "migrations", "--svg", out, "--with", dump, rec.ID)
	svg, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct{ XMLName xml.Name }
	if err := xml.Unmarshal(svg, &doc); err != nil || doc.XMLName.Local != "svg" {
		t.Errorf("the picture is not SVG: %v", err)
	}
}

func migrationByID(t testing.TB, l *lab.Lab, h *lab.Host, id string) control.Migration {
	t.Helper()
	var m control.Migration
	if err := json.Unmarshal([]byte(cli(t, l, h, "migrations", "--json", id)), &m); err != nil {
		t.Fatalf("%s: migrations --json %s: %v", h.Name, id, err)
	}
	return m
}

func series(m control.Migration, name string) (control.TimelineSeries, bool) {
	if m.Timeline != nil {
		for _, s := range m.Timeline.Series {
			if s.Name == name {
				return s, true
			}
		}
	}
	return control.TimelineSeries{}, false
}

// summary is a migration without its timeline's counts, for the log.
func summary(m control.Migration) map[string]any {
	totals := map[string]uint64{}
	if m.Timeline != nil {
		for _, s := range m.Timeline.Series {
			totals[s.Name] = s.Total()
		}
	}
	return map[string]any{"id": m.ID, "cached": m.Cached, "flushed": m.Flushed, "forwarded": m.Forwarded, "held": m.Held,
		"delivered": m.Delivered, "late": m.Late, "lost": m.Lost, "dropped": m.Dropped, "timeline": totals}
}
