// Package metrics exposes the agent to Prometheus: it defines every
// vmroam_* metric, keeps the counters the agent files as migrations end and
// reconciles run, snapshots the current state (peers, VIPs, gossip) at
// scrape time, and serves it all over HTTP.
package metrics

import (
	"fmt"
	"math"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/vmroam/vmroam/cache"
)

// Label values the agent and the documentation share.
const (
	RoleSource      = "source"
	RoleDestination = "destination"

	KindCached    = "cached"    // source: queued while the VM was suspended
	KindFlushed   = "flushed"   // sent (source) or received (destination) before the end marker
	KindForwarded = "forwarded" // stragglers sent or received after the end marker
	KindHeld      = "held"      // destination: reached it directly, held until delivery
	KindDelivered = "delivered" // written to the VM (destination, or source on abort)
)

// Outcome is how a migration ended on this host.
type Outcome uint8

const (
	Completed Outcome = iota // handed over (source) or delivered (destination)
	Aborted                  // the VM stayed on the source; the cache went back to it
	TimedOut                 // nobody claimed the VIP within the cache's max age
)

// Traffic counts packets and their bytes.
type Traffic struct {
	Packets, Bytes uint64
}

// Migration is what one migration did on this host, filed once when it
// ends: the agent adds the queues' and streams' totals here rather than
// counting packet by packet on the data path.
type Migration struct {
	Role    string // RoleSource or RoleDestination
	Outcome Outcome
	// Traffic by kind (KindCached ...); a packet may count under several
	// kinds, e.g. cached and then flushed at the source.
	Traffic map[string]Traffic
	// Dropped is what the cache dropped on this host, by reason
	// (cache.DropReason).
	Dropped map[string]Traffic
	// Handover is the time from the VM's activation at the destination to
	// the first cached packet delivered to it; 0 when not measured.
	Handover time.Duration
}

// Snapshot is the agent's current state, taken at each scrape.
type Snapshot struct {
	Time             time.Time         // when it was taken: handshake ages count to it
	Peers            []Peer            // every other member the agent knows of
	VIPs             map[string]int    // location records by state as status shows them
	GossipMembers    int               // alive members, this one included
	GossipMsgErrors  uint64            // malformed gossip messages dropped, ever
	GossipMetaErrors uint64            // member metadata that did not decode, ever
	GossipRefused    uint64            // VIP claims and network changes the allowlist refused, ever
	CacheUnclaimed   uint64            // packets the cache device read for no migration, ever
	CacheQueuedBytes int64             // packet bytes held by every cache queue now
	CacheMaxBytes    int64             // the cap on CacheQueuedBytes; <= 0 or math.MaxInt64: none
	Conflicts        int               // VIPs claimed by two owners at one epoch, open now
	Problems         int               // conditions status reports now
	RecordsRefused   map[string]int    // other hosts' records refused now, by owner
	OverCap          map[string]uint64 // records and networks the table's caps refused, ever, by owner
}

// Peer is one other member and, while it is a WireGuard peer, its tunnel.
type Peer struct {
	Name  string
	State string // alive, suspect, dead or left
	// Tunnel: the member is a WireGuard peer now, so the fields below
	// are read from the device.
	Tunnel        bool
	LastHandshake time.Time // zero: never
	RxBytes       int64
	TxBytes       int64
	// CheckFailures is how many checks in a row of the tunnel's session
	// failed (0: passed or not checked yet); at 4 the agent gave up
	// checking (wgagent's maxSessionChecks, which the alert rules name).
	CheckFailures int
}

// Source gives the collector the agent's current state. Snapshot runs on
// the scrape's goroutine: it may take the agent's locks briefly but must
// not wait on the data path or on the network. On error it returns what it
// could read with it.
type Source interface {
	Snapshot() (Snapshot, error)
}

// Peer and VIP states that are always exported, with 0 when none is in
// them, so that a query or an alert finds the series.
var (
	peerStates = []string{"alive", "suspect", "dead", "left"}
	vipStates  = []string{"local", "reserved", "remote", "released", "awaiting", "caching", "forwarding", "holding", "refused"}
)

// ReconcileStep is a step of the agent's reconcile, as the reconcile
// errors counter labels it.
type ReconcileStep string

