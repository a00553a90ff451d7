package e2e

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

var (
	vipM = netip.MustParseAddr("100.100.20.1") // the VM that moves
	vipC = netip.MustParseAddr("100.100.20.3") // the client that sends to it
)

// migrate moves vm from its host to `to` as a live migration does: the VM
// vanishes from its old host, the new host's hook attaches it while it is
// still paused, and after downtime it runs (carrier on its vif).
func migrate(t *testing.T, l *lab.Lab, vm *lab.VM, to *lab.Host, downtime time.Duration) {
	t.Helper()
	from := vm.Host
	if err := l.UnplugVM(vm, to); err != nil {
		t.Fatal(err)
	}
	cli(t, l, to, "vip", "attach", vm.VIPs[0].String(), "--dev", vm.Vif)
	time.Sleep(downtime)
	if err := l.ResumeVM(vm); err != nil {
		t.Fatal(err)
	}
	// Xen's offline hook on the old host comes last, after success.
	cli(t, l, from, "vip", "detach", vm.VIPs[0].String())
}

// waitMigrated waits until `to` has delivered the VIP and owns it.
func waitMigrated(t *testing.T, l *lab.Lab, to *lab.Host, vip netip.Addr) control.Migration {
	t.Helper()
	var last control.Migration
	eventually(t, 30*time.Second, "migration of "+vip.String()+" to "+to.Name+" delivered", func() error {
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

// TestMigrationUDPNoLoss sends 12,500 UDP datagrams a second to a VM while
// it moves from host 1 to host 2 (0.5 s paused) and back (2 s paused), and
// checks with iperf3's own counters that none was lost or reordered.
func TestMigrationUDPNoLoss(t *testing.T) {
	l := newLabWith(t, 3, fastBinary)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	m, err := l.AddVM("m", h1, vipM)
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.AddVM("c", h3, vipC)
	if err != nil {
		t.Fatal(err)
	}
	cli(t, l, h1, "vip", "attach", vipM.String(), "--dev", m.Vif)
	cli(t, l, h3, "vip", "attach", vipC.String(), "--dev", c.Vif)
	if err := l.WaitPing(c, vipM, 30*time.Second); err != nil {
		t.Fatal(err)
	}

	for _, step := range []struct {
		to       *lab.Host
		downtime time.Duration
	}{{h2, 500 * time.Millisecond}, {h1, 2 * time.Second}} {
		name := fmt.Sprintf("to %s with %v downtime", step.to.Name, step.downtime)
		ok := t.Run(name, func(t *testing.T) {
			flow, err := l.StartUDPFlow(c, m, step.downtime+6*time.Second, "20M", 200)
			if err != nil {
				t.Fatal(err)
			}
			time.Sleep(2 * time.Second) // traffic flowing before the move
			migrate(t, l, m, step.to, step.downtime)
			res, err := flow.Wait()
			if err != nil {
				t.Fatal(err)
			}
			mig := waitMigrated(t, l, step.to, vipM)
			if out, err := l.Exec(m.NS, "nstat", "-az", "UdpRcvbufErrors", "UdpInErrors", "IpInDiscards"); err == nil {
				t.Logf("VM m's counters:\n%s", out)
			}
			t.Logf("iperf3: %d datagrams, %d lost, %d out of order; migration %+v", res.Packets, res.Lost, res.OutOfOrder, mig)
			if res.Packets < 50000 {
				t.Errorf("only %d datagrams: the stream did not run", res.Packets)
			}
			if res.Lost != 0 || res.OutOfOrder != 0 {
				t.Errorf("lost %d, out of order %d: want 0 and 0", res.Lost, res.OutOfOrder)
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
