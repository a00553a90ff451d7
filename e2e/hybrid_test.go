package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
)

// TestHybridPaths runs two trusted hosts in site dc1 and one in dc2: VIPs of
// dc1's hosts go over the LAN between them, everything to or from dc2
// through WireGuard; a VM that migrates across the site boundary and back
// switches path each time, under a UDP stream that loses nothing.
func TestHybridPaths(t *testing.T) {
	l := newLabWith(t, 3, fastBinary)
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
	a, err := l.AddVM("a", h1, netip.MustParseAddr("100.100.30.1"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddVM("b", h2, netip.MustParseAddr("100.100.30.2"))
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []*lab.VM{a, b} {
		cli(t, l, vm.Host, "vip", "attach", vm.VIP4().String(), "--dev", vm.Vif)
	}
	if err := l.WaitPing(a, b.VIP4(), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	waitSessions(t, l)

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
		// Known gap: a move onto a host whose sender is on the LAN (its
		// packets arrive in eth0's softirq, not through wireguard-go) still
		// reorders some now and then: 13 in 1 of 5 quiet runs before the
		// fence stepped between two gateways, 17 and 77 in two CI runs
		// after it (a local sender's, which looked the same, went from 0-34
		// per 50 moves to none in 200). Not explained yet; bounded at a
		// fence queue's worth (as the local sender's was) and reported.
		if res.OutOfOrder > 150 {
			t.Errorf("move to %s: %d out of order, more than the known gap", step.to.Name, res.OutOfOrder)
		} else if res.OutOfOrder > 0 {
			t.Logf("KNOWN GAP: %d out of order with a sender on the LAN", res.OutOfOrder)
		}
		if res.OutOfOrder > 0 {
			logHandBacks(t, l)
		}
	}
}
