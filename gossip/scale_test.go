package gossip

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	metrics "github.com/hashicorp/go-metrics"
)

// The scale measurement (issue 23): N real Clusters on 127.0.0.1
// (memberlist over UDP and TCP, encrypted, the LAN profile) that between
// them hold V VIPs, V/N owned by each, and what one new record costs them.
// Every agent starts with the whole table already merged, as a cluster
// that has converged holds it, so that the measurement starts in the
// steady state: the table then travels with every push/pull, at the joins
// and at each interval after them, as in production. `make scale` runs
// TestScale; TestScaleHarness runs the same code tiny with the unit tests.

var (
	scaleAgents = flag.String("scale.agents", "50,100,200,400", "agent counts TestScale runs, comma-separated, smallest first")
	scaleVIPs   = flag.String("scale.vips", "100000", "table sizes (VIPs in all) TestScale runs at each agent count, comma-separated")
	scaleClaims = flag.Int("scale.claims", 20, "new records TestScale spreads at each size")
	scaleBudget = flag.Duration("scale.budget", 3*time.Minute, "longest one size may take; a size that takes longer is stopped, and larger ones are not run")
)

// scaleResult is what one size measured.
type scaleResult struct {
	agents, vips int
	joined       time.Duration // start to every agent seeing (nearly) all others
	prop         summary       // the new records' spread
	heapPerAgent float64       // bytes of live heap, all agents' over N
	idleCPU      float64       // CPU seconds a second per agent, with nothing to spread
	recordCPU    time.Duration // CPU per agent for one record, above idle
	stateBytes   int           // one agent's LocalState
	encode       time.Duration // LocalState of the whole table, median
	merge        time.Duration // MergeRemoteState of a whole, known table, median
	ppWire       float64       // push/pull bytes on the wire (compressed, encrypted), median of the large sends
	ppTime       []float64     // memberlist's pushPullNode, ms
	suspicions   int64
	ppFailed     int    // of the 5 push/pulls timed, those that failed
	stopped      string // why the size was cut short, "" if it was not
}

// scaleSink counts what memberlist sends (through the simulation's
// counters) and keeps the size of each TCP send and the duration of each
// push/pull.
type scaleSink struct {
	countingSink
	mu      sync.Mutex
	tcpSend []float64
	ppMs    []float64
}

func (s *scaleSink) IncrCounterWithLabels(key []string, val float32, l []metrics.Label) {
	s.countingSink.IncrCounterWithLabels(key, val, l)
	if slices.Equal(key, []string{"memberlist", "tcp", "sent"}) {
		s.mu.Lock()
		s.tcpSend = append(s.tcpSend, float64(val))
		s.mu.Unlock()
	}
}

func (s *scaleSink) AddSampleWithLabels(key []string, val float32, _ []metrics.Label) {
	if slices.Equal(key, []string{"memberlist", "pushPullNode"}) {
		s.mu.Lock()
		s.ppMs = append(s.ppMs, float64(val))
		s.mu.Unlock()
	}
}

// cpuTime is the CPU time (user and system) this process used so far.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// liveHeap is the heap in use after a collection.
func liveHeap() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// medianF is the median of xs (0 for none).
func medianF(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}

// errBudget says a size ran out of its time budget.
var errBudget = errors.New("over the time budget")

