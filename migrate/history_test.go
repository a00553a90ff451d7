package migrate

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/control"
)

func TestMigrationID(t *testing.T) {
	e := &Engine{}
	vip := netip.MustParseAddr("100.100.20.1")
	for _, want := range []string{"100.100.20.1@4", "100.100.20.1@4#2", "100.100.20.1@4#3"} {
		id := e.migrationIDLocked(vip, 4)
		if id != want {
			t.Fatalf("id %q, want %q", id, want)
		}
		e.history = append(e.history, control.Migration{ID: id})
	}
	if id := e.migrationIDLocked(vip, 5); id != "100.100.20.1@5" {
		t.Errorf("next epoch: %q", id)
	}
	if id := e.migrationIDLocked(netip.MustParseAddr("100.100.20.14"), 4); id != "100.100.20.14@4" {
		t.Errorf("a VIP that the other's ID starts with: %q", id)
	}
}

func TestTimelineOf(t *testing.T) {
	start := time.Now()
	tl := cache.NewTimeline(start)
	names := map[cache.Series]string{
		cache.SeriesCached: control.SeriesCached, cache.SeriesFlushed: control.SeriesFlushed, cache.SeriesHeld: control.SeriesHeld,
		cache.SeriesReceived: control.SeriesReceived, cache.SeriesDelivered: control.SeriesDelivered,
	}
	for s := range names {
		tl.AddN(s, start.Add(time.Duration(s)*time.Millisecond), uint32(s))
	}
	got := timelineOf(tl)
	if !got.Start.Equal(start) || len(got.Series) != len(names) {
		t.Fatalf("timeline %+v", got)
	}
	for _, s := range got.Series {
		found := false
		for cs, name := range names {
			if s.Name == name {
				found = true
				if s.First != int(cs) || s.Total() != uint64(cs) {
					t.Errorf("%s: first %d total %d, want %d and %d", name, s.First, s.Total(), cs, cs)
				}
			}
		}
		if !found {
			t.Errorf("series %q is not a control.Series... name", s.Name)
		}
	}
	if timelineOf(nil) != nil {
		t.Error("a nil timeline converts to non-nil")
	}
}

func TestKeepTimelineBounded(t *testing.T) {
	e := &Engine{}
	for i := range control.MaxTimelines + 3 {
		c := &vipCtl{rec: control.Migration{ID: fmt.Sprint(i), VIP: "100.100.20.1"}, tl: cache.NewTimeline(time.Now())}
		e.keepTimelineLocked(c)
		if c.tl != nil {
			t.Fatal("the controller keeps its timeline after filing it")
		}
	}
	if len(e.timelines) != control.MaxTimelines || e.timelines[0].id != "3" {
		t.Errorf("kept %d timelines from %q, want %d from \"3\"", len(e.timelines), e.timelines[0].id, control.MaxTimelines)
	}
}
