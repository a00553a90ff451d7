package metrics

import (
	"errors"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/internal/promtest"
)

// fakeSource returns a fixed snapshot and counts the calls.
type fakeSource struct {
	mu    sync.Mutex
	snap  Snapshot
	err   error
	calls int
}

func (f *fakeSource) Snapshot() (Snapshot, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	return f.snap, f.err
}

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

func sampleSnapshot() Snapshot {
	return Snapshot{
		Time: t0,
		Peers: []Peer{
			{Name: "h2", State: "alive", Tunnel: true, LastHandshake: t0.Add(-30 * time.Second), RxBytes: 1000, TxBytes: 2000},
			{Name: "h3", State: "alive", Tunnel: true, CheckFailures: 2}, // no handshake yet
			{Name: "h4", State: "dead"},
		},
		VIPs:             map[string]int{"local": 2, "remote": 3, "caching": 1},
		GossipMembers:    3,
		GossipMsgErrors:  4,
		GossipMetaErrors: 1,
		GossipRefused:    5,
		CacheUnclaimed:   7,
		CacheQueuedBytes: 4096,
		CacheMaxBytes:    1 << 20,
		Conflicts:        1,
		Problems:         1,
		RecordsRefused:   map[string]int{"evil": 3},
		OverCap:          map[string]uint64{"flood": 1200},
	}
}

func gather(t *testing.T, m *Metrics) promtest.Families {
	t.Helper()
	fams, err := m.Gatherer().Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	return promtest.ByName(fams)
}

func TestStateAtScrape(t *testing.T) {
	src := &fakeSource{snap: sampleSnapshot()}
	m := New(src)

	const want = `
# HELP vmroam_peers Other members of the cluster, by gossip state.
# TYPE vmroam_peers gauge
vmroam_peers{state="alive"} 2
vmroam_peers{state="dead"} 1
vmroam_peers{state="left"} 0
vmroam_peers{state="suspect"} 0
# HELP vmroam_peer_receive_bytes_total Bytes received from the WireGuard peer (restarts from 0 when the peer is removed and added again).
# TYPE vmroam_peer_receive_bytes_total counter
vmroam_peer_receive_bytes_total{peer="h2"} 1000
vmroam_peer_receive_bytes_total{peer="h3"} 0
# HELP vmroam_peer_transmit_bytes_total Bytes sent to the WireGuard peer (restarts from 0 when the peer is removed and added again).
# TYPE vmroam_peer_transmit_bytes_total counter
vmroam_peer_transmit_bytes_total{peer="h2"} 2000
vmroam_peer_transmit_bytes_total{peer="h3"} 0
# HELP vmroam_vips VIPs of the location table, by state as ` + "`vmroam status`" + ` shows them.
# TYPE vmroam_vips gauge
vmroam_vips{state="awaiting"} 0
vmroam_vips{state="caching"} 1
vmroam_vips{state="forwarding"} 0
vmroam_vips{state="holding"} 0
vmroam_vips{state="refused"} 0
vmroam_vips{state="local"} 2
vmroam_vips{state="released"} 0
vmroam_vips{state="remote"} 3
vmroam_vips{state="reserved"} 0
# HELP vmroam_gossip_members Alive gossip members, this host included.
# TYPE vmroam_gossip_members gauge
vmroam_gossip_members 3
# HELP vmroam_gossip_message_errors_total Gossip input dropped as invalid: malformed messages or remote states (kind message), member metadata that did not decode (kind metadata).
# TYPE vmroam_gossip_message_errors_total counter
vmroam_gossip_message_errors_total{kind="message"} 4
vmroam_gossip_message_errors_total{kind="metadata"} 1
# HELP vmroam_cache_unclaimed_packets_total Packets the cache device read for a VIP that no migration here was taking: lost.
# TYPE vmroam_cache_unclaimed_packets_total counter
vmroam_cache_unclaimed_packets_total 7
# HELP vmroam_cache_queued_bytes Packet bytes held by all the cache's queues now.
# TYPE vmroam_cache_queued_bytes gauge
vmroam_cache_queued_bytes 4096
# HELP vmroam_problems Problems ` + "`vmroam status`" + ` reports now (a reconcile step failing, a member that cannot be a peer, a config clash).
# TYPE vmroam_problems gauge
vmroam_problems 1
# HELP vmroam_records_refused Other hosts' location records this host refuses to follow now (their VIP is a host's address, loopback, link-local or outside --vip-prefixes), by owner.
# TYPE vmroam_records_refused gauge
vmroam_records_refused{owner="evil"} 3
# HELP vmroam_gossip_over_cap_total Location records and network versions the gossip table refused beyond its caps (--max-vips, per owner), by owner; at most 64 owners named, the rest as "(others)".
# TYPE vmroam_gossip_over_cap_total counter
vmroam_gossip_over_cap_total{owner="flood"} 1200
`
	names := []string{"vmroam_peers", "vmroam_peer_receive_bytes_total", "vmroam_peer_transmit_bytes_total", "vmroam_vips",
		"vmroam_gossip_members", "vmroam_gossip_message_errors_total", "vmroam_cache_unclaimed_packets_total",
		"vmroam_cache_queued_bytes", "vmroam_problems", "vmroam_records_refused", "vmroam_gossip_over_cap_total"}
	if err := testutil.GatherAndCompare(m.Gatherer(), strings.NewReader(want), names...); err != nil {
		t.Fatal(err)
	}

	fams := gather(t, m)
	if age, ok := fams.Value("vmroam_peer_handshake_age_seconds", "peer", "h2"); !ok || age != 30 {
		t.Errorf("handshake age of h2: %v (present %v), want 30", age, ok)
	}
	if age, ok := fams.Value("vmroam_peer_handshake_age_seconds", "peer", "h3"); !ok || !math.IsInf(age, 1) {
		t.Errorf("handshake age of h3, never shaken: %v (present %v), want +Inf", age, ok)
	}
	if _, ok := fams.Value("vmroam_peer_handshake_age_seconds", "peer", "h4"); ok {
		t.Error("a dead member, no WireGuard peer, has a handshake age")
	}

	// The state is read anew at each scrape.
	src.mu.Lock()
	before := src.calls
	src.snap.Peers = src.snap.Peers[:1]
	src.snap.VIPs = map[string]int{"holding": 1}
	src.mu.Unlock()
	fams = gather(t, m)
	if src.calls != before+1 {
		t.Errorf("snapshot taken %d times by one gather, want 1", src.calls-before)
	}
	if v, _ := fams.Value("vmroam_peers", "state", "alive"); v != 1 {
		t.Errorf("peers alive after the change: %v, want 1", v)
	}
	if v, _ := fams.Value("vmroam_vips", "state", "local"); v != 0 {
		t.Errorf("local VIPs after the change: %v, want 0 (still exported)", v)
	}
	if _, ok := fams.Value("vmroam_peer_receive_bytes_total", "peer", "h3"); ok {
		t.Error("a peer gone from the snapshot is still exported")
	}
}

