package lab

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/lab/wanem"
)

// wanBinary builds the emulator once per test binary, into wanBinDir,
// which TestMain removes.
var (
	wanBinDir string
	wanBinary = sync.OnceValues(func() (string, error) {
		dir, err := os.MkdirTemp("", "vmroam-wanem-")
		if err != nil {
			return "", err
		}
		wanBinDir = dir
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		return BuildWANEm(ctx, dir)
	})
)

func TestMain(m *testing.M) {
	code := m.Run()
	if wanBinDir != "" {
		os.RemoveAll(wanBinDir)
	}
	os.Exit(code)
}

func newSitesLab(t testing.TB, hosts, sites int, wan wanem.Config) *Lab {
	t.Helper()
	bin, err := wanBinary()
	if err != nil {
		t.Fatal(err)
	}
	l, err := New(Config{Hosts: hosts, Sites: sites, WAN: wan, WANBinary: bin, Dir: t.TempDir(), Logf: t.Logf})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		pid := l.wan.p.cmd.Process.Pid
		if err := l.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if left := nsWithPrefix(t, l.Prefix()); len(left) > 0 {
			t.Errorf("namespaces left after Close: %v", left)
		}
		if alive(pid) {
			t.Errorf("wanem (pid %d) still running after Close", pid)
		}
		if _, err := os.Stat(l.wan.sock); err == nil {
			t.Errorf("control socket %s left after Close", l.wan.sock)
		}
	})
	return l
}

// echo is a UDP echo server on a host's underlay address.
type echo struct {
	conn *net.UDPConn
	done chan struct{}
}

