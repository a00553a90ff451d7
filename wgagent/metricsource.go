package wgagent

import (
	"fmt"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

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
