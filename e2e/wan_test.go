package e2e

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/lab/wanem"
)

// wanRTT is the round trip between any two sites of the WAN lab.
const wanRTT = 40 * time.Millisecond

// wanBinary builds the WAN emulator once for the tests that need it.
var wanBinary = sync.OnceValues(func() (string, error) {
	dir, err := os.MkdirTemp("", "vmroam-e2e-wanem-")
	if err != nil {
		return "", err
	}
	wanBinDir = dir
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	return lab.BuildWANEm(ctx, dir)
})

// wanBinDir is removed by TestMain.
var wanBinDir string

// newWANLab builds a lab of n hosts, each in a site of its own, every pair
// of sites wanRTT apart, with agents (agentArgs) on every host.
func newWANLab(t testing.TB, n int, agentArgs ...string) *lab.Lab {
	t.Helper()
	return newWANLabRTT(t, n, wanRTT, agentArgs...)
}

// newWANLabRTT is newWANLab with another round trip between sites.
func newWANLabRTT(t testing.TB, n int, rtt time.Duration, agentArgs ...string) *lab.Lab {
	t.Helper()
	if testing.Short() {
		t.Skip("end-to-end: skipped with -short")
	}
	if err := lab.RequireRoot(); err != nil {
		t.Skipf("end-to-end needs root and network namespaces: %v", err)
	}
	wb, err := wanBinary()
	if err != nil {
		t.Fatal(err)
	}
	l, err := lab.New(lab.Config{Hosts: n, Sites: n, Binary: fastBinary, Logf: t.Logf,
		WAN: wanem.Config{Delay: rtt / 2}, WANBinary: wb})
	if err != nil {
		t.Fatal(err)
	}
	closeAtEnd(t, l)
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h, agentArgs...); err != nil {
			t.Fatal(err)
		}
	}
	return l
}

// wanMoveLab is migrationLab across the WAN: the VM m that moves starts on
// host 1, its client c on host 3, every host in a site of its own.
func wanMoveLab(t testing.TB, agentArgs ...string) (l *lab.Lab, m, c *lab.VM) {
	t.Helper()
	return wanMoveLabRTT(t, wanRTT, agentArgs...)
}

func wanMoveLabRTT(t testing.TB, rtt time.Duration, agentArgs ...string) (l *lab.Lab, m, c *lab.VM) {
	t.Helper()
	l = newWANLabRTT(t, 3, rtt, agentArgs...)
	m, c = addPair(t, l, l.Hosts[0], "", l.Hosts[2])
	// Converged, as a cluster is before a migration: a prepare right
	// after the start timed out (1 s) in CI while a WireGuard handshake
	// waited for wireguard-go's 5 s retry.
	waitSessions(t, l)
	return l, m, c
}

// wanAccount splits what a flow from c lost during one step into what
// vmroam cannot answer for: packets the emulated underlay dropped on c's
// host's path to either of the VM's hosts, and packets the WireGuard
// devices' TUN queues dropped because wireguard-go did not get the CPU to
// read them (it happens on this 2-core lab machine with or without a
// migration; the hosts' counters say so).
type wanAccount struct {
	l      *lab.Lab
	c      *lab.VM
	hosts  []*lab.Host // the VM's hosts
	wan    wanem.Stats
	drops  map[string]uint64
	stepAt time.Time
}

func startAccount(t *testing.T, l *lab.Lab, c *lab.VM, hosts ...*lab.Host) *wanAccount {
	t.Helper()
	st, err := l.WANStats()
	if err != nil {
		t.Fatal(err)
	}
	return &wanAccount{l: l, c: c, hosts: hosts, wan: st, drops: wgQueueDrops(l), stepAt: time.Now()}
}

// finish returns the datagrams the underlay dropped on the flow's paths
// and those the WireGuard TUN queues dropped, since startAccount.
func (a *wanAccount) finish(t *testing.T) (underlay, tunQueue uint64) {
	t.Helper()
	st, err := a.l.WANStats()
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range a.hosts {
		k := a.c.Host.Underlay.String() + ">" + h.Underlay.String()
		underlay += st.LostByPath[k] - a.wan.LostByPath[k]
	}
	tunQueue = tunDropsSince(a.l, a.drops)
	t.Logf("WAN: %d packets in, %d out, %d dropped on purpose (%d on the flow's paths), %d for want of room; lateness p99 %v max %v; WireGuard TUN queue drops %d",
		st.Received-a.wan.Received, st.Sent-a.wan.Sent, st.Lost-a.wan.Lost, underlay, st.Dropped-a.wan.Dropped, st.P99Lateness, st.MaxLateness, tunQueue)
	return underlay, tunQueue
}

