package e2e

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/internal/udpcsum"
	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

var (
	vipM = netip.MustParseAddr("100.100.20.1") // the VM that moves
	vipC = netip.MustParseAddr("100.100.20.3") // the client that sends to it
)

// migrationLab builds a lab of n hosts running agents (with agentArgs) and
// two VMs: m, which moves, on the first host, and c, its client, on the
// last; both attached and c reaching m.
func migrationLab(t testing.TB, n int, agentArgs ...string) (l *lab.Lab, m, c *lab.VM) {
	t.Helper()
	l = newLabWith(t, n, fastBinary)
	first, last := l.Hosts[0], l.Hosts[n-1]
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h, agentArgs...); err != nil {
			t.Fatal(err)
		}
	}
	m, c = addPair(t, l, first, "", last)
	return l, m, c
}

// addPair adds the VM m that moves on mHost (behind a vif called mVif, ""
// for the lab's own name) and its client c on cHost, attaches both and
// waits until c reaches m (attachPair).
func addPair(t testing.TB, l *lab.Lab, mHost *lab.Host, mVif string, cHost *lab.Host) (m, c *lab.VM) {
	t.Helper()
	return addPairWith(t, l, mHost, mVif, vipM, cHost, vipC)
}

// addPairWith is addPair with other VIPs than vipM and vipC.
func addPairWith(t testing.TB, l *lab.Lab, mHost *lab.Host, mVif string, mVIP netip.Addr, cHost *lab.Host, cVIP netip.Addr) (m, c *lab.VM) {
	t.Helper()
	var err error
	if mVif != "" {
		m, err = l.AddVMWithVif("m", mVif, mHost, mVIP)
	} else {
		m, err = l.AddVM("m", mHost, mVIP)
	}
	if err != nil {
		t.Fatal(err)
	}
	if c, err = l.AddVM("c", cHost, cVIP); err != nil {
		t.Fatal(err)
	}
	attachPair(t, l, m, c)
	return m, c
}

// attachPair attaches the moving VM m and the client c where they run and
// waits for a converged cluster, as migrations find it in production: c
// reaches m, and every tunnel has a session (wireguard-go drops most of
// what is sent while it handshakes, and a lost initiation is retried only
// after 5 s).
func attachPair(t testing.TB, l *lab.Lab, m, c *lab.VM) {
	t.Helper()
	cli(t, l, m.Host, "vip", "attach", m.VIPs[0].String(), "--dev", m.Vif)
	cli(t, l, c.Host, "vip", "attach", c.VIPs[0].String(), "--dev", c.Vif)
	if err := l.WaitPing(c, m.VIPs[0], 30*time.Second); err != nil {
		t.Fatal(err)
	}
	waitSessions(t, l)
}

// migrate moves vm to `to` with the given downtime (lab.MigrateVM); with
// announce, the old host hears of the suspend first, as from Xen.
func migrate(t *testing.T, l *lab.Lab, vm *lab.VM, to *lab.Host, downtime time.Duration, announce bool) {
	t.Helper()
	if err := l.MigrateVM(vm, to, downtime, announce); err != nil {
		t.Fatal(err)
	}
}

func sum(m map[string]uint64) (n uint64) {
	for _, v := range m {
		n += v
	}
	return n
}

func handover(m control.Migration) time.Duration {
	if m.CarrierUp == nil || m.FirstDelivery == nil {
		return -1
	}
	return m.FirstDelivery.Sub(*m.CarrierUp)
}

// waitMigrated waits until `to` has delivered the VIP and owns it.
func waitMigrated(t testing.TB, l *lab.Lab, to *lab.Host, vip netip.Addr) control.Migration {
	t.Helper()
	var last control.Migration
	// Generous: a handover connection has been seen to take 12 s to come
	// up on a loaded CI machine (open in issue 3); held packets wait.
	eventually(t, 60*time.Second, "migration of "+vip.String()+" to "+to.Name+" delivered", func() error {
		st := status(t, l, to)
		for _, v := range st.VIPs {
			if v.VIP == vip.String() && v.State != "local" {
				return fmt.Errorf("%s is %s on %s", vip, v.State, to.Name)
			}
		}
		for i := len(st.Migrations) - 1; i >= 0; i-- {
			m := st.Migrations[i]
			if m.VIP == vip.String() && m.Role == "destination" {
				last = m
				if m.Done == nil {
					return fmt.Errorf("migration under way: %+v", m)
				}
				return nil
			}
		}
		return fmt.Errorf("no migration of %s on %s yet", vip, to.Name)
	})
	return last
}