// startScale starts n agents holding the whole table of v records, joins
// them and waits until each sees (nearly) all the others alive, all before
// deadline. The simulation is returned even with an error, to be closed.
func startScale(tb testing.TB, n, v int, deadline time.Time) (*simulation, error) {
	tb.Helper()
	raiseNoFile(tb, n)
	s := &simulation{}
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprintf("sim-%d", i)
	}
	for i := range n {
		e := &simEvents{sim: s, i: i}
		c, err := New(simAgentConfig(names[i], i, ProfileLAN, e))
		if err != nil {
			return s, fmt.Errorf("agent %d: %w", i, err)
		}
		e.table.Store(c.Table())
		s.nodes = append(s.nodes, c)
		s.seen = append(s.seen, e)
		for j := range v {
			c.Table().Merge(Record{VIP: nthVIP(j), Owner: names[j%n], Epoch: 1})
		}
		if time.Now().After(deadline) {
			return s, fmt.Errorf("starting agent %d of %d: %w", i+1, n, errBudget)
		}
	}
	// The first few join one after the other, each to one before it; the
	// rest join in parallel, each to a random one of those.
	seeds := min(n, 10)
	join := func(i, seed int) error {
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		defer cancel()
		s.nodes[i].Join(ctx, []string{fmt.Sprintf("127.0.0.1:%d", s.nodes[seed].LocalPort())})
		if ctx.Err() != nil {
			return fmt.Errorf("agent %d joining: %w", i, errBudget)
		}
		return nil
	}
	for i := 1; i < seeds; i++ {
		if err := join(i, rand.IntN(i)); err != nil {
			return s, err
		}
	}
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		errs []error
		next = make(chan int)
	)
	for range 4 {
		wg.Go(func() {
			for i := range next {
				if err := join(i, rand.IntN(seeds)); err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		})
	}
	for i := seeds; i < n; i++ {
		next <- i
	}
	close(next)
	wg.Wait()
	if len(errs) > 0 {
		return s, errs[0]
	}
	for {
		fewest := n
		for _, c := range s.nodes {
			fewest = min(fewest, c.Stats().Members)
		}
		if fewest >= n-n/50 {
			return s, nil
		}
		if time.Now().After(deadline) {
			return s, fmt.Errorf("an agent sees only %d of %d alive: %w", fewest, n, errBudget)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// measureScale runs one size: n agents, v VIPs, claims new records, the
// cluster left idle for idle to measure what it costs with nothing to
// spread. It stops at budget, returning what it measured until then.
func measureScale(tb testing.TB, n, v, claims int, idle, budget time.Duration) scaleResult {
	tb.Helper()
	res := scaleResult{agents: n, vips: v}
	start := time.Now()
	deadline := start.Add(budget)
	heap0 := liveHeap()
	sink := &scaleSink{}
	s, err := startScale(tb, n, v, deadline)
	defer s.close()
	if err != nil {
		if !errors.Is(err, errBudget) {
			tb.Fatalf("%d agents, %d VIPs: %v", n, v, err)
		}
		res.stopped = err.Error()
		return res
	}
	res.joined = time.Since(start)
	sink.sim = s
	conf := &metrics.Config{FilterDefault: true, TimerGranularity: time.Millisecond}
	metrics.NewGlobal(conf, sink)
	defer metrics.NewGlobal(conf, &metrics.BlackholeSink{})
	s.countSince = time.Now()

	res.heapPerAgent = float64(int64(liveHeap())-int64(heap0)) / float64(n)

	// Push/pull of the whole table, in this process: one agent's state,
	// and another agent merging it (it holds the same table, so nothing
	// changes: the periodic exchange of a converged cluster).
	var encs, merges []time.Duration
	d0, d1 := delegate{s.nodes[0]}, delegate{s.nodes[len(s.nodes)-1]}
	for range 5 {
		t0 := time.Now()
		st := d0.LocalState(false)
		t1 := time.Now()
		d1.MergeRemoteState(st, false)
		encs, merges = append(encs, t1.Sub(t0)), append(merges, time.Since(t1))
		res.stateBytes = len(st)
	}
	res.encode, res.merge = percentile(encs, 50), percentile(merges, 50)

	// Push/pull over the network: a join to a member already known is
	// one push/pull exchange (memberlist's pushPullNode, which times
	// it), the same as the periodic one but for the join flag.
	for range 5 {
		peer := s.nodes[1+rand.IntN(n-1)]
		if _, err := s.nodes[0].ml.Join([]string{fmt.Sprintf("127.0.0.1:%d", peer.LocalPort())}); err != nil {
			res.ppFailed++ // memberlist's TCP timeout, on an overloaded machine
			tb.Logf("push/pull with %s: %v", peer.Name(), err)
		}
	}

	var rs []recordResult
	cpu0, t0 := cpuTime(), time.Now()
	for k := range claims {
		if time.Now().After(deadline) {
			res.stopped = fmt.Sprintf("after %d of %d records: %v", k, claims, errBudget)
			break
		}
		r := s.spread(tb, nthVIP(v+k), recordTimeout)
		s.settle(tb, &r)
		rs = append(rs, r)
	}
	cpuRecords, window := cpuTime()-cpu0, time.Since(t0)

	// Idle: probes, acks and the periodic push/pull of the whole table,
	// measured once the records are over, when the joins' news is long
	// gone too (during the joins it would inflate the idle rate).
	cpu0 = cpuTime()
	idleP, idleB := s.idleRate(idle)
	idleCPU := float64(cpuTime()-cpu0) / float64(idle)
	res.idleCPU = idleCPU / float64(n)
	if len(rs) > 0 {
		res.prop = summarize(rs, idleP, idleB)
		busy := float64(cpuRecords) - idleCPU*float64(window)
		res.recordCPU = time.Duration(busy / float64(len(rs)) / float64(n))
	}
	sink.mu.Lock()
	var large []float64
	for _, b := range sink.tcpSend {
		if b >= float64(res.stateBytes)/10 && b > 1024 {
			large = append(large, b)
		}
	}
	res.ppWire = medianF(large)
	res.ppTime = slices.Clone(sink.ppMs)
	sink.mu.Unlock()
	res.suspicions = s.suspicions.Load()
	return res
}

// scaleTable formats results as a table.
func scaleTable(rs []scaleResult) string {
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "N\tV\trecords\tp50\tp99\tmax\tUDP pkts/rec\tUDP B/rec\tstate B\tpush/pull wire B\tencode\tmerge\tpush/pull p50\tpush/pull max\theap/agent MiB\theap B/rec\tidle CPU/agent\tCPU/rec/agent\tsuspicions\tjoin\tpush/pull failed\t")
	for _, r := range rs {
		if r.stopped != "" && r.prop.records == 0 {
			continue // nothing measured: listed below
		}
		ms := func(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64) + "ms" }
		pp50, ppMax := medianF(r.ppTime), 0.0
		if len(r.ppTime) > 0 {
			ppMax = slices.Max(r.ppTime)
		}
		fmt.Fprintf(w, "%d\t%d\t%d\t%s\t%s\t%s\t%.0f\t%.0f\t%d\t%.0f\t%s\t%s\t%.0fms\t%.0fms\t%.1f\t%.0f\t%.1f%%\t%s\t%d\t%v\t%d/5\t\n",
			r.agents, r.vips, r.prop.records, ms(r.prop.allP50), ms(r.prop.allP99), ms(r.prop.allMax),
			r.prop.udpPktsPerRecord, r.prop.udpBytesPerRecord, r.stateBytes, r.ppWire,
			ms(r.encode), ms(r.merge), pp50, ppMax,
			r.heapPerAgent/(1<<20), r.heapPerAgent/float64(max(r.vips, 1)), 100*r.idleCPU, ms(r.recordCPU),
			r.suspicions, r.joined.Round(time.Second), r.ppFailed)
	}
	w.Flush()
	for _, r := range rs {
		if r.stopped != "" {
			fmt.Fprintf(&b, "N=%d V=%d stopped: %s\n", r.agents, r.vips, r.stopped)
		}
	}
	return b.String()
}

func parseInts(tb testing.TB, s string) []int {
	var out []int
	for _, f := range strings.Split(s, ",") {
		v, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || v <= 0 {
			tb.Fatalf("%q: not a positive count", f)
		}
		out = append(out, v)
	}
	return out
}

// TestScale measures every size of -scale.agents and -scale.vips and
// prints the table. `make scale` runs it; it keeps both cores busy for
// a quarter of an hour or more, so it runs only with VMROAM_SCALE=1.
func TestScale(t *testing.T) {
	if os.Getenv("VMROAM_SCALE") != "1" {
		t.Skip("the scale measurement runs for many minutes: VMROAM_SCALE=1 (make scale)")
	}
	var results []scaleResult
	for _, v := range parseInts(t, *scaleVIPs) {
		for _, n := range parseInts(t, *scaleAgents) {
			if n > v {
				continue
			}
			t0 := time.Now()
			r := measureScale(t, n, v, *scaleClaims, 10*time.Second, *scaleBudget)
			results = append(results, r)
			t.Logf("N=%d V=%d done in %v\n%s", n, v, time.Since(t0).Round(time.Second), scaleTable([]scaleResult{r}))
			if r.stopped != "" {
				t.Logf("N=%d V=%d took longer than %v: larger N not run at V=%d", n, v, *scaleBudget, v)
				break
			}
			if r.prop.records > 0 && r.prop.missed > 0 {
				t.Errorf("N=%d V=%d: %d of %d records did not reach every agent within %v", n, v, r.prop.missed, r.prop.records, recordTimeout)
			}
		}
	}
	t.Logf("scale, LAN profile, encrypted, every agent holding the whole table:\n%s", scaleTable(results))
	t.Logf("extrapolated to %d agents:\n%s", extrapolateTo, extrapolate(results, extrapolateTo))
}

// extrapolateTo is the cluster size issue 23 aims at.
const extrapolateTo = 1000

// fitLine is the least-squares line y = a + b*x through the points.
func fitLine(xs, ys []float64) (a, b float64) {
	n := float64(len(xs))
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx, sy, sxx, sxy = sx+xs[i], sy+ys[i], sxx+xs[i]*xs[i], sxy+xs[i]*ys[i]
	}
	if d := n*sxx - sx*sx; d != 0 {
		b = (n*sxy - sx*sy) / d
	}
	return (sy - b*sx) / n, b
}

