package e2e

import (
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

// Faults during a migration (issue 7): agents killed and restarted, the
// underlay cut, a VIP started twice, many moves in a row. Each test checks
// what the VMs receive, not only what the agents say.

// killAgent SIGKILLs h's agent, as a crash would.
func killAgent(t testing.TB, h *lab.Host) {
	t.Helper()
	if err := h.Agent.Kill(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: agent killed", h.Name)
}

// startAgent starts h's agent again with args, on the same data dir.
func startAgent(t testing.TB, l *lab.Lab, h *lab.Host, args ...string) {
	t.Helper()
	if _, err := l.StartAgent(h, args...); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: agent restarted", h.Name)
}

// blockUnderlay drops, in h's namespace, every underlay packet to and
// from the given hosts (the others see nothing, as with a cut link; h's
// own sends to them fail), and returns the function that heals the cut.
// The test's cleanup heals it too.
func blockUnderlay(t testing.TB, l *lab.Lab, h *lab.Host, from ...*lab.Host) (heal func()) {
	t.Helper()
	table := "vmrfault"
	var rules []string
	for _, o := range from {
		rules = append(rules,
			fmt.Sprintf("add rule ip %s in ip saddr %s drop", table, o.Underlay),
			fmt.Sprintf("add rule ip %s out ip daddr %s drop", table, o.Underlay))
	}
	script := strings.Join(append([]string{
		"add table ip " + table,
		"add chain ip " + table + " in { type filter hook input priority -300; }",
		"add chain ip " + table + " out { type filter hook output priority -300; }",
	}, rules...), "\n")
	if out, err := l.Exec(h.NS, "nft", script); err != nil {
		t.Fatalf("%s: nft: %v: %s", h.Name, err, out)
	}
	healed := false
	heal = func() {
		if healed {
			return
		}
		healed = true
		if out, err := l.Exec(h.NS, "nft", "delete table ip "+table); err != nil {
			t.Errorf("%s: heal the underlay: %v: %s", h.Name, err, out)
		}
	}
	t.Cleanup(heal)
	return heal
}

// agentLog is h's agent log, across restarts.
func agentLog(t testing.TB, h *lab.Host) string {
	t.Helper()
	b, err := os.ReadFile(h.Agent.LogPath)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// hasLogLine reports whether a line of h's agent log contains every part.
func hasLogLine(t testing.TB, h *lab.Host, parts ...string) bool {
	t.Helper()
	for _, line := range strings.Split(agentLog(t, h), "\n") {
		if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(line, p) }) {
			return true
		}
	}
	return false
}

// waitOwner waits until every host names owner the owner of vip.
func waitOwner(t testing.TB, l *lab.Lab, vip netip.Addr, owner string, deadline time.Duration) {
	t.Helper()
	eventually(t, deadline, vip.String()+" owned by "+owner+" everywhere", func() error {
		for _, h := range l.Hosts {
			if o := vipOwner(status(t, l, h), vip); o != owner {
				return fmt.Errorf("%s names %q", h.Name, o)
			}
		}
		return nil
	})
}

// checkOneOwner fails unless exactly owner has vip attached (local) and
// every other host routes it away.
func checkOneOwner(t testing.TB, l *lab.Lab, vip netip.Addr, owner string) {
	t.Helper()
	for _, h := range l.Hosts {
		for _, v := range status(t, l, h).VIPs {
			if v.VIP != vip.String() {
				continue
			}
			if v.Local != (h.Name == owner) {
				t.Errorf("%s: %s local=%v (state %s), want local only on %s", h.Name, vip, v.Local, v.State, owner)
			}
		}
	}
}

// lastDestination is h's newest destination record for vip.
func lastDestination(t testing.TB, l *lab.Lab, h *lab.Host, vip netip.Addr) (control.Migration, bool) {
	t.Helper()
	ms := status(t, l, h).Migrations
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].VIP == vip.String() && ms[i].Role == "destination" {
			return ms[i], true
		}
	}
	return control.Migration{}, false
}

// lossRuns describes the runs of lost sequence numbers as times after
// the first ping (interval apart), e.g. "300-900ms (120)".
func lossRuns(st lab.PingStats, interval time.Duration) string {
	var runs []string
	for i := 0; i < len(st.Lost); {
		j := i
		for j+1 < len(st.Lost) && st.Lost[j+1] == st.Lost[j]+1 {
			j++
		}
		runs = append(runs, fmt.Sprintf("%d-%dms (%d)", st.Lost[i]*uint64(interval.Milliseconds()), st.Lost[j]*uint64(interval.Milliseconds()), j-i+1))
		i = j + 1
	}
	return strings.Join(runs, ", ")
}

// waitPingsFlow waits until the pinger's replies grow again: traffic
// reaches the VM after the fault.
func waitPingsFlow(t testing.TB, p *lab.Pinger, deadline time.Duration) {
	t.Helper()
	before := p.Stats().Received
	eventually(t, deadline, "pings answered again", func() error {
		if n := p.Stats().Received; n < before+50 {
			return fmt.Errorf("%d replies since the fault", n-before)
		}
		return nil
	})
}

