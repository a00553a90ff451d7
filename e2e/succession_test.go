package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

// step is one event of a randomized schedule: a move to another host, or
// an abort (the VM pauses, its host caches, and it runs on where it was).
type step struct {
	abort    bool
	to       int           // index into the lab's hosts (a move)
	downtime time.Duration // the VM paused
	gap      time.Duration // from the VM running again to the next step
}

func (s step) String() string {
	if s.abort {
		return fmt.Sprintf("abort after %v, then %v", s.downtime.Round(time.Millisecond), s.gap.Round(time.Millisecond))
	}
	return fmt.Sprintf("to h%d with %v down, then %v", s.to+1, s.downtime.Round(time.Millisecond), s.gap.Round(time.Millisecond))
}

// schedule draws n steps for a VM starting on host `at` of hosts: gaps
// 0.2-3 s, downtimes 0.1-2 s, a random other host each move (back to the
// one just left as likely as any), one step in seven an abort.
func schedule(r *rand.Rand, n, hosts, at int) []step {
	out := make([]step, n)
	for i := range out {
		s := step{
			downtime: 100*time.Millisecond + time.Duration(r.Int64N(int64(1900*time.Millisecond))),
			gap:      200*time.Millisecond + time.Duration(r.Int64N(int64(2800*time.Millisecond))),
		}
		if r.IntN(7) == 0 {
			s.abort = true
		} else {
			s.to = (at + 1 + r.IntN(hosts-1)) % hosts
			at = s.to
		}
		out[i] = s
	}
	return out
}

// scheduleSeed is VMROAM_SEED if set (to replay a failure), else a new one.
func scheduleSeed(t testing.TB) uint64 {
	if s := os.Getenv("VMROAM_SEED"); s != "" {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("VMROAM_SEED=%q: %v", s, err)
		}
		return n
	}
	return uint64(time.Now().UnixNano())
}