// extrapolate fits, at each table size with two or more complete agent
// counts, the spread's p50 and p99 to a + b*ln(N) (an epidemic reaches
// everyone in O(log N) rounds) and the heap per agent to a + b*N
// (memberlist keeps every member), and evaluates the fits at n agents.
func extrapolate(rs []scaleResult, n int) string {
	byV := map[int][]scaleResult{}
	var vs []int
	for _, r := range rs {
		if r.stopped != "" || r.prop.records == 0 {
			continue
		}
		if _, ok := byV[r.vips]; !ok {
			vs = append(vs, r.vips)
		}
		byV[r.vips] = append(byV[r.vips], r)
	}
	var b strings.Builder
	for _, v := range vs {
		pts := byV[v]
		if len(pts) < 2 {
			fmt.Fprintf(&b, "V=%d: one agent count only, no fit\n", v)
			continue
		}
		var lnN, ns, p50, p99, heap []float64
		for _, r := range pts {
			lnN = append(lnN, math.Log(float64(r.agents)))
			ns = append(ns, float64(r.agents))
			p50 = append(p50, r.prop.allP50.Seconds())
			p99 = append(p99, r.prop.allP99.Seconds())
			heap = append(heap, r.heapPerAgent)
		}
		a50, b50 := fitLine(lnN, p50)
		a99, b99 := fitLine(lnN, p99)
		ah, bh := fitLine(ns, heap)
		x := math.Log(float64(n))
		fmt.Fprintf(&b, "V=%d, from N=%d..%d: every agent has a record after p50 %.2f s + %.3f s*ln N = %.2f s, p99 %.2f s + %.3f s*ln N = %.2f s; heap per agent %.1f MiB + %.1f KiB*N = %.1f MiB\n",
			v, pts[0].agents, pts[len(pts)-1].agents, a50, b50, a50+b50*x, a99, b99, a99+b99*x,
			ah/(1<<20), bh/(1<<10), (ah+bh*float64(n))/(1<<20))
	}
	return b.String()
}