func startEcho(t testing.TB, h *Host) *echo {
	t.Helper()
	var conn *net.UDPConn
	err := inNetNS(h.NS, func() (err error) {
		conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(underlayPort(h, 0)))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	setRcvBuf(t, conn)
	e := &echo{conn: conn, done: make(chan struct{})}
	go func() {
		defer close(e.done)
		buf := make([]byte, 2048)
		for {
			n, from, err := conn.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = conn.WriteToUDPAddrPort(buf[:n], from)
		}
	}()
	t.Cleanup(func() {
		conn.Close()
		<-e.done
	})
	return e
}

// udpRTTs sends n datagrams from host a to the echo on b, one at a time
// every 10 ms, and returns the round-trip times of those answered within
// wait, sorted.
func udpRTTs(t testing.TB, a *Host, to *echo, n int, wait time.Duration) []time.Duration {
	t.Helper()
	var c *net.UDPConn
	err := inNetNS(a.NS, func() (err error) {
		c, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(underlayPort(a, 0)), to.conn.LocalAddr().(*net.UDPAddr))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var rtts []time.Duration
	buf := make([]byte, 64)
	for i := range n {
		binary.BigEndian.PutUint64(buf, uint64(i))
		t0 := time.Now()
		if _, err := c.Write(buf[:16]); err != nil {
			t.Fatalf("echo %s -> %s: %v", a.Name, to.conn.LocalAddr(), err)
		}
		_ = c.SetReadDeadline(t0.Add(wait))
		for {
			m, err := c.Read(buf)
			if err != nil {
				break // lost
			}
			if m >= 8 && binary.BigEndian.Uint64(buf) == uint64(i) {
				rtts = append(rtts, time.Since(t0))
				break
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	slices.Sort(rtts)
	return rtts
}

func underlayPort(h *Host, port uint16) netip.AddrPort { return netip.AddrPortFrom(h.Underlay, port) }

// setRcvBuf gives a receiving socket 8 MiB, beyond net.core.rmem_max (as
// root), so that bursts through the WAN are not dropped at the receiver.
func setRcvBuf(t testing.TB, c *net.UDPConn) {
	t.Helper()
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
	}); err != nil || serr != nil {
		t.Fatalf("SO_RCVBUFFORCE: %v %v", err, serr)
	}
}

// requireLabTB is requireLab for benchmarks too.
func requireLabTB(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("namespace lab: skipped with -short")
	}
	if err := RequireRoot(); err != nil {
		t.Skipf("namespace lab unavailable: %v", err)
	}
}

// nsWithPrefix is labNamespaces for benchmarks too.
func nsWithPrefix(t testing.TB, prefix string) []string {
	t.Helper()
	entries, err := os.ReadDir(netnsDir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var ours []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			ours = append(ours, e.Name())
		}
	}
	return ours
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[len(d)/2]
}

// TestSitesRTT: three hosts in three sites behind a 20 ms one-way WAN see
// each other at about 40 ms; loss can be changed while it runs.
func TestSitesRTT(t *testing.T) {
	requireLab(t)
	const delay = 20 * time.Millisecond
	l := newSitesLab(t, 3, 3, wanem.Config{Delay: delay})
	if l.Sites != 3 {
		t.Fatalf("Sites %d", l.Sites)
	}
	for i, h := range l.Hosts {
		if h.Site != i+1 || h.Underlay != netip.MustParseAddr(fmt.Sprintf("198.18.%d.%d", i+1, i+1)) {
			t.Fatalf("host %d: site %d underlay %v", i+1, h.Site, h.Underlay)
		}
	}
	wantNS := []string{l.nsName("sw1"), l.nsName("sw2"), l.nsName("sw3"), l.nsName("h1"), l.nsName("h2"), l.nsName("h3"), l.nsName("wan")}
	if got := labNamespaces(t, l.Prefix()); !sameSet(got, wantNS) {
		t.Fatalf("namespaces %v, want %v", got, wantNS)
	}
	router := l.nsName("wan")
	for _, dev := range []string{"wan0", "s1", "s2", "s3"} {
		out, err := l.Exec(router, "ip", "-o", "link", "show", dev)
		if err != nil || !strings.Contains(string(out), "mtu 1500") {
			t.Fatalf("%s: %q %v", dev, out, err)
		}
	}
	out, err := l.Exec(router, "sysctl", "-n", "net.ipv4.conf.all.send_redirects", "net.ipv4.conf.s1.send_redirects", "net.ipv4.conf.wan0.rp_filter")
	if err != nil || strings.Join(strings.Fields(string(out)), " ") != "0 0 0" {
		t.Fatalf("router sysctls: %q %v", out, err)
	}
	// The route a packet from site 1 to site 2 takes through the router.
	out, err = l.Exec(router, "ip", "route", "get", "198.18.2.2", "from", "198.18.1.1", "iif", "s1")
	if err != nil || !strings.Contains(string(out), "dev wan0") {
		t.Fatalf("route from s1: %q %v", out, err)
	}
	out, err = l.Exec(router, "ip", "route", "get", "198.18.2.2", "from", "198.18.1.1", "iif", "wan0")
	if err != nil || !strings.Contains(string(out), "dev s2") {
		t.Fatalf("route from wan0: %q %v", out, err)
	}

	echos := make([]*echo, 3)
	for i, h := range l.Hosts {
		echos[i] = startEcho(t, h)
	}
	for _, pair := range [][2]int{{0, 1}, {0, 2}, {1, 2}, {2, 0}} {
		a := l.Hosts[pair[0]]
		rtts := udpRTTs(t, a, echos[pair[1]], 20, time.Second)
		t.Logf("%s -> %s: %d/20 answered, RTT min %v median %v max %v", a.Name, l.Hosts[pair[1]].Name,
			len(rtts), rtts[0], median(rtts), rtts[len(rtts)-1])
		if len(rtts) < 18 {
			t.Fatalf("%s -> h%d: only %d of 20 answered", a.Name, pair[1]+1, len(rtts))
		}
		if m := median(rtts); m < 2*delay-2*time.Millisecond || m > 60*time.Millisecond {
			t.Fatalf("%s -> h%d: median RTT %v, want about %v", a.Name, pair[1]+1, m, 2*delay)
		}
		if rtts[0] < 2*delay {
			t.Fatalf("%s -> h%d: an RTT of %v beat the WAN's %v", a.Name, pair[1]+1, rtts[0], 2*delay)
		}
	}

	// Loss while running: half the probes' packets go, then none again.
	before, err := l.WANStats()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.SetWANLoss(0.5); err != nil {
		t.Fatal(err)
	}
	lossy := udpRTTs(t, l.Hosts[0], echos[1], 40, 200*time.Millisecond)
	if err := l.SetWANLoss(0); err != nil {
		t.Fatal(err)
	}
	after, err := l.WANStats()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("loss 0.5: %d/40 probes answered; emulator %v", len(lossy), after)
	// Each probe crosses twice: about a quarter answered. Bounds for 40.
	if len(lossy) < 2 || len(lossy) > 25 || after.Lost-before.Lost < 10 {
		t.Fatalf("with loss 0.5: %d/40 answered, %d lost", len(lossy), after.Lost-before.Lost)
	}
	if got := udpRTTs(t, l.Hosts[0], echos[1], 10, time.Second); len(got) != 10 {
		t.Fatalf("after SetWANLoss(0): %d/10 answered", len(got))
	}
	if err := l.SetWANLoss(1); err == nil {
		t.Fatal("SetWANLoss(1) accepted")
	}
}

// TestSitesLocal: hosts of one site talk without the WAN's delay; those of
// two sites with it.
func TestSitesLocal(t *testing.T) {
	requireLab(t)
	l := newSitesLab(t, 4, 2, wanem.Config{Delay: 20 * time.Millisecond})
	h1, h2, h3, h4 := l.Hosts[0], l.Hosts[1], l.Hosts[2], l.Hosts[3]
	if h1.Site != 1 || h2.Site != 2 || h3.Site != 1 || h4.Site != 2 || h3.Underlay != netip.MustParseAddr("198.18.1.3") {
		t.Fatalf("sites %d %d %d %d, h3 %v", h1.Site, h2.Site, h3.Site, h4.Site, h3.Underlay)
	}
	e2, e3, e4 := startEcho(t, h2), startEcho(t, h3), startEcho(t, h4)
	before, err := l.WANStats()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		from   *Host
		to     *echo
		lo, hi time.Duration
	}{
		{h1, e3, 0, 5 * time.Millisecond},
		{h2, e4, 0, 5 * time.Millisecond},
	} {
		rtts := udpRTTs(t, c.from, c.to, 20, time.Second)
		t.Logf("%s -> %v: RTT median %v max %v", c.from.Name, c.to.conn.LocalAddr(), median(rtts), rtts[len(rtts)-1])
		if len(rtts) < 18 || median(rtts) > c.hi {
			t.Fatalf("%s -> %v: %d/20 answered, median %v", c.from.Name, c.to.conn.LocalAddr(), len(rtts), median(rtts))
		}
	}
	if st, err := l.WANStats(); err != nil || st.Received != before.Received {
		t.Fatalf("traffic inside a site went through the WAN: %v -> %v (%v)", before, st, err)
	}
	rtts := udpRTTs(t, h1, e2, 20, time.Second)
	t.Logf("h1 -> h2 (across): RTT median %v", median(rtts))
	if m := median(rtts); len(rtts) < 18 || m < 38*time.Millisecond || m > 60*time.Millisecond {
		t.Fatalf("h1 -> h2: %d/20 answered, median %v", len(rtts), m)
	}
}

