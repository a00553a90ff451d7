package gossip

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	metrics "github.com/hashicorp/go-metrics"
)

// The propagation simulation: many members on 127.0.0.1, each a real
// Cluster (memberlist over UDP and TCP, encrypted), and nothing else. The
// gossip package has no WireGuard in it, so nothing is faked: records
// travel between agents exactly as they do in production, only over
// loopback. `make sim` runs BenchmarkPropagation with 200 agents;
// TestPropagation runs the same code small, with the unit tests.

var (
	simAgents   = flag.Int("sim.agents", 200, "agents in BenchmarkPropagation")
	simProfiles = flag.String("sim.profiles", "lan,wan,local", "memberlist configurations BenchmarkPropagation runs, comma-separated")
)

// simulation is a cluster of agents on loopback and what they saw of the
// record being measured.
type simulation struct {
	nodes      []*Cluster
	seen       []*simEvents
	countSince time.Time // when countTraffic started

	// What one record's measurement collects, reset by measure.
	target  atomic.Pointer[simTarget]
	udpPkts atomic.Int64
	udpB    atomic.Int64
	tcpB    atomic.Int64

	// Since countTraffic: memberlist's failure detector at work. On a
	// machine too loaded for the profile's probe timeout, agents suspect
	// each other and the refutations crowd the gossip.
	suspicions atomic.Int64
	deaths     atomic.Int64
}

// simTarget is the record being measured: when each agent first held it.
type simTarget struct {
	vip     netip.Addr
	start   time.Time
	arrived []atomic.Int64 // ns after start, 0 = not yet
	count   atomic.Int64
	all     chan struct{}
}

// simEvents tells the simulation when an agent's table changes.
type simEvents struct {
	sim   *simulation
	i     int
	table atomic.Pointer[Table]
}

func (e *simEvents) MembersChanged() {}

func (e *simEvents) RecordsChanged() {
	tg, tbl := e.sim.target.Load(), e.table.Load()
	if tg == nil || tbl == nil || tg.arrived[e.i].Load() != 0 {
		return
	}
	if _, ok := tbl.Get(tg.vip); !ok {
		return
	}
	if tg.arrived[e.i].CompareAndSwap(0, max(1, int64(time.Since(tg.start)))) &&
		tg.count.Add(1) == int64(len(tg.arrived)) {
		close(tg.all)
	}
}

// countingSink counts what memberlist sends, through go-metrics.
type countingSink struct {
	metrics.BlackholeSink
	sim *simulation
}

func (s *countingSink) IncrCounterWithLabels(key []string, val float32, _ []metrics.Label) {
	switch {
	case slices.Equal(key, []string{"memberlist", "udp", "sent"}):
		s.sim.udpPkts.Add(1)
		s.sim.udpB.Add(int64(val))
	case slices.Equal(key, []string{"memberlist", "tcp", "sent"}):
		s.sim.tcpB.Add(int64(val))
	case slices.Equal(key, []string{"memberlist", "msg", "suspect"}):
		s.sim.suspicions.Add(1)
	case slices.Equal(key, []string{"memberlist", "msg", "dead"}):
		s.sim.deaths.Add(1)
	}
}

// raiseNoFile makes room for n agents' sockets (a UDP socket and a TCP
// listener each, and push/pull connections).
func raiseNoFile(tb testing.TB, n int) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		tb.Fatalf("getrlimit: %v", err)
	}
	need := uint64(4*n + 256)
	if lim.Cur >= need {
		return
	}
	lim.Cur = min(max(need, lim.Cur), lim.Max)
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < need {
		tb.Fatalf("%d agents need %d file descriptors; the limit is %d (%v)", n, need, lim.Cur, err)
	}
}