// TestFaultDoubleStart starts one VIP on two hosts that cannot hear each
// other (a double start across a partition), heals the partition, and
// checks that every host shows the conflict, names the same owner (the
// greater name at equal epochs), that only the owner keeps the VIP, and
// that the conflict is an alarm: a status problem on every host and an
// error in the log.
func TestFaultDoubleStart(t *testing.T) {
	l := newLab(t, 3)
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	vip := netip.MustParseAddr("100.100.30.1")
	vm1, err := l.AddVM("a", h1, vip)
	if err != nil {
		t.Fatal(err)
	}
	vm2, err := l.AddVM("b", h2, vip)
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.AddVM("c", h3, netip.MustParseAddr("100.100.30.3"))
	if err != nil {
		t.Fatal(err)
	}
	cli(t, l, h3, "vip", "attach", "100.100.30.3", "--dev", c.Vif)
	eventually(t, 30*time.Second, "three members everywhere", func() error {
		for _, h := range l.Hosts {
			if n := status(t, l, h).Gossip.Members; n != 3 {
				return fmt.Errorf("%s sees %d members", h.Name, n)
			}
		}
		return nil
	})

	// h2 cut off from everyone: both claims are made at epoch 1.
	heal := blockUnderlay(t, l, h2, h1, h3)
	cli(t, l, h1, "vip", "attach", vip.String(), "--dev", vm1.Vif)
	cli(t, l, h2, "vip", "attach", vip.String(), "--dev", vm2.Vif)
	for _, h := range []*lab.Host{h1, h2} {
		for _, v := range status(t, l, h).VIPs {
			if v.VIP == vip.String() && (v.Owner != h.Name || v.Epoch != 1) {
				t.Fatalf("%s: %s owned by %s at epoch %d before the heal; want itself at 1", h.Name, vip, v.Owner, v.Epoch)
			}
		}
	}
	// Long enough for h1 and h3 to hear h1's claim and for the
	// broadcasts to be spent: only anti-entropy (a rejoin's push/pull)
	// can bring the two claims together.
	eventually(t, 10*time.Second, "h3 learns h1's claim", func() error {
		if o := vipOwner(status(t, l, h3), vip); o != "h1" {
			return fmt.Errorf("h3 names %q", o)
		}
		return nil
	})
	time.Sleep(time.Second)
	heal()

	var want control.Conflict
	eventually(t, 60*time.Second, "the conflict shown everywhere", func() error {
		for _, h := range l.Hosts {
			st := status(t, l, h)
			i := slices.IndexFunc(st.Conflicts, func(c control.Conflict) bool { return c.VIP == vip.String() })
			if i < 0 {
				return fmt.Errorf("%s shows no conflict (owner %q, members %d)", h.Name, vipOwner(st, vip), st.Gossip.Members)
			}
			want = st.Conflicts[i]
		}
		return nil
	})
	if !slices.Equal(want.Owners, []string{"h1", "h2"}) || want.Winner != "h2" || want.Epoch != 1 {
		t.Errorf("conflict %+v: want owners [h1 h2] at epoch 1, winner h2 (the greater name)", want)
	}
	waitOwner(t, l, vip, "h2", 20*time.Second)
	eventually(t, 20*time.Second, "only h2 keeps the VIP", func() error {
		for _, h := range l.Hosts {
			for _, v := range status(t, l, h).VIPs {
				if v.VIP == vip.String() && v.Local != (h == h2) {
					return fmt.Errorf("%s: local=%v state %s", h.Name, v.Local, v.State)
				}
			}
		}
		return nil
	})
	for _, h := range l.Hosts {
		st := status(t, l, h)
		i := slices.IndexFunc(st.Conflicts, func(c control.Conflict) bool { return c.VIP == vip.String() })
		if i < 0 || st.Conflicts[i].Winner != "h2" {
			t.Errorf("%s: conflicts %+v, want %s won by h2", h.Name, st.Conflicts, vip)
		}
		eventually(t, 10*time.Second, h.Name+" raises the alarm in its status", func() error {
			for _, p := range status(t, l, h).Problems {
				if strings.Contains(p, vip.String()) && strings.Contains(p, "h1") && strings.Contains(p, "h2") {
					return nil
				}
			}
			return fmt.Errorf("problems %q", status(t, l, h).Problems)
		})
	}
	if !hasLogLine(t, h1, "level=ERROR", "DUPLICATE OWNER") {
		t.Errorf("h1, the loser, logged no error about the duplicate owner")
	}
	if !hasLogLine(t, h3, "level=ERROR", "VIP claimed twice") {
		t.Errorf("h3, a bystander, logged no error about the conflict")
	}
	if hasLogLine(t, h1, "VM suspended") {
		t.Errorf("h1 took the lost tie for a migration and cached the VIP")
	}
	// h3's client reaches the VIP, at h2.
	if err := l.WaitPing(c, vip, 20*time.Second); err != nil {
		t.Fatal(err)
	}
}

