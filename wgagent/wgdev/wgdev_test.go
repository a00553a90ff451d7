package wgdev

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/internal/netnstest"
)

func TestParseImpl(t *testing.T) {
	for _, s := range []string{"auto", "kernel", "userspace"} {
		if _, err := ParseImpl(s); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	if _, err := ParseImpl("magic"); err == nil {
		t.Error("magic accepted")
	}
}

func TestOpenUserspace(t *testing.T) {
	netnstest.Run(t, func() {
		key, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		// UAPI sockets are shared by every namespace: make the name unique.
		name := fmt.Sprintf("vmrt%d", os.Getpid()%1000000)
		d, err := Open(Config{Name: name, MTU: 1400, Impl: Auto, PrivateKey: key, ListenPort: 51999})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		if _, err := Open(Config{Name: name, MTU: 1400, Impl: Userspace, PrivateKey: key, ListenPort: 51998}); err == nil {
			t.Fatal("a second device took the same name")
		}
		link, err := netlink.LinkByName(name)
		if err != nil {
			t.Fatal(err)
		}
		if link.Attrs().MTU != 1400 || link.Attrs().Flags&1 == 0 {
			t.Errorf("link MTU %d flags %v", link.Attrs().MTU, link.Attrs().Flags)
		}
		if q := link.Attrs().TxQLen; q != userspaceTxQueueLen {
			t.Errorf("TUN transmit queue %d packets, want %d (a resuming VM's burst)", q, userspaceTxQueueLen)
		}
		st, err := d.State()
		if err != nil {
			t.Fatal(err)
		}
		if st.PrivateKey != key || st.ListenPort != 51999 {
			t.Errorf("device state: port %d, key match %v", st.ListenPort, st.PrivateKey == key)
		}
		peer, _ := wgtypes.GeneratePrivateKey()
		if err := d.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: peer.PublicKey()}}}); err != nil {
			t.Fatal(err)
		}
		if st, _ = d.State(); len(st.Peers) != 1 {
			t.Errorf("peers after configure: %d", len(st.Peers))
		}
		// Taking one prefix off a peer keeps the others, without a
		// replace in between.
		pfx := func(s ...string) (out []net.IPNet) {
			for _, p := range s {
				_, n, _ := net.ParseCIDR(p)
				out = append(out, *n)
			}
			return out
		}
		if err := d.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: peer.PublicKey(), UpdateOnly: true,
			AllowedIPs: pfx("100.100.0.9/32", "100.100.20.1/32", "100.100.20.2/32")}}}); err != nil {
			t.Fatal(err)
		}
		keep := []netip.Prefix{netip.MustParsePrefix("100.100.0.9/32"), netip.MustParsePrefix("100.100.20.2/32")}
		if err := d.RemoveAllowedIPs(peer.PublicKey(), []netip.Prefix{netip.MustParsePrefix("100.100.20.1/32")}, keep); err != nil {
			t.Fatal(err)
		}
		st, _ = d.State()
		var got []string
		for _, n := range st.Peers[0].AllowedIPs {
			got = append(got, n.String())
		}
		slices.Sort(got)
		if want := []string{"100.100.0.9/32", "100.100.20.2/32"}; !slices.Equal(got, want) {
			t.Errorf("allowed IPs after removing one: %v, want %v", got, want)
		}
		// The read barrier's packet goes through the kernel's routing: the
		// interface has no address and no route, only the socket bound
		// to it.
		for range 3 {
			if err := d.ReadBarrier(2 * time.Second); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := netlink.LinkByName(name); err == nil {
			t.Error("interface left after Close")
		}
		if _, err := os.Stat(uapiSocketPath(name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("UAPI socket left after Close: %v", err)
		}
		if err := d.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
}

func TestKernelUnavailableIsClear(t *testing.T) {
	netnstest.Run(t, func() {
		key, _ := wgtypes.GeneratePrivateKey()
		d, err := Open(Config{Name: "vmrktest0", MTU: 1420, Impl: Kernel, PrivateKey: key, ListenPort: 51997})
		if err == nil {
			// This host has the module: the kernel path works, check it.
			defer d.Close()
			if d.Impl() != Kernel {
				t.Fatalf("impl %s", d.Impl())
			}
			return
		}
		if !errors.Is(err, ErrKernelUnsupported) {
			t.Fatalf("kernel WireGuard missing, but the error does not say so: %v", err)
		}
		if _, lerr := netlink.LinkByName("vmrktest0"); lerr == nil {
			t.Fatal("a failed Open left an interface")
		}
	})
}

func TestBadConfig(t *testing.T) {
	if _, err := Open(Config{Name: "averyveryverylongname", MTU: 1420}); err == nil {
		t.Error("long name accepted")
	}
	if _, err := Open(Config{Name: "x", MTU: 100}); err == nil {
		t.Error("MTU 100 accepted")
	}
}
