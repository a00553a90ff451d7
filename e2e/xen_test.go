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
	m, err := l.AddVMWithVif("m", "vif7.0", h1, vipM)
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.AddVM("c", h3, vipC)
	if err != nil {
		t.Fatal(err)
	}
	attachPair(t, l, m, c)

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
	if res.Packets < 50000 || res.Lost != 0 || res.OutOfOrder != 0 {
		t.Errorf("%d datagrams, %d lost, %d out of order: want >= 50000, 0 and 0", res.Packets, res.Lost, res.OutOfOrder)
	}
	if mig.Flushed == 0 {
		t.Errorf("nothing flushed: the cache was not used")
	}
}

// waitSessions waits until every host has a WireGuard session with every
// peer, as a converged cluster has before a migration.
func waitSessions(t testing.TB, l *lab.Lab) {
	t.Helper()
	eventually(t, 30*time.Second, "every peer has a WireGuard session", func() error {
		for _, h := range l.Hosts {
			for _, p := range status(t, l, h).Peers {
				if p.LastHandshake == nil {
					return fmt.Errorf("%s has no session with %s", h.Name, p.Name)
				}
			}
		}
		return nil
	})
}