func TestSitesBadConfig(t *testing.T) {
	requireLab(t)
	before := labNamespaces(t, "vr")
	for _, cfg := range []Config{
		{Hosts: 2, Sites: 3, WANBinary: "/bin/true"},
		{Hosts: 2, Sites: -1},
		{Hosts: 2, Sites: 2}, // no WANBinary
		{Hosts: 2, Sites: 2, WANBinary: "/bin/true", WAN: wanem.Config{Loss: 2}},
	} {
		if l, err := New(cfg); err == nil {
			l.Close()
			t.Errorf("New(%+v) succeeded", cfg)
		}
	}
	// An emulator that dies at once: New fails with its log and cleans up.
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad-wanem")
	if err := os.WriteFile(bad, []byte("#!/bin/sh\necho no TUN here >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	_, err := New(Config{Hosts: 2, Sites: 2, WANBinary: bad, Dir: filepath.Join(dir, "lab"), Logf: t.Logf})
	if err == nil || !strings.Contains(err.Error(), "no TUN here") {
		t.Fatalf("New with a failing wanem: %v", err)
	}
	if after := labNamespaces(t, "vr"); len(after) > len(before) {
		t.Fatalf("namespaces left: before %v after %v", before, after)
	}
	// No WAN on a lab of one bridge.
	l := newLab(t, 1)
	if err := l.SetWANLoss(0.1); err == nil {
		t.Fatal("SetWANLoss without sites succeeded")
	}
	if _, err := l.WANStats(); err == nil {
		t.Fatal("WANStats without sites succeeded")
	}
}

func sameSet(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(a, b)
}

// BenchmarkWAN sends 50,000 UDP datagrams/s (64 bytes) from a host in site 1
// to one in site 2 across a 20 ms WAN for 3 s, and reports the rate that
// arrived and the error of the one-way delay (arrival - sending - 20 ms),
// end to end: sockets, veths, bridges, the router and the emulator.
//
//	go test -run '^$' -bench BenchmarkWAN -benchtime 1x ./lab/
func BenchmarkWAN(b *testing.B) {
	requireLabTB(b)
	const (
		delay = 20 * time.Millisecond
		rate  = 50_000
		dur   = 3 * time.Second
	)
	l := newSitesLab(b, 2, 2, wanem.Config{Delay: delay})
	h1, h2 := l.Hosts[0], l.Hosts[1]
	var rx, tx *net.UDPConn
	if err := inNetNS(h2.NS, func() (err error) {
		rx, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(underlayPort(h2, 0)))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer rx.Close()
	setRcvBuf(b, rx)
	if err := inNetNS(h1.NS, func() (err error) {
		tx, err = net.DialUDP("udp4", nil, rx.LocalAddr().(*net.UDPAddr))
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer tx.Close()

	t0 := time.Now()
	total := int(rate * dur.Seconds())
	errs := make([]time.Duration, 0, total)
	var got atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 2048)
		for {
			n, err := rx.Read(buf)
			if err != nil {
				return
			}
			if n >= 8 {
				sent := time.Duration(binary.BigEndian.Uint64(buf))
				errs = append(errs, time.Since(t0)-sent-delay)
				got.Add(1)
			}
		}
	}()
	buf := make([]byte, 64)
	start := time.Now()
	for i := 0; i < total; {
		due := int(rate * time.Since(start).Seconds())
		for ; i < total && i <= due; i++ {
			binary.BigEndian.PutUint64(buf, uint64(time.Since(t0)))
			if _, err := tx.Write(buf); err != nil && !errors.Is(err, net.ErrClosed) {
				b.Fatalf("send: %v", err)
			}
		}
		time.Sleep(200 * time.Microsecond)
	}
	elapsed := time.Since(start)
	time.Sleep(delay + 500*time.Millisecond)
	rx.Close()
	<-done
	st, err := l.WANStats()
	if err != nil {
		b.Fatal(err)
	}
	slices.Sort(errs)
	pct := func(p float64) time.Duration {
		if len(errs) == 0 {
			return 0
		}
		return errs[min(len(errs)-1, int(p*float64(len(errs))))]
	}
	b.Logf("sent %d in %v, received %d (%.0f/s); one-way delay error p50 %v p99 %v max %v, min %v; emulator: %v",
		total, elapsed.Round(time.Millisecond), got.Load(), float64(got.Load())/elapsed.Seconds(),
		pct(0.5), pct(0.99), pct(1), pct(0), st)
	b.ReportMetric(float64(got.Load())/elapsed.Seconds(), "pkts/s")
	b.ReportMetric(float64(total)-float64(got.Load()), "lost")
	b.ReportMetric(float64(pct(0.5).Microseconds()), "p50-µs")
	b.ReportMetric(float64(pct(0.99).Microseconds()), "p99-µs")
	b.ReportMetric(float64(pct(1).Microseconds()), "max-µs")
}