// The reconcile's steps, in the order it runs them.
const (
	StepAddress   ReconcileStep = "address"
	StepGateway   ReconcileStep = "gateway"
	StepRoutes    ReconcileStep = "routes"
	StepWireGuard ReconcileStep = "wireguard"
	StepNftables  ReconcileStep = "nftables"
)

// ReconcileSteps are every ReconcileStep. They and the drop reasons
// (cache.DropReasons) are exported at 0 from the start so that rate() and
// increase() see the first one.
var ReconcileSteps = []ReconcileStep{StepAddress, StepGateway, StepRoutes, StepWireGuard, StepNftables}

// HandoverBuckets are the handover histogram's upper bounds: 0.5 ms
// doubling to about 4 s (the goal is 5 ms; a stuck handover is seconds).
var HandoverBuckets = prometheus.ExponentialBuckets(0.0005, 2, 14)

// Metrics holds the agent's metrics in a registry of its own. Its methods
// are safe for concurrent use and never block.
type Metrics struct {
	reg *prometheus.Registry

	migrationsStarted   *prometheus.CounterVec
	migrationsCompleted *prometheus.CounterVec
	migrationsAborted   prometheus.Counter
	migrationsTimedOut  prometheus.Counter
	packets, bytes      *prometheus.CounterVec
	droppedPackets      *prometheus.CounterVec
	droppedBytes        *prometheus.CounterVec
	handover            prometheus.Histogram
	reconcileRuns       prometheus.Counter
	reconcileErrors     *prometheus.CounterVec
}

// New returns the metrics of an agent whose current state src gives, with
// Go runtime and process metrics beside them.
func New(src Source) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		migrationsStarted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmroam_migrations_started_total",
			Help: "Migrations that began on this host, by its role in them.",
		}, []string{"role"}),
		migrationsCompleted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmroam_migrations_completed_total",
			Help: "Migrations that ended as planned on this host: the cache handed over (source) or delivered (destination), by role.",
		}, []string{"role"}),
		migrationsAborted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmroam_migrations_aborted_total",
			Help: "Migrations away from this host that ended with the VM staying here and getting its cache back.",
		}),
		migrationsTimedOut: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmroam_migrations_timed_out_total",
			Help: "Migrations away from this host that nobody claimed within the cache's max age; their queue was dropped.",
		}),
		packets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmroam_cache_packets_total",
			Help: "Packets of finished migrations, by what the cache did with them: cached, flushed, forwarded, held, delivered.",
		}, []string{"kind"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmroam_cache_bytes_total",
			Help: "Bytes of the packets in vmroam_cache_packets_total, by the same kinds.",
		}, []string{"kind"}),
		droppedPackets: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmroam_cache_dropped_packets_total",
			Help: "Packets of finished migrations the cache dropped on this host, by reason.",
		}, []string{"reason"}),
		droppedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmroam_cache_dropped_bytes_total",
			Help: "Bytes of the packets in vmroam_cache_dropped_packets_total, by reason.",
		}, []string{"reason"}),
		handover: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "vmroam_handover_duration_seconds",
			Help:    "Time from an arriving VM's activation (carrier or announcement) to the first cached packet delivered to it.",
			Buckets: HandoverBuckets,
		}),
		reconcileRuns: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "vmroam_reconcile_runs_total",
			Help: "Reconciles of WireGuard peers, routes, addresses and nftables with the cluster's state.",
		}),
		reconcileErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "vmroam_reconcile_errors_total",
			Help: "Reconcile steps that failed (retried on the next run), by step.",
		}, []string{"step"}),
	}
	for _, role := range []string{RoleSource, RoleDestination} {
		m.migrationsStarted.WithLabelValues(role)
		m.migrationsCompleted.WithLabelValues(role)
	}
	for _, kind := range []string{KindCached, KindFlushed, KindForwarded, KindHeld, KindDelivered} {
		m.packets.WithLabelValues(kind)
		m.bytes.WithLabelValues(kind)
	}
	for _, r := range cache.DropReasons() {
		m.droppedPackets.WithLabelValues(string(r))
		m.droppedBytes.WithLabelValues(string(r))
	}
	for _, st := range ReconcileSteps {
		m.reconcileErrors.WithLabelValues(string(st))
	}
	m.reg.MustRegister(
		m.migrationsStarted, m.migrationsCompleted, m.migrationsAborted, m.migrationsTimedOut,
		m.packets, m.bytes, m.droppedPackets, m.droppedBytes, m.handover,
		m.reconcileRuns, m.reconcileErrors,
		newStateCollector(src),
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	return m
}

