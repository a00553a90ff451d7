package wanem

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"
)

// fakeDev is an in-memory Device: the test feeds packets into in, the
// emulator's writes come out of out with their time.
type fakeDev struct {
	in   chan []byte
	out  chan written
	dead chan struct{} // closed by SetReadDeadline
	once sync.Once
}

type written struct {
	b  []byte
	at time.Time
}

func newFakeDev() *fakeDev {
	return &fakeDev{in: make(chan []byte), out: make(chan written, 100_000), dead: make(chan struct{})}
}

func (d *fakeDev) Read(p []byte) (int, error) {
	select {
	case b, ok := <-d.in:
		if !ok {
			return 0, io.EOF
		}
		return copy(p, b), nil
	case <-d.dead:
		return 0, os.ErrDeadlineExceeded
	}
}

func (d *fakeDev) Write(p []byte) (int, error) {
	d.out <- written{b: append([]byte(nil), p...), at: time.Now()}
	return len(p), nil
}

func (d *fakeDev) SetReadDeadline(time.Time) error {
	d.once.Do(func() { close(d.dead) })
	return nil
}

// udp4 builds an IPv4/UDP packet whose payload is seq.
func udp4(src, dst byte, sport, dport uint16, seq uint64) []byte {
	b := make([]byte, 20+8+8)
	b[0] = 0x45
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	b[8] = 64
	b[9] = protoUDP
	copy(b[12:], []byte{10, 0, 0, src})
	copy(b[16:], []byte{10, 0, 0, dst})
	binary.BigEndian.PutUint16(b[20:], sport)
	binary.BigEndian.PutUint16(b[22:], dport)
	binary.BigEndian.PutUint16(b[24:], 16)
	binary.BigEndian.PutUint64(b[28:], seq)
	return b
}

func seqOf(b []byte) uint64 { return binary.BigEndian.Uint64(b[28:]) }

// start runs e on d in the background; the returned func cancels it and
// returns Run's results.
func start(t *testing.T, e *Emulator, d Device) func() (Stats, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	type result struct {
		st  Stats
		err error
	}
	done := make(chan result, 1)
	go func() {
		st, err := e.Run(ctx, d)
		done <- result{st, err}
	}()
	var once sync.Once
	var res result
	stop := func() (Stats, error) {
		once.Do(func() {
			cancel()
			select {
			case res = <-done:
			case <-time.After(5 * time.Second):
				t.Fatal("Run did not return within 5 s of cancel")
			}
		})
		return res.st, res.err
	}
	t.Cleanup(func() { stop() })
	return stop
}

// tolerance is how late a packet may come out in the timing tests: generous,
// because other tests may keep the machine's cores busy. outliers is the
// share of packets that may be later still (a descheduled test goroutine
// takes its timestamps late).
const (
	tolerance = 20 * time.Millisecond
	outliers  = 0.02
)

func TestDelay(t *testing.T) {
	const delay = 30 * time.Millisecond
	e, err := New(Config{Delay: delay})
	if err != nil {
		t.Fatal(err)
	}
	d := newFakeDev()
	stop := start(t, e, d)
	const n = 200
	sentAt := make([]time.Time, n)
	go func() {
		for i := range n {
			sentAt[i] = time.Now()
			d.in <- udp4(1, 2, 1000, 2000, uint64(i))
			time.Sleep(500 * time.Microsecond)
		}
	}()
	var extra []time.Duration
	for i := range n {
		select {
		case w := <-d.out:
			if s := seqOf(w.b); s != uint64(i) {
				t.Fatalf("packet %d came out as %d", i, s)
			}
			got := w.at.Sub(sentAt[i])
			if got < delay {
				t.Fatalf("packet %d written after %v, before its delay %v", i, got, delay)
			}
			extra = append(extra, got-delay)
		case <-time.After(5 * time.Second):
			t.Fatalf("packet %d never written", i)
		}
	}
	st, err := stop()
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	checkExtra(t, extra)
	if st.Received != n || st.Sent != n || st.Lost != 0 || st.Dropped != 0 {
		t.Fatalf("stats %v", st)
	}
}

// checkExtra fails unless nearly all delays beyond the configured ones are
// within tolerance.
func checkExtra(t *testing.T, extra []time.Duration) {
	t.Helper()
	slices.Sort(extra)
	t.Logf("extra delay: p50 %v p99 %v max %v", extra[len(extra)/2], extra[len(extra)*99/100], extra[len(extra)-1])
	if bad := extra[int(float64(len(extra))*(1-outliers))]; bad > tolerance {
		t.Fatalf("more than %.0f%% of the packets were over %v late (%v)", outliers*100, tolerance, bad)
	}
}

func TestZeroDelayForwardsAtOnce(t *testing.T) {
	e, _ := New(Config{})
	d := newFakeDev()
	start(t, e, d)
	var extra []time.Duration
	for i := range 100 {
		t0 := time.Now()
		d.in <- udp4(1, 2, 1, 2, uint64(i))
		w := <-d.out
		extra = append(extra, w.at.Sub(t0))
	}
	checkExtra(t, extra)
}

