package migrate

import (
	"fmt"
	"net/netip"
	"slices"
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
// it at epoch (see control.Migration.ID). agent lock held.
func (e *Engine) migrationIDLocked(vip netip.Addr, epoch uint64) string {
	id := fmt.Sprintf("%s@%d", vip, epoch)
	n := 0
	for _, m := range e.history {
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
func (e *Engine) keepTimelineLocked(c *vipCtl) {
	if c.tl == nil {
		return
	}
	e.timelines = append(e.timelines, keptTimeline{id: c.rec.ID, tl: timelineOf(c.tl)})
	if len(e.timelines) > control.MaxTimelines {
		e.timelines = e.timelines[len(e.timelines)-control.MaxTimelines:]
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
func (e *Engine) Migrations() []control.Migration {
	e.host.Lock()
	defer e.host.Unlock()
	return e.MigrationsLocked()
}

// MigrationsLocked is Migrations with the agent lock held.
func (e *Engine) MigrationsLocked() []control.Migration {
	out := slices.Clone(e.history)
	for _, c := range e.ctls {
		c.mu.Lock()
		if c.rec.VIP != "" {
			out = append(out, c.liveRecordLocked())
		}
		c.mu.Unlock()
	}
	if out == nil {
		out = []control.Migration{}
	}
	return out
}

// liveRecordLocked is the record of c's migration under way, with the
// counters as they stand. c.mu held.
func (c *vipCtl) liveRecordLocked() control.Migration {
	m := c.rec
	m.State = c.state.status()
	if c.queue != nil {
		qs := c.queue.Stats()
		if c.source {
			m.Cached, m.CachedBytes = qs.Packets, qs.Bytes
		} else {
			m.Held = qs.Packets
		}
		m.Dropped = map[string]uint64{}
		for r, n := range qs.Dropped {
			m.Dropped[string(r)] = n
		}
	}
	return m
}

// Migration returns one migration with its timeline (`vmroam migrations
// --json ID`): one under way as it stands now, else the latest finished
// one by that ID.
func (e *Engine) Migration(id string) (control.Migration, error) {
	e.host.Lock()
	defer e.host.Unlock()
	for _, c := range e.ctls {
		c.mu.Lock()
		if c.rec.VIP != "" && c.rec.ID == id {
			m := c.liveRecordLocked()
			m.Timeline = timelineOf(c.tl)
			c.mu.Unlock()
			return m, nil
		}
		c.mu.Unlock()
	}
	for i := len(e.history) - 1; i >= 0; i-- {
		if m := e.history[i]; m.ID == id {
			for _, k := range e.timelines {
				if k.id == id {
					m.Timeline = k.tl
				}
			}
			return m, nil
		}
	}
	return control.Migration{}, fmt.Errorf("%w: no migration %q on this host (vmroam migrations lists them)", control.ErrNotFound, id)
}