// wgQueueDrops reads the transmit drops of every host's WireGuard device.
func wgQueueDrops(l *lab.Lab) map[string]uint64 {
	out := map[string]uint64{}
	for _, h := range l.Hosts {
		b, err := l.Exec(h.NS, "cat", "/sys/class/net/"+h.Iface+"/statistics/tx_dropped")
		if err != nil {
			continue
		}
		n, _ := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
		out[h.Name] = n
	}
	return out
}

// lostBeyondQueues is what a flow lost beyond what the WireGuard TUN
// queues dropped meanwhile (wireguard-go short of CPU on this machine: see
// wanAccount); it says so when they dropped any.
func lostBeyondQueues(t testing.TB, lost int, tunQueue uint64) int {
	t.Helper()
	if tunQueue == 0 {
		return lost
	}
	t.Logf("NOTE: WireGuard's TUN queues dropped %d packets meanwhile: wireguard-go was short of CPU on this machine (not a migration loss)", tunQueue)
	return max(0, lost-int(tunQueue))
}

// checkFlow fails the test unless the flow lost nothing beyond what
// the underlay and the TUN queues account for, and reordered nothing.
func checkFlow(t *testing.T, res lab.FlowResult, underlay, tunQueue uint64) {
	t.Helper()
	if res.OutOfOrder != 0 {
		t.Errorf("%d datagrams out of order; want none", res.OutOfOrder)
	}
	lost := uint64(res.Lost)
	switch {
	case lost > underlay+tunQueue:
		t.Errorf("%d datagrams lost, of which the underlay dropped %d and WireGuard's TUN queues %d: vmroam lost %d; want none",
			res.Lost, underlay, tunQueue, lost-underlay-tunQueue)
	case tunQueue > 0:
		t.Logf("NOTE: WireGuard's TUN queues dropped %d packets: wireguard-go was short of CPU on this machine (not a migration loss)", tunQueue)
	}
}

// TestWANMigrationUDP is TestMigrationUDPNoLoss across the WAN: VM m moves
// between sites 1 and 2, 0.5 s and then 2 s paused, while its client in
// site 3 sends it 12,500 UDP datagrams a second, every site 40 ms from the
// others.
func TestWANMigrationUDP(t *testing.T) {
	l, m, c := wanMoveLab(t)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	for _, step := range []struct {
		to       *lab.Host
		downtime time.Duration
	}{{h2, 500 * time.Millisecond}, {h1, 2 * time.Second}} {
		t.Run(fmt.Sprintf("to %s with %v downtime", step.to.Name, step.downtime), func(t *testing.T) {
			acct := startAccount(t, l, c, h1, h2)
			flow, err := l.StartUDPFlow(c, m, step.downtime+6*time.Second, "20M", 200)
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Second)
			migrate(t, l, m, step.to, step.downtime, true)
			res, err := flow.Wait()
			if err != nil {
				t.Fatal(err)
			}
			mig := waitMigrated(t, l, step.to, vipM)
			underlay, tunQueue := acct.finish(t)
			t.Logf("iperf3: %d datagrams, %d lost, %d out of order; flushed %d, forwarded %d, held %d, late %d, handover %v",
				res.Packets, res.Lost, res.OutOfOrder, mig.Flushed, mig.Forwarded, mig.Held, mig.Late, handover(mig))
			if res.Packets < 50000 {
				t.Errorf("only %d datagrams: the stream did not run", res.Packets)
			}
			if mig.Flushed == 0 {
				t.Errorf("nothing flushed: the cache was not used")
			}
			if res.OutOfOrder != 0 {
				logHandBacks(t, l)
			}
			checkFlow(t, res, underlay, tunQueue)
		})
	}
}