// Gatherer returns the registry, for serving and for tests.
func (m *Metrics) Gatherer() prometheus.Gatherer { return m.reg }

// MigrationStarted counts a migration beginning on this host in role.
func (m *Metrics) MigrationStarted(role string) {
	m.migrationsStarted.WithLabelValues(role).Inc()
}

// MigrationEnded files the totals of a migration that ended on this host.
func (m *Metrics) MigrationEnded(mig Migration) {
	switch mig.Outcome {
	case Completed:
		m.migrationsCompleted.WithLabelValues(mig.Role).Inc()
	case Aborted:
		m.migrationsAborted.Inc()
	case TimedOut:
		m.migrationsTimedOut.Inc()
	}
	for kind, t := range mig.Traffic {
		m.packets.WithLabelValues(kind).Add(float64(t.Packets))
		m.bytes.WithLabelValues(kind).Add(float64(t.Bytes))
	}
	for reason, t := range mig.Dropped {
		m.droppedPackets.WithLabelValues(reason).Add(float64(t.Packets))
		m.droppedBytes.WithLabelValues(reason).Add(float64(t.Bytes))
	}
	if mig.Handover > 0 {
		m.handover.Observe(mig.Handover.Seconds())
	}
}

// ReconcileRun counts one reconcile.
func (m *Metrics) ReconcileRun() { m.reconcileRuns.Inc() }

// ReconcileError counts a failed reconcile step.
func (m *Metrics) ReconcileError(step ReconcileStep) {
	m.reconcileErrors.WithLabelValues(string(step)).Inc()
}

// stateCollector turns a Snapshot into gauges and counters at each scrape.
type stateCollector struct {
	src Source

	peers, handshakeAge, peerRx, peerTx  *prometheus.Desc
	peerState, checkFailures             *prometheus.Desc
	vips, conflicts                      *prometheus.Desc
	gossipMembers, gossipErrors, refused *prometheus.Desc
	cacheUnclaimed, cacheQueued, problem *prometheus.Desc
	cacheMax, recordsRefused, overCap    *prometheus.Desc
}