// faultArgs are the agents' flags in the fault tests; a restart uses
// them again.
var faultArgs = []string{"--reconcile-interval", "500ms"}

// TestFaultSourceKilled kills the source's agent (SIGKILL) while it caches
// a suspended VM's packets, and in another run while it forwards the
// stragglers of a flush, and restarts it with the same data dir. The
// destination must give up on the dead source, deliver what it holds,
// report the source's cache lost, and the VIP must converge to it with
// traffic flowing; nothing may reach the VM twice.
func TestFaultSourceKilled(t *testing.T) {
	for _, when := range []string{"caching", "forwarding"} {
		t.Run("while "+when, func(t *testing.T) {
			l, m, c := migrationLab(t, 3, faultArgs...)
			h1, h2 := l.Hosts[0], l.Hosts[1]
			drops0 := wgQueueDrops(l)
			p, err := l.StartPinger(c, vipM, 5*time.Millisecond)
			if err != nil {
				t.Fatal(err)
			}
			t0 := time.Now()
			mark := func(what string) { t.Logf("%s at %v", what, time.Since(t0).Round(time.Millisecond)) }
			time.Sleep(500 * time.Millisecond)
			cli(t, l, h1, "migrate", "suspend", vipM.String())
			if err := l.UnplugVM(m, h2); err != nil {
				t.Fatal(err)
			}
			time.Sleep(300 * time.Millisecond) // ~60 pings cached on h1
			if when == "caching" {
				killAgent(t, h1)
				mark("h1 killed")
			}
			cli(t, l, h2, "vip", "attach", vipM.String(), "--dev", m.Vif)
			mark("h2 claimed")
			if when == "forwarding" {
				eventually(t, 20*time.Second, "h1 forwards stragglers", func() error {
					for _, v := range status(t, l, h1).VIPs {
						if v.VIP == vipM.String() && v.State == "forwarding" {
							return nil
						}
					}
					return fmt.Errorf("not yet")
				})
				killAgent(t, h1)
				mark("h1 killed")
			}
			time.Sleep(300 * time.Millisecond) // the VM is paused
			if err := l.ResumeVM(m); err != nil {
				t.Fatal(err)
			}
			mark("VM resumed on h2")
			startAgent(t, l, h1, faultArgs...)
			mark("h1 restarted")
			mig := waitMigrated(t, l, h2, vipM)
			waitOwner(t, l, vipM, "h2", 30*time.Second)
			checkOneOwner(t, l, vipM, "h2")
			waitPingsFlow(t, p, 30*time.Second)
			st := p.Stop(2 * time.Second)
			t.Logf("pings: %v; longest loss run %d; migration %+v", st, st.LongestLossRun, mig)
			if st.Duplicates != 0 {
				t.Errorf("%d duplicate replies: a packet reached the VM twice", st.Duplicates)
			}
			t.Logf("lost pings (ms after the first, by sequence number): %s; WireGuard TUN queue drops %d (wireguard-go short of CPU, not vmroam)",
				lossRuns(st, 5*time.Millisecond), tunDropsSince(l, drops0))
			switch when {
			case "caching":
				// The whole cache died with the agent.
				if !mig.CacheLost || st.LostCount == 0 {
					t.Errorf("source's cache lost %v, %d pings lost: want it reported lost, and pings lost", mig.CacheLost, st.LostCount)
				}
			case "forwarding":
				// The whole cache came before the kill: only stragglers
				// routed to h1 after it died can be lost.
				if mig.CacheLost {
					t.Errorf("the destination reports the source's cache lost, but its end marker came: %+v", mig)
				}
				if mig.FlushEnd == nil || mig.Done == nil || mig.Done.Sub(*mig.FlushEnd) > 10*time.Second {
					t.Errorf("the destination held on to the dead source's stream too long: %+v", mig)
				}
			}
			if strings.Contains(agentLog(t, h1), "panic") {
				t.Errorf("h1's agent panicked")
			}
		})
	}
}

