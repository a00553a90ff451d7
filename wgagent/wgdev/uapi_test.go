package wgdev

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/internal/netnstest"
)

// TestUAPIMatchesWgctrl configures an embedded device through its UAPI
// directly and reads it back both ways: wgctrl over the UAPI socket (what
// `wg show` sees) must find what Configure set, and State must read what
// wgctrl reads.
func TestUAPIMatchesWgctrl(t *testing.T) {
	netnstest.Run(t, func() {
		key, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		name := fmt.Sprintf("vmru%d", os.Getpid()%1000000)
		d, err := Open(Config{Name: name, MTU: 1400, Impl: Userspace, PrivateKey: key, ListenPort: 51996})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		client, err := wgctrl.New()
		if err != nil {
			t.Fatal(err)
		}
		defer client.Close()

		p1, _ := wgtypes.GeneratePrivateKey()
		p2, _ := wgtypes.GeneratePrivateKey()
		p3, _ := wgtypes.GeneratePrivateKey()
		psk, _ := wgtypes.GenerateKey()
		ka := 25 * time.Second
		mark := 51
		cidrs := func(s ...string) (out []net.IPNet) {
			for _, c := range s {
				_, n, err := net.ParseCIDR(c)
				if err != nil {
					t.Fatal(err)
				}
				out = append(out, *n)
			}
			return out
		}
		// A v4 prefix as 16 bytes with a 16-byte mask, as some callers
		// build them.
		mapped := net.IPNet{IP: net.ParseIP("100.100.30.0"), Mask: net.CIDRMask(120, 128)}
		err = d.Configure(wgtypes.Config{FirewallMark: &mark, Peers: []wgtypes.PeerConfig{
			{PublicKey: p1.PublicKey(), PresharedKey: &psk, Endpoint: &net.UDPAddr{IP: net.ParseIP("198.18.0.2"), Port: 51820},
				PersistentKeepaliveInterval: &ka, AllowedIPs: append(cidrs("100.100.0.2/32", "fd00:64::2/128"), mapped)},
			{PublicKey: p2.PublicKey(), Endpoint: &net.UDPAddr{IP: net.ParseIP("2001:db8::3"), Port: 51821},
				AllowedIPs: cidrs("100.100.0.3/32")},
			{PublicKey: p3.PublicKey()},
		}})
		if err != nil {
			t.Fatal(err)
		}
		// Changes: p2 replaced allowed IPs, p3 removed, p1 only updated.
		err = d.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{
			{PublicKey: p2.PublicKey(), UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: cidrs("100.100.0.4/32")},
			{PublicKey: p3.PublicKey(), Remove: true},
			{PublicKey: p1.PublicKey(), UpdateOnly: true, AllowedIPs: cidrs("100.100.20.1/32")},
		}})
		if err != nil {
			t.Fatal(err)
		}

		ours, err := d.State()
		if err != nil {
			t.Fatal(err)
		}
		theirs, err := client.Device(name)
		if err != nil {
			t.Fatal(err)
		}
		normalize(ours)
		normalize(theirs)
		if !reflect.DeepEqual(ours, theirs) {
			t.Errorf("State and wgctrl differ:\nours   %+v\nwgctrl %+v", ours, theirs)
		}
		if theirs.FirewallMark != mark || theirs.PublicKey != key.PublicKey() || len(theirs.Peers) != 2 {
			t.Fatalf("wgctrl reads fwmark %d, %d peers", theirs.FirewallMark, len(theirs.Peers))
		}
		want := map[wgtypes.Key][]string{
			p1.PublicKey(): {"100.100.0.2/32", "100.100.20.1/32", "100.100.30.0/24", "fd00:64::2/128"},
			p2.PublicKey(): {"100.100.0.4/32"},
		}
		for _, p := range theirs.Peers {
			if got := prefixStrings(p.AllowedIPs); !slices.Equal(got, want[p.PublicKey]) {
				t.Errorf("peer %s: allowed IPs %v, want %v", p.PublicKey, got, want[p.PublicKey])
			}
			if p.PublicKey == p1.PublicKey() && (p.PresharedKey != psk || p.PersistentKeepaliveInterval != ka || p.Endpoint.String() != "198.18.0.2:51820") {
				t.Errorf("peer 1: psk set %v, keepalive %v, endpoint %v", p.PresharedKey == psk, p.PersistentKeepaliveInterval, p.Endpoint)
			}
			if p.PublicKey == p2.PublicKey() && p.Endpoint.String() != "[2001:db8::3]:51821" {
				t.Errorf("peer 2: endpoint %v", p.Endpoint)
			}
		}
	})
}

