package lab

import (
	"context"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestParseGuestCounters(t *testing.T) {
	page := "boot_id 1b2c\nuptime 12.50 11.00\n== snmp\n" +
		"Ip: Forwarding DefaultTTL\nIp: 2 64\n" +
		"Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 25000 1 3 7 2\n" +
		"== dev\nInter-|   Receive |  Transmit\n face |bytes    packets errs drop fifo frame compressed multicast|bytes packets errs drop fifo colls carrier compressed\n" +
		"  eth0: 100 10 1 2 0 0 0 0 200 20 3 4 0 0 0 0\n"
	c, err := parseGuestCounters([]byte(page))
	if err != nil {
		t.Fatal(err)
	}
	if c.BootID != "1b2c" || c.Uptime != 12500*time.Millisecond {
		t.Errorf("boot id %q uptime %v", c.BootID, c.Uptime)
	}
	if u := c.SNMP["Udp"]; u["InDatagrams"] != 25000 || u["RcvbufErrors"] != 2 || u["InErrors"] != 3 {
		t.Errorf("Udp %v", u)
	}
	if want := (IfStats{100, 10, 1, 2, 200, 20, 3, 4}); c.Dev["eth0"] != want {
		t.Errorf("eth0 %+v, want %+v", c.Dev["eth0"], want)
	}
	if _, err := parseGuestCounters([]byte("boot_id x\n")); err == nil {
		t.Error("a page without snmp and dev parsed")
	}
}

// TestQEMUGuestMigrate boots a real QEMU guest on h1, sends it UDP from a
// namespace VM on h3, live-migrates it to h2 over the underlay while the
// test moves h3's route, and reads the guest's counters back: same boot,
// still counting, answering at h2.
func TestQEMUGuestMigrate(t *testing.T) {
	requireLab(t)
	if err := RequireQEMU(); err != nil {
		t.Skipf("QEMU guest: %v", err)
	}
	// make-guest.sh's tools; with all of them, a failed build is a failure.
	for _, c := range []string{"apt-get", "apt-cache", "dpkg-deb", "dpkg-query", "cpio", "gzip", "sha256sum", "iperf3"} {
		if _, err := exec.LookPath(c); err != nil {
			t.Skipf("QEMU guest: %s not found (make deps): %v", c, err)
		}
	}
	begin := time.Now()
	// A first build downloads the packages: its own time, not the test's.
	bctx, bcancel := context.WithTimeout(context.Background(), 10*time.Minute)
	img, err := BuildGuestImage(bctx, "../scripts/make-guest.sh", "")
	bcancel()
	if err != nil {
		t.Fatalf("QEMU guest image: %v", err)
	}
	t.Logf("guest image %s (%v), accel %s", img.Dir, time.Since(begin).Round(time.Millisecond), Accel())
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()

	l := newLab(t, 3)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	gvip, cvip := netip.MustParseAddr("100.64.7.10"), netip.MustParseAddr("100.64.7.2")
	client, err := l.AddVM("qc", h3, cvip)
	if err != nil {
		t.Fatal(err)
	}
	route := func(h *Host, vip netip.Addr, via *Host, op string) {
		t.Helper()
		if _, err := l.Exec(h.NS, "ip", "route", op, hostPrefix(vip).String(), "via", via.Underlay.String()); err != nil {
			t.Fatal(err)
		}
	}
	route(h1, cvip, h3, "add")
	route(h2, cvip, h3, "add")
	route(h3, gvip, h1, "add")

	boot := time.Now()
	g, err := l.StartGuest(img, "qg", h1, gvip)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Stop)
	bootTime := time.Since(boot)
	if err := l.WaitPing(client, gvip, 20*time.Second); err != nil {
		t.Fatal(err)
	}

	// Steady state into the guest: 12,500 datagrams/s of 100 bytes, none lost.
	c0, err := g.Counters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	res, err := g.IperfUDP(client, 2*time.Second, 12500, 100)
	if err != nil {
		t.Fatal(err)
	}
	c1, err := g.Counters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	udpIn := c1.SNMP["Udp"]["InDatagrams"] - c0.SNMP["Udp"]["InDatagrams"]
	loss := PlaceLoss(res.Sent, c0, c1)
	t.Logf("UDP into the guest: sent %d, read %d, lost %d, unread at the end %d; placed: %s", res.Sent, res.Received, res.Lost, res.Unread, loss)
	if res.Sent < 20000 {
		t.Errorf("iperf3 sent %d datagrams in 2 s, want about 25,000", res.Sent)
	}
	if res.Lost != 0 {
		t.Errorf("%d of %d datagrams lost in steady state (placed: %s)", res.Lost, res.Sent, loss)
	}
	// Linux counts Udp InDatagrams as the application reads them; iperf3's
	// server also reads the client's one "connect" datagram.
	if d := udpIn - res.Received; d < 0 || d > 3 {
		t.Errorf("guest Udp InDatagrams grew by %d, iperf3 read %d", udpIn, res.Received)
	}

	// A migration whose context ends once QEMU has set it up is cancelled:
	// the guest runs on at h1, same boot, and h2's QEMU and tap are gone.
	if err := g.Incoming(h2); err != nil {
		t.Fatal(err)
	}
	cctx, ccancel := context.WithCancel(ctx)
	go func(q *qmp, since time.Time) {
		if _, err := q.waitEvent(cctx, "MIGRATION", since); err == nil {
			ccancel()
		}
	}(g.cur.q, time.Now().Add(-time.Second))
	_, err = g.Migrate(cctx)
	ccancel()
	if err == nil {
		t.Fatal("Migrate whose context ended during the migration succeeded")
	}
	t.Logf("cancelled migration: %v", err)
	if g.Host != h1 || g.next != nil {
		t.Fatalf("after a cancelled migration: guest on %v, destination %v; want h1, none", g.Host, g.next)
	}
	if err := l.WaitPing(client, gvip, 10*time.Second); err != nil {
		t.Fatalf("guest not answering at h1 after a cancelled migration: %v", err)
	}
	if c1, err = g.Counters(ctx); err != nil {
		t.Fatal(err)
	}
	if c1.BootID != c0.BootID {
		t.Errorf("boot id %s after a cancelled migration, %s before", c1.BootID, c0.BootID)
	}
	if _, err := l.Exec(h2.NS, "ip", "link", "show", g.Tap); err == nil {
		t.Errorf("tap %s still on h2 after a cancelled migration", g.Tap)
	}

	// Live migration h1 -> h2 in the middle of a 4 s run; the test moves
	// h3's route once Migrate returns, so datagrams are lost, and placed.
	if err := g.Incoming(h2); err != nil {
		t.Fatal(err)
	}
	type flowResult struct {
		res GuestUDP
		err error
	}
	tap0, err := g.tapStats(h1)
	if err != nil {
		t.Fatal(err)
	}
	flow := make(chan flowResult, 1)
	go func() {
		r, err := g.IperfUDP(client, 4*time.Second, 12500, 100)
		flow <- flowResult{r, err}
	}()
	// Migrate once the flow runs: h1's tap has handed the guest 2,500
	// more packets (0.2 s of it).
	for {
		st, err := g.tapStats(h1)
		if err != nil {
			t.Fatal(err)
		}
		if st.TxPackets-tap0.TxPackets >= 2500 {
			break
		}
		select {
		case fr := <-flow:
			t.Fatalf("the flow ended before it reached the guest's tap: %+v, %v", fr.res, fr.err)
		case <-ctx.Done():
			t.Fatalf("the flow did not reach the guest's tap: %v", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	mig := time.Now()
	m, err := g.Migrate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	migTime := time.Since(mig)
	route(h3, gvip, h2, "replace")
	routed := time.Now()
	fr := <-flow
	if fr.err != nil {
		t.Fatal(fr.err)
	}
	if g.Host != h2 {
		t.Fatalf("guest on %v after Migrate, want h2", g.Host)
	}
	if m.Total <= 0 || m.RAMBytes <= 0 || m.Stop.IsZero() || m.Resume.Before(m.Stop) {
		t.Errorf("migration report %+v", m)
	}
	t.Logf("migration: total %v, downtime %v, setup %v, STOP->RESUME %v, %d MB RAM",
		m.Total, m.Downtime, m.Setup, m.Paused(), m.RAMBytes>>20)
	if err := l.WaitPing(client, gvip, 10*time.Second); err != nil {
		t.Fatalf("guest not answering at h2: %v", err)
	}
	c2, err := g.Counters(ctx)
	if err != nil {
		t.Fatal(err)
	}
	loss = PlaceLoss(fr.res.Sent, c1, c2)
	t.Logf("UDP across the migration: sent %d, read %d, lost %d, unread at the end %d; placed: %s; route moved %v after RESUME",
		fr.res.Sent, fr.res.Received, fr.res.Lost, fr.res.Unread, loss, routed.Sub(m.Resume).Round(time.Millisecond))
	// The taps' counters add up across hosts: what reached the guest's
	// taps is at most what was sent (plus pings and the counters' TCP).
	if tx := c2.Tap.TxPackets - c1.Tap.TxPackets; tx < fr.res.Received || tx > fr.res.Sent+200 {
		t.Errorf("taps handed %d packets to QEMU across the migration; iperf3 sent %d, read %d", tx, fr.res.Sent, fr.res.Received)
	}
	if udp2 := c2.SNMP["Udp"]["InDatagrams"] - c1.SNMP["Udp"]["InDatagrams"]; udp2-fr.res.Received < 0 || udp2-fr.res.Received > 3 {
		t.Errorf("guest Udp InDatagrams grew by %d across the migration, iperf3 read %d", udp2, fr.res.Received)
	}
	if c2.BootID != c0.BootID {
		t.Errorf("boot id %s after migration, %s before: the guest rebooted", c2.BootID, c0.BootID)
	}
	if c2.Uptime <= c1.Uptime {
		t.Errorf("guest uptime %v after migration, %v before", c2.Uptime, c1.Uptime)
	}
	if c2.SNMP["Udp"]["InDatagrams"] < c1.SNMP["Udp"]["InDatagrams"] {
		t.Errorf("guest Udp InDatagrams went back from %d to %d", c1.SNMP["Udp"]["InDatagrams"], c2.SNMP["Udp"]["InDatagrams"])
	}
	// The source QEMU and its tap are gone; h2 has the tap.
	if out, err := l.Exec(h1.NS, "ip", "-o", "link"); err != nil || strings.Contains(string(out), g.Tap) {
		t.Errorf("tap %s still on h1 (%v): %s", g.Tap, err, out)
	}
	if _, err := l.Exec(h2.NS, "ip", "link", "show", g.Tap); err != nil {
		t.Errorf("no tap on h2: %v", err)
	}
	t.Logf("timings: boot %v, migrate call %v, test %v", bootTime.Round(time.Millisecond),
		migTime.Round(time.Millisecond), time.Since(begin).Round(time.Millisecond))
}