// bothWays is a UDP stream into a moving VM from its client, 12,500
// datagrams/s, and one out of it back, 3,125/s.
type bothWays struct{ in, out *lab.Flow }

// startBothWays starts both streams between the client c and the moving
// VM m for dur.
func startBothWays(t testing.TB, l *lab.Lab, c, m *lab.VM, dur time.Duration) bothWays {
	t.Helper()
	in, err := l.StartUDPFlow(c, m, dur, "20M", 200)
	if err != nil {
		t.Fatal(err)
	}
	out, err := l.StartUDPFlow(m, c, dur, "5M", 200)
	if err != nil {
		t.Fatal(err)
	}
	return bothWays{in, out}
}

// wait waits for both streams to end and returns what their receivers
// counted; a failure message starts with prefix.
func (b bothWays) wait(t testing.TB, prefix string) (in, out lab.FlowResult) {
	t.Helper()
	in, errIn := b.in.Wait()
	out, errOut := b.out.Wait()
	if errIn != nil || errOut != nil {
		t.Fatalf("%sflow into the VM: %v; out of it: %v", prefix, errIn, errOut)
	}
	return in, out
}

// TestMigrationUDPNoLoss sends 12,500 UDP datagrams a second to a VM, and
// the VM 3,125 a second back, while it moves from host 1 to host 2 (0.5 s
// paused) and back (2 s paused), the suspend announced as Xen's watch will,
// and checks with iperf3's own counters that none was lost or reordered in
// either direction; then once more with the VM's interface vanishing
// without warning. The VM is frozen while paused: it sends nothing then.
func TestMigrationUDPNoLoss(t *testing.T) {
	l, m, c := migrationLab(t, 3)
	h1, h2 := l.Hosts[0], l.Hosts[1]

	for _, step := range []struct {
		to       *lab.Host
		downtime time.Duration
		announce bool
	}{{h2, 500 * time.Millisecond, true}, {h1, 2 * time.Second, true}, {h2, 500 * time.Millisecond, false}} {
		name := fmt.Sprintf("to %s with %v downtime, suspend announced %v", step.to.Name, step.downtime, step.announce)
		ok := t.Run(name, func(t *testing.T) {
			queues := wgQueueDrops(l)
			flows := startBothWays(t, l, c, m, step.downtime+6*time.Second)
			time.Sleep(2 * time.Second) // traffic flowing before the move
			migrate(t, l, m, step.to, step.downtime, step.announce)
			resIn, resOut := flows.wait(t, "")
			mig := waitMigrated(t, l, step.to, vipM)
			if out, err := l.Exec(m.NS, "nstat", "-az", "UdpRcvbufErrors", "UdpInErrors", "IpInDiscards"); err == nil {
				t.Logf("VM m's counters:\n%s", out)
			}
			t.Logf("migration %+v", mig)
			lost := lostBeyondQueues(t, resIn.Lost+resOut.Lost, tunDropsSince(l, queues))
			for _, d := range []struct {
				what string
				res  lab.FlowResult
				min  int
			}{{"into the VM", resIn, 50000}, {"out of the VM", resOut, 10000}} {
				t.Logf("iperf3 %s: %d datagrams, %d lost, %d out of order", d.what, d.res.Packets, d.res.Lost, d.res.OutOfOrder)
				if d.res.Packets < d.min {
					t.Errorf("%s: only %d datagrams: the stream did not run", d.what, d.res.Packets)
				}
			}
			reordered := resIn.OutOfOrder + resOut.OutOfOrder
			if reordered > 0 {
				logHandBacks(t, l)
			}
			switch {
			case step.announce && (lost != 0 || reordered != 0):
				t.Errorf("lost %d, out of order %d (both directions): want 0 and 0", lost, reordered)
			case !step.announce && (lost > 5 || reordered != 0):
				// Unannounced, the standby route catches everything routed
				// after the interface vanished; what the kernel had already
				// handed to the interface dies with it (0 to 2 seen here).
				t.Errorf("lost %d, out of order %d (both directions): want at most the few in flight in the vanishing interface, and 0", lost, reordered)
			}
			if mig.Flushed+mig.Held == 0 {
				t.Errorf("the migration carried no packet: the cache was not used")
			}
		})
		if !ok {
			t.FailNow()
		}
	}
}

