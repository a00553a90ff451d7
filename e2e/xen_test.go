package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/xenhook/xenstore/xenstoretest"
)

// TestXenstoreSuspend moves a VM whose vif has Xen's name (vif7.0) with the
// suspend announced only the way Xen announces it: libxl writes "suspend"
// to the domain's control/shutdown in xenstore (an in-test xenstored here).
// The agent must start caching at that moment, so that the vif vanishing
// afterwards loses nothing: 0 lost, 0 reordered at 12,500 datagrams/s.
func TestXenstoreSuspend(t *testing.T) {
	xs := xenstoretest.NewServer(t)
	xs.Write("/local/domain/7/name", "web1")
	l := newLabWith(t, 3, fastBinary)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	for _, h := range l.Hosts {
		var extra []string
		if h == h1 {
			extra = []string{"--xenstore", xs.Path()}
		}
		if _, err := l.StartAgent(h, extra...); err != nil {
			t.Fatal(err)
		}
	}
	m, c := addPair(t, l, h1, "vif7.0", h3)
	waitSessions(t, l) // as migrationLab: converged before the migration

	before := takeLossSnapshot(t, l, m, c)
	flow, err := l.StartUDPFlow(c, m, 8*time.Second, "20M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second)
	xs.Write("/local/domain/7/control/shutdown", "suspend")
	// Caching means the kernel routes the VIP to the cache device. (In Xen
	// the vif goes much later: after the memory copy, at the destroy.)
	eventually(t, 10*time.Second, "h1 routing the VIP into its cache after the xenstore suspend", func() error {
		out, err := l.Exec(h1.NS, "ip", "route", "get", vipM.String())
		if err != nil || !strings.Contains(string(out), "dev vmrc0") {
			return fmt.Errorf("route: %v %s", err, out)
		}
		return nil
	})
	// libxl renames the domain once it is suspended; that must not count
	// as a second suspend.
	xs.Write("/local/domain/7/name", "web1--migratedaway")
	if err := l.MigrateVM(m, h2, 500*time.Millisecond, false); err != nil {
		t.Fatal(err)
	}
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err)
	}
	mig := waitMigrated(t, l, h2, vipM)
	t.Logf("iperf3: %d datagrams, %d lost, %d out of order; flushed %d, held %d, delivered %d", res.Packets, res.Lost, res.OutOfOrder, mig.Flushed, mig.Held, mig.Delivered)
	// Lost: none beyond what this 2-core machine's queues dropped for
	// want of CPU (checkMoves names them). Out of order: none, the client
	// is on neither of the VM's hosts.
	checkMoves(t, l, "xenstore suspend", res, 1, before, m, c)
	if res.Packets < 50000 || res.OutOfOrder != 0 {
		t.Errorf("%d datagrams, %d out of order: want >= 50000 and 0", res.Packets, res.OutOfOrder)
		logPaths(t, l, vipM)
	}
	if mig.Flushed == 0 {
		t.Errorf("nothing flushed: the cache was not used")
	}
}

// waitSessions waits until every host has a WireGuard session with every
// peer that passed the agent's check (a round trip through it), as a
// converged cluster has before a migration.
func waitSessions(t testing.TB, l *lab.Lab) {
	t.Helper()
	eventually(t, 30*time.Second, "every peer has a WireGuard session that passed its check", func() error {
		for _, h := range l.Hosts {
			for _, p := range status(t, l, h).Peers {
				if p.LastHandshake == nil {
					return fmt.Errorf("%s has no session with %s", h.Name, p.Name)
				}
				if p.SessionCheck != "passed" {
					return fmt.Errorf("%s's session with %s: check %q", h.Name, p.Name, p.SessionCheck)
				}
			}
		}
		return nil
	})
}

// TestActivationByAnnouncement: with --activation announce the new host
// must not deliver when the VM's interface gets carrier (a Xen vif may
// have it before the domain runs), only once the VM announces itself with
// a gratuitous ARP, as a resumed Linux guest does; and then lose nothing.
func TestActivationByAnnouncement(t *testing.T) {
	l, m, c := migrationLab(t, 3, "--activation", "announce")
	h1, h2 := l.Hosts[0], l.Hosts[1]
	before := takeLossSnapshot(t, l, m, c)
	flow, err := l.StartUDPFlow(c, m, 8*time.Second, "20M", 200)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second)
	cli(t, l, h1, "migrate", "suspend", vipM.String())
	if err := l.UnplugVM(m, h2); err != nil {
		t.Fatal(err)
	}
	cli(t, l, h2, "vip", "attach", vipM.String(), "--dev", m.Vif)
	time.Sleep(300 * time.Millisecond)
	if err := l.ResumeVM(m); err != nil {
		t.Fatal(err)
	}
	resumed := time.Now()
	time.Sleep(300 * time.Millisecond)
	for _, mg := range status(t, l, h2).Migrations {
		if mg.VIP == vipM.String() && mg.FirstDelivery != nil {
			t.Errorf("delivery started at carrier, before the VM announced itself: %+v", mg)
		}
	}
	if err := l.AnnounceVM(m); err != nil {
		t.Fatal(err)
	}
	cli(t, l, h1, "vip", "detach", vipM.String())
	res, err := flow.Wait()
	if err != nil {
		t.Fatal(err)
	}
	mig := waitMigrated(t, l, h2, vipM)
	var after time.Duration
	if mig.CarrierUp != nil {
		after = mig.CarrierUp.Sub(resumed)
	}
	t.Logf("iperf3: %d datagrams, %d lost, %d out of order; activation %q %v after carrier, handover %v",
		res.Packets, res.Lost, res.OutOfOrder, mig.Activation, after, handover(mig))
	// Lost: none beyond what this 2-core machine's queues dropped for
	// want of CPU (checkMoves names them). Out of order: none, the client
	// is on neither of the VM's hosts.
	checkMoves(t, l, "activation by announcement", res, 1, before, m, c)
	if res.Packets < 50000 || res.OutOfOrder != 0 {
		t.Errorf("%d datagrams, %d out of order: want >= 50000 and 0", res.Packets, res.OutOfOrder)
		logPaths(t, l, vipM)
	}
	if mig.Activation != "garp" || after < 300*time.Millisecond {
		t.Errorf("activation %q at %v (carrier at %v): want garp, after the announcement", mig.Activation, mig.CarrierUp, resumed)
	}
}