// TestWANMigrationTCP moves a VM under an iperf3 TCP stream across the
// WAN: the connection must survive (a reset fails iperf3) and the stall
// the receiver sees is reported.
func TestWANMigrationTCP(t *testing.T) {
	l, m, c := wanMoveLab(t)
	h2 := l.Hosts[1]
	const downtime = 500 * time.Millisecond
	flow, err := l.StartTCPFlow(c, m, 10*time.Second, "50M")
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(3 * time.Second)
	migrate(t, l, m, h2, downtime, true)
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err) // a reset connection fails the client
	}
	mig := waitMigrated(t, l, h2, vipM)
	n := len(res.Intervals)
	if n < 80 {
		t.Fatalf("only %d intervals of %v: %v", n, lab.FlowInterval, res.Intervals)
	}
	var last float64
	for _, b := range res.Intervals[n-20 : n-1] {
		last += b
	}
	if last == 0 {
		t.Fatalf("no data in the last two seconds, well after the move: %v", res.Intervals)
	}
	stall := res.Stall()
	t.Logf("TCP across a %v-downtime move over %v RTT: %.1f MB in %.1f s, longest stall at the receiver %v; flushed %d, held %d, late %d",
		downtime, wanRTT, res.Bytes/1e6, res.Seconds, stall, mig.Flushed, mig.Held, mig.Late)
	// The VM is away for the downtime; the cache delivers what was sent
	// meanwhile, so the sender's window is not lost and no retransmission
	// timeout backs off. Several seconds would mean it was.
	if stall > downtime+2*time.Second {
		t.Errorf("the receiver stalled %v; want well under %v", stall, downtime+2*time.Second)
		if st, err := l.WANStats(); err == nil {
			t.Logf("WAN emulator: %v", st) // a late underlay shows here
		}
	}
}

// TestWANMigrationUnderlayLoss moves a VM while the underlay between
// every pair of sites loses 1 % of packets: the handover must complete,
// and what the flow lost must be what the underlay took from its path.
func TestWANMigrationUnderlayLoss(t *testing.T) {
	l, m, c := wanMoveLab(t)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	acct := startAccount(t, l, c, h1, h2)
	flow, err := l.StartUDPFlow(c, m, 7*time.Second, "20M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	// Lossy from here, once the stream is set up: iperf3 sends its UDP
	// stream's opening datagram and the answer once, without retrying,
	// and the client gives up when one is lost (seen in CI).
	if err := l.SetWANLoss(0.01); err != nil {
		t.Fatal(err)
	}
	migrate(t, l, m, h2, 500*time.Millisecond, true)
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err)
	}
	mig := waitMigrated(t, l, h2, vipM)
	if err := l.SetWANLoss(0); err != nil {
		t.Fatal(err)
	}
	underlay, tunQueue := acct.finish(t)
	t.Logf("iperf3: %d datagrams, %d lost (%.2f %%), %d out of order; the underlay dropped %d on the flow's paths; flushed %d, forwarded %d, held %d, late %d",
		res.Packets, res.Lost, 100*float64(res.Lost)/float64(max(1, res.Packets)), res.OutOfOrder, underlay, mig.Flushed, mig.Forwarded, mig.Held, mig.Late)
	if underlay == 0 {
		t.Errorf("the underlay dropped nothing on the flow's paths: the loss was not applied")
	}
	if mig.Flushed == 0 {
		t.Errorf("nothing flushed: the cache was not used")
	}
	checkFlow(t, res, underlay, tunQueue)
}

// TestWANHandover measures the handover across the WAN in its hardest
// case: the VM already runs at its new host when that host claims it (as
// when libvirt's "started" hook attaches), so nothing hides the time the
// old host's cache takes to arrive. The new host was told beforehand
// (libvirt's "prepare": vmroam migrate prepare) and is connected already;
// from the claim, the first cached packet must be delivered within one
// round trip plus 5 ms.
func TestWANHandover(t *testing.T) {
	l, m, c := wanMoveLab(t)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	var got []time.Duration
	for i, to := range []*lab.Host{h2, h1, h2, h1, h2} {
		ho, res := preparedMove(t, l, m, c, to)
		if res.Lost != 0 || res.OutOfOrder != 0 {
			t.Errorf("move %d: %d lost, %d out of order; want none", i+1, res.Lost, res.OutOfOrder)
		}
		got = append(got, ho)
	}
	slices.Sort(got)
	med := got[len(got)/2]
	// The goal (one round trip and 5 ms) is a speed target, measured by
	// BenchmarkMigration; what must hold on any machine is that the
	// copies the old host sent ahead on the prepared connection were
	// there at the claim: without them the first packet waits for the
	// request's round trip (and an unprepared claim connects first, two
	// round trips).
	goal := wanRTT + 5*time.Millisecond
	t.Logf("handover from the claim across %v RTT: median %v (goal %v: met %v), all %v", wanRTT, med, goal, med <= goal, got)
	if med >= wanRTT {
		t.Errorf("median handover %v: not under a round trip (%v); the copies sent ahead were not used", med, wanRTT)
	}
}

