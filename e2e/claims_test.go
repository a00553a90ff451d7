package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/doctor"
)

// hostileEnv, set in the test binary's environment, makes it the hostile
// member of TestHostileClaims instead of running tests (see TestMain).
const hostileEnv = "VMROAM_E2E_HOSTILE"

// hostileSpec is what the hostile member is told, as JSON in hostileEnv.
type hostileSpec struct {
	Name    string       // member name
	Bind    netip.Addr   // its underlay address (the namespace's)
	Address netip.Addr   // the overlay address it announces
	KeyFile string       // the cluster's gossip key
	Join    []string     // members to join
	Members int          // alive members, itself included, to wait for
	Claims  []netip.Addr // VIPs to claim once they are all there
}

// runHostile is the hostile member: a gossip participant built from the
// project's own gossip package, holding the key, announcing a WireGuard key
// and endpoint of its own, that claims spec.Claims as any agent would claim
// a VIP. It runs until SIGTERM.
func runHostile(specJSON string) error {
	var spec hostileSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		return fmt.Errorf("hostile: spec: %w", err)
	}
	keys, err := gossip.LoadKeyFile(spec.KeyFile)
	if err != nil {
		return fmt.Errorf("hostile: %w", err)
	}
	wk, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return fmt.Errorf("hostile: WireGuard key: %w", err)
	}
	cfg := gossip.DefaultConfig()
	cfg.Name, cfg.BindAddr, cfg.BindPort, cfg.Keys = spec.Name, spec.Bind, lab.GossipPort, keys
	cfg.Meta = gossip.Meta{Version: gossip.ProtocolVersion, PublicKey: wk.PublicKey(),
		Endpoint: netip.AddrPortFrom(spec.Bind, 51820), Address: spec.Address}
	c, err := gossip.New(cfg)
	if err != nil {
		return fmt.Errorf("hostile: %w", err)
	}
	defer c.Shutdown()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	c.Join(ctx, spec.Join)
	for c.Stats().Members < spec.Members {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
	for _, vip := range spec.Claims {
		r := c.Claim(vip)
		fmt.Printf("hostile: claimed %s at epoch %d\n", vip, r.Epoch)
	}
	fmt.Printf("hostile: public key %s\n", wk.PublicKey())
	<-ctx.Done()
	return nil
}

