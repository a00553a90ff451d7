package e2e

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
)

// TestNetworksIsolation declares two virtual networks, runs a VM of each on
// three hosts, and checks in the kernel's own forwarding path that VMs
// reach their own network (on one host and through the tunnel) and nothing
// of the other one, by ICMP, TCP and UDP, in both directions, also right
// after a migration; and that clashing declarations are refused.
func TestNetworksIsolation(t *testing.T) {
	l := newLab(t, 3)
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	blue := netip.MustParsePrefix("100.100.64.0/24")
	red := netip.MustParsePrefix("100.100.65.0/24")
	cli(t, l, h1, "network", "add", "blue", blue.String())
	cli(t, l, h2, "network", "add", "red", red.String())

	t.Run("clashes refused", func(t *testing.T) {
		for _, c := range []struct{ name, cidr, want string }{
			{"green", "100.100.64.128/25", `overlaps network "blue"`},
			{"green", "100.100.0.0/24", "overlay address"},
			{"green", "198.18.0.0/16", "underlay"},
			{"blue", "100.100.66.0/24", "remove it first"},
			{"Bad Name", "100.100.67.0/24", "name"},
		} {
			out, err := l.CLI(h3, "network", "add", c.name, c.cidr)
			if err == nil || !strings.Contains(string(out), c.want) {
				t.Errorf("network add %s %s: %v, %q; want refused with %q", c.name, c.cidr, err, out, c.want)
			}
		}
		// Every host sees both networks and nothing else.
		eventually(t, 30*time.Second, "both networks everywhere", func() error {
			for _, h := range l.Hosts {
				ns := status(t, l, h).Networks
				if len(ns) != 2 || !ns[0].Active || !ns[1].Active {
					return fmt.Errorf("%s: networks %+v", h.Name, ns)
				}
			}
			return nil
		})
	})

	vms := map[string]*lab.VM{}
	for i, h := range l.Hosts {
		for _, net := range []struct {
			name   string
			prefix netip.Prefix
		}{{"blue", blue}, {"red", red}} {
			name := fmt.Sprintf("%s%d", net.name, i+1)
			vip := net.prefix.Addr().Next().Next() // .2 upwards: .1 is not special, just unused
			for range i {
				vip = vip.Next()
			}
			vm, err := l.AddVM(name, h, vip)
			if err != nil {
				t.Fatal(err)
			}
			cli(t, l, h, "vip", "attach", vip.String(), "--dev", vm.Vif)
			vms[name] = vm
		}
	}
	if out, err := l.CLI(h1, "vip", "attach", "100.100.99.1", "--dev", vms["blue1"].Vif); err == nil || !strings.Contains(string(out), "in no virtual network") {
		t.Errorf("attach outside every network: %v, %q; want refused", err, out)
	}

	// Reachable: poll, the tunnels and records settle first.
	reach := func(t *testing.T, from, to *lab.VM) {
		t.Helper()
		if err := l.WaitPing(from, to.VIP4(), 30*time.Second); err != nil {
			t.Errorf("%s -> %s ping: %v", from, to, err)
		}
		for _, proto := range []string{"tcp", "udp"} {
			if err := l.Reach(from, to, to.VIP4(), proto, 5*time.Second); err != nil {
				t.Errorf("%s -> %s: %v", from, to, err)
			}
		}
	}
	// Isolated: each way must fail; a lab that routes nothing would pass
	// this too, which is why every check runs after reach succeeded.
	isolated := func(t *testing.T, a, b *lab.VM) {
		t.Helper()
		for _, p := range [][2]*lab.VM{{a, b}, {b, a}} {
			from, to := p[0], p[1]
			if err := l.Ping(from, to.VIP4(), 3, 2*time.Second); err == nil {
				t.Errorf("%s -> %s: ping got through", from, to)
			}
			for _, proto := range []string{"tcp", "udp"} {
				if err := l.Reach(from, to, to.VIP4(), proto, time.Second); err == nil {
					t.Errorf("%s -> %s: %s got through", from, to, proto)
				}
			}
		}
	}

	t.Run("same network reachable", func(t *testing.T) {
		reach(t, vms["blue1"], vms["blue2"]) // through the tunnel
		reach(t, vms["blue3"], vms["blue1"])
		reach(t, vms["red2"], vms["red3"])
		reach(t, vms["red1"], vms["red3"])
	})
	t.Run("other network dropped", func(t *testing.T) {
		isolated(t, vms["blue1"], vms["red1"]) // on one host
		isolated(t, vms["blue1"], vms["red2"]) // through the tunnel
		isolated(t, vms["red3"], vms["blue2"])
	})
	t.Run("after a migration", func(t *testing.T) {
		if err := l.MigrateVM(vms["blue2"], h3, 200*time.Millisecond, true); err != nil {
			t.Fatal(err)
		}
		reach(t, vms["blue1"], vms["blue2"])
		isolated(t, vms["red3"], vms["blue2"]) // now on one host
		isolated(t, vms["red1"], vms["blue2"])
	})
	t.Run("table repaired and removed", func(t *testing.T) {
		if out, err := l.Exec(h2.NS, "nft", "delete", "table", "inet", "vmroam"); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		eventually(t, 30*time.Second, "vmroam's nftables table back on h2", func() error {
			_, err := l.Exec(h2.NS, "nft", "list", "table", "inet", "vmroam")
			return err
		})
		isolated(t, vms["blue1"], vms["red2"])
		cli(t, l, h3, "network", "remove", "red")
		eventually(t, 30*time.Second, "red gone everywhere", func() error {
			for _, h := range l.Hosts {
				if ns := status(t, l, h).Networks; len(ns) != 1 || ns[0].Name != "blue" {
					return fmt.Errorf("%s: networks %+v", h.Name, ns)
				}
			}
			return nil
		})
		// red's VMs are in no network now: nothing isolates blue from them.
		if err := l.WaitPing(vms["red1"], vms["blue1"].VIP4(), 30*time.Second); err != nil {
			t.Errorf("after removing red: %v", err)
		}
	})
	h1.Agent.Stop()
	if out, err := l.Exec(h1.NS, "nft", "list", "tables"); err != nil || strings.Contains(string(out), "vmroam") {
		t.Errorf("after the agent stopped: %v, %q; want no vmroam table", err, out)
	}
}