// TestWANSessionsAtJoin: hosts that learn of each other at once across a
// WAN send WireGuard initiations that cross; each answers the other's and
// drops the answer to its own, and WireGuard's own retry comes 5 s later
// (10 s, 16 s if they cross again: without the new handshake, 5 of 6 lab
// starts took 5.5-16.4 s). A migration onto a host in that time has no
// tunnel. The agents start a new handshake from one end after a second
// without a session: every pair must have a session before WireGuard's own
// retry could have made one.
func TestWANSessionsAtJoin(t *testing.T) {
	for i := range 2 {
		t.Run(fmt.Sprint("start", i+1), func(t *testing.T) {
			l := newWANLab(t, 3)
			started := time.Now()
			eventually(t, 4500*time.Millisecond, "every peer has a WireGuard session before WireGuard's 5 s retry", func() error {
				for _, h := range l.Hosts {
					peers := status(t, l, h).Peers
					if len(peers) != len(l.Hosts)-1 {
						return fmt.Errorf("%s has %d peers, want %d", h.Name, len(peers), len(l.Hosts)-1)
					}
					for _, p := range peers {
						if p.LastHandshake == nil {
							return fmt.Errorf("%s has no session with %s", h.Name, p.Name)
						}
					}
				}
				return nil
			})
			t.Logf("every pair has a session %v after the agents started", time.Since(started).Round(time.Millisecond))
			// Each end checks each new session with a round trip
			// (wgagent's checkSession); the peer takes the check
			// quietly.
			waitSessions(t, l)
			for _, h := range l.Hosts {
				if hasLogLine(t, h, "level=WARN", "handover") {
					t.Errorf("%s logged a handover warning: a session check is not quiet", h.Name)
				}
			}
		})
	}
}

// TestPreparedConnectionReplaced: the old host's agent restarts between
// the prepare and the claim, so the prepared connection is dead when the
// claim sends its request on it. The new host must notice at once, connect
// anew and get the cache: nothing lost, and the request on a fresh
// connection, not a wait for the dead one's TCP timeout.
func TestPreparedConnectionReplaced(t *testing.T) {
	l, m, c := migrationLab(t, 3)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	cli(t, l, h2, "migrate", "prepare", vipM.String())
	if err := h1.Agent.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := l.StartAgent(h1); err != nil {
		t.Fatal(err)
	}
	waitOwner(t, l, vipM, h1.Name, 30*time.Second)
	if err := l.WaitPing(c, vipM, 30*time.Second); err != nil {
		t.Fatal(err)
	}
	ho, res := movePrepared(t, l, m, c, h2)
	if res.Lost != 0 || res.OutOfOrder != 0 {
		t.Errorf("%d lost, %d out of order; want none", res.Lost, res.OutOfOrder)
	}
	b, err := os.ReadFile(h2.Agent.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "the prepared connection failed; connecting anew") {
		t.Errorf("h2 did not replace the dead prepared connection (log has no \"connecting anew\")")
	}
	// A dead connection found by TCP_USER_TIMEOUT (2 s), not by the
	// restart's FIN and RST, would show here.
	if ho > time.Second {
		t.Errorf("claim -> first delivery %v: the dead prepared connection was waited for", ho)
	}
}

// preparedMove moves m to `to` as libvirt would with vmroam's hooks, under a
// light UDP flow from c: `to` is told first (migrate prepare), the old host
// caches, the VM runs at `to` before `to` claims it. It returns the time
// from the claim to the first cached packet delivered, and the flow.
func preparedMove(t testing.TB, l *lab.Lab, m, c *lab.VM, to *lab.Host) (time.Duration, lab.FlowResult) {
	t.Helper()
	cli(t, l, to, "migrate", "prepare", vipM.String())
	return movePrepared(t, l, m, c, to)
}

