package e2e

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

// TestPeerAllowlist: h1 and h2 list each other's WireGuard keys in
// --peer-allowlist; h3 has the gossip key but is not listed. h3 gets no
// tunnel, its claim of a VIP that h1's VM holds changes nothing at h1 and
// h2 (the VM keeps answering h2's VM), and both say so in status. A VM or
// a local process that connects to a host's handover port is refused and
// counted; the underlay cannot reach that port at all.
func TestPeerAllowlist(t *testing.T) {
	l := newLab(t, 3)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]
	allow := filepath.Join(l.Dir, "peers.allow")
	// Empty at first: the agents' keys are made on their first start. The
	// agents re-read the file when it changes.
	if err := os.WriteFile(allow, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, h := range []*lab.Host{h1, h2} {
		if _, err := l.StartAgent(h, "--peer-allowlist", allow); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := l.StartAgent(h3); err != nil {
		t.Fatal(err)
	}
	st1, st2, st3 := status(t, l, h1), status(t, l, h2), status(t, l, h3)
	list := fmt.Sprintf("# vmroam peers\n%s h1\n%s h2\n", st1.PublicKey, st2.PublicKey)
	if err := os.WriteFile(allow, []byte(list), 0o644); err != nil {
		t.Fatal(err)
	}

	eventually(t, 30*time.Second, "h1 and h2 peers, h3 refused by both", func() error {
		for _, c := range []struct {
			h    *lab.Host
			peer string
		}{{h1, st2.PublicKey}, {h2, st1.PublicKey}} {
			if got := wgPeers(t, l, c.h); !slices.Equal(got, []string{c.peer}) {
				return fmt.Errorf("%s: WireGuard peers %v, want only %s", c.h.Name, got, c.peer)
			}
			st := status(t, l, c.h)
			p, ok := peerByName(st, "h3")
			if !ok || p.Refused == "" || !strings.Contains(p.Refused, st3.PublicKey) {
				return fmt.Errorf("%s: h3 is %+v", c.h.Name, p)
			}
			if !slices.ContainsFunc(st.Problems, func(s string) bool { return strings.Contains(s, "member h3 is not a peer") }) {
				return fmt.Errorf("%s: problems %q", c.h.Name, st.Problems)
			}
		}
		return nil
	})

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
	if err := l.WaitPing(b, vipA, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "h3 to know h1 owns "+vipA.String(), func() error {
		if o := vipOwner(status(t, l, h3), vipA); o != "h1" {
			return fmt.Errorf("owner %q", o)
		}
		return nil
	})

	// The rogue claims the VIP, as a VM arriving would.
	if _, err := l.Exec(h3.NS, "ip", "link", "add", "rogue0", "type", "veth", "peer", "name", "rogue1"); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Exec(h3.NS, "ip", "link", "set", "rogue0", "up"); err != nil {
		t.Fatal(err)
	}
	cli(t, l, h3, "vip", "attach", vipA.String(), "--dev", "rogue0")
	if o := vipOwner(status(t, l, h3), vipA); o != "h3" {
		t.Fatalf("the rogue's own view: %s owned by %q", vipA, o)
	}
	eventually(t, 20*time.Second, "h1 and h2 to count the rogue's claim as refused", func() error {
		for _, h := range []*lab.Host{h1, h2} {
			if st := status(t, l, h); st.Gossip.Refused == 0 {
				return fmt.Errorf("%s: nothing refused", h.Name)
			}
		}
		return nil
	})
	// Well past the time gossip takes: the traffic still reaches the VM at
	// h1 (the rogue has no VM, so a reply means it stayed), and nobody
	// but h3 believes the claim.
	if err := l.Ping(b, vipA, 25, 0); err != nil {
		t.Fatalf("after the rogue's claim: %v", err)
	}
	for _, h := range []*lab.Host{h1, h2} {
		st := status(t, l, h)
		if o := vipOwner(st, vipA); o != "h1" {
			t.Fatalf("%s: %s owned by %q after the rogue's claim", h.Name, vipA, o)
		}
		if p, _ := peerByName(st, "h3"); len(p.VIPs) != 0 || !strings.Contains(p.Refused, "not listed") {
			t.Fatalf("%s: h3 shown as %+v", h.Name, p)
		}
	}
	if out := cli(t, l, h2, "status"); !strings.Contains(out, "REFUSED") || !strings.Contains(out, "h3") {
		t.Fatalf("h2's status does not show the refusal:\n%s", out)
	}

	// The handover port. From a VM (which reaches hosts' overlay
	// addresses through the tunnel from its VIP) and from a local process
	// on h1: accepted by TCP, then closed unread, counted and logged.
	h1Overlay := h1.Overlay.Addr().String()
	before := status(t, l, h1).HandoverRefused
	for _, ns := range []string{b.NS, h1.NS} {
		if out, err := l.Exec(ns, "timeout", "10", "bash", "-c", "exec 3<>/dev/tcp/"+h1Overlay+"/7947 && cat <&3"); err != nil {
			t.Fatalf("%s to h1's handover port: %v\n%s", ns, err, out)
		}
	}
	eventually(t, 10*time.Second, "h1 to count the two connections", func() error {
		if n := status(t, l, h1).HandoverRefused; n != before+2 {
			return fmt.Errorf("handover_refused %d, was %d", n, before)
		}
		return nil
	})
	if b, _ := os.ReadFile(h1.Agent.LogPath); !strings.Contains(string(b), "handover: refused a connection") {
		t.Fatal("h1 did not log the refused handover connection")
	}
	// From h2 over the underlay, straight to h1's overlay address: the
	// socket is bound to the WireGuard interface, so h1's kernel refuses.
	refusedByKernel := func(ns, what string) {
		t.Helper()
		out, err := l.Exec(ns, "timeout", "10", "bash", "-c", "exec 3<>/dev/tcp/"+h1Overlay+"/7947")
		if err == nil || !strings.Contains(string(out), "refused") {
			t.Fatalf("%s to h1's handover port: %v\n%s", what, err, out)
		}
	}
	via := h1.Underlay.String()
	if _, err := l.Exec(h2.NS, "ip", "route", "add", h1Overlay+"/32", "via", via, "table", "77"); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Exec(h2.NS, "ip", "rule", "add", "to", h1Overlay+"/32", "ipproto", "tcp", "dport", "7947", "table", "77", "pref", "77"); err != nil {
		t.Fatal(err)
	}
	refusedByKernel(h2.NS, "h2 over the underlay")
	l.Exec(h2.NS, "ip", "rule", "del", "pref", "77")
	if n := status(t, l, h1).HandoverRefused; n != before+2 {
		t.Fatalf("handover_refused %d, want %d: the underlay's connection reached the agent", n, before+2)
	}
}

// TestKeyRotation rotates the gossip key of a running three-host cluster
// with `vmroam keys add|use|remove`, each step from another host, while
// a watcher checks that no host ever sees fewer than three members and VMs
// keep reaching each other; then a fourth host that has only the new key
// joins, and every key file holds only the new key.
func TestKeyRotation(t *testing.T) {
	l := newLab(t, 4)
	h1, h2, h3, h4 := l.Hosts[0], l.Hosts[1], l.Hosts[2], l.Hosts[3]
	oldKey, err := os.ReadFile(l.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	raw := make([]byte, 32)
	rand.Read(raw)
	newKey := base64.StdEncoding.EncodeToString(raw)
	old, _ := base64.StdEncoding.DecodeString(strings.TrimSpace(string(oldKey)))
	files := map[*lab.Host]string{}
	for _, h := range l.Hosts {
		files[h] = filepath.Join(l.Dir, h.Name+".key")
		content := oldKey
		if h == h4 {
			content = []byte(newKey + "\n")
		}
		if err := os.WriteFile(files[h], content, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	three := []*lab.Host{h1, h2, h3}
	for _, h := range three {
		if _, err := l.StartAgent(h, "--encrypt-key-file", files[h]); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 30*time.Second, "three members everywhere", func() error {
		for _, h := range three {
			if n := status(t, l, h).Gossip.Members; n != 3 {
				return fmt.Errorf("%s: %d members", h.Name, n)
			}
		}
		return nil
	})
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
	if err := l.WaitPing(a, vipB, 20*time.Second); err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var drops []string
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			for _, h := range three {
				out, err := l.CLI(h, "status", "--json")
				var st control.Status
				if err == nil {
					err = json.Unmarshal(out, &st)
				}
				if err != nil || st.Gossip.Members != 3 {
					mu.Lock()
					drops = append(drops, fmt.Sprintf("%s: %d members (%v)", h.Name, st.Gossip.Members, err))
					mu.Unlock()
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
		}
	}()
	finishWatch := func() {
		t.Helper()
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
		mu.Lock()
		defer mu.Unlock()
		if len(drops) > 0 {
			t.Fatalf("a host saw fewer than 3 members during the rotation (%d times), first: %s", len(drops), drops[0])
		}
	}
	defer finishWatch()

	oldFP, newFP := gossip.KeyFingerprint(old), gossip.KeyFingerprint(raw)
	out := cli(t, l, h1, "keys", "add", newKey)
	if !strings.Contains(out, "installed on 3 members") {
		t.Fatalf("keys add:\n%s", out)
	}
	out = cli(t, l, h2, "keys", "list")
	if !strings.Contains(out, newFP+"  3/3") || !strings.Contains(out, oldFP+"  3/3") {
		t.Fatalf("keys list after add:\n%s", out)
	}
	if out := cli(t, l, h3, "keys", "use", newKey); !strings.Contains(out, "in use on 3 members") {
		t.Fatalf("keys use:\n%s", out)
	}
	if out, err := l.CLI(h1, "keys", "remove", newKey); err == nil || !strings.Contains(string(out), "primary") {
		t.Fatalf("removing the key in use: %v\n%s", err, out)
	}
	if out := cli(t, l, h1, "keys", "remove", strings.TrimSpace(string(oldKey))); !strings.Contains(out, "removed from 3 members") {
		t.Fatalf("keys remove:\n%s", out)
	}
	for _, h := range three {
		got, err := gossip.LoadKeyFile(files[h])
		if err != nil || len(got) != 1 || gossip.KeyFingerprint(got[0]) != newFP {
			t.Fatalf("%s's key file after the rotation: %d keys, %v", h.Name, len(got), err)
		}
	}
	// Gossip still flows between all three (a member that cannot read the
	// others would not learn this claim), and the tunnels carry traffic.
	c, err := l.AddVM("c", h3, vipA6)
	if err != nil {
		t.Fatal(err)
	}
	cli(t, l, h3, "vip", "attach", vipA6.String(), "--dev", c.Vif)
	eventually(t, 20*time.Second, "h3's claim to reach h1 and h2", func() error {
		for _, h := range []*lab.Host{h1, h2} {
			if o := vipOwner(status(t, l, h), vipA6); o != "h3" {
				return fmt.Errorf("%s: owner %q", h.Name, o)
			}
		}
		return nil
	})
	if err := l.Ping(b, vipA, 5, 0); err != nil {
		t.Fatal(err)
	}
	// A partition would show as members turning suspect, then dead,
	// within seconds: keep watching a while.
	time.Sleep(8 * time.Second)
	finishWatch()

	if _, err := l.StartAgent(h4, "--encrypt-key-file", files[h4]); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "h4, with only the new key, joins", func() error {
		for _, h := range l.Hosts {
			if n := status(t, l, h).Gossip.Members; n != 4 {
				return fmt.Errorf("%s: %d members", h.Name, n)
			}
		}
		return nil
	})
}

// TestHandoverNeedsTheClaim: a peer that asks for a VIP's cache without
// having claimed the VIP in gossip gets nothing. h2 is a real member and
// WireGuard peer of h1 (its request comes from its own overlay address, so
// it passes the connection's checks) and asks for h1's VIP at a higher
// epoch: h1 refuses, naming the missing claim, keeps the VIP and streams
// nothing. Before the check, h1 streamed its cache and made h2 the owner
// on the request's word alone.
func TestHandoverNeedsTheClaim(t *testing.T) {
	l, m, _ := migrationLab(t, 2)
	h1, h2 := l.Hosts[0], l.Hosts[1]
	epoch := uint64(0)
	for _, v := range status(t, l, h1).VIPs {
		if v.VIP == m.VIPs[0].String() {
			epoch = v.Epoch
		}
	}
	if epoch == 0 {
		t.Fatalf("h1 has no record of %s", m.VIPs[0])
	}
	var req bytes.Buffer
	w := cache.NewWriter(&req)
	if err := w.Request(cache.Request{VIP: m.VIPs[0], Epoch: epoch + 1, Claimer: h2.Name, Ticks: true}); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(l.Dir, "forged-request")
	if err := os.WriteFile(file, req.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	// From h2's namespace to h1's overlay address: through the tunnel,
	// from h2's overlay address.
	out, err := l.Exec(h2.NS, "timeout", "20", "bash", "-c",
		"exec 3<>/dev/tcp/"+h1.Overlay.Addr().String()+"/7947 && cat "+file+" >&3 && cat <&3")
	if err != nil {
		t.Fatalf("h2 to h1's handover port: %v\n%s", err, out)
	}
	f, err := cache.NewReader(bytes.NewReader(out)).Next()
	if err != nil {
		t.Fatalf("h1's answer (%d bytes): %v", len(out), err)
	}
	if f.Type != cache.FrameRefuse || !strings.Contains(f.Refuse.Reason, "no claim of") {
		t.Fatalf("h1 answered a request without a claim with %v %q, want a refusal naming the missing claim", f.Type, f.Refuse.Reason)
	}
	for _, h := range []*lab.Host{h1, h2} {
		st := status(t, l, h)
		if owner := vipOwner(st, m.VIPs[0]); owner != h1.Name {
			t.Errorf("%s: %s owned by %q, want h1", h.Name, m.VIPs[0], owner)
		}
	}
	for _, v := range status(t, l, h1).VIPs {
		if v.VIP == m.VIPs[0].String() && (!v.Local || v.State != control.VIPLocal || v.Epoch != epoch) {
			t.Errorf("h1: %s is %+v, want local at epoch %d", v.VIP, v, epoch)
		}
	}
}