// newSimulation starts n agents with the given profile, joins each to
// an earlier one, and waits until every one sees all n alive. The caller shuts
// them down with close.
func newSimulation(tb testing.TB, profile string, n int) *simulation {
	tb.Helper()
	raiseNoFile(tb, n)
	s := &simulation{}
	for i := range n {
		e := &simEvents{sim: s, i: i}
		c, err := New(simAgentConfig(fmt.Sprintf("sim-%d", i), i, Profile(profile), e))
		if err != nil {
			s.close()
			tb.Fatalf("agent %d: %v", i, err)
		}
		e.table.Store(c.Table())
		s.nodes = append(s.nodes, c)
		s.seen = append(s.seen, e)
	}
	start := time.Now()
	for i, c := range s.nodes[1:] {
		// Each joins one that joined before it: a single seed answering
		// every join falls behind on a loaded machine.
		seed := []string{fmt.Sprintf("127.0.0.1:%d", s.nodes[rand.IntN(i+1)].LocalPort())}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		c.Join(ctx, seed)
		timedOut := ctx.Err() != nil
		cancel()
		if timedOut {
			s.close()
			tb.Fatalf("%s could not join", c.Name())
		}
	}
	// Every agent must see (nearly) every other alive: on a loaded
	// machine probes time out now and then, and an agent suspected or
	// declared dead for a moment must not stall the measurement. Records
	// reach it all the same.
	deadline := time.Now().Add(5 * time.Minute)
	for {
		fewest := n
		for _, c := range s.nodes {
			fewest = min(fewest, c.Stats().Members)
		}
		if fewest >= n-n/50 {
			tb.Logf("%s: %d agents joined in %v; each sees at least %d alive", profile, n, time.Since(start).Round(time.Millisecond), fewest)
			return s
		}
		if time.Now().After(deadline) {
			s.close()
			tb.Fatalf("%s: after 5 minutes, an agent of %d sees only %d alive", profile, n, fewest)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (s *simulation) close() {
	var wg sync.WaitGroup
	for _, c := range s.nodes {
		wg.Go(func() { c.Shutdown() })
	}
	wg.Wait()
}

// quiesce waits until no agent has a record left to retransmit, so that
// one record's traffic is not counted in the next one's.
func (s *simulation) quiesce(tb testing.TB) {
	deadline := time.Now().Add(2 * time.Minute)
	for {
		busy := 0
		for _, c := range s.nodes {
			busy += c.queue.NumQueued()
		}
		if busy == 0 {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("%d broadcasts still queued after 2 minutes", busy)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// recordResult is one record's spread.
type recordResult struct {
	all      time.Duration   // until every agent held it
	arrivals []time.Duration // each agent but the claimer
	udpPkts  int64           // sent by all agents until the queues drained
	udpBytes int64
	tcpBytes int64
	start    time.Time
	window   time.Duration // claim to drained
	missed   int           // agents it had not reached by the timeout
}

// spread has a random agent claim a new VIP and waits until every agent
// holds it.
func (s *simulation) spread(tb testing.TB, vip netip.Addr, timeout time.Duration) recordResult {
	tb.Helper()
	n := len(s.nodes)
	claimer := rand.IntN(n)
	tg := &simTarget{vip: vip, arrived: make([]atomic.Int64, n), all: make(chan struct{})}
	s.udpPkts.Store(0)
	s.udpB.Store(0)
	s.tcpB.Store(0)
	tg.start = time.Now()
	s.target.Store(tg)
	if r := s.nodes[claimer].Claim(vip); r.Owner != s.nodes[claimer].Name() {
		tb.Fatalf("claim of %v: %+v", vip, r)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	res := recordResult{start: tg.start}
	select {
	case <-tg.all:
	case <-t.C:
		// Counted as reaching them at the timeout: a lower bound.
		res.missed = n - int(tg.count.Load())
	}
	for i := range tg.arrived {
		d := time.Duration(tg.arrived[i].Load())
		if d == 0 {
			d = timeout
		}
		res.all = max(res.all, d)
		if i != claimer {
			res.arrivals = append(res.arrivals, d)
		}
	}
	return res
}

// settle waits until the retransmissions of the record spread last are
// over and adds the traffic they made to r.
func (s *simulation) settle(tb testing.TB, r *recordResult) {
	tb.Helper()
	s.quiesce(tb)
	r.window = time.Since(r.start)
	s.target.Store(nil)
	r.udpPkts, r.udpBytes, r.tcpBytes = s.udpPkts.Load(), s.udpB.Load(), s.tcpB.Load()
}

// idleRate measures what the agents send with nothing to spread
// (probes, acks), per second, for d.
func (s *simulation) idleRate(d time.Duration) (pkts, bytes float64) {
	s.udpPkts.Store(0)
	s.udpB.Store(0)
	time.Sleep(d)
	return float64(s.udpPkts.Load()) / d.Seconds(), float64(s.udpB.Load()) / d.Seconds()
}

// countTraffic routes memberlist's go-metrics counters to s until the
// returned func is called.
func countTraffic(s *simulation) (stop func()) {
	conf := &metrics.Config{FilterDefault: true}
	s.countSince = time.Now()
	metrics.NewGlobal(conf, &countingSink{sim: s})
	return func() { metrics.NewGlobal(conf, &metrics.BlackholeSink{}) }
}

// percentile returns the p-th percentile (0 < p <= 100) of ds, nearest
// rank.
func percentile(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	i := int(float64(len(s))*p/100+0.999999) - 1
	return s[min(max(i, 0), len(s)-1)]
}

// summary is the simulation's result over many records.
type summary struct {
	records                int
	allP50, allP99, allMax time.Duration
	arrP50, arrP99         time.Duration
	udpPktsPerRecord       float64 // beyond the idle rate
	udpBytesPerRecord      float64
	missed                 int // records that had not reached every agent by the timeout
}

func summarize(rs []recordResult, idlePkts, idleBytes float64) summary {
	var all, arr []time.Duration
	var pkts, bytes float64
	missed := 0
	for _, r := range rs {
		if r.missed > 0 {
			missed++
		}
		all = append(all, r.all)
		arr = append(arr, r.arrivals...)
		pkts += float64(r.udpPkts) - idlePkts*r.window.Seconds()
		bytes += float64(r.udpBytes) - idleBytes*r.window.Seconds()
	}
	return summary{
		records: len(rs),
		allP50:  percentile(all, 50), allP99: percentile(all, 99), allMax: slices.Max(all),
		arrP50: percentile(arr, 50), arrP99: percentile(arr, 99),
		udpPktsPerRecord:  pkts / float64(len(rs)),
		udpBytesPerRecord: bytes / float64(len(rs)),
		missed:            missed,
	}
}

func (s summary) String() string {
	return fmt.Sprintf("%d records (%d not everywhere by the timeout): every agent had it after p50 %v p99 %v max %v; one agent's arrival p50 %v p99 %v; %.0f UDP packets (%.0f KB) per record",
		s.records, s.missed, s.allP50.Round(time.Millisecond), s.allP99.Round(time.Millisecond), s.allMax.Round(time.Millisecond),
		s.arrP50.Round(time.Millisecond), s.arrP99.Round(time.Millisecond), s.udpPktsPerRecord, s.udpBytesPerRecord/1000)
}

// simVIP is the i-th record's VIP: fresh for every record.
func simVIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{100, 64 + byte(i>>16&0x3f), byte(i >> 8), byte(i)})
}

// recordTimeout is how long a record may take to reach every agent
// before it counts as missed: far beyond what gossip takes, and below
// push/pull's interval (30 s on the LAN configuration, 60 s on the WAN
// one, times 4 at 200 agents), which would otherwise hide a broadcast
// that failed.
const recordTimeout = 30 * time.Second

// BenchmarkPropagation measures how long a new location record takes to
// reach every one of -sim.agents agents, with memberlist's LAN, WAN and
// local configurations. One op is one record: a random agent claims a new
// VIP, and the op ends when every agent's table holds it (the time until
// the retransmissions are over is not counted). `make sim` runs it.
func BenchmarkPropagation(b *testing.B) {
	if testing.Short() {
		b.Skip("the propagation simulation is not run with -short")
	}
	for _, profile := range strings.Split(*simProfiles, ",") {
		var (
			sim     *simulation
			next    int
			stopCnt func()
		)
		b.Run(profile, func(b *testing.B) {
			// The framework calls this twice (once with b.N = 1): the
			// agents are started once.
			if sim == nil {
				sim = newSimulation(b, profile, *simAgents)
				stopCnt = countTraffic(sim)
			}
			var rs []recordResult
			b.ResetTimer()
			for range b.N {
				b.StartTimer()
				r := sim.spread(b, simVIP(next), recordTimeout)
				b.StopTimer()
				sim.settle(b, &r)
				next++
				rs = append(rs, r)
				if testing.Verbose() {
					fmt.Fprintf(os.Stderr, "%s record %d: everywhere after %v, %d agents missed\n", profile, next, r.all.Round(time.Millisecond), r.missed)
				}
			}
			// What the agents send with nothing to spread (probes and
			// their acks, membership news), measured once the records
			// are over, when the joins' news is long gone too.
			idleP, idleB := sim.idleRate(10 * time.Second)
			sum := summarize(rs, idleP, idleB)
			b.ReportMetric(float64(sum.allP50)/1e6, "all-p50-ms")
			b.ReportMetric(float64(sum.allP99)/1e6, "all-p99-ms")
			b.ReportMetric(float64(sum.allMax)/1e6, "all-max-ms")
			b.ReportMetric(float64(sum.arrP50)/1e6, "agent-p50-ms")
			b.ReportMetric(float64(sum.arrP99)/1e6, "agent-p99-ms")
			b.ReportMetric(sum.udpPktsPerRecord, "udp-pkts/record")
			b.ReportMetric(sum.udpBytesPerRecord, "udp-B/record")
			b.ReportMetric(idleP/float64(len(sim.nodes)), "idle-pkts/s/agent")
			b.ReportMetric(float64(sum.missed), "missed-records")
			elapsed := time.Since(sim.countSince).Seconds()
			b.ReportMetric(float64(sim.suspicions.Load())/elapsed, "suspicions/s")
			b.Logf("%s, %d agents: %v (idle: %.1f UDP packets/s per agent); since the start %d suspicions, %d declared dead",
				profile, len(sim.nodes), sum, idleP/float64(len(sim.nodes)), sim.suspicions.Load(), sim.deaths.Load())
		})
		if sim != nil {
			stopCnt()
			sim.close()
		}
	}
}

// TestPropagation runs the simulation small, so that it keeps working:
// every record reaches every agent, and the summary adds up.
//
// With so few agents a broadcast can miss one (each retransmits a record
// only RetransmitMult*ceil(log10(n+1)) times, 8 here), and push/pull then
// brings it within its interval: hence the long timeout.
func TestPropagation(t *testing.T) {
	const agents, records = 10, 3
	goroutines := runtime.NumGoroutine()
	sim := newSimulation(t, "lan", agents)
	defer sim.close()
	stop := countTraffic(sim)
	defer stop()
	var rs []recordResult
	for i := range records {
		r := sim.spread(t, simVIP(i), 3*time.Minute)
		sim.settle(t, &r)
		if r.missed != 0 || len(r.arrivals) != agents-1 || slices.Contains(r.arrivals, 0) {
			t.Fatalf("record %d: arrivals %v", i, r.arrivals)
		}
		if r.udpPkts == 0 || r.udpBytes == 0 {
			t.Errorf("record %d spread without a UDP packet counted", i)
		}
		rs = append(rs, r)
	}
	for i, c := range sim.nodes {
		for j := range records {
			if _, ok := c.Table().Get(simVIP(j)); !ok {
				t.Errorf("agent %d lacks record %d", i, j)
			}
		}
	}
	sum := summarize(rs, 0, 0)
	if sum.records != records || sum.allP50 > sum.allP99 || sum.allP99 > sum.allMax || sum.arrP50 > sum.arrP99 || sum.arrP99 > sum.allMax || sum.allMax <= 0 {
		t.Errorf("summary does not add up: %+v", sum)
	}
	t.Log(sum)

	// Shut down, nothing of the agents keeps running.
	sim.close()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > goroutines {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after shutdown, %d before the agents started", runtime.NumGoroutine(), goroutines)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// simAgentConfig is the config of the i-th agent of a simulation or scale
// run: memberlist on 127.0.0.1 at any port, encrypted, events to e.
func simAgentConfig(name string, i int, profile Profile, e Events) Config {
	cfg := DefaultConfig()
	cfg.Name = name
	cfg.BindAddr = netip.MustParseAddr("127.0.0.1")
	cfg.BindPort = 0
	cfg.Profile = profile
	cfg.Keys = [][]byte{key1}
	cfg.Meta = testMeta(i%250 + 1)
	cfg.Logger = testLogger()
	cfg.Events = e
	return cfg
}