// TestMigrationBackAndForthAndTCP moves a VM between two hosts ten times
// under one UDP stream, then once under a TCP stream.
func TestMigrationBackAndForthAndTCP(t *testing.T) {
	l, m, c := migrationLab(t, 3)
	h1, h2 := l.Hosts[0], l.Hosts[1]

	t.Run("ten moves under UDP", func(t *testing.T) {
		queues := wgQueueDrops(l)
		flow, err := l.StartUDPFlow(c, m, 45*time.Second, "20M", 200)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		for i := range 10 {
			to := h2
			if i%2 == 1 {
				to = h1
			}
			migrate(t, l, m, to, 200*time.Millisecond, true)
			mig := waitMigrated(t, l, to, vipM)
			if mig.Late != 0 || len(mig.Dropped) != 0 && sum(mig.Dropped) != 0 {
				t.Errorf("move %d: the cache itself reordered (%d late) or dropped (%v)", i+1, mig.Late, mig.Dropped)
			}
			t.Logf("move %d to %s: flushed %d, forwarded %d, held %d, delivered %d, late %d, dropped %v, settle-handover %v",
				i+1, to.Name, mig.Flushed, mig.Forwarded, mig.Held, mig.Delivered, mig.Late, mig.Dropped, handover(mig))
		}
		res, err := flow.Wait()
		if err != nil {
			t.Fatal(err)
		}
		if out, err := l.Exec(m.NS, "nstat", "-az", "UdpRcvbufErrors", "UdpInErrors"); err == nil {
			t.Logf("VM m's counters:\n%s", out)
		}
		t.Logf("iperf3 over 10 moves: %d datagrams, %d lost, %d out of order", res.Packets, res.Lost, res.OutOfOrder)
		if res.Packets < 400000 {
			t.Errorf("only %d datagrams: the stream did not run", res.Packets)
		}
		// When the new host hands the VIP back to the kernel, the kernel
		// sends a fence gateway's queue while new packets already pass; c
		// runs on h2, and there its packets come from its own interface,
		// which the agent cannot hold as it holds wireguard-go's writes.
		// The fence therefore steps between two gateways and resolves one
		// only once nothing waits for it (62 out of order over ten moves
		// in one CI run before the hold, 0-34 per 50 moves after it, none
		// since the steps).
		if lost := lostBeyondQueues(t, res.Lost, tunDropsSince(l, queues)); lost != 0 || res.OutOfOrder != 0 {
			t.Errorf("%d lost and %d out of order over 10 moves: want none", lost, res.OutOfOrder)
		}
		if res.OutOfOrder > 0 {
			logHandBacks(t, l)
		}
	})

	t.Run("TCP survives a move", func(t *testing.T) {
		flow, err := l.StartTCPFlow(c, m, 8*time.Second, "50M")
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(2 * time.Second)
		to := h2
		if m.Host == h2 {
			to = h1
		}
		migrate(t, l, m, to, 500*time.Millisecond, true)
		res, err := flow.Wait()
		if err != nil {
			t.Fatal(err) // a reset connection fails the client
		}
		waitMigrated(t, l, to, vipM)
		n := len(res.Intervals)
		if n < 60 {
			t.Fatalf("only %d intervals of %v: %v", n, lab.FlowInterval, res.Intervals)
		}
		// The last two seconds, well after the move, carried data.
		for _, b := range res.Intervals[n-20 : n-1] {
			if b == 0 {
				t.Fatalf("no data after the move: intervals %v", res.Intervals)
			}
		}
		t.Logf("TCP: %.1f MB in %.1fs, longest stall %v, per %v: %v", res.Bytes/1e6, res.Seconds, res.Stall(), lab.FlowInterval, res.Intervals)
	})
}

// TestMigrationAbortAndTimeout caches a VM's traffic and gives it back
// (abort), then caches it with nobody claiming it (timeout).
func TestMigrationAbortAndTimeout(t *testing.T) {
	l, _, c := migrationLab(t, 2, "--cache-max-age", "3s", "--reconcile-interval", "500ms")
	h1, h2 := l.Hosts[0], l.Hosts[1]

	t.Run("abort delivers the cache in order", func(t *testing.T) {
		p, err := l.StartPinger(c, vipM, 5*time.Millisecond)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		cli(t, l, h1, "migrate", "suspend", vipM.String())
		time.Sleep(500 * time.Millisecond)
		cli(t, l, h1, "migrate", "abort", vipM.String())
		time.Sleep(500 * time.Millisecond)
		st := p.Stop(2 * time.Second)
		if st.LostCount != 0 || st.Reordered != 0 || st.Duplicates != 0 {
			t.Fatalf("pings across suspend and abort: %v", st)
		}
		var rec control.Migration
		eventually(t, 10*time.Second, "abort recorded", func() error {
			for _, m := range status(t, l, h1).Migrations {
				if m.Aborted && m.Done != nil {
					rec = m
					return nil
				}
			}
			return fmt.Errorf("no finished aborted migration yet")
		})
		if rec.Cached < 50 || rec.Delivered < rec.Cached {
			t.Fatalf("abort cached %d, delivered %d: the cache was not used", rec.Cached, rec.Delivered)
		}
		t.Logf("pings: %v; cached %d, delivered %d", st, rec.Cached, rec.Delivered)
	})

	t.Run("nobody claims: dropped and released", func(t *testing.T) {
		cli(t, l, h1, "migrate", "suspend", vipM.String())
		eventually(t, 20*time.Second, "VIP released after max age", func() error {
			st := status(t, l, h2)
			if o := vipOwner(st, vipM); o != "" {
				return fmt.Errorf("owner still %q", o)
			}
			return nil
		})
		var timedOut bool
		for _, m := range status(t, l, h1).Migrations {
			timedOut = timedOut || m.TimedOut
		}
		if !timedOut {
			t.Fatal("h1 does not report the timed-out migration")
		}
	})
}

