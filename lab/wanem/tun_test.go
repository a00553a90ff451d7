package wanem

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"runtime"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// tunLoop is a fresh network namespace in which UDP datagrams from tx
// (10.77.0.1) to rx (10.77.0.2:9) go through the TUN "wt0" (opened with
// OpenTUN) and, once the emulator writes them back into it, are delivered
// to rx: locally sent packets for 10.77.0.2 are routed into wt0 by a rule
// placed before the local table, packets coming out of wt0 reach the local
// table, where 10.77.0.2 is an address of lo.
type tunLoop struct {
	tun    *os.File
	tx, rx *net.UDPConn
}

// newTUNLoop builds a tunLoop; everything goes when the test ends. It skips
// unless root.
func newTUNLoop(tb testing.TB) *tunLoop {
	tb.Helper()
	if testing.Short() {
		tb.Skip("TUN in a namespace: skipped with -short")
	}
	if os.Geteuid() != 0 {
		tb.Skip("needs root for a network namespace and a TUN")
	}
	var (
		tl  tunLoop
		ns  netns.NsHandle
		err error
	)
	// The TUN and the sockets belong to the namespace of the thread that
	// makes them; they keep it alive after the thread goes back.
	func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			err = gerr
			return
		}
		defer orig.Close()
		if ns, err = netns.New(); err != nil {
			return
		}
		defer func() {
			if serr := netns.Set(orig); serr != nil && err == nil {
				err = serr
			}
		}()
		err = tl.setUp(ns)
	}()
	tb.Cleanup(func() {
		for _, c := range []*net.UDPConn{tl.tx, tl.rx} {
			if c != nil {
				c.Close()
			}
		}
		if tl.tun != nil {
			tl.tun.Close()
		}
		ns.Close()
	})
	if err != nil {
		tb.Fatalf("TUN namespace: %v", err)
	}
	return &tl
}

// setUp runs on a thread in the new namespace ns.
func (tl *tunLoop) setUp(ns netns.NsHandle) error {
	var err error
	if tl.tun, err = OpenTUN("wt0"); err != nil {
		return err
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	wt0, err := h.LinkByName("wt0")
	if err != nil {
		return err
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return err
	}
	a1, _ := netlink.ParseAddr("10.77.0.1/32")
	a2, _ := netlink.ParseAddr("10.77.0.2/32")
	_, dst2, _ := net.ParseCIDR("10.77.0.2/32")
	out := netlink.NewRule()
	out.Priority, out.IifName, out.Dst, out.Table = 10, "lo", dst2, 200
	local := netlink.NewRule()
	local.Priority, local.Table = 100, unix.RT_TABLE_LOCAL
	oldLocal := netlink.NewRule()
	oldLocal.Priority, oldLocal.Table = 0, unix.RT_TABLE_LOCAL
	for _, step := range []func() error{
		func() error { return h.LinkSetUp(lo) },
		func() error { return h.AddrAdd(lo, a1) },
		func() error { return h.AddrAdd(lo, a2) },
		func() error { return h.LinkSetTxQLen(wt0, 10000) },
		func() error { return h.LinkSetUp(wt0) },
		func() error {
			return h.RouteAdd(&netlink.Route{LinkIndex: wt0.Attrs().Index, Dst: dst2, Table: 200})
		},
		func() error { return h.RuleAdd(out) },
		func() error { return h.RuleAdd(local) },
		func() error { return h.RuleDel(oldLocal) },
		// Packets from a local address arriving on wt0 are martians
		// unless accepted.
		func() error { return os.WriteFile("/proc/sys/net/ipv4/conf/wt0/accept_local", []byte("1"), 0) },
		func() error { return os.WriteFile("/proc/sys/net/ipv4/conf/wt0/rp_filter", []byte("0"), 0) },
		func() error { return os.WriteFile("/proc/sys/net/ipv4/conf/all/rp_filter", []byte("0"), 0) },
	} {
		if err := step(); err != nil {
			return err
		}
	}
	if tl.rx, err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 77, 0, 2), Port: 9}); err != nil {
		return err
	}
	raw, err := tl.rx.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 16<<20)
	}); err != nil || serr != nil {
		return fmt.Errorf("SO_RCVBUFFORCE: %v %v", err, serr)
	}
	tl.tx, err = net.DialUDP("udp4", &net.UDPAddr{IP: net.IPv4(10, 77, 0, 1)}, tl.rx.LocalAddr().(*net.UDPAddr))
	return err
}