// movePrepared is preparedMove once `to` has been told.
func movePrepared(t testing.TB, l *lab.Lab, m, c *lab.VM, to *lab.Host) (time.Duration, lab.FlowResult) {
	t.Helper()
	from := m.Host
	flow, err := l.StartUDPFlow(c, m, 3*time.Second, "2M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	moveRunningFirst(t, l, m, to)
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err)
	}
	// The old host's hook (libvirt's "release") runs on that host, beside
	// the claim; here the hosts share two cores, and launching the command
	// (ip netns exec, a Go program) in the handover's window added 3 ms to
	// the median handover (47.4 -> 44.5 ms, 7 moves each, the detach at
	// once or 300 ms later). By now the claim has taken the VIP from the
	// old host, so the detach finds nothing to do, as a late hook would.
	cli(t, l, from, "vip", "detach", vipM.String())
	mig := waitMigrated(t, l, to, vipM)
	if mig.Claim == nil || mig.FirstDelivery == nil || mig.FlushStart == nil || mig.CarrierUp == nil {
		t.Fatalf("migration record incomplete: %+v", mig)
	}
	ho := mig.FirstDelivery.Sub(*mig.Claim)
	t.Logf("prepared move to %s: claim->first delivery %v (claim->flush start %v, carrier up %v after the claim), %d of %d flushed came ahead, lost %d, out of order %d",
		to.Name, ho, mig.FlushStart.Sub(*mig.Claim), mig.CarrierUp.Sub(*mig.Claim), mig.Ahead, mig.Flushed, res.Lost, res.OutOfOrder)
	return ho, res
}

// moveRunningFirst moves m (VIP vipM) to `to` in the hardest order: the
// old host caches from the suspend, and the VM runs at `to` before `to`
// claims it (libvirt's "started" hook).
func moveRunningFirst(t testing.TB, l *lab.Lab, m *lab.VM, to *lab.Host) {
	t.Helper()
	cli(t, l, m.Host, "migrate", "suspend", vipM.String())
	if err := l.UnplugVM(m, to); err != nil {
		t.Fatal(err)
	}
	if err := l.ResumeVM(m); err != nil {
		t.Fatal(err)
	}
	cli(t, l, to, "vip", "attach", vipM.String(), "--dev", m.Vif)
}

// TestPreparedCopiesWithdrawn: the old host sends copies of its cache on a
// prepared connection, then the VM stays there (abort): the old host
// delivers its cache itself and withdraws the copies. When the VM then
// does move, nothing is delivered twice (iperf3 counts a duplicate out of
// order) and nothing is lost, and the copies of the second cache arrive
// ahead.
func TestPreparedCopiesWithdrawn(t *testing.T) {
	l, m, c := migrationLab(t, 3)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	cli(t, l, h2, "migrate", "prepare", vipM.String())
	flow, err := l.StartUDPFlow(c, m, 5*time.Second, "2M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	cli(t, l, h1, "migrate", "suspend", vipM.String())
	time.Sleep(300 * time.Millisecond)
	cli(t, l, h1, "migrate", "abort", vipM.String())
	eventually(t, 10*time.Second, "h1 withdrawing the copies", func() error {
		b, err := os.ReadFile(h1.Agent.LogPath)
		if err != nil || !strings.Contains(string(b), "copies withdrawn") {
			return fmt.Errorf("no \"copies withdrawn\" in h1's log (%v)", err)
		}
		return nil
	})
	time.Sleep(time.Second)
	moveRunningFirst(t, l, m, h2)
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err)
	}
	mig := waitMigrated(t, l, h2, vipM)
	t.Logf("%d datagrams, %d lost, %d out of order; at h2 %d flushed, %d of them ahead", res.Packets, res.Lost, res.OutOfOrder, mig.Flushed, mig.Ahead)
	if res.Lost != 0 || res.OutOfOrder != 0 {
		t.Errorf("%d lost, %d out of order; want none", res.Lost, res.OutOfOrder)
	}
	if mig.Ahead == 0 {
		t.Errorf("no copies came ahead for the second suspend")
	}
}