// TestFaultDestinationKilled kills the destination's agent while it holds
// the arriving VM's packets, and restarts it: the VIP must converge (the
// restarted destination keeps its attachment, or gives it back, but one
// host owns it everywhere), with no routing loop between the hosts and
// traffic reaching the VM again.
func TestFaultDestinationKilled(t *testing.T) {
	l, m, c := migrationLab(t, 3, faultArgs...)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	drops0 := wgQueueDrops(l)
	p, err := l.StartPinger(c, vipM, 5*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond)
	cli(t, l, h1, "migrate", "suspend", vipM.String())
	if err := l.UnplugVM(m, h2); err != nil {
		t.Fatal(err)
	}
	cli(t, l, h2, "vip", "attach", vipM.String(), "--dev", m.Vif)
	eventually(t, 20*time.Second, "h2 holds", func() error {
		for _, v := range status(t, l, h2).VIPs {
			if v.VIP == vipM.String() && v.State == "holding" {
				return nil
			}
		}
		return fmt.Errorf("not yet")
	})
	killAgent(t, h2)
	time.Sleep(300 * time.Millisecond)
	if err := l.ResumeVM(m); err != nil { // the VM runs on h2
		t.Fatal(err)
	}
	startAgent(t, l, h2, faultArgs...)
	cli(t, l, h1, "vip", "detach", vipM.String()) // the old host's hook, after success
	waitOwner(t, l, vipM, "h2", 30*time.Second)
	checkOneOwner(t, l, vipM, "h2")
	waitPingsFlow(t, p, 30*time.Second)
	st := p.Stop(2 * time.Second)
	t.Logf("pings: %v; longest loss run %d; lost (ms after the first, by sequence number): %s; WireGuard TUN queue drops %d",
		st, st.LongestLossRun, lossRuns(st, 5*time.Millisecond), tunDropsSince(l, drops0))
	if st.Duplicates != 0 {
		t.Errorf("%d duplicate replies", st.Duplicates)
	}
	if st.ICMPErrors != nil {
		for k := range st.ICMPErrors {
			if strings.Contains(k, "time exceeded") {
				t.Errorf("a routing loop: %s", k)
			}
		}
	}
	for _, h := range l.Hosts {
		if cs := status(t, l, h).Conflicts; len(cs) != 0 {
			t.Errorf("%s: conflicts %+v after a restart: a duplicate owner", h.Name, cs)
		}
	}
}

// tunDropsSince sums the transmit drops of the hosts' WireGuard devices
// since base (wgQueueDrops).
func tunDropsSince(l *lab.Lab, base map[string]uint64) uint64 {
	return dropsSince(base, wgQueueDrops(l))
}

// dropsSince sums the growth of each counter from base to now; a device
// made anew by a restart counts from 0.
func dropsSince(base, now map[string]uint64) (n uint64) {
	for k, v := range now {
		if v >= base[k] {
			n += v - base[k]
		} else {
			n += v
		}
	}
	return n
}

// peakRSS is the agent's peak resident memory (VmHWM), in bytes.
func peakRSS(t testing.TB, h *lab.Host) uint64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", h.Agent.Pid()))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "VmHWM:" {
			var kb uint64
			fmt.Sscan(f[1], &kb)
			return kb << 10
		}
	}
	t.Fatalf("%s: no VmHWM in /proc/%d/status", h.Name, h.Agent.Pid())
	return 0
}

// lastSource is h's newest finished source record for vip.
func lastSource(t testing.TB, l *lab.Lab, h *lab.Host, vip netip.Addr) (control.Migration, bool) {
	t.Helper()
	ms := status(t, l, h).Migrations
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].VIP == vip.String() && ms[i].Role == "source" && ms[i].Done != nil {
			return ms[i], true
		}
	}
	return control.Migration{}, false
}

