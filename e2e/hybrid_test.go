package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
)

// TestHybridPaths runs two trusted hosts in site dc1 and one in dc2: VIPs of
// dc1's hosts go over the LAN between them, everything to or from dc2
// through WireGuard; a VM that migrates across the site boundary and back
// switches path each time, under a UDP stream that loses nothing.
func TestHybridPaths(t *testing.T) {
	l, a, b := hybridLab(t)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]

	// pathTo waits until h1 routes vm's VIP the way want says.
	pathTo := func(vm *lab.VM, want string) {
		t.Helper()
		eventually(t, 30*time.Second, fmt.Sprintf("h1 reaching %s by %s", vm, want), func() error {
			out, err := l.Exec(h1.NS, "ip", "route", "get", vm.VIP4().String())
			if err != nil {
				return err
			}
			lan := strings.Contains(string(out), "dev eth0")
			tunnel := strings.Contains(string(out), "dev "+h1.Iface)
			if (want == "lan" && !lan) || (want == "tunnel" && !tunnel) {
				return fmt.Errorf("route: %s", out)
			}
			return nil
		})
	}
	pathTo(b, "lan")
	peers := map[string]string{}
	for _, p := range status(t, l, h1).Peers {
		peers[p.Name] = p.Path
	}
	if peers["h2"] != "lan" || peers["h3"] != "tunnel" {
		t.Errorf("h1's peer paths: %v; want h2 lan, h3 tunnel", peers)
	}

	for _, step := range []struct {
		to   *lab.Host
		path string
	}{{h3, "tunnel"}, {h2, "lan"}} {
		queues := wgQueueDrops(l)
		flow, err := l.StartUDPFlow(a, b, 6*time.Second, "20M", 200)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second)
		if err := l.MigrateVM(b, step.to, 300*time.Millisecond, true); err != nil {
			t.Fatal(err)
		}
		res, err := flow.Wait()
		if err != nil {
			t.Fatal(err)
		}
		mig := waitMigrated(t, l, step.to, b.VIP4())
		pathTo(b, step.path)
		t.Logf("to %s (%s): %d datagrams, %d lost, %d out of order; flushed %d, forwarded %d, held %d, late %d", step.to.Name, step.path, res.Packets, res.Lost, res.OutOfOrder, mig.Flushed, mig.Forwarded, mig.Held, mig.Late)
		if lost := lostBeyondQueues(t, res.Lost, tunDropsSince(l, queues)); res.Packets < 40000 || lost != 0 {
			t.Errorf("move to %s: %d datagrams, %d lost: want 0 lost", step.to.Name, res.Packets, lost)
		}
		if mig.Late != 0 {
			t.Errorf("move to %s: the cache delivered %d packets late", step.to.Name, mig.Late)
		}
		if res.OutOfOrder > 0 {
			t.Errorf("move to %s: %d out of order; want none", step.to.Name, res.OutOfOrder)
			logHandBacks(t, l)
		}
	}
}

// hybridLab starts TestHybridPaths' lab: h1 and h2 trusted hosts of site
// dc1, h3 of dc2; a VM b on h2 and its client a on h1, attached, with
// sessions.
func hybridLab(t testing.TB) (l *lab.Lab, a, b *lab.VM) {
	t.Helper()
	l = newLabWith(t, 3, fastBinary)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	for _, h := range l.Hosts {
		site := "dc1"
		if h == h3 {
			site = "dc2"
		}
		if _, err := l.StartAgent(h, "--site", site, "--trusted-site"); err != nil {
			t.Fatal(err)
		}
	}
	b, a = addPairWith(t, l, h2, "", netip.MustParseAddr("100.100.30.2"), h1, netip.MustParseAddr("100.100.30.1"))
	return l, a, b
}

// TestHybridMovesUnderLoad moves b between h2 (its sender's site, over the
// LAN) and h3 (through the tunnel) ten times while two busy loops load the
// machine. Under load, embedded wireguard-go reads what the kernel queued
// for it late: packets queued before the sender's host moved the VIP from
// the tunnel to the LAN went to the new host through the tunnel, behind
// newer ones over the LAN (163 out of order in 30 such moves), until the
// reconcile waited for its read barrier between route and peer changes.
func TestHybridMovesUnderLoad(t *testing.T) {
	l, a, b := hybridLab(t)
	stop := cpuHogs(2)
	defer stop()
	before := takeLossSnapshot(t, l, b)
	res, moves, err := moveLoop(l, a, b, b.VIP4(), []*lab.Host{l.Hosts[1], l.Hosts[2]}, 10, "20M", t.Logf)
	stop()
	if err != nil {
		t.Fatal(err)
	}
	checkMoves(t, l, "10 hybrid moves under load", res, moves, before, b)
}

// cpuHogs keeps n goroutines busy until stop is called (more than once
// is fine).
func cpuHogs(n int) (stop func()) {
	done := make(chan struct{})
	for range n {
		go func() {
			for {
				select {
				case <-done:
					return
				default:
				}
			}
		}()
	}
	var once sync.Once
	return func() { once.Do(func() { close(done) }) }
}