func newStateCollector(src Source) *stateCollector {
	return &stateCollector{
		src:          src,
		peers:        prometheus.NewDesc("vmroam_peers", "Other members of the cluster, by gossip state.", []string{"state"}, nil),
		handshakeAge: prometheus.NewDesc("vmroam_peer_handshake_age_seconds", "Time since the last WireGuard handshake with the peer; +Inf if none yet.", []string{"peer"}, nil),
		peerRx:       prometheus.NewDesc("vmroam_peer_receive_bytes_total", "Bytes received from the WireGuard peer (restarts from 0 when the peer is removed and added again).", []string{"peer"}, nil),
		peerTx:       prometheus.NewDesc("vmroam_peer_transmit_bytes_total", "Bytes sent to the WireGuard peer (restarts from 0 when the peer is removed and added again).", []string{"peer"}, nil),
		peerState:    prometheus.NewDesc("vmroam_peer_state", "1 for the gossip state the member is in, 0 for the others.", []string{"peer", "state"}, nil),
		checkFailures: prometheus.NewDesc("vmroam_peer_session_check_failures",
			"Checks in a row that the WireGuard session with the peer carries a round trip failed; 0 if the last passed, 4 when the agent gave up checking.", []string{"peer"}, nil),
		conflicts: prometheus.NewDesc("vmroam_conflicts", "VIPs claimed by two owners at one epoch, until a higher epoch settles them.", nil, nil),
		refused: prometheus.NewDesc("vmroam_gossip_refused_total",
			"VIP claims and network changes ignored because the peer allowlist refuses the member they came from.", nil, nil),
		cacheMax:      prometheus.NewDesc("vmroam_cache_max_bytes", "The cap on vmroam_cache_queued_bytes (cache-global-max-bytes); +Inf if none.", nil, nil),
		vips:          prometheus.NewDesc("vmroam_vips", "VIPs of the location table, by state as `vmroam status` shows them.", []string{"state"}, nil),
		gossipMembers: prometheus.NewDesc("vmroam_gossip_members", "Alive gossip members, this host included.", nil, nil),
		gossipErrors: prometheus.NewDesc("vmroam_gossip_message_errors_total",
			"Gossip input dropped as invalid: malformed messages or remote states (kind message), member metadata that did not decode (kind metadata).", []string{"kind"}, nil),
		cacheUnclaimed: prometheus.NewDesc("vmroam_cache_unclaimed_packets_total", "Packets the cache device read for a VIP that no migration here was taking: lost.", nil, nil),
		cacheQueued:    prometheus.NewDesc("vmroam_cache_queued_bytes", "Packet bytes held by all the cache's queues now.", nil, nil),
		problem:        prometheus.NewDesc("vmroam_problems", "Problems `vmroam status` reports now (a reconcile step failing, a member that cannot be a peer, a config clash).", nil, nil),
		overCap: prometheus.NewDesc("vmroam_gossip_over_cap_total",
			"Location records and network versions the gossip table refused beyond its caps (--max-vips, per owner), by owner; at most 64 owners named, the rest as \"(others)\".", []string{"owner"}, nil),
		recordsRefused: prometheus.NewDesc("vmroam_records_refused", "Other hosts' location records this host refuses to follow now (their VIP is a host's address, loopback, link-local or outside --vip-prefixes), by owner.", []string{"owner"}, nil),
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.peers, c.handshakeAge, c.peerRx, c.peerTx, c.peerState, c.checkFailures,
		c.vips, c.conflicts, c.gossipMembers, c.gossipErrors, c.refused, c.cacheUnclaimed, c.cacheQueued, c.cacheMax, c.problem,
		c.recordsRefused, c.overCap} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	s, err := c.src.Snapshot()
	if err != nil {
		// Served as a scrape error; what the snapshot holds still goes out.
		ch <- prometheus.NewInvalidMetric(c.peers, fmt.Errorf("reading the agent's state: %w", err))
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}

	byState := map[string]int{}
	for _, st := range peerStates {
		byState[st] = 0
	}
	for _, p := range s.Peers {
		byState[p.State]++
		for _, st := range peerStates {
			v := 0.0
			if st == p.State {
				v = 1
			}
			gauge(c.peerState, v, p.Name, st)
		}
		if !p.Tunnel {
			continue
		}
		age := math.Inf(1)
		if !p.LastHandshake.IsZero() {
			age = max(0, s.Time.Sub(p.LastHandshake).Seconds())
		}
		gauge(c.handshakeAge, age, p.Name)
		counter(c.peerRx, float64(p.RxBytes), p.Name)
		counter(c.peerTx, float64(p.TxBytes), p.Name)
		gauge(c.checkFailures, float64(p.CheckFailures), p.Name)
	}
	for st, n := range byState {
		gauge(c.peers, float64(n), st)
	}
	vips := map[string]int{}
	for _, st := range vipStates {
		vips[st] = 0
	}
	for st, n := range s.VIPs {
		vips[st] += n
	}
	for st, n := range vips {
		gauge(c.vips, float64(n), st)
	}
	gauge(c.gossipMembers, float64(s.GossipMembers))
	counter(c.gossipErrors, float64(s.GossipMsgErrors), "message")
	counter(c.gossipErrors, float64(s.GossipMetaErrors), "metadata")
	counter(c.cacheUnclaimed, float64(s.CacheUnclaimed))
	gauge(c.cacheQueued, float64(s.CacheQueuedBytes))
	capBytes := math.Inf(1)
	if s.CacheMaxBytes > 0 && s.CacheMaxBytes < math.MaxInt64 {
		capBytes = float64(s.CacheMaxBytes)
	}
	gauge(c.cacheMax, capBytes)
	gauge(c.conflicts, float64(s.Conflicts))
	counter(c.refused, float64(s.GossipRefused))
	gauge(c.problem, float64(s.Problems))
	for owner, n := range s.RecordsRefused {
		gauge(c.recordsRefused, float64(n), owner)
	}
	for owner, n := range s.OverCap {
		counter(c.overCap, float64(n), owner)
	}
}