// TestStateForAlerts checks the series the alert rules of monitoring/
// read: a peer's state by name, its session checks, conflicts, refusals
// and the cache's cap.
func TestStateForAlerts(t *testing.T) {
	src := &fakeSource{snap: sampleSnapshot()}
	m := New(src)
	const want = `
# HELP vmroam_peer_state 1 for the gossip state the member is in, 0 for the others.
# TYPE vmroam_peer_state gauge
vmroam_peer_state{peer="h2",state="alive"} 1
vmroam_peer_state{peer="h2",state="dead"} 0
vmroam_peer_state{peer="h2",state="left"} 0
vmroam_peer_state{peer="h2",state="suspect"} 0
vmroam_peer_state{peer="h3",state="alive"} 1
vmroam_peer_state{peer="h3",state="dead"} 0
vmroam_peer_state{peer="h3",state="left"} 0
vmroam_peer_state{peer="h3",state="suspect"} 0
vmroam_peer_state{peer="h4",state="alive"} 0
vmroam_peer_state{peer="h4",state="dead"} 1
vmroam_peer_state{peer="h4",state="left"} 0
vmroam_peer_state{peer="h4",state="suspect"} 0
# HELP vmroam_peer_session_check_failures Checks in a row that the WireGuard session with the peer carries a round trip failed; 0 if the last passed, 4 when the agent gave up checking.
# TYPE vmroam_peer_session_check_failures gauge
vmroam_peer_session_check_failures{peer="h2"} 0
vmroam_peer_session_check_failures{peer="h3"} 2
# HELP vmroam_conflicts VIPs claimed by two owners at one epoch, until a higher epoch settles them.
# TYPE vmroam_conflicts gauge
vmroam_conflicts 1
# HELP vmroam_gossip_refused_total VIP claims and network changes ignored because the peer allowlist refuses the member they came from.
# TYPE vmroam_gossip_refused_total counter
vmroam_gossip_refused_total 5
# HELP vmroam_cache_max_bytes The cap on vmroam_cache_queued_bytes (cache-global-max-bytes); +Inf if none.
# TYPE vmroam_cache_max_bytes gauge
vmroam_cache_max_bytes 1.048576e+06
`
	names := []string{"vmroam_peer_state", "vmroam_peer_session_check_failures", "vmroam_conflicts",
		"vmroam_gossip_refused_total", "vmroam_cache_max_bytes"}
	if err := testutil.GatherAndCompare(m.Gatherer(), strings.NewReader(want), names...); err != nil {
		t.Fatal(err)
	}

	// No cap (the budget's math.MaxInt64, or none set) is +Inf, so that
	// queued/max is 0 rather than a division by zero or a tiny ratio.
	for _, none := range []int64{0, math.MaxInt64} {
		src.mu.Lock()
		src.snap.CacheMaxBytes = none
		src.mu.Unlock()
		if v, ok := gather(t, m).Value("vmroam_cache_max_bytes"); !ok || !math.IsInf(v, 1) {
			t.Errorf("cap %d: vmroam_cache_max_bytes = %v (present %v), want +Inf", none, v, ok)
		}
	}
}

