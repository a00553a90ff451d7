package xenhook

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// canonicalPVEConfig writes the smallest config of VM vmid that holds vips:
// each a description line naming its net<N>, one bridged net<N> per tap, a
// name (a config is never empty) and, when some VIP names no net<N>, a
// bridgeless net so that a lone bridged one is not taken for it.
func canonicalPVEConfig(t *testing.T, vmid int, vips []DomainVIP) []byte {
	var b strings.Builder
	var nets []int
	for _, v := range vips {
		fmt.Fprintf(&b, "#vmroam-vip%%3A %s", strings.ReplaceAll(v.VIP.String(), ":", "%3A"))
		if v.Dev == "" {
			b.WriteString("\n")
			continue
		}
		num, ok := strings.CutPrefix(v.Dev, fmt.Sprintf("tap%di", vmid))
		n, err := strconv.Atoi(num)
		if !ok || err != nil || ProxmoxTap(vmid, n) != v.Dev {
			t.Fatalf("dev %q of %v is not a tap of VM %d", v.Dev, v.VIP, vmid)
		}
		fmt.Fprintf(&b, " net%d\n", n)
		if !slices.Contains(nets, n) {
			nets = append(nets, n)
		}
	}
	for _, n := range nets {
		fmt.Fprintf(&b, "net%d: virtio=BC:24:11:00:00:%02x,bridge=vmbr0\n", n, n)
	}
	b.WriteString("name: canonical\n")
	if len(nets) == 1 && slices.ContainsFunc(vips, func(v DomainVIP) bool { return v.Dev == "" }) {
		fmt.Fprintf(&b, "net%d: virtio=BC:24:11:00:01:00\n", (nets[0]+1)%maxNets)
	}
	return []byte(b.String())
}

// FuzzProxmoxVIPs reads arbitrary bytes as VM 100's config. What it accepts
// are distinct VIPs the agent can route, each behind one of the VM's taps
// or none; written back as the smallest config they read the same; and the
// hook's actions for each phase follow from them.
func FuzzProxmoxVIPs(f *testing.F) {
	for _, name := range []string{"100-web1.conf", "100-web1.qm", "205-db1.conf", "300-dhcp.qm", "500-one.qm"} {
		f.Add(readPVE(f, name))
	}
	f.Add([]byte("#vmroam-vip%3A ::ffff:100.64.0.1/128 net31\n#vmroam-vip%3A 100.64.0.2\nnet31: virtio=BC:24:11:00:00:01,bridge=vmbr0\nnet0: virtio=BC:24:11:00:00:02\n"))
	f.Add([]byte("ipconfig01: ip=100.64.0.1/24\nnet01: virtio=BC:24:11:00:00:01,bridge=vmbr0\nipconfig32: ip=100.64.0.2/24\n"))
	f.Add([]byte("ipconfig0: ip=100.64.0.1/24,ip6=fe80::1%eth0/64\n"))
	f.Fuzz(func(t *testing.T, conf []byte) {
		const vmid = 100
		vips, _, err := ProxmoxVIPs(vmid, conf)
		if err != nil {
			if vips != nil {
				t.Fatalf("error %v with VIPs %v", err, vips)
			}
			for _, p := range []ProxmoxPhase{PhasePreStart, PhasePostStart, PhasePostStop} {
				if acts, _, aerr := ProxmoxActions(ProxmoxEvent{VMID: vmid, Phase: p, Config: conf}); aerr == nil || acts != nil {
					t.Fatalf("%s: actions %v, %v for a config that does not read", p, acts, aerr)
				}
			}
			return
		}
		for i, v := range vips {
			if v.VIP != v.VIP.Unmap() || v.VIP.Zone() != "" || !routable(v.VIP) {
				t.Fatalf("VIP %v cannot be routed to a VM", v.VIP)
			}
			taps := make([]string, maxNets)
			for n := range taps {
				taps[n] = ProxmoxTap(vmid, n)
			}
			if v.Dev != "" && !slices.Contains(taps, v.Dev) {
				t.Fatalf("VIP %v behind %q, not a tap of VM %d", v.VIP, v.Dev, vmid)
			}
			for _, w := range vips[:i] {
				if w.VIP == v.VIP {
					t.Fatalf("VIP %v twice in %v", v.VIP, vips)
				}
			}
		}

		again, warns, err := ProxmoxVIPs(vmid, canonicalPVEConfig(t, vmid, vips))
		if err != nil || !slices.Equal(again, vips) || len(warns) > 0 {
			t.Fatalf("%v written back reads as %v, %v, warnings %q", vips, again, err, warns)
		}

		var prepare, attach, detach []Action
		for _, v := range vips {
			prepare = append(prepare, Action{Verb: "prepare", VIP: v.VIP, Dev: v.Dev})
			if v.Dev != "" {
				attach = append(attach, Action{Verb: "attach", VIP: v.VIP, Dev: v.Dev, WhenAnnounced: true})
			}
			detach = append(detach, Action{Verb: "detach", VIP: v.VIP})
		}
		for _, c := range []struct {
			p     ProxmoxPhase
			want  []Action
			fails bool
		}{
			{PhasePreStart, prepare, false},
			{PhasePostStart, attach, len(attach) != len(vips)},
			{PhasePreStop, nil, false},
			{PhasePostStop, detach, false},
		} {
			acts, _, err := ProxmoxActions(ProxmoxEvent{VMID: vmid, Phase: c.p, Config: conf})
			if !slices.Equal(acts, c.want) || (err != nil) != c.fails {
				t.Fatalf("%s: %v, %v for %v", c.p, acts, err, vips)
			}
		}
	})
}
