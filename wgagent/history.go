package wgagent

import (
	"context"
	"fmt"
	"net/netip"
	"strings"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/control"
)

// keptTimeline is a finished migration's timeline, kept for `vmroam
// migrations --json ID` and --svg.
type keptTimeline struct {
	id string
	tl *control.Timeline
}

// migrationIDLocked names a migration of vip away from the host that held
// it at epoch (see control.Migration.ID). a.mu held.
func (a *Agent) migrationIDLocked(vip netip.Addr, epoch uint64) string {
	id := fmt.Sprintf("%s@%d", vip, epoch)
	n := 0
	for _, m := range a.history {
		if m.ID == id || strings.HasPrefix(m.ID, id+"#") {
			n++
		}
	}
	if n == 0 {
		return id
	}
	return fmt.Sprintf("%s#%d", id, n+1)
}

// keepTimelineLocked files the timeline of c's migration, which is ending,
// keeping the last control.MaxTimelines. Both locks held.
func (a *Agent) keepTimelineLocked(c *vipCtl) {
	if c.tl == nil {
		return
	}
	a.timelines = append(a.timelines, keptTimeline{id: c.rec.ID, tl: timelineOf(c.tl)})
	if len(a.timelines) > control.MaxTimelines {
		a.timelines = a.timelines[len(a.timelines)-control.MaxTimelines:]
	}
	c.tl = nil
}

// timelineOf copies tl's counts for the control API.
func timelineOf(tl *cache.Timeline) *control.Timeline {
	if tl == nil {
		return nil
	}
	out := &control.Timeline{Start: tl.Start(), Series: []control.TimelineSeries{}}
	for _, s := range tl.Snapshot() {
		out.Series = append(out.Series, control.TimelineSeries{Name: s.Series.String(), First: s.First, Counts: s.Counts, Beyond: s.Beyond})
	}
	return out
}

// Migrations lists this host's side of recent migrations and those under
// way (`vmroam migrations`).
func (b backend) Migrations(context.Context) ([]control.Migration, error) {
	b.a.mu.Lock()
	defer b.a.mu.Unlock()
	return b.a.migrationsLocked(), nil
}

// Migration returns one migration with its timeline (`vmroam migrations
// --json ID`): one under way as it stands now, else the latest finished
// one by that ID.
func (b backend) Migration(_ context.Context, id string) (control.Migration, error) {
	a := b.a
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, c := range a.ctls {
		c.mu.Lock()
		if c.rec.VIP != "" && c.rec.ID == id {
			m := c.liveRecordLocked()
			m.Timeline = timelineOf(c.tl)
			c.mu.Unlock()
			return m, nil
		}
		c.mu.Unlock()
	}
	for i := len(a.history) - 1; i >= 0; i-- {
		if m := a.history[i]; m.ID == id {
			for _, k := range a.timelines {
				if k.id == id {
					m.Timeline = k.tl
				}
			}
			return m, nil
		}
	}
	return control.Migration{}, fmt.Errorf("%w: no migration %q on this host (vmroam migrations lists them)", control.ErrNotFound, id)
}
