package wgagent

import (
	"fmt"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/metrics"
)

// metricsSource reads the agent's state for a scrape.
type metricsSource struct{ a *Agent }

// Snapshot takes the agent's lock only to read the VIPs' states, and no
// queue's: a scrape never waits on the data path.
func (s metricsSource) Snapshot() (metrics.Snapshot, error) {
	a := s.a
	snap := metrics.Snapshot{Time: time.Now(), VIPs: map[string]int{}}
	dev, devErr := a.dev.State()
	tunnels := map[wgtypes.Key]wgtypes.Peer{}
	if devErr == nil {
		for _, p := range dev.Peers {
			tunnels[p.PublicKey] = p
		}
	}
	var keys []wgtypes.Key // of snap.Peers, one for one
	for _, m := range a.cluster.Members() {
		if m.Local {
			continue
		}
		keys = append(keys, wgtypes.Key(m.Meta.PublicKey))
		p := metrics.Peer{Name: m.Name, State: string(m.State)}
		if wp, ok := tunnels[wgtypes.Key(m.Meta.PublicKey)]; ok && m.MetaErr == nil {
			p.Tunnel = true
			p.LastHandshake = wp.LastHandshakeTime
			p.RxBytes, p.TxBytes = wp.ReceiveBytes, wp.TransmitBytes
		}
		snap.Peers = append(snap.Peers, p)
	}
	records := a.cluster.Table().Records()
	a.mu.Lock()
	for i, p := range snap.Peers {
		if p.Tunnel {
			snap.Peers[i].CheckFailures = a.checks.failures(keys[i])
		}
	}
	for _, r := range records {
		snap.VIPs[string(a.vipLocked(r).State)]++
	}
	snap.Problems = len(a.problems)
	snap.RecordsRefused = a.refusedByOwnerLocked()
	a.mu.Unlock()
	gs := a.cluster.Stats()
	snap.GossipMembers = gs.Members
	snap.GossipMsgErrors, snap.GossipMetaErrors = gs.DroppedMessages, gs.DroppedMeta
	snap.GossipRefused = gs.Refused
	snap.OverCap = a.cluster.Table().OverCap()
	snap.Conflicts = len(a.cluster.Table().Conflicts())
	if a.intercept != nil {
		snap.CacheUnclaimed = a.intercept.Unclaimed()
		snap.CacheQueuedBytes = a.budget.Used()
		snap.CacheMaxBytes = a.budget.Max()
	}
	if devErr != nil {
		return snap, fmt.Errorf("WireGuard peers: %w", devErr)
	}
	return snap, nil
}

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
