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
)

// tunNS makes a fresh network namespace holding the TUN "wt0" (10.77.0.1/24,
// up, a long transmit queue) opened with OpenTUN, and a UDP socket connected
// to 10.77.0.2:9, so that what it sends enters the emulator. What the
// emulator writes back is for 10.77.0.2, which is nobody in a namespace
// without forwarding: the kernel drops it. Everything goes when the test
// ends. It skips unless root.
func tunNS(tb testing.TB) (*os.File, *net.UDPConn) {
	tb.Helper()
	if testing.Short() {
		tb.Skip("TUN in a namespace: skipped with -short")
	}
	if os.Geteuid() != 0 {
		tb.Skip("needs root for a network namespace and a TUN")
	}
	var (
		tun  *os.File
		conn *net.UDPConn
		ns   netns.NsHandle
		err  error
	)
	// The TUN and the socket belong to the namespace of the thread that
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
		if tun, err = OpenTUN("wt0"); err != nil {
			return
		}
		h, herr := netlink.NewHandleAt(ns)
		if herr != nil {
			err = herr
			return
		}
		defer h.Close()
		link, lerr := h.LinkByName("wt0")
		if lerr != nil {
			err = lerr
			return
		}
		addr, _ := netlink.ParseAddr("10.77.0.1/24")
		for _, step := range []func() error{
			func() error { return h.AddrAdd(link, addr) },
			func() error { return h.LinkSetTxQLen(link, 10000) },
			func() error { return h.LinkSetUp(link) },
		} {
			if err = step(); err != nil {
				return
			}
		}
		conn, err = net.DialUDP("udp4", nil, &net.UDPAddr{IP: net.IPv4(10, 77, 0, 2), Port: 9})
	}()
	tb.Cleanup(func() {
		if conn != nil {
			conn.Close()
		}
		if tun != nil {
			tun.Close()
		}
		ns.Close()
	})
	if err != nil {
		tb.Fatalf("TUN namespace: %v", err)
	}
	return tun, conn
}

// meter wraps the TUN to time each packet the emulator writes against the
// time the sender sent it (in its first 8 bytes, ns since t0): the sending
// syscall takes the datagram all the way into the TUN's queue, so this is
// the emulator's timing error as a packet sees it, its reading included.
// It passes SyscallConn on, so the emulator reads the TUN as it would
// without the meter.
type meter struct {
	*os.File
	delay int64
	t0    time.Time
	errs  []int64 // write time - due time, writer goroutine only
}

func (m *meter) Write(p []byte) (int, error) {
	if sent, ok := stampIn(p); ok {
		m.errs = append(m.errs, int64(time.Since(m.t0))-sent-m.delay)
	}
	return m.File.Write(p)
}

// stampIn finds the sender's time stamp in an IPv4/UDP packet to 10.77.0.2.
func stampIn(b []byte) (int64, bool) {
	if len(b) < 36 || b[0] != 0x45 || b[9] != protoUDP || b[19] != 2 {
		return 0, false
	}
	return int64(binary.BigEndian.Uint64(b[28:])), true
}

// tunRun is one measured run through a real TUN.
type tunRun struct {
	sent     uint64        // datagrams the sender sent
	elapsed  time.Duration // the sending time
	stats    Stats
	errs     []time.Duration // sorted: write time - (sending time + delay)
	negative int             // packets written before sending time + delay
}

func (r tunRun) pct(p float64) time.Duration {
	if len(r.errs) == 0 {
		return 0
	}
	return r.errs[min(len(r.errs)-1, int(p*float64(len(r.errs))))]
}

func (r tunRun) String() string {
	return fmt.Sprintf("sent %d in %v (%.0f/s); emulator: %v; from sending: p50 %v p99 %v max %v",
		r.sent, r.elapsed.Round(time.Millisecond), float64(r.stats.Sent)/r.elapsed.Seconds(), r.stats,
		r.pct(0.5), r.pct(0.99), r.pct(1))
}

// runTUN sends rate datagrams/s of size bytes for dur through an emulator
// with cfg on a real TUN and times every packet.
func runTUN(tb testing.TB, cfg Config, rate int, dur time.Duration, size int) tunRun {
	tb.Helper()
	tun, conn := tunNS(tb)
	total := int(float64(rate) * dur.Seconds())
	m := &meter{File: tun, delay: int64(cfg.Delay), t0: time.Now(), errs: make([]int64, 0, total)}
	e, err := New(cfg)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := e.Run(ctx, m)
		done <- err
	}()

	// Pace in small bursts: the sender sleeps (about 1 ms, the runtime's
	// resolution) and then catches up with the schedule.
	var sent atomic.Uint64
	buf := make([]byte, max(size, 8))
	start := time.Now()
	for i := 0; i < total; {
		due := int(float64(rate) * time.Since(start).Seconds())
		for ; i < total && i <= due; i++ {
			binary.BigEndian.PutUint64(buf, uint64(time.Since(m.t0)))
			if _, err := conn.Write(buf); err != nil {
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
	time.Sleep(10 * time.Millisecond)
	cancel()
	if err := <-done; err != nil {
		tb.Fatalf("Run: %v", err)
	}
	r := tunRun{sent: sent.Load(), elapsed: elapsed, stats: e.Stats()}
	for _, v := range m.errs {
		if v < 0 {
			r.negative++
		}
		r.errs = append(r.errs, time.Duration(v))
	}
	slices.Sort(r.errs)
	return r
}

// TestTUN moves real packets through a TUN with a 10 ms delay.
func TestTUN(t *testing.T) {
	r := runTUN(t, Config{Delay: 10 * time.Millisecond}, 2000, time.Second, 64)
	t.Logf("%v", r)
	// The kernel may send a packet of its own into the TUN (IPv6 router
	// solicitation): count the test's own.
	if len(r.errs) != int(r.sent) || r.stats.Lost+r.stats.Dropped != 0 {
		t.Fatalf("packets went missing: %v", r)
	}
	if r.negative > 0 {
		t.Fatalf("%d packets written sooner than the delay after they were sent", r.negative)
	}
	// Generous: other tests may load the machine.
	if p50 := r.pct(0.5); p50 > 2*time.Millisecond {
		t.Fatalf("median timing error %v", p50)
	}
	if r.stats.P50Lateness > 2*time.Millisecond || r.stats.MaxLateness < r.stats.P99Lateness/2 {
		t.Fatalf("emulator's lateness: %v", r.stats)
	}
}

// BenchmarkEmulator pushes 50,000 (and 100,000) packets/s of 64-byte UDP
// datagrams through the emulator on a real TUN for 3 s with a 20 ms delay,
// and reports the rate it wrote and its timing errors: p50/p99/max are the
// emulator's own (write time - due time, due = arrival stamp + delay),
// e2e-* count from the sending syscall instead, so they add the time a
// packet waits in the TUN's queue for the reader, which includes the
// sender's bursts (it sleeps ~1 ms, then catches up). First with normal
// scheduling, then ("-rt") with the whole test process SCHED_FIFO, as the
// lab runs wanem. Each run is one measurement: use -benchtime 1x.
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
				b.ReportMetric(float64(r.pct(0.5).Microseconds()), "e2e-p50-µs")
				b.ReportMetric(float64(r.pct(0.99).Microseconds()), "e2e-p99-µs")
				b.ReportMetric(float64(r.pct(1).Microseconds()), "e2e-max-µs")
				b.ReportMetric(float64(r.stats.Late), "late")
				b.ReportMetric(float64(r.sent)-float64(len(r.errs)), "lost")
			})
		}
	}
}