// TestFaultPartitionDuringFlush cuts the underlay between the source and
// the destination as the handover starts (the request and the flush of
// a second of cached traffic under way) and heals it 2 s later, while
// 12,500 datagrams a second go to the VM. The flush must resume within
// 12 s of the heal (TCP carries it across the cut; the cut may also catch
// the connect, or WireGuard's handshake, retried every 5 s) or fall back
// (the destination gives the source up and says its cache is lost); memory stays within the
// configured caps (20,000 packets a queue), and every datagram lost is
// one the agents counted.
func TestFaultPartitionDuringFlush(t *testing.T) {
	args := append(slices.Clone(faultArgs), "--cache-max-packets", "20000", "--cache-linger", "5s")
	l, m, c := migrationLab(t, 3, args...)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	drops0 := wgQueueDrops(l)
	// Long enough that a flush resuming seconds after the heal (a lost
	// WireGuard handshake is retried after 5 s) still ends before the
	// stream does: iperf3 counts only what arrives before its end.
	flow, err := l.StartUDPFlow(c, m, 20*time.Second, "20M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	cli(t, l, h1, "migrate", "suspend", vipM.String())
	if err := l.UnplugVM(m, h2); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // 12,500 datagrams cached
	cli(t, l, h2, "vip", "attach", vipM.String(), "--dev", m.Vif)
	heal := blockUnderlay(t, l, h1, h2)
	cut := time.Now()
	time.Sleep(300 * time.Millisecond) // the VM is paused
	if err := l.ResumeVM(m); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Until(cut.Add(2 * time.Second)))
	heal()
	healed := time.Now()
	cli(t, l, h1, "vip", "detach", vipM.String())
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err)
	}
	mig := waitMigrated(t, l, h2, vipM)
	waitOwner(t, l, vipM, "h2", 30*time.Second)
	checkOneOwner(t, l, vipM, "h2")
	src, ok := lastSource(t, l, h1, vipM)
	if !ok {
		t.Fatalf("h1 has no finished source record of %s", vipM)
	}
	tunQueue := tunDropsSince(l, drops0)
	counted := sum(src.Dropped) + sum(mig.Dropped) + mig.Lost
	at := func(p *time.Time) string {
		if p == nil {
			return "-"
		}
		return p.Sub(cut).Round(time.Millisecond).String()
	}
	t.Logf("iperf3: %d datagrams, %d lost, %d out of order; WireGuard TUN queue drops %d", res.Packets, res.Lost, res.OutOfOrder, tunQueue)
	t.Logf("since the cut (healed at %v): claim %s, flush %s..%s, first delivery %s, done %s",
		healed.Sub(cut).Round(time.Millisecond), at(mig.Claim), at(mig.FlushStart), at(mig.FlushEnd), at(mig.FirstDelivery), at(mig.Done))
	t.Logf("source: cached %d, flushed %d, forwarded %d, dropped %v; destination: flushed %d, forwarded %d, held %d, delivered %d, late %d, dropped %v, cache lost %v",
		src.Cached, src.Flushed, src.Forwarded, src.Dropped, mig.Flushed, mig.Forwarded, mig.Held, mig.Delivered, mig.Late, mig.Dropped, mig.CacheLost)
	if mig.CacheLost {
		t.Logf("the flush fell back: the destination gave the source up")
	} else {
		t.Logf("the flush resumed after the heal")
		if mig.FirstDelivery == nil || mig.FirstDelivery.Sub(healed) > 12*time.Second {
			t.Errorf("the VM got its first packet at %s after the cut, more than 12 s after the heal", at(mig.FirstDelivery))
		}
		if uint64(res.Lost) > counted+tunQueue {
			t.Errorf("%d datagrams lost; the agents counted %d dropped and WireGuard's TUN queues %d: some loss is not accounted for", res.Lost, counted, tunQueue)
		}
		if mig.Flushed+mig.Forwarded < src.Flushed+src.Forwarded {
			t.Errorf("the destination received %d of the %d packets the source sent", mig.Flushed+mig.Forwarded, src.Flushed+src.Forwarded)
		}
	}
	if tunQueue > 0 {
		t.Logf("NOTE: WireGuard's TUN queues dropped %d packets: wireguard-go was short of CPU (not vmroam)", tunQueue)
	}
	if res.Packets < 200000 {
		t.Errorf("the receiver accounted for only %d datagrams of 250,000: the stream did not run, or ended while the VM's packets were still held", res.Packets)
	}
	for _, h := range []*lab.Host{h1, h2} {
		peak := peakRSS(t, h)
		t.Logf("%s: agent peak RSS %d MiB", h.Name, peak>>20)
		// 20,000 packets of ~230 bytes a queue is a few MiB; the agent's
		// own baseline is some tens of MiB.
		if peak > 256<<20 {
			t.Errorf("%s: agent peak RSS %d MiB: memory not bounded by the cache caps", h.Name, peak>>20)
		}
	}
}

// longTestsWanted says whether an opt-in long test should run: with
// VMROAM_LONG=1, or when -run names it.
func longTestsWanted(name string) bool {
	if os.Getenv("VMROAM_LONG") == "1" {
		return true
	}
	f := flag.Lookup("test.run")
	return f != nil && strings.Contains(f.Value.String(), name)
}

// udpRcvbufErrors reads the datagrams the kernel of namespace ns dropped
// for a full socket receive buffer, IPv4 and IPv6.
func udpRcvbufErrors(t testing.TB, l *lab.Lab, ns string) uint64 {
	t.Helper()
	out, err := l.Exec(ns, "cat", "/proc/net/snmp", "/proc/net/snmp6")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	var n, found uint64
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) == 2 && f[0] == "Udp6RcvbufErrors":
			var v uint64
			fmt.Sscan(f[1], &v)
			n += v
			found++
		case len(f) == 0 || f[0] != "Udp:":
		case names == nil:
			names = f
		default:
			if i := slices.Index(names, "RcvbufErrors"); i > 0 && i < len(f) {
				var v uint64
				fmt.Sscan(f[i], &v)
				n += v
				found++
			}
		}
	}
	if found != 2 {
		t.Fatalf("%s: no Udp RcvbufErrors in /proc/net/snmp, or no Udp6RcvbufErrors in /proc/net/snmp6", ns)
	}
	return n
}

// afterStreamLoss sums what the agents logged as left in an old host's
// cache after its handover stream closed ("packets reached the old host
// after the stream closed ... count=N"): lost.
func afterStreamLoss(t testing.TB, l *lab.Lab) (n uint64) {
	t.Helper()
	for _, h := range l.Hosts {
		for _, line := range strings.Split(agentLog(t, h), "\n") {
			if !strings.Contains(line, "packets reached the old host after the stream closed") {
				continue
			}
			if _, after, ok := strings.Cut(line, " count="); ok {
				var c uint64
				fmt.Sscan(after, &c)
				n += c
			}
		}
	}
	return n
}