// TestHostileClaims: a member holding the gossip key (h4's namespace runs
// no agent but this test's own gossip participant) claims what no VM may
// be: another host's overlay address, a host's underlay address, loopback,
// the metadata service's link-local address and an address outside
// --vip-prefixes, and, to show its records do arrive, one good VIP. No
// host routes any of the five anywhere, no peer's AllowedIPs take them,
// gossip and tunnels stay up, and every host shows each refusal, naming
// the claimer, in status, doctor and vmroam_records_refused. A host that
// attaches its own or another host's address, or a VM on its underlay
// interface, gets an error that says why; detaching a cached VIP says what
// happens to it.
func TestHostileClaims(t *testing.T) {
	l := newLab(t, 4)
	h1, h2, h3, h4 := l.Hosts[0], l.Hosts[1], l.Hosts[2], l.Hosts[3]
	hosts := []*lab.Host{h1, h2, h3}
	for _, h := range hosts {
		var extra []string
		if h == h2 {
			extra = []string{"--metrics-addr", metricsAddr}
		}
		if _, err := l.StartAgent(h, extra...); err != nil {
			t.Fatal(err)
		}
	}
	a, err := l.AddVM("a", h1, vipA)
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddVM("b", h2, vipB)
	if err != nil {
		t.Fatal(err)
	}
	cli(t, l, h1, "vip", "attach", vipA.String(), "--dev", a.Vif)
	cli(t, l, h2, "vip", "attach", vipB.String(), "--dev", b.Vif)
	if err := l.WaitPing(b, vipA, 30*time.Second); err != nil {
		t.Fatal(err)
	}

	// What a host refuses to attach, with the reason in the error.
	for _, c := range []struct {
		h        *lab.Host
		vip, dev string
		want     string
	}{
		{h3, h3.Underlay.String(), "eth0", "this host's underlay address"},
		{h1, h2.Underlay.String(), a.Vif, "the underlay address of host h2"},
		{h1, h2.Overlay.Addr().String(), a.Vif, "the overlay address of host h2"},
		{h1, "169.254.169.254", a.Vif, "link-local"},
		{h1, "127.0.0.1", a.Vif, "loopback"},
		{h1, "100.101.0.7", a.Vif, "outside the overlay"},
		{h1, "100.100.10.5", "eth0", "--dev eth0 carries this host's underlay"},
	} {
		out, err := l.CLI(c.h, "vip", "attach", c.vip, "--dev", c.dev)
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("%s: vip attach %s --dev %s: %v, want an error with %q:\n%s", c.h.Name, c.vip, c.dev, err, c.want, out)
		}
	}

	before := map[*lab.Host]map[string]string{}
	for _, h := range hosts {
		before[h] = wgAllowed(t, l, h)
	}
	good := netip.MustParseAddr("100.100.10.9")
	refused := map[netip.Addr]string{
		h2.Overlay.Addr():                      "overlay address",
		h1.Underlay:                            "underlay address",
		netip.MustParseAddr("127.0.0.1"):       "loopback",
		netip.MustParseAddr("169.254.169.254"): "link-local",
		netip.MustParseAddr("100.101.0.7"):     "outside the overlay",
	}
	spec := hostileSpec{Name: "evil", Bind: h4.Underlay, Address: h4.Overlay.Addr(), KeyFile: l.KeyFile,
		Join: []string{netip.AddrPortFrom(h1.Underlay, lab.GossipPort).String()}, Members: 4, Claims: []netip.Addr{good}}
	for vip := range refused {
		spec.Claims = append(spec.Claims, vip)
	}
	js, _ := json.Marshal(spec)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	logPath := filepath.Join(l.Dir, "evil.log")
	cmd, err := l.Spawn(h4.NS, logPath, "env", hostileEnv+"="+string(js), exe)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		if t.Failed() {
			b, _ := os.ReadFile(logPath)
			t.Logf("---- log of the hostile member ----\n%s", tail(string(b), 40))
		}
	}()

	// The good claim arrives and is followed: the records do reach every
	// host, so what follows is refusal, not a lost message.
	eventually(t, 30*time.Second, "every host to follow evil's claim of "+good.String()+" and refuse the others", func() error {
		for _, h := range hosts {
			st := status(t, l, h)
			if o := vipOwner(st, good); o != "evil" {
				return fmt.Errorf("%s: %s owned by %q", h.Name, good, o)
			}
			evil, _ := peerByName(st, "evil")
			if got, want := wgAllowed(t, l, h)[evil.PublicKey], h4.Overlay.Addr().String()+"/32 "+good.String()+"/32"; got != want {
				return fmt.Errorf("%s: evil's AllowedIPs %q, want %q", h.Name, got, want)
			}
			for vip, why := range refused {
				i := slices.IndexFunc(st.RefusedRecords, func(r control.RefusedRecord) bool { return r.VIP == vip.String() })
				if i < 0 {
					return fmt.Errorf("%s: %s not refused: %+v", h.Name, vip, st.RefusedRecords)
				}
				r := st.RefusedRecords[i]
				if r.Owner != "evil" || !strings.Contains(r.Reason, why) {
					return fmt.Errorf("%s: %s refused as %+v, want owner evil and %q", h.Name, vip, r, why)
				}
				if !slices.Contains(st.Problems, r.Problem()) {
					return fmt.Errorf("%s: no problem line for %s: %q", h.Name, vip, st.Problems)
				}
				if j := slices.IndexFunc(st.VIPs, func(v control.VIP) bool { return v.VIP == vip.String() }); j < 0 || st.VIPs[j].State != control.VIPRefused {
					return fmt.Errorf("%s: %s not shown as refused among the VIPs: %+v", h.Name, vip, st.VIPs)
				}
			}
		}
		return nil
	})

	// Past the ~10 s in which a claimed underlay address had killed its
	// host: still four members, h1 alive everywhere, the tunnels carry.
	time.Sleep(12 * time.Second)
	for _, h := range hosts {
		st := status(t, l, h)
		if st.Gossip.Members != 4 {
			t.Errorf("%s: %d members, want 4", h.Name, st.Gossip.Members)
		}
		for _, p := range st.Peers {
			if p.State != "alive" {
				t.Errorf("%s: peer %s is %s", h.Name, p.Name, p.State)
			}
		}
		// No refused address is routed into the tunnel. The peers'
		// AllowedIPs are as before; evil's hold its overlay address and
		// the good claim only (checked above), so no refused one.
		routes, err := l.Exec(h.NS, "ip", "-o", "route", "show", "table", "all")
		if err != nil {
			t.Fatalf("%s: ip route: %v", h.Name, err)
		}
		for vip := range refused {
			for _, line := range strings.Split(string(routes), "\n") {
				if strings.HasPrefix(line, vip.String()+" ") {
					t.Errorf("%s: a route for %s: %s", h.Name, vip, line)
				}
			}
			// Inside the overlay prefix the prefix route leads into the
			// tunnel; WireGuard then finds no peer for it (above).
			out, _ := l.Exec(h.NS, "ip", "route", "get", vip.String())
			if strings.Contains(string(out), "dev "+h.Iface) && !lab.OverlayPrefix.Contains(vip) {
				t.Errorf("%s: route to %s: %s", h.Name, vip, out)
			}
		}
		now := wgAllowed(t, l, h)
		evil, _ := peerByName(st, "evil")
		if now[evil.PublicKey] != h4.Overlay.Addr().String()+"/32 "+good.String()+"/32" {
			t.Errorf("%s: evil's AllowedIPs %q", h.Name, now[evil.PublicKey])
		}
		delete(now, evil.PublicKey)
		if !maps.Equal(now, before[h]) {
			t.Errorf("%s: AllowedIPs changed:\nbefore %v\nnow    %v", h.Name, before[h], now)
		}
	}
	if err := l.Ping(b, vipA, 5, 0); err != nil {
		t.Fatalf("h2's VM to h1's after the claims: %v", err)
	}
	if out := cli(t, l, h3, "status"); !strings.Contains(out, "PROBLEM   host evil claims 127.0.0.1") {
		t.Errorf("h3's status shows no refusal:\n%s", out)
	}
	out, _ := l.CLI(h1, "doctor", "--json", "--encrypt-key-file", l.KeyFile)
	var rep doctor.Report
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("doctor --json: %v\n%s", err, out)
	}
	if !slices.ContainsFunc(rep.Results, func(r doctor.Result) bool {
		return r.Check == "records" && r.Level == doctor.Warn && strings.Contains(r.Found, "host evil claims 169.254.169.254")
	}) {
		t.Errorf("h1's doctor shows no refusal: %+v", rep.Results)
	}
	fams := scrape(t, l, h2)
	if v, _ := fams.Value("vmroam_records_refused", "owner", "evil"); v != float64(len(refused)) {
		t.Errorf("h2: vmroam_records_refused{owner=evil} = %v, want %d", v, len(refused))
	}

	// A VIP detached here while the cache holds it is not "not attached".
	out = []byte(cli(t, l, h1, "vip", "detach", vipA.String()))
	if !strings.Contains(string(out), "cached for the host it moves to") || !strings.Contains(string(out), "--cache-max-age") {
		t.Errorf("vip detach of a cached VIP: %s", out)
	}
}

// wgAllowed is `wg show IFACE allowed-ips` in h: each peer's public key
// and its AllowedIPs as printed, sorted.
func wgAllowed(t testing.TB, l *lab.Lab, h *lab.Host) map[string]string {
	t.Helper()
	out, err := l.Exec(h.NS, "wg", "show", h.Iface, "allowed-ips")
	if err != nil {
		t.Fatalf("%s: wg show: %v\n%s", h.Name, err, out)
	}
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		ips := f[1:]
		slices.Sort(ips)
		m[f[0]] = strings.Join(ips, " ")
	}
	return m
}