// TestMigrationAttachBeforeSuspend lets the new host claim the VIP while the
// VM still runs on the old one, as Xen does when it creates the destination
// vif first: the old host must divert and hand over on the request alone.
func TestMigrationAttachBeforeSuspend(t *testing.T) {
	l, m, c := migrationLab(t, 3)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	queues := wgQueueDrops(l)
	flow, err := l.StartUDPFlow(c, m, 6*time.Second, "20M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	newVif, err := l.PrepareIncoming(m, h2)
	if err != nil {
		t.Fatal(err)
	}
	// Twice: hooks may repeat themselves.
	cli(t, l, h2, "vip", "attach", vipM.String(), "--dev", newVif)
	cli(t, l, h2, "vip", "attach", vipM.String(), "--dev", newVif)
	eventually(t, 10*time.Second, "h1 diverts on the request", func() error {
		for _, v := range status(t, l, h1).VIPs {
			if v.VIP == vipM.String() && (v.State == "forwarding" || v.State == "caching") {
				return nil
			}
		}
		return fmt.Errorf("h1 still delivers to the VM")
	})
	time.Sleep(500 * time.Millisecond) // the VM is paused
	if err := l.CompleteIncoming(m, h2, newVif); err != nil {
		t.Fatal(err)
	}
	cli(t, l, h1, "vip", "detach", vipM.String()) // the old host's offline hook, late
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err)
	}
	mig := waitMigrated(t, l, h2, vipM)
	if out, err := l.Exec(m.NS, "nstat", "-az", "UdpRcvbufErrors", "UdpInErrors", "IpInAddrErrors", "IpInDiscards", "UdpNoPorts"); err == nil {
		t.Logf("VM m's counters:\n%s", out)
	}
	t.Logf("iperf3: %d datagrams, %d lost, %d out of order; flushed %d, forwarded %d, held %d, delivered %d, late %d, dropped %v",
		res.Packets, res.Lost, res.OutOfOrder, mig.Flushed, mig.Forwarded, mig.Held, mig.Delivered, mig.Late, mig.Dropped)
	for _, h := range l.Hosts {
		st := status(t, l, h)
		t.Logf("%s: cache unclaimed %d; migrations %+v", h.Name, st.CacheUnclaimed, st.Migrations)
	}
	if res.Packets < 50000 || res.OutOfOrder != 0 {
		t.Errorf("%d datagrams, %d out of order: want >= 50000 and 0", res.Packets, res.OutOfOrder)
	}
	// The cache itself must lose and reorder nothing: all it took went out.
	if mig.Late != 0 || sum(mig.Dropped) != 0 || mig.Delivered < mig.Flushed+mig.Forwarded+mig.Held {
		t.Errorf("the cache reordered (%d late), dropped (%v) or kept back packets (delivered %d of %d)", mig.Late, mig.Dropped, mig.Delivered, mig.Flushed+mig.Forwarded+mig.Held)
	}
	// Once the cause of an occasional loss here was found (cold WireGuard
	// tunnels; now warmed), this order must lose nothing either.
	if lost := lostBeyondQueues(t, res.Lost, tunDropsSince(l, queues)); lost != 0 {
		t.Errorf("%d of %d datagrams lost", lost, res.Packets)
	}
	if o := vipOwner(status(t, l, h1), vipM); o != "h2" {
		t.Errorf("h1 names %q the owner after a late detach, want h2", o)
	}
}