// normalize sorts what the two readings may order differently, and drops
// the representation differences net.IP allows.
func normalize(d *wgtypes.Device) {
	slices.SortFunc(d.Peers, func(a, b wgtypes.Peer) int { return strings.Compare(a.PublicKey.String(), b.PublicKey.String()) })
	for i := range d.Peers {
		p := &d.Peers[i]
		var nets []net.IPNet
		for _, s := range prefixStrings(p.AllowedIPs) {
			_, n, _ := net.ParseCIDR(s)
			nets = append(nets, *n)
		}
		p.AllowedIPs = nets
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			p.Endpoint = net.UDPAddrFromAddrPort(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		}
	}
}

func prefixStrings(nets []net.IPNet) []string {
	var out []string
	for _, n := range nets {
		out = append(out, n.String())
	}
	slices.Sort(out)
	return out
}

func TestParseUAPIRefuses(t *testing.T) {
	for _, text := range []string{
		"private_key=zz\n",
		"listen_port=51820\nallowed_ip=10.0.0.1/32\n", // no peer yet
		"public_key=" + strings.Repeat("00", 32) + "\nallowed_ip=10.0.0.1\n",
		"public_key=" + strings.Repeat("00", 31) + "\n",
		"no equals sign\n",
		"errno=1\n",
	} {
		if d, err := parseUAPI("wg0", text); err == nil {
			t.Errorf("parseUAPI(%q) = %+v, want an error", text, d)
		}
	}
}

func TestFormatUAPISetRefuses(t *testing.T) {
	k, _ := wgtypes.GenerateKey()
	bad := []wgtypes.PeerConfig{
		{PublicKey: k, AllowedIPs: []net.IPNet{{IP: net.ParseIP("fd00::1"), Mask: net.CIDRMask(24, 32)}}},
		{PublicKey: k, AllowedIPs: []net.IPNet{{IP: net.ParseIP("10.0.0.1")}}},
		{PublicKey: k, Endpoint: &net.UDPAddr{IP: net.IP{1, 2}, Port: 1}},
	}
	for _, p := range bad {
		if s, err := formatUAPISet(wgtypes.Config{Peers: []wgtypes.PeerConfig{p}}); err == nil {
			t.Errorf("formatUAPISet(%+v) = %q, want an error", p, s)
		}
	}
}

// BenchmarkDeviceState reads an embedded device with three peers as a
// reconcile does (State), against wgctrl over the UAPI socket, which
// State used before.
func BenchmarkDeviceState(b *testing.B) {
	netnstest.Run(b, func() {
		key, _ := wgtypes.GeneratePrivateKey()
		name := fmt.Sprintf("vmrb%d", os.Getpid()%1000000)
		d, err := Open(Config{Name: name, MTU: 1400, Impl: Userspace, PrivateKey: key, ListenPort: 51995})
		if err != nil {
			b.Fatal(err)
		}
		defer d.Close()
		for i := range 3 {
			pk, _ := wgtypes.GeneratePrivateKey()
			_, n, _ := net.ParseCIDR(fmt.Sprintf("100.100.0.%d/32", i+2))
			if err := d.Configure(wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: pk.PublicKey(), AllowedIPs: []net.IPNet{*n}}}}); err != nil {
				b.Fatal(err)
			}
		}
		client, err := wgctrl.New()
		if err != nil {
			b.Fatal(err)
		}
		defer client.Close()
		// Sub-benchmarks run on other goroutines, outside the namespace:
		// neither reading needs it.
		b.Run("State", func(b *testing.B) {
			for b.Loop() {
				if _, err := d.State(); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run("wgctrl", func(b *testing.B) {
			for b.Loop() {
				if _, err := client.Device(name); err != nil {
					b.Fatal(err)
				}
			}
		})
	})
}

// BenchmarkParseUAPI is State's parse alone.
func BenchmarkParseUAPI(b *testing.B) {
	// A fixed answer with three peers, as a reconcile reads it.
	var text strings.Builder
	k, _ := wgtypes.GeneratePrivateKey()
	fmt.Fprintf(&text, "private_key=%x\nlisten_port=51820\n", k[:])
	for i := range 3 {
		p, _ := wgtypes.GenerateKey()
		fmt.Fprintf(&text, "public_key=%x\npreshared_key=%x\nprotocol_version=1\nendpoint=198.18.0.%d:51820\n"+
			"last_handshake_time_sec=1795680000\nlast_handshake_time_nsec=5\ntx_bytes=100\nrx_bytes=200\n"+
			"persistent_keepalive_interval=25\nallowed_ip=100.100.0.%d/32\nallowed_ip=100.100.20.%d/32\n", p[:], make([]byte, 32), i+2, i+2, i+2)
	}
	for b.Loop() {
		if _, err := parseUAPI("wg0", text.String()); err != nil {
			b.Fatal(err)
		}
	}
}