// loadAverage is the machine's 1-minute load average, for the log.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Fields(string(b))[0]
}

// statusOf is status for goroutines: it returns the error.
func statusOf(l *lab.Lab, h *lab.Host) (control.Status, error) {
	var st control.Status
	out, err := l.CLI(h, "status", "--json")
	if err != nil {
		return st, err
	}
	return st, json.Unmarshal(out, &st)
}

// awaitMigrated is waitMigrated for goroutines: it waits until `to` has
// delivered a migration of vip newer than the after-th one it saw, and
// owns the VIP.
func awaitMigrated(l *lab.Lab, to *lab.Host, vip netip.Addr, after time.Time, deadline time.Duration) (control.Migration, error) {
	end := time.Now().Add(deadline)
	for {
		st, err := statusOf(l, to)
		if err == nil {
			local := false
			for _, v := range st.VIPs {
				local = local || v.VIP == vip.String() && v.State == "local"
			}
			for i := len(st.Migrations) - 1; i >= 0; i-- {
				m := st.Migrations[i]
				if m.VIP == vip.String() && m.Role == "destination" && m.Claim != nil && !m.Claim.Before(after) {
					if m.Done != nil && local {
						return m, nil
					}
					break
				}
			}
		}
		if time.Now().After(end) {
			return control.Migration{}, fmt.Errorf("migration of %s to %s not delivered within %v (last error %v)", vip, to.Name, deadline, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// lossSnapshot counts what a run can lose outside vmroam on this loaded
// machine: wireguard-go short of CPU drops packets in its TUN queues
// (tx_dropped) and lets its UDP socket overflow (the hosts' UDP receive
// buffer drops); iperf3 short of CPU lets the VM's overflow. It also
// counts what the agents logged as reaching an old host's cache after its
// straggler stream closed: lost by vmroam (seen before endLinger, at every
// move away from the client's own host).
// In a WAN lab it also counts what the WAN emulator dropped for want of
// room (not its deliberate loss).
type lossSnapshot struct {
	lingerEnd  uint64
	tun        map[string]uint64
	hostRcvbuf uint64
	vmRcvbuf   uint64
	wanDropped uint64
	// unresolved is the kernel's count of packets dropped from a
	// neighbour's queue while it resolved (the fence's queue at a
	// hand-back is one): vmroam's loss, but named. The neighbour tables
	// are the kernel's, shared by all namespaces.
	unresolved uint64
	// links are the drop counters (rx, tx) of every interface of the
	// hosts and the VMs, by "namespace/link/direction": not excused, but
	// a loss they show is named.
	links map[string]uint64
}

// linkDrops reads the rx and tx drop counters of every link in the lab's
// host and VM namespaces.
func linkDrops(l *lab.Lab, vms []*lab.VM) map[string]uint64 {
	out := map[string]uint64{}
	var nss []string
	for _, h := range l.Hosts {
		nss = append(nss, h.NS)
	}
	for _, vm := range vms {
		nss = append(nss, vm.NS)
	}
	for _, ns := range nss {
		b, err := l.Exec(ns, "ip", "-j", "-s", "link", "show")
		if err != nil {
			continue
		}
		var links []struct {
			Name  string `json:"ifname"`
			Stats struct {
				RX struct {
					Dropped uint64 `json:"dropped"`
				} `json:"rx"`
				TX struct {
					Dropped uint64 `json:"dropped"`
				} `json:"tx"`
			} `json:"stats64"`
		}
		if json.Unmarshal(b, &links) != nil {
			continue
		}
		for _, ln := range links {
			out[ns+"/"+ln.Name+"/rx"] = ln.Stats.RX.Dropped
			out[ns+"/"+ln.Name+"/tx"] = ln.Stats.TX.Dropped
		}
	}
	return out
}

// linkDropsSince names the counters that grew since before (a link made
// anew since counts from 0).
func linkDropsSince(before, now map[string]uint64) []string {
	var grew []string
	for k, v := range now {
		switch b := before[k]; {
		case v < b:
			grew = append(grew, fmt.Sprintf("%s +%d (recreated)", k, v))
		case v > b:
			grew = append(grew, fmt.Sprintf("%s +%d", k, v-b))
		}
	}
	slices.Sort(grew)
	return grew
}

func takeLossSnapshot(t testing.TB, l *lab.Lab, vms ...*lab.VM) lossSnapshot {
	t.Helper()
	s := lossSnapshot{tun: wgQueueDrops(l), lingerEnd: afterStreamLoss(t, l)}
	for _, h := range l.Hosts {
		s.hostRcvbuf += udpRcvbufErrors(t, l, h.NS)
	}
	for _, vm := range vms {
		s.vmRcvbuf += udpRcvbufErrors(t, l, vm.NS)
	}
	if st, err := l.WANStats(); err == nil {
		s.wanDropped = st.Dropped
	}
	s.unresolved = neighUnresolvedDiscards("/proc/net/stat/arp_cache") + neighUnresolvedDiscards("/proc/net/stat/ndisc_cache")
	s.links = linkDrops(l, vms)
	return s
}

// neighUnresolvedDiscards sums the unresolved_discards column of a
// /proc/net/stat neighbour table over its per-CPU lines (hexadecimal).
func neighUnresolvedDiscards(path string) (n uint64) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	col := slices.Index(strings.Fields(lines[0]), "unresolved_discards")
	if col < 0 {
		return 0
	}
	for _, line := range lines[1:] {
		if f := strings.Fields(line); col < len(f) {
			v, _ := strconv.ParseUint(f[col], 16, 64)
			n += v
		}
	}
	return n
}

// setAside is what may be set aside from a flow's losses between two
// snapshots, each by name: drops before vmroam could see a packet, in
// the WireGuard TUN queues (the kernel had no room for what was routed
// into wireguard-go) and in the WAN emulator. Nothing else is: a
// datagram a host's or a VM's socket buffer dropped is lost.
func setAside(before, now lossSnapshot) (tun, wan uint64) {
	return dropsSince(before.tun, now.tun), now.wanDropped - before.wanDropped
}

// checkMoves checks the flows of moves migrations since before: nothing
// lost that the TUN queues and the WAN emulator do not explain (setAside),
// nothing left behind in an old host's cache, nothing reordered.
func checkMoves(t testing.TB, l *lab.Lab, what string, res lab.FlowResult, moves int, before lossSnapshot, vms ...*lab.VM) {
	t.Helper()
	now := takeLossSnapshot(t, l, vms...)
	tun, wan := setAside(before, now)
	hostRcvbuf, vmRcvbuf := now.hostRcvbuf-before.hostRcvbuf, now.vmRcvbuf-before.vmRcvbuf
	lingerEnd := now.lingerEnd - before.lingerEnd
	outside := tun + wan
	t.Logf("%s: %d datagrams, %d lost, %d out of order; set aside: WireGuard TUN queue drops %d, WAN emulator's %d; counted as lost: hosts' UDP receive buffer drops %d, VMs' %d; left in the old host's cache after its stream closed %d; dropped from the kernel's unresolved-neighbour queues (a fence's) %d",
		what, res.Packets, res.Lost, res.OutOfOrder, tun, wan, hostRcvbuf, vmRcvbuf, lingerEnd, now.unresolved-before.unresolved)
	if grew := linkDropsSince(before.links, now.links); len(grew) > 0 {
		t.Logf("%s: interfaces that dropped meanwhile: %s", what, strings.Join(grew, ", "))
	}
	if lingerEnd > 0 {
		t.Errorf("%s: %d datagrams reached an old host's cache after its straggler stream closed: lost", what, lingerEnd)
	}
	switch lost := uint64(res.Lost); {
	case lost > outside:
		t.Errorf("%s: %d datagrams lost, %d more than WireGuard's TUN queues and the WAN emulator dropped (%d); want none (the VMs' socket buffers dropped %d, the hosts' %d)",
			what, lost, lost-outside, outside, vmRcvbuf, hostRcvbuf)
	case lost > 0:
		t.Logf("NOTE: %d datagrams lost, no more than WireGuard's TUN queues and the WAN emulator dropped: the machine was short of CPU (load %s), not a migration loss",
			lost, loadAverage())
	}
	// The hand-back to the kernel used to reorder a few per move onto the
	// client's own host (wgagent's fence, now stepped between two
	// gateways); nothing may be reordered.
	if res.OutOfOrder > 0 {
		t.Errorf("%s: %d out of order over %d moves; want none", what, res.OutOfOrder, moves)
		logHandBacks(t, l)
	}
}

// moveLoop moves vm n times along hosts (the next one each time) while
// UDP flows from c, each flow ending before the next starts; it checks
// each move's cache counters and returns the flows' totals.
func moveLoop(l *lab.Lab, c, vm *lab.VM, vip netip.Addr, hosts []*lab.Host, n int, bitrate string, logf func(string, ...any)) (total lab.FlowResult, moves int, err error) {
	next := slices.Index(hosts, vm.Host)
	for moves < n {
		// About 5 s a move here; moves stop 8 s before a flow ends.
		flowDur := min(40*time.Second, time.Duration(n-moves)*6*time.Second+10*time.Second)
		flow, err := l.StartUDPFlow(c, vm, flowDur, bitrate, 200)
		if err != nil {
			return total, moves, err
		}
		begun := time.Now()
		ends := begun.Add(flowDur)
		type move struct {
			at       time.Duration
			from, to string
		}
		var flowMoves []move
		time.Sleep(time.Second)
		for moves < n && time.Until(ends) > 8*time.Second {
			next = (next + 1) % len(hosts)
			to := hosts[next]
			t0 := time.Now()
			flowMoves = append(flowMoves, move{t0.Sub(begun), vm.Host.Name, to.Name})
			if err := l.MigrateVM(vm, to, 200*time.Millisecond, true); err != nil {
				return total, moves, err
			}
			mig, err := awaitMigrated(l, to, vip, t0, 60*time.Second)
			if err != nil {
				return total, moves, err
			}
			moves++
			if mig.Late != 0 || sum(mig.Dropped) != 0 || mig.CacheLost {
				return total, moves, fmt.Errorf("move %d of %s to %s: the cache reordered (%d late), dropped (%v) or lost the source's cache (%v)",
					moves, vm.Name, to.Name, mig.Late, mig.Dropped, mig.CacheLost)
			}
			logf("%s move %d to %s in %v: flushed %d, forwarded %d, held %d, delivered %d",
				vm.Name, moves, to.Name, time.Since(t0).Round(time.Millisecond), mig.Flushed, mig.Forwarded, mig.Held, mig.Delivered)
		}
		res, err := flow.Wait()
		if err != nil {
			return total, moves, err
		}
		logf("%s: flow of %d datagrams, %d lost, %d out of order; %d moves so far", vm.Name, res.Packets, res.Lost, res.OutOfOrder, moves)
		// When the losses happened, against the moves (to a FlowInterval,
		// the client's clock ~ the receiver's).
		for i, lost := range res.LostIntervals {
			if lost == 0 {
				continue
			}
			at := time.Duration(i) * lab.FlowInterval
			where := "before any move"
			for _, mv := range flowMoves {
				if mv.at <= at+lab.FlowInterval {
					where = fmt.Sprintf("%v after the move %s -> %s began", (at - mv.at).Round(lab.FlowInterval), mv.from, mv.to)
				}
			}
			logf("%s: %d lost in the interval at %v, %s", vm.Name, lost, at, where)
		}
		total.Packets += res.Packets
		total.Lost += res.Lost
		total.OutOfOrder += res.OutOfOrder
	}
	return total, moves, nil
}

// TestFaultManyMigrations moves one VM 50 times in a row between three
// hosts under an iperf3 UDP stream, then two VMs 10 times each at the
// same time; each move's cache must drop and reorder nothing, and the
// stream lose nothing that wireguard-go short of CPU does not explain.
// Opt-in (VMROAM_LONG=1, or -run naming it): it takes about 5 minutes.
func TestFaultManyMigrations(t *testing.T) {
	if !longTestsWanted("TestFaultManyMigrations") {
		t.Skip("long: set VMROAM_LONG=1 or name it in -run")
	}
	l, m, c := migrationLab(t, 3)
	t.Run("50 moves between three hosts", func(t *testing.T) {
		start, before := time.Now(), takeLossSnapshot(t, l, m)
		res, moves, err := moveLoop(l, c, m, vipM, l.Hosts, 50, "20M", t.Logf)
		if err != nil {
			t.Fatalf("after %d moves: %v", moves, err)
		}
		t.Logf("%d moves in %v", moves, time.Since(start).Round(time.Second))
		checkMoves(t, l, "50 moves", res, moves, before, m)
	})

	t.Run("two VMs moving at once", func(t *testing.T) {
		h1, h2 := l.Hosts[0], l.Hosts[1]
		vip2 := netip.MustParseAddr("100.100.20.2")
		m2, err := l.AddVM("m2", h2, vip2)
		if err != nil {
			t.Fatal(err)
		}
		cli(t, l, h2, "vip", "attach", vip2.String(), "--dev", m2.Vif)
		if err := l.WaitPing(c, vip2, 30*time.Second); err != nil {
			t.Fatal(err)
		}
		if m.Host != h1 && m.Host != h2 {
			migrate(t, l, m, h1, 200*time.Millisecond, true)
			waitMigrated(t, l, h1, vipM)
		}
		type result struct {
			res   lab.FlowResult
			moves int
			err   error
		}
		before := takeLossSnapshot(t, l, m, m2)
		results := make(chan result, 2)
		for _, p := range []struct {
			vm  *lab.VM
			vip netip.Addr
		}{{m, vipM}, {m2, vip2}} {
			go func() {
				// Half the rate each: together as much as one VM above.
				res, moves, err := moveLoop(l, c, p.vm, p.vip, []*lab.Host{h1, h2}, 10, "10M", t.Logf)
				results <- result{res, moves, err}
			}()
		}
		var total lab.FlowResult
		var moves int
		for range 2 {
			r := <-results
			if r.err != nil {
				t.Errorf("after %d moves: %v", r.moves, r.err)
			}
			total.Packets += r.res.Packets
			total.Lost += r.res.Lost
			total.OutOfOrder += r.res.OutOfOrder
			moves += r.moves
		}
		checkMoves(t, l, "two VMs, 10 moves each", total, moves, before, m, m2)
	})
}