// tunRun is one measured run through a real TUN.
type tunRun struct {
	sent, received uint64
	elapsed        time.Duration // the sending time
	stats          Stats
	errs           []time.Duration // sorted: arrival at rx - (sending + delay)
}

func (r tunRun) pct(p float64) time.Duration {
	if len(r.errs) == 0 {
		return 0
	}
	return r.errs[min(len(r.errs)-1, int(p*float64(len(r.errs))))]
}

func (r tunRun) String() string {
	return fmt.Sprintf("sent %d in %v (%.0f/s), received %d; emulator: %v; sending to receiving, beyond the delay: p50 %v p99 %v max %v, min %v",
		r.sent, r.elapsed.Round(time.Millisecond), float64(r.sent)/r.elapsed.Seconds(), r.received,
		r.stats, r.pct(0.5), r.pct(0.99), r.pct(1), r.pct(0))
}

// runTUN sends rate datagrams/s of size bytes for dur through an emulator
// with cfg on a real TUN, back to a receiver, and times every packet.
func runTUN(tb testing.TB, cfg Config, rate int, dur time.Duration, size int) tunRun {
	tb.Helper()
	tl := newTUNLoop(tb)
	// As the wanem command does: the reader and writer keep a P each.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(runtime.GOMAXPROCS(0) + 2))
	total := int(float64(rate) * dur.Seconds())
	t0 := time.Now()
	e, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := e.Run(ctx, tl.tun)
		done <- err
	}()

	errs := make([]time.Duration, 0, total)
	rxDone := make(chan struct{})
	go func() {
		defer close(rxDone)
		buf := make([]byte, 2048)
		for {
			n, err := tl.rx.Read(buf)
			if err != nil {
				return
			}
			if n >= 8 {
				errs = append(errs, time.Since(t0)-time.Duration(binary.BigEndian.Uint64(buf))-cfg.Delay)
			}
		}
	}()

	// Pace in small bursts: the sender sleeps (about 1 ms, the runtime's
	// resolution) and then catches up with the schedule.
	var sent atomic.Uint64
	buf := make([]byte, max(size, 8))
	start := time.Now()
	for i := 0; i < total; {
		due := int(float64(rate) * time.Since(start).Seconds())
		for ; i < total && i <= due; i++ {
			binary.BigEndian.PutUint64(buf, uint64(time.Since(t0)))
			if _, err := tl.tx.Write(buf); err != nil {
				tb.Fatalf("send %d: %v", i, err)
			}
			sent.Add(1)
		}
		time.Sleep(200 * time.Microsecond)
	}
	elapsed := time.Since(start)
	// Let the last packets come out.
	deadline := time.Now().Add(cfg.Delay + cfg.Jitter + 2*time.Second)
	for {
		st := e.Stats()
		if st.Sent+st.Lost+st.Dropped >= sent.Load() || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(20 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		tb.Fatalf("Run: %v", err)
	}
	tl.rx.Close()
	<-rxDone
	r := tunRun{sent: sent.Load(), received: uint64(len(errs)), elapsed: elapsed, stats: e.Stats(), errs: errs}
	slices.Sort(r.errs)
	return r
}