// TestMigrationIPv6 moves a VM whose VIP is IPv6 ten times between h1 and
// its client's host h3 under 12,500 UDP datagrams a second. IPv6 has no
// route metric 0 (the kernel stores it as 1024), so the diversion to the
// cache once lost to Xen's VIP route (metric 2) and the new host let packets
// through to the resuming VM while it delivered the cache: 15,556 out of
// order in 10 moves. Nothing may be reordered.
func TestMigrationIPv6(t *testing.T) {
	l := newLabWith(t, 3, fastBinary)
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	h1, h3 := l.Hosts[0], l.Hosts[2]
	vip6 := netip.MustParseAddr("fd76:6d72::e1")
	m, c := addPairWith(t, l, h1, "", vip6, h3, netip.MustParseAddr("fd76:6d72::e2"))
	before, csumBefore := takeLossSnapshot(t, l, m), snmp6(t, l, m.NS, "Udp6InCsumErrors")
	res, moves, err := moveLoop(l, c, m, vip6, []*lab.Host{h1, h3}, 10, "20M", t.Logf)
	if err != nil {
		t.Fatalf("after %d moves: %v", moves, err)
	}
	if res.OutOfOrder != 0 {
		t.Errorf("%d out of order over %d moves; want none", res.OutOfOrder, moves)
		logHandBacks(t, l)
	}
	// The VM's kernel once dropped 2-6 datagrams of these 500,000 for a
	// zero UDP checksum (see TestIPv6ChecksumsThatSumToZero): none now.
	now, csum := takeLossSnapshot(t, l, m), snmp6(t, l, m.NS, "Udp6InCsumErrors")-csumBefore
	tun, wan := setAside(before, now)
	machine := tun + wan
	t.Logf("IPv6, %d moves: %d datagrams, %d lost, %d out of order; set aside: TUN queue drops %d, WAN emulator's %d; the VM's socket buffer drops %d (lost), its UDP checksum errors %d",
		moves, res.Packets, res.Lost, res.OutOfOrder, tun, wan, now.vmRcvbuf-before.vmRcvbuf, csum)
	if csum != 0 {
		t.Errorf("%d datagrams reached the VM with a bad UDP checksum", csum)
	}
	if lost := uint64(res.Lost); lost > machine {
		t.Errorf("%d datagrams lost: %d more than the TUN queues and the WAN emulator dropped (%d)", lost, lost-machine, machine)
	}
}

// TestIPv6ChecksumsThatSumToZero sends, both ways between VMs on two hosts,
// IPv6 UDP datagrams whose checksum comes out as zero. The sending VM's
// kernel leaves the checksum to the device, and wireguard-go completed it
// to 0x0000 instead of 0xffff: the receiving VM dropped each one as a bad
// checksum (one datagram in 65,536 of any IPv6 UDP flow through the tunnel,
// and the losses TestMigrationIPv6 once allowed). All must arrive.
func TestIPv6ChecksumsThatSumToZero(t *testing.T) {
	l := newLab(t, 2)
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	m, c := addPairWith(t, l, l.Hosts[0], "", netip.MustParseAddr("fd76:6d72::e1"), l.Hosts[1], netip.MustParseAddr("fd76:6d72::e2"))
	payloads := func(src, dst netip.AddrPort) (p [][]byte) {
		for i := range 20 {
			p = append(p, udpcsum.ZeroSumPayload(src, dst, 100+2*i))
			// Ordinary datagrams alongside: if they go missing too,
			// the lab is at fault, not the checksums.
			p = append(p, []byte(fmt.Sprintf("ordinary datagram %d", i)))
		}
		return p
	}
	for _, dir := range []struct{ from, to *lab.VM }{{c, m}, {m, c}} {
		before := snmp6(t, l, dir.to.NS, "Udp6InCsumErrors")
		got, err := l.SendDatagrams(dir.from, dir.to, dir.to.VIPs[0], payloads, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		csum := snmp6(t, l, dir.to.NS, "Udp6InCsumErrors") - before
		if got != 40 || csum != 0 {
			t.Errorf("%s -> %s: %d of 40 datagrams arrived (half sum to zero), %d dropped for their checksum", dir.from, dir.to, got, csum)
		}
	}
}

// snmp6 reads one counter of /proc/net/snmp6 in namespace ns.
func snmp6(t testing.TB, l *lab.Lab, ns, name string) uint64 {
	t.Helper()
	out, err := l.Exec(ns, "cat", "/proc/net/snmp6")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == name {
			n, err := strconv.ParseUint(f[1], 10, 64)
			if err != nil {
				t.Fatalf("%s: %s: %v", ns, name, err)
			}
			return n
		}
	}
	t.Fatalf("%s: no %s in /proc/net/snmp6", ns, name)
	return 0
}
