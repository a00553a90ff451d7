package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
)

var (
	vipA  = netip.MustParseAddr("100.100.10.1")
	vipA6 = netip.MustParseAddr("fd76:6d72::a1")
	vipB  = netip.MustParseAddr("100.100.10.2")
	vipB6 = netip.MustParseAddr("fd76:6d72::b1")
)

// TestMesh walks one three-host cluster through the life of a VIP: VMs on
// two hosts reach each other over IPv4 and IPv6, a VIP moves to the third
// host, a killed agent drops out of its peers' WireGuard config and comes
// back with the same key, and the agent repairs what others delete.
func TestMesh(t *testing.T) {
	l := newLab(t, 3)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	a, err := l.AddVM("a", h1, vipA, vipA6)
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddVM("b", h2, vipB, vipB6)
	if err != nil {
		t.Fatal(err)
	}

	step := func(name string, f func(t *testing.T)) {
		if !t.Run(name, f) {
			t.FailNow()
		}
	}

	step("members and peers", func(t *testing.T) {
		eventually(t, 30*time.Second, "every host sees two alive peers", func() error {
			for _, h := range l.Hosts {
				st := status(t, l, h)
				alive := 0
				for _, p := range st.Peers {
					if p.State == "alive" {
						alive++
					}
				}
				if alive != 2 || st.Gossip.Members != 3 {
					return fmt.Errorf("%s: %d alive peers, %d members", h.Name, alive, st.Gossip.Members)
				}
				if !st.Gossip.Encrypted {
					return fmt.Errorf("%s: gossip not encrypted", h.Name)
				}
			}
			return nil
		})
		// Tunnels are warm before any VM sends: a migration must not wait
		// for a handshake.
		waitSessions(t, l)
		// `wg show` (wireguard-tools) sees the same peers as status.
		st2, st3 := status(t, l, h2), status(t, l, h3)
		eventually(t, 10*time.Second, "wg show on h1 lists h2 and h3", func() error {
			got := wgPeers(t, l, h1)
			slices.Sort(got)
			want := []string{st2.PublicKey, st3.PublicKey}
			slices.Sort(want)
			if !slices.Equal(got, want) {
				return fmt.Errorf("wg show peers = %v, want %v", got, want)
			}
			return nil
		})
	})

	step("attach and ping over IPv4 and IPv6", func(t *testing.T) {
		cli(t, l, h1, "vip", "attach", vipA.String(), "--dev", a.Vif)
		cli(t, l, h1, "vip", "attach", vipA6.String(), "--dev", a.Vif)
		cli(t, l, h2, "vip", "attach", vipB.String(), "--dev", b.Vif)
		cli(t, l, h2, "vip", "attach", vipB6.String(), "--dev", b.Vif)
		if err := l.WaitPing(a, vipB, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		if err := l.Ping(b, vipA, 5, 0); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitPing(b, vipA6, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		if err := l.Ping(a, vipB6, 3, 0); err != nil {
			t.Fatal(err)
		}
		// The traffic really went through WireGuard: h1's peer h2 saw a
		// handshake and bytes.
		st := status(t, l, h1)
		p, ok := peerByName(st, "h2")
		if !ok || p.LastHandshake == nil || p.RxBytes == 0 || !slices.Contains(p.VIPs, vipB.String()) {
			t.Fatalf("h1's view of h2 after pings: %+v", p)
		}
		if o := vipOwner(status(t, l, h3), vipA); o != "h1" {
			t.Fatalf("h3 thinks %s is owned by %q", vipA, o)
		}
	})

	step("attach again is a no-op", func(t *testing.T) {
		before := status(t, l, h1)
		cli(t, l, h1, "vip", "attach", vipA.String(), "--dev", a.Vif)
		after := status(t, l, h1)
		if !slices.Equal(before.VIPs, after.VIPs) {
			t.Fatalf("a repeated attach changed the records:\n%v\n%v", before.VIPs, after.VIPs)
		}
	})

	step("bad attach is refused", func(t *testing.T) {
		if out, err := l.CLI(h1, "vip", "attach", "100.100.10.9", "--dev", "nosuchdev0"); err == nil || !strings.Contains(string(out), "nosuchdev0 not found") {
			t.Fatalf("attach on a missing interface: %v %s", err, out)
		}
		if out, err := l.CLI(h1, "vip", "attach", h2.Overlay.Addr().String(), "--dev", a.Vif); err == nil || !strings.Contains(string(out), "overlay address of host h2") {
			t.Fatalf("attach of a host address: %v %s", err, out)
		}
	})

	step("detach and attach elsewhere moves the VIP", func(t *testing.T) {
		cli(t, l, h2, "vip", "detach", vipB.String())
		cli(t, l, h2, "vip", "detach", vipB6.String())
		if err := l.MoveVM(b, h3); err != nil {
			t.Fatal(err)
		}
		cli(t, l, h3, "vip", "attach", vipB.String(), "--dev", b.Vif)
		cli(t, l, h3, "vip", "attach", vipB6.String(), "--dev", b.Vif)
		if err := l.WaitPing(a, vipB, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		if err := l.WaitPing(a, vipB6, 20*time.Second); err != nil {
			t.Fatal(err)
		}
		eventually(t, 10*time.Second, "every host names h3 the owner", func() error {
			for _, h := range l.Hosts {
				if o := vipOwner(status(t, l, h), vipB); o != "h3" {
					return fmt.Errorf("%s: owner %q", h.Name, o)
				}
			}
			return nil
		})
	})

	step("repairs deleted routes, peers and its address", func(t *testing.T) {
		if _, err := l.Exec(h1.NS, "ip", "route", "del", lab.OverlayPrefix.String(), "dev", h1.Iface); err != nil {
			t.Fatal(err)
		}
		k3 := status(t, l, h3).PublicKey
		if _, err := l.Exec(h1.NS, "wg", "set", h1.Iface, "peer", k3, "remove"); err != nil {
			t.Fatal(err)
		}
		addr := netip.PrefixFrom(h1.Overlay.Addr(), 32).String()
		if _, err := l.Exec(h1.NS, "ip", "addr", "del", addr, "dev", h1.Iface); err != nil {
			t.Fatal(err)
		}
		eventually(t, 15*time.Second, "route, peer and address put back", func() error {
			out, err := l.Exec(h1.NS, "ip", "route", "show", lab.OverlayPrefix.String())
			if err != nil || !strings.Contains(string(out), h1.Iface) {
				return fmt.Errorf("route: %q %v", out, err)
			}
			if out, err := l.Exec(h1.NS, "ip", "-o", "addr", "show", "dev", h1.Iface); err != nil || !strings.Contains(string(out), addr) {
				return fmt.Errorf("address %s: %q %v", addr, out, err)
			}
			if !slices.Contains(wgPeers(t, l, h1), k3) {
				return fmt.Errorf("peer h3 missing")
			}
			return nil
		})
		if err := l.WaitPing(a, vipB, 20*time.Second); err != nil {
			t.Fatal(err)
		}
	})

	step("killed agent drops out and comes back with its key", func(t *testing.T) {
		st3 := status(t, l, h3)
		if err := h3.Agent.Kill(); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		eventually(t, 30*time.Second, "h1 and h2 remove h3's peer", func() error {
			for _, h := range []*lab.Host{h1, h2} {
				if slices.Contains(wgPeers(t, l, h), st3.PublicKey) {
					return fmt.Errorf("%s still has h3 as a peer", h.Name)
				}
				if p, _ := peerByName(status(t, l, h), "h3"); p.State != "dead" {
					return fmt.Errorf("%s: h3 is %q", h.Name, p.State)
				}
			}
			return nil
		})
		t.Logf("h3's peer removed %v after SIGKILL", time.Since(start).Round(100*time.Millisecond))

		if _, err := l.StartAgent(h3); err != nil {
			t.Fatal(err)
		}
		if k := status(t, l, h3).PublicKey; k != st3.PublicKey {
			t.Fatalf("public key changed across a restart: %s -> %s", st3.PublicKey, k)
		}
		eventually(t, 30*time.Second, "h1 has h3 back as a peer", func() error {
			if !slices.Contains(wgPeers(t, l, h1), st3.PublicKey) {
				return fmt.Errorf("h3 not a peer of h1")
			}
			return nil
		})
		// h3 kept its VIP across the restart (state in the data dir).
		if err := l.WaitPing(a, vipB, 30*time.Second); err != nil {
			t.Fatal(err)
		}
	})

	step("clean shutdown removes what the agent made", func(t *testing.T) {
		if err := h2.Agent.Stop(); err != nil {
			t.Fatal(err)
		}
		if out, err := l.Exec(h2.NS, "ip", "link", "show", h2.Iface); err == nil {
			t.Fatalf("WireGuard interface left behind: %s", out)
		}
		if out, _ := l.Exec(h2.NS, "ip", "route", "show", "proto", "118"); strings.TrimSpace(string(out)) != "" {
			t.Fatalf("routes left behind: %s", out)
		}
		if _, err := os.Stat(h2.Socket); err == nil {
			t.Fatal("control socket left behind")
		}
		eventually(t, 20*time.Second, "h1 sees h2 leave", func() error {
			if p, _ := peerByName(status(t, l, h1), "h2"); p.State != "left" {
				return fmt.Errorf("h2 is %q", p.State)
			}
			return nil
		})
	})
}

// TestWrongGossipKey checks that an agent with another gossip key cannot
// join, and that the cluster goes on without it.
func TestWrongGossipKey(t *testing.T) {
	l := newLab(t, 3)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	for _, h := range []*lab.Host{h1, h2} {
		if _, err := l.StartAgent(h); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 30*time.Second, "h1 and h2 form a cluster", func() error {
		if n := status(t, l, h1).Gossip.Members; n != 2 {
			return fmt.Errorf("h1 sees %d members", n)
		}
		return nil
	})
	wrong := filepath.Join(l.Dir, "wrong.key")
	out, err := exec.Command(binary, "keygen", "--gossip").Output()
	if err != nil {
		t.Fatal(err)
	}
	key := strings.TrimSpace(string(out))
	if err := os.WriteFile(wrong, []byte(key+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := l.StartAgent(h3, "--encrypt-key-file", wrong); err != nil {
		t.Fatal(err)
	}
	// The intruder keeps trying to join; for several seconds of its tries,
	// nobody may count it as a member.
	end := time.Now().Add(8 * time.Second)
	for time.Now().Before(end) {
		for _, h := range l.Hosts {
			st := status(t, l, h)
			want := 2
			if h == h3 {
				want = 1
			}
			if st.Gossip.Members != want {
				t.Fatalf("%s sees %d members, want %d", h.Name, st.Gossip.Members, want)
			}
			if h != h3 && len(wgPeers(t, l, h)) != 1 {
				t.Fatalf("%s has %d WireGuard peers, want 1", h.Name, len(wgPeers(t, l, h)))
			}
		}
		time.Sleep(500 * time.Millisecond)
	}
	if b, _ := os.ReadFile(h3.Agent.LogPath); !strings.Contains(string(b), "join") {
		t.Errorf("the intruder's log does not mention its failed joins:\n%s", tail(string(b), 20))
	}
}