func TestJitterKeepsFlowOrder(t *testing.T) {
	const (
		delay  = 5 * time.Millisecond
		jitter = 20 * time.Millisecond
		flows  = 8
		n      = 4000
	)
	e, err := New(Config{Delay: delay, Jitter: jitter, Seed: 7})
	if err != nil {
		t.Fatal(err)
	}
	d := newFakeDev()
	stop := start(t, e, d)
	sentAt := make([]time.Time, n)
	go func() {
		for i := range n {
			f := i % flows
			sentAt[i] = time.Now()
			// Flows differ by port, and two by address only, and one is IPv6.
			var p []byte
			switch f {
			case 6:
				p = udp6(uint64(i))
			case 7:
				p = udp4(3, 2, 1000, 2000, uint64(i))
			default:
				p = udp4(1, 2, 1000+uint16(f), 2000, uint64(i))
			}
			d.in <- p
			if i%40 == 0 {
				time.Sleep(200 * time.Microsecond)
			}
		}
	}()
	last := make([]int, flows)
	for i := range last {
		last[i] = -1
	}
	reordered := 0
	prev := -1
	var extra []time.Duration // beyond Delay+Jitter
	for range n {
		var w written
		select {
		case w = <-d.out:
		case <-time.After(5 * time.Second):
			t.Fatal("packets missing")
		}
		var s int
		if w.b[0]>>4 == 6 {
			s = int(binary.BigEndian.Uint64(w.b[56:]))
		} else {
			s = int(seqOf(w.b))
		}
		f := s % flows
		if s <= last[f] {
			t.Fatalf("flow %d: packet %d written after %d", f, s, last[f])
		}
		last[f] = s
		if s < prev {
			reordered++
		}
		prev = s
		got := w.at.Sub(sentAt[s])
		if got < delay {
			t.Fatalf("packet %d delayed %v, less than %v", s, got, delay)
		}
		extra = append(extra, max(0, got-delay-jitter))
	}
	checkExtra(t, extra)
	if reordered == 0 {
		t.Fatal("no packet overtook another: jitter had no effect")
	}
	st, _ := stop()
	t.Logf("%d of %d packets overtaken across flows; %v", reordered, n, st)
}

// udp6 builds an IPv6/UDP packet with a destination options header before
// UDP, and seq at offset 56.
func udp6(seq uint64) []byte {
	b := make([]byte, 40+8+8+8)
	b[0] = 0x60
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)-40))
	b[6] = 60 // destination options
	b[7] = 64
	b[8], b[9] = 0xfd, 1
	b[24], b[25] = 0xfd, 2
	b[40] = protoUDP // next header after the options; length 0 = 8 bytes
	binary.BigEndian.PutUint16(b[48:], 5000)
	binary.BigEndian.PutUint16(b[50:], 6000)
	binary.BigEndian.PutUint64(b[56:], seq)
	return b
}

