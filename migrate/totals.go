package migrate

import (
	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/metrics"
)

// migrationQueues are the queues of a migration that ends now, from which
// its totals are read once; nil where it had none.
type migrationQueues struct {
	cache   *cache.Queue   // source: the suspended VM's packets
	stream  *cache.Queue   // destination: what the handover stream brought
	held    *cache.Queue   // what reached the delivering host directly
	orderer *cache.Orderer // what delivered them to the VM here
}

// totalsLocked sums what c's migration did on this host. c.mu held.
func (c *vipCtl) totalsLocked(q migrationQueues) metrics.Migration {
	m := metrics.Migration{
		Role:    c.rec.Role,
		Traffic: map[string]metrics.Traffic{},
		Dropped: map[string]metrics.Traffic{},
	}
	switch {
	case c.rec.TimedOut:
		m.Outcome = metrics.TimedOut
	case c.rec.Aborted:
		m.Outcome = metrics.Aborted
	}
	for _, k := range []struct {
		kind string // "" when the queue's intake is counted elsewhere
		q    *cache.Queue
	}{{metrics.KindCached, q.cache}, {"", q.stream}, {metrics.KindHeld, q.held}} {
		if k.q == nil {
			continue
		}
		st := k.q.Stats()
		if k.kind != "" {
			m.Traffic[k.kind] = metrics.Traffic{Packets: st.Packets, Bytes: st.Bytes}
		}
		for r, n := range st.Dropped {
			d := m.Dropped[string(r)]
			d.Packets += n
			d.Bytes += st.DroppedBytes[r]
			m.Dropped[string(r)] = d
		}
	}
	m.Traffic[metrics.KindFlushed] = metrics.Traffic{Packets: c.flush.Flushed, Bytes: c.flush.FlushedB}
	m.Traffic[metrics.KindForwarded] = metrics.Traffic{Packets: c.flush.Forwarded, Bytes: c.flush.ForwardedB}
	if q.orderer != nil {
		os := q.orderer.Stats()
		m.Traffic[metrics.KindDelivered] = metrics.Traffic{Packets: os.Delivered, Bytes: os.DeliveredBytes}
	}
	if c.rec.Role == metrics.RoleDestination && c.rec.CarrierUp != nil && c.rec.FirstDelivery != nil {
		m.Handover = c.rec.FirstDelivery.Sub(*c.rec.CarrierUp)
	}
	return m
}