// TestScaleHarness runs the scale measurement tiny (5 agents, 500 VIPs,
// 3 records), so that it keeps working: every figure is there and adds up,
// and nothing is left running.
func TestScaleHarness(t *testing.T) {
	const agents, vips, records = 5, 500, 3
	goroutines := runtime.NumGoroutine()
	// Push/pull repairs a broadcast that missed an agent within its
	// interval (30 s): a generous record timeout for so few agents.
	r := measureScale(t, agents, vips, records, 2*time.Second, 5*time.Minute)
	t.Logf("\n%s", scaleTable([]scaleResult{r}))
	if r.stopped != "" {
		t.Fatalf("stopped: %s", r.stopped)
	}
	if r.prop.records != records || r.prop.missed != 0 {
		t.Errorf("%d records measured, %d missed; want %d, 0", r.prop.records, r.prop.missed, records)
	}
	if r.prop.allP50 <= 0 || r.prop.allP50 > r.prop.allP99 || r.prop.allP99 > r.prop.allMax {
		t.Errorf("spread p50 %v p99 %v max %v do not add up", r.prop.allP50, r.prop.allP99, r.prop.allMax)
	}
	// The state is the whole table: vips records of about 12 bytes
	// (IPv4, epoch 1, names "sim-N"), plus the claimed records.
	if r.stateBytes < 11*vips || r.stateBytes > 13*(vips+records)+16 {
		t.Errorf("push/pull state of %d records is %d bytes", vips, r.stateBytes)
	}
	if r.encode <= 0 || r.merge <= 0 {
		t.Errorf("push/pull encode %v, merge %v", r.encode, r.merge)
	}
	if len(r.ppTime) < 5 || r.ppWire <= 0 {
		t.Errorf("push/pull: %d exchanges timed, %.0f bytes on the wire", len(r.ppTime), r.ppWire)
	}
	if r.heapPerAgent <= 0 || r.idleCPU <= 0 {
		t.Errorf("heap per agent %.0f B, idle CPU per agent %.3f", r.heapPerAgent, r.idleCPU)
	}
	// The fit: through two points exactly.
	if a, b := fitLine([]float64{1, 3}, []float64{2, 6}); math.Abs(a) > 1e-9 || math.Abs(b-2) > 1e-9 {
		t.Errorf("fit through (1,2) and (3,6) is %v + %v*x, want 0 + 2*x", a, b)
	}
	big := r
	big.agents, big.prop.allP50, big.prop.allP99 = 50, 2*r.prop.allP50, 2*r.prop.allP99
	if ex := extrapolate([]scaleResult{r, big}, extrapolateTo); !strings.Contains(ex, fmt.Sprintf("V=%d, from N=%d..50", vips, agents)) {
		t.Errorf("extrapolation: %q", ex)
	} else {
		t.Log(ex)
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > goroutines {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after shutdown, %d before the agents started", runtime.NumGoroutine(), goroutines)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