func TestLossRate(t *testing.T) {
	const (
		n    = 10_000
		loss = 0.1
	)
	e, err := New(Config{Loss: loss, Seed: 42})
	if err != nil {
		t.Fatal(err)
	}
	d := newFakeDev()
	stop := start(t, e, d)
	for i := range n {
		d.in <- udp4(1, byte(2+i%2), 1, 2, uint64(i))
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.Stats().Sent+e.Stats().Lost < n && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	st, err := stop()
	if err != nil {
		t.Fatal(err)
	}
	// Binomial: mean 1000, standard deviation 30; allow 5 of them.
	sd := math.Sqrt(n * loss * (1 - loss))
	if st.Received != n || st.Sent+st.Lost != n || math.Abs(float64(st.Lost)-n*loss) > 5*sd {
		t.Fatalf("stats %v: want about %v lost of %d", st, n*loss, n)
	}
	if len(d.out) != int(st.Sent) {
		t.Fatalf("%d packets written, stats say %d", len(d.out), st.Sent)
	}
	// Half the packets went to 10.0.0.2, half to 10.0.0.3: each path lost
	// its share, and the shares add up.
	a, b := st.LostByPath["10.0.0.1>10.0.0.2"], st.LostByPath["10.0.0.1>10.0.0.3"]
	if len(st.LostByPath) != 2 || a+b != st.Lost || a < st.Lost/3 || b < st.Lost/3 {
		t.Fatalf("lost by path %v, lost %d: want two paths sharing it", st.LostByPath, st.Lost)
	}

	// SetLoss while running: 0 loses nothing more.
	e2, _ := New(Config{Loss: 0.5, Seed: 1})
	d2 := newFakeDev()
	stop2 := start(t, e2, d2)
	if err := e2.SetLoss(0); err != nil {
		t.Fatal(err)
	}
	for i := range 1000 {
		d2.in <- udp4(1, 2, 1, 2, uint64(i))
	}
	st2, _ := stop2()
	if st2.Lost != 0 {
		t.Fatalf("lost %d after SetLoss(0)", st2.Lost)
	}
}

func TestCancelLeavesNoGoroutine(t *testing.T) {
	before := runtime.NumGoroutine()
	for _, closer := range []bool{false, true} {
		e, _ := New(Config{Delay: time.Hour})
		var dev Device = newFakeDev()
		fd := dev.(*fakeDev)
		if closer {
			dev = &closeOnlyDev{fakeDev: fd}
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() {
			_, err := e.Run(ctx, dev)
			done <- err
		}()
		fd.in <- udp4(1, 2, 1, 2, 1) // held for an hour
		time.Sleep(10 * time.Millisecond)
		t0 := time.Now()
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Run after cancel: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("Run (closer %v) did not return after cancel", closer)
		}
		if took := time.Since(t0); took > time.Second {
			t.Fatalf("Run took %v to return after cancel", took)
		}
		if st := e.Stats(); st.Received != 1 || st.Sent != 0 {
			t.Fatalf("stats %v", st)
		}
	}
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines before, %d after:\n%s", before, runtime.NumGoroutine(), buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// closeOnlyDev has Close but no SetReadDeadline.
type closeOnlyDev struct{ fakeDev *fakeDev }

func (d *closeOnlyDev) Read(p []byte) (int, error)  { return d.fakeDev.Read(p) }
func (d *closeOnlyDev) Write(p []byte) (int, error) { return d.fakeDev.Write(p) }

func (d *closeOnlyDev) Close() error { return d.fakeDev.SetReadDeadline(time.Time{}) }

func TestReadErrorEndsRun(t *testing.T) {
	e, _ := New(Config{Delay: time.Millisecond})
	d := newFakeDev()
	done := make(chan error, 1)
	go func() {
		_, err := e.Run(context.Background(), d)
		done <- err
	}()
	d.in <- udp4(1, 2, 1, 2, 1)
	close(d.in)
	select {
	case err := <-done:
		if !errors.Is(err, io.EOF) {
			t.Fatalf("Run: %v, want EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after a read error")
	}
}

func TestBadConfig(t *testing.T) {
	for _, c := range []Config{
		{Delay: -1},
		{Jitter: -time.Millisecond},
		{Loss: -0.1},
		{Loss: 1},
		{Loss: math.NaN()},
	} {
		if err := c.Validate(); err == nil {
			t.Errorf("Validate(%+v) = nil", c)
		}
		if _, err := New(c); err == nil {
			t.Errorf("New(%+v) succeeded", c)
		}
		if _, err := Run(context.Background(), newFakeDev(), c); err == nil {
			t.Errorf("Run(%+v) succeeded", c)
		}
	}
	if err := (Config{Delay: time.Second, Jitter: time.Millisecond, Loss: 0.999}).Validate(); err != nil {
		t.Errorf("good config: %v", err)
	}
	e, _ := New(Config{})
	if err := e.SetLoss(1.5); err == nil || e.Loss() != 0 {
		t.Errorf("SetLoss(1.5): %v, loss now %v", err, e.Loss())
	}
	// A second Run at the same time is refused.
	d := newFakeDev()
	start(t, e, d)
	d.in <- udp4(1, 2, 1, 2, 1) // the first Run is surely running now
	if _, err := e.Run(context.Background(), newFakeDev()); err == nil {
		t.Error("second concurrent Run succeeded")
	}
}

// TestHeapOrder checks every pop against a sorted reference.
func TestHeapOrder(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	var q heapQueue
	var ref []packet
	var seq uint64
	for range 20_000 {
		if len(ref) == 0 || r.IntN(3) > 0 {
			seq++
			p := packet{due: r.Int64N(100), seq: seq}
			q.push(p)
			i, _ := slices.BinarySearchFunc(ref, p, func(a, b packet) int {
				if a.before(&b) {
					return -1
				}
				return 1
			})
			ref = slices.Insert(ref, i, p)
			continue
		}
		if q.peek().seq != ref[0].seq {
			t.Fatalf("peek %+v, want %+v", *q.peek(), ref[0])
		}
		if p := q.pop(); p.seq != ref[0].seq {
			t.Fatalf("pop %+v, want %+v", p, ref[0])
		}
		ref = ref[1:]
		if q.len() != len(ref) {
			t.Fatalf("len %d, want %d", q.len(), len(ref))
		}
	}
}

func TestFIFOWraps(t *testing.T) {
	var f fifo
	next, want := uint64(0), uint64(0)
	for round := range 50 {
		for range round * 7 {
			f.push(packet{seq: next})
			next++
		}
		for range round * 5 {
			if p := f.pop(); p.seq != want {
				t.Fatalf("popped %d, want %d", p.seq, want)
			}
			want++
		}
	}
	if f.len() != int(next-want) {
		t.Fatalf("len %d, want %d", f.len(), next-want)
	}
}