// TestAllocateConcurrently asks three hosts for 50 addresses of one small
// network at once: every answer must be distinct and owned, everywhere, by
// the host that gave it, although the hosts race for the same addresses.
func TestAllocateConcurrently(t *testing.T) {
	l := newLabWith(t, 3, fastBinary)
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	pool := netip.MustParsePrefix("100.100.70.0/25") // 126 addresses for 50: races are likely
	cli(t, l, l.Hosts[0], "network", "add", "pool", pool.String())
	eventually(t, 30*time.Second, "the network everywhere", func() error {
		for _, h := range l.Hosts {
			if len(status(t, l, h).Networks) != 1 {
				return fmt.Errorf("%s does not know it yet", h.Name)
			}
		}
		return nil
	})
	type result struct {
		host *lab.Host
		vip  netip.Addr
		err  error
	}
	results := make(chan result, 50)
	for i := range 50 {
		h := l.Hosts[i%3]
		go func() {
			out, err := l.CLI(h, "vip", "allocate", "--network", "pool")
			r := result{host: h, err: err}
			if err == nil {
				r.vip, r.err = netip.ParseAddr(strings.TrimSpace(string(out)))
			}
			if err != nil {
				r.err = fmt.Errorf("%w: %s", err, out)
			}
			results <- r
		}()
	}
	owner := map[netip.Addr]string{}
	for range 50 {
		r := <-results
		if r.err != nil {
			t.Errorf("%s: allocate: %v", r.host.Name, r.err)
			continue
		}
		if !pool.Contains(r.vip) {
			t.Errorf("%s: allocated %s outside %s", r.host.Name, r.vip, pool)
		}
		if prev, dup := owner[r.vip]; dup {
			t.Errorf("%s given to %s and to %s", r.vip, prev, r.host.Name)
		}
		owner[r.vip] = r.host.Name
	}
	t.Logf("%d distinct addresses", len(owner))
	eventually(t, 30*time.Second, "every host agrees on the owners", func() error {
		for _, h := range l.Hosts {
			seen := 0
			for _, v := range status(t, l, h).VIPs {
				addr := netip.MustParseAddr(v.VIP)
				if o, ok := owner[addr]; ok {
					seen++
					if v.Owner != o {
						return fmt.Errorf("%s: %s owned by %q, want %s", h.Name, addr, v.Owner, o)
					}
				}
			}
			if seen != len(owner) {
				return fmt.Errorf("%s knows %d of %d", h.Name, seen, len(owner))
			}
		}
		return nil
	})
}

// TestMSSClamp gives two VMs the usual MTU of 1500 behind a 1420 tunnel:
// the agents' nftables table clamps the MSS of their TCP handshake, so a
// bulk transfer goes through at full size without stalling on a black
// hole and without fragments.
func TestMSSClamp(t *testing.T) {
	l := newLabWith(t, 2, fastBinary)
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	a, err := l.AddVM("a", l.Hosts[0], netip.MustParseAddr("100.100.40.1"))
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddVM("b", l.Hosts[1], netip.MustParseAddr("100.100.40.2"))
	if err != nil {
		t.Fatal(err)
	}
	for _, vm := range []*lab.VM{a, b} {
		for _, c := range [][]string{{vm.NS, "ip", "link", "set", "eth0", "mtu", "1500"}, {vm.Host.NS, "ip", "link", "set", vm.Vif, "mtu", "1500"}} {
			if out, err := l.Exec(c[0], c[1:]...); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
		}
		cli(t, l, vm.Host, "vip", "attach", vm.VIP4().String(), "--dev", vm.Vif)
	}
	if err := l.WaitPing(a, b.VIP4(), 30*time.Second); err != nil {
		t.Fatal(err)
	}
	// The MSS a's kernel uses towards b, read while the transfer runs.
	mss := make(chan string, 1)
	go func() {
		defer close(mss)
		for range 50 {
			time.Sleep(100 * time.Millisecond)
			out, _ := l.Exec(a.NS, "ss", "-tin", "dst", b.VIP4().String())
			if i := strings.Index(string(out), " mss:"); i >= 0 {
				f := strings.Fields(string(out)[i+1:])
				mss <- strings.TrimPrefix(f[0], "mss:")
				return
			}
		}
	}()
	bps, err := l.IperfTCP(a, b, 3*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	got := <-mss
	frags, _ := l.Exec(l.Hosts[0].NS, "nstat", "-az", "IpFragCreates", "IpFragFails")
	t.Logf("TCP a -> b with MTU 1500 VMs: %.0f Mbit/s, MSS %s; host 1: %s", bps/1e6, got, strings.Join(strings.Fields(string(frags)), " "))
	if bps < 10e6 {
		t.Errorf("%.1f Mbit/s: the transfer stalled", bps/1e6)
	}
	if n, err := strconv.Atoi(got); err != nil || n > 1380 {
		t.Errorf("MSS %q: want at most 1380 (tunnel MTU 1420 - 40)", got)
	}
}