// TestLabelledCountersStartAtZero: every drop reason and reconcile step is
// served before the first event, so an alert's increase() sees the first.
func TestLabelledCountersStartAtZero(t *testing.T) {
	fams := gather(t, New(&fakeSource{}))
	for _, name := range []string{"vmroam_cache_dropped_packets_total", "vmroam_cache_dropped_bytes_total"} {
		for _, r := range cache.DropReasons() {
			if v, ok := fams.Value(name, "reason", string(r)); !ok || v != 0 {
				t.Errorf("%s{reason=%q} = %v (present %v), want 0", name, r, v, ok)
			}
		}
	}
	for _, st := range ReconcileSteps {
		if v, ok := fams.Value("vmroam_reconcile_errors_total", "step", string(st)); !ok || v != 0 {
			t.Errorf("vmroam_reconcile_errors_total{step=%q} = %v (present %v), want 0", st, v, ok)
		}
	}
}

func TestSnapshotErrorIsAScrapeError(t *testing.T) {
	src := &fakeSource{snap: sampleSnapshot(), err: errors.New("wgctrl: no such device")}
	m := New(src)
	_, err := m.Gatherer().Gather()
	if err == nil || !strings.Contains(err.Error(), "no such device") {
		t.Fatalf("gather error %v, want the snapshot's", err)
	}
	// What the snapshot still had is served (promhttp.ContinueOnError).
	fams, _ := m.Gatherer().Gather()
	found := false
	for _, f := range fams {
		found = found || f.GetName() == "vmroam_gossip_members"
	}
	if !found {
		t.Error("vmroam_gossip_members missing after a partial snapshot")
	}
}

func TestMigrationCounters(t *testing.T) {
	m := New(&fakeSource{})
	m.MigrationStarted(RoleSource)
	m.MigrationStarted(RoleSource)
	m.MigrationStarted(RoleDestination)
	m.MigrationEnded(Migration{
		Role: RoleSource, Outcome: Completed,
		Traffic: map[string]Traffic{KindCached: {10, 1000}, KindFlushed: {9, 900}, KindForwarded: {1, 100}},
		Dropped: map[string]Traffic{"max-age": {2, 200}},
	})
	m.MigrationEnded(Migration{Role: RoleSource, Outcome: TimedOut,
		Traffic: map[string]Traffic{KindCached: {5, 500}},
		Dropped: map[string]Traffic{"discarded": {5, 500}}})
	m.MigrationEnded(Migration{
		Role: RoleDestination, Outcome: Completed,
		Traffic:  map[string]Traffic{KindFlushed: {9, 900}, KindHeld: {3, 300}, KindDelivered: {13, 1300}},
		Handover: 3 * time.Millisecond,
	})
	m.MigrationEnded(Migration{Role: RoleSource, Outcome: Aborted, Traffic: map[string]Traffic{KindCached: {1, 100}, KindDelivered: {1, 100}}})
	m.ReconcileRun()
	m.ReconcileRun()
	m.ReconcileError(StepRoutes)

	fams := gather(t, m)
	for _, c := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"vmroam_migrations_started_total", []string{"role", "source"}, 2},
		{"vmroam_migrations_started_total", []string{"role", "destination"}, 1},
		{"vmroam_migrations_completed_total", []string{"role", "source"}, 1},
		{"vmroam_migrations_completed_total", []string{"role", "destination"}, 1},
		{"vmroam_migrations_aborted_total", nil, 1},
		{"vmroam_migrations_timed_out_total", nil, 1},
		{"vmroam_cache_packets_total", []string{"kind", "cached"}, 16},
		{"vmroam_cache_bytes_total", []string{"kind", "cached"}, 1600},
		{"vmroam_cache_packets_total", []string{"kind", "flushed"}, 18},
		{"vmroam_cache_packets_total", []string{"kind", "forwarded"}, 1},
		{"vmroam_cache_packets_total", []string{"kind", "held"}, 3},
		{"vmroam_cache_packets_total", []string{"kind", "delivered"}, 14},
		{"vmroam_cache_bytes_total", []string{"kind", "delivered"}, 1400},
		{"vmroam_cache_dropped_packets_total", []string{"reason", "max-age"}, 2},
		{"vmroam_cache_dropped_bytes_total", []string{"reason", "discarded"}, 500},
		{"vmroam_handover_duration_seconds", nil, 1}, // sample count
		{"vmroam_reconcile_runs_total", nil, 2},
		{"vmroam_reconcile_errors_total", []string{"step", "routes"}, 1},
	} {
		got, ok := fams.Value(c.name, c.labels...)
		if !ok || got != c.want {
			t.Errorf("%s%v = %v (present %v), want %v", c.name, c.labels, got, ok, c.want)
		}
	}
	h := fams["vmroam_handover_duration_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleSum() != 0.003 {
		t.Errorf("handover sum %v s, want 0.003", h.GetSampleSum())
	}
	for _, b := range h.GetBucket() {
		want := uint64(0)
		if b.GetUpperBound() >= 0.003 {
			want = 1
		}
		if b.GetCumulativeCount() != want {
			t.Errorf("bucket le=%v holds %d, want %d", b.GetUpperBound(), b.GetCumulativeCount(), want)
		}
	}
}