// TestMovesInQuickSuccession moves a VM around three hosts on a seeded
// random schedule (moves and aborts at any point of the one before: while
// the new host holds, delivers, or the old one streams) under UDP both
// ways, 12,500 datagrams/s into the VM and 3,125/s out of it, and checks
// that nothing was lost beyond what the TUN queues dropped and nothing
// reordered, in either direction. 30 steps; 300 with VMROAM_LONG=1;
// VMROAM_MOVES sets the count, VMROAM_SEED replays a schedule.
//
// Opt-in (VMROAM_SUCCESSION=1) until it passes: today a move that starts
// while the old host still delivers an abort's cache, or within about a
// second of the previous move, fails it ("still attached here" at the old
// host's detach; issue 19).
func TestMovesInQuickSuccession(t *testing.T) {
	if os.Getenv("VMROAM_SUCCESSION") != "1" && os.Getenv("VMROAM_LONG") != "1" {
		t.Skip("known to fail (issue 19): set VMROAM_SUCCESSION=1 to run it")
	}
	n := 30
	if os.Getenv("VMROAM_LONG") == "1" {
		n = 300
	}
	if s := os.Getenv("VMROAM_MOVES"); s != "" {
		var err error
		if n, err = strconv.Atoi(s); err != nil || n < 1 {
			t.Fatalf("VMROAM_MOVES=%q: want a positive count", s)
		}
	}
	seed := scheduleSeed(t)
	l, m, c := migrationLab(t, 3)
	steps := schedule(rand.New(rand.NewPCG(seed, 0)), n, len(l.Hosts), 0)
	var total time.Duration
	for _, s := range steps {
		total += s.downtime + s.gap + 150*time.Millisecond // the hooks' commands
	}
	t.Logf("seed=%d (VMROAM_SEED=%d replays it): %d steps, about %v", seed, seed, n, total.Round(time.Second))

	before := takeLossSnapshot(t, l, m, c)
	flows := startBothWays(t, l, c, m, total+6*time.Second)
	begun := time.Now()
	time.Sleep(2 * time.Second)
	var log []string
	for i, s := range steps {
		at := time.Since(begun).Round(time.Millisecond)
		from := m.Host
		if s.abort {
			abortMove(t, l, m, s.downtime, seed)
		} else if err := l.MigrateVM(m, l.Hosts[s.to], s.downtime, true); err != nil {
			t.Fatalf("seed=%d step %d (%v): %v", seed, i+1, s, err)
		}
		log = append(log, fmt.Sprintf("%d at %v from %s: %v", i+1, at, from.Name, s))
		time.Sleep(s.gap)
	}
	resIn, resOut := flows.wait(t, fmt.Sprintf("seed=%d: ", seed))
	if last := steps[len(steps)-1]; !last.abort {
		waitMigrated(t, l, m.Host, vipM)
	}
	checkOneOwner(t, l, vipM, m.Host.Name)

	// Every migration record of the VIP on every host: what the cache
	// itself says it lost, dropped or delivered late.
	var problems []string
	for _, h := range l.Hosts {
		for _, mig := range status(t, l, h).Migrations {
			if mig.VIP != vipM.String() {
				continue
			}
			if p := migrationProblem(mig); p != "" {
				problems = append(problems, fmt.Sprintf("%s %s %s->%s epoch %d: %s", h.Name, mig.Role, mig.From, mig.To, mig.Epoch, p))
			}
		}
	}
	now := takeLossSnapshot(t, l, m, c)
	tun, wan := setAside(before, now)
	lost := resIn.Lost + resOut.Lost
	reordered := resIn.OutOfOrder + resOut.OutOfOrder
	t.Logf("seed=%d: into the VM %d datagrams, %d lost, %d out of order; out of it %d, %d lost, %d out of order; set aside: TUN queue drops %d, WAN %d; socket buffer drops (lost): VMs %d, hosts %d",
		seed, resIn.Packets, resIn.Lost, resIn.OutOfOrder, resOut.Packets, resOut.Lost, resOut.OutOfOrder,
		tun, wan, now.vmRcvbuf-before.vmRcvbuf, now.hostRcvbuf-before.hostRcvbuf)
	bad := uint64(lost) > tun+wan || reordered != 0 || len(problems) > 0
	if bad {
		t.Logf("seed=%d schedule:\n%s", seed, strings.Join(log, "\n"))
		for name, res := range map[string]lab.FlowResult{"into the VM": resIn, "out of it": resOut} {
			for i, n := range res.LostIntervals {
				if n != 0 {
					t.Logf("%s: %d lost in the interval at %v", name, n, time.Duration(i)*lab.FlowInterval)
				}
			}
		}
		if grew := linkDropsSince(before.links, now.links); len(grew) > 0 {
			t.Logf("interfaces that dropped: %s", strings.Join(grew, ", "))
		}
	}
	if uint64(lost) > tun+wan {
		t.Errorf("seed=%d: %d datagrams lost (%d into the VM, %d out of it), %d more than the TUN queues and the WAN dropped; want none",
			seed, lost, resIn.Lost, resOut.Lost, uint64(lost)-tun-wan)
	}
	if reordered != 0 {
		t.Errorf("seed=%d: %d out of order (%d into the VM, %d out of it); want none", seed, reordered, resIn.OutOfOrder, resOut.OutOfOrder)
	}
	for _, p := range problems {
		t.Errorf("seed=%d: %s", seed, p)
	}
}

// abortMove pauses vm on its host, has the host cache its traffic as for
// a move, then lets it run on there and aborts the migration, as a failed
// live migration does.
func abortMove(t *testing.T, l *lab.Lab, vm *lab.VM, downtime time.Duration, seed uint64) {
	t.Helper()
	if err := l.FreezeVM(vm); err != nil {
		t.Fatalf("seed=%d: %v", seed, err)
	}
	if _, err := l.CLI(vm.Host, "migrate", "suspend", vipM.String()); err != nil {
		t.Fatalf("seed=%d: %v", seed, err)
	}
	time.Sleep(downtime)
	// The source domain runs again, then its hook tells vmroam.
	if err := l.ThawVM(vm); err != nil {
		t.Fatalf("seed=%d: %v", seed, err)
	}
	if _, err := l.CLI(vm.Host, "migrate", "abort", vipM.String()); err != nil {
		t.Fatalf("seed=%d: %v", seed, err)
	}
}

// migrationProblem says what a migration record shows went wrong, or "".
func migrationProblem(m control.Migration) string {
	var p []string
	if m.Lost != 0 {
		p = append(p, fmt.Sprintf("lost %d", m.Lost))
	}
	if m.CacheLost {
		p = append(p, "the old host's cache was lost")
	}
	if m.Late != 0 {
		p = append(p, fmt.Sprintf("%d late (reordered)", m.Late))
	}
	if d := sum(m.Dropped); d != 0 {
		p = append(p, fmt.Sprintf("dropped %v", m.Dropped))
	}
	if m.TimedOut {
		p = append(p, "timed out")
	}
	return strings.Join(p, ", ")
}