// TestTUN moves real packets through a TUN with a 10 ms delay.
func TestTUN(t *testing.T) {
	r := runTUN(t, Config{Delay: 10 * time.Millisecond}, 2000, time.Second, 64)
	t.Logf("%v", r)
	// The emulator may see a packet of the kernel's own too (an IPv6 router
	// solicitation): count the test's.
	if r.received != r.sent || r.stats.Lost+r.stats.Dropped != 0 {
		t.Fatalf("packets went missing: %v", r)
	}
	if r.pct(0) < 0 {
		t.Fatalf("a packet arrived %v sooner than the delay after it was sent", -r.pct(0))
	}
	// Generous: other tests may load the machine.
	if p50 := r.pct(0.5); p50 > 2*time.Millisecond {
		t.Fatalf("median timing error %v", p50)
	}
	if r.stats.P50Lateness > 2*time.Millisecond || r.stats.MaxLateness < r.stats.P99Lateness/2 {
		t.Fatalf("emulator's lateness: %v", r.stats)
	}
}

// TestTUNRunTwice: Run leaves the TUN open and usable, and stops at once
// when no packet comes.
func TestTUNRunTwice(t *testing.T) {
	tl := newTUNLoop(t)
	for i := range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		t0 := time.Now()
		if _, err := Run(ctx, tl.tun, Config{Delay: time.Millisecond}); err != nil {
			t.Fatalf("Run %d: %v", i, err)
		}
		cancel()
		if took := time.Since(t0); took > 2*time.Second {
			t.Fatalf("Run %d took %v to stop", i, took)
		}
	}
	// Still open: a packet sent now can be read from it.
	if _, err := tl.tx.Write(make([]byte, 8)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 2048)
	if n, err := tl.tun.Read(buf); err != nil || n < 28 {
		t.Fatalf("TUN after Run: %d %v", n, err)
	}
}

// BenchmarkEmulator pushes 50,000 (and 100,000) packets/s of 64-byte UDP
// datagrams through the emulator on a real TUN for 3 s with a 20 ms delay,
// and reports the rate and the timing errors: p50/p99/max are the
// emulator's own (write time - due time, due = arrival stamp + delay;
// p50/p99 up to 12.5 % high), e2e-* are from sending to receiving, minus
// the delay, so they add the sender's bursts (it sleeps ~1 ms, then
// catches up) and the receiver's wake-up. First with normal scheduling,
// then ("-rt") with the whole test process SCHED_FIFO, as the lab runs
// wanem. Each run is one measurement: use -benchtime 1x.
//
//	go test -run '^$' -bench BenchmarkEmulator -benchtime 1x ./lab/wanem/
func BenchmarkEmulator(b *testing.B) {
	for _, rt := range []bool{false, true} {
		for _, rate := range []int{50_000, 100_000} {
			name := fmt.Sprintf("%dpps", rate)
			if rt {
				name += "-rt"
			}
			b.Run(name, func(b *testing.B) {
				if rt {
					if err := SetRealtime(10); err != nil {
						b.Skip(err)
					}
					defer func() {
						if err := SetRealtime(0); err != nil {
							b.Error(err)
						}
					}()
				}
				r := runTUN(b, Config{Delay: 20 * time.Millisecond}, rate, 3*time.Second, 64)
				b.Logf("%v", r)
				b.ReportMetric(float64(r.stats.Sent)/r.elapsed.Seconds(), "pkts/s")
				b.ReportMetric(float64(r.stats.P50Lateness.Microseconds()), "p50-µs")
				b.ReportMetric(float64(r.stats.P99Lateness.Microseconds()), "p99-µs")
				b.ReportMetric(float64(r.stats.MaxLateness.Microseconds()), "max-µs")
				b.ReportMetric(float64(r.stats.Late), "late")
				b.ReportMetric(float64(r.sent)-float64(r.received), "lost")
				b.ReportMetric(float64(r.pct(0.5).Microseconds()), "e2e-p50-µs")
				b.ReportMetric(float64(r.pct(0.99).Microseconds()), "e2e-p99-µs")
				b.ReportMetric(float64(r.pct(1).Microseconds()), "e2e-max-µs")
			})
		}
	}
}