func TestHandoverBuckets(t *testing.T) {
	if b := HandoverBuckets; b[0] != 0.0005 || b[len(b)-1] < 4 || b[len(b)-1] > 6 {
		t.Fatalf("buckets %v: want 0.5 ms up to about 5 s", b)
	}
}

// TestConventions runs Prometheus' own linter over every vmroam metric.
func TestConventions(t *testing.T) {
	m := New(&fakeSource{snap: sampleSnapshot()})
	m.MigrationEnded(Migration{Role: RoleDestination, Dropped: map[string]Traffic{"max-bytes": {1, 1}}, Handover: time.Millisecond})
	m.ReconcileError(StepAddress)
	problems, err := testutil.GatherAndLint(m.Gatherer())
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		if strings.HasPrefix(p.Metric, "vmroam_") {
			t.Errorf("%s: %s", p.Metric, p.Text)
		}
	}
	for name := range gather(t, m) {
		if !strings.HasPrefix(name, "vmroam_") && !strings.HasPrefix(name, "go_") && !strings.HasPrefix(name, "process_") {
			t.Errorf("metric %s is neither vmroam's nor the Go runtime's or the process's", name)
		}
	}
}

func TestServer(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	s, err := Listen("127.0.0.1:0", log)
	if err != nil {
		t.Fatal(err)
	}
	m := New(&fakeSource{snap: sampleSnapshot()})
	m.MigrationStarted(RoleDestination)
	s.Serve(m)
	url := "http://" + s.Addr().String() + Path

	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	fams, err := promtest.Parse(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := fams.Value("vmroam_migrations_started_total", "role", "destination"); !ok || got != 1 {
		t.Errorf("served vmroam_migrations_started_total{role=destination} = %v (present %v), want 1", got, ok)
	}
	if _, ok := fams["go_goroutines"]; !ok {
		t.Error("no Go runtime metrics served")
	}
	if r, err := http.Get("http://" + s.Addr().String() + "/other"); err == nil {
		r.Body.Close()
		if r.StatusCode != http.StatusNotFound {
			t.Errorf("GET /other: %s, want 404", r.Status)
		}
	}

	// The address is taken now: a second agent's Listen says which.
	if _, err := Listen(s.Addr().String(), log); err == nil || !strings.Contains(err.Error(), s.Addr().String()) {
		t.Errorf("listen on a used address: %v, want an error naming it", err)
	}

	s.Close()
	s.Close() // twice is harmless
	if c, err := net.DialTimeout("tcp", s.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Error("still accepting connections after Close")
	}
}

func TestCloseWithoutServe(t *testing.T) {
	s, err := Listen("127.0.0.1:0", slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if c, err := net.DialTimeout("tcp", s.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Error("listener open after Close without Serve")
	}
}
