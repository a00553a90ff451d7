package wgagent

import (
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/vmroam/vmroam/internal/netnstest"
)

// TestEnsureGateway: an interface as Xen's vif-route leaves it (dom0's
// address alone, as a /32) gets the gateways beside it, proxy ARP on, and
// a second call changes nothing; an interface that is not there is
// errNoLink, which the reconcile passes over.
func TestEnsureGateway(t *testing.T) {
	netnstest.Run(t, func() {
		for _, args := range [][]string{
			{"link", "add", "vif5.0", "type", "veth", "peer", "name", "vm5"},
			{"addr", "add", "198.18.0.1/32", "dev", "vif5.0"},
			{"link", "set", "vif5.0", "up"},
		} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
		added, err := ensureGateway("vif5.0", gatewayFamilies{v4: true, v6: true})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(added, "169.254.0.1/32") || !strings.Contains(added, "fe80::1/64") || !strings.Contains(added, "proxy_arp") {
			t.Errorf("added %q, want both gateways and proxy ARP", added)
		}
		out, _ := exec.Command("ip", "-o", "addr", "show", "dev", "vif5.0").CombinedOutput()
		for _, want := range []string{"198.18.0.1/32", "169.254.0.1/32", "fe80::1/64"} {
			if !strings.Contains(string(out), want) {
				t.Errorf("vif5.0 lacks %s:\n%s", want, out)
			}
		}
		if b, _ := os.ReadFile("/proc/sys/net/ipv4/conf/vif5.0/proxy_arp"); strings.TrimSpace(string(b)) != "1" {
			t.Errorf("proxy_arp %q, want 1", b)
		}
		if added, err := ensureGateway("vif5.0", gatewayFamilies{v4: true, v6: true}); err != nil || added != "" {
			t.Errorf("second call: added %q, err %v; want nothing", added, err)
		}
		if _, err := ensureGateway("vif9.9", gatewayFamilies{v4: true}); err != errNoLink {
			t.Errorf("a missing interface: %v, want errNoLink", err)
		}
	})
}

// TestBridgeOf: a VM interface in a bridge (Proxmox's taps, libvirt's
// bridged interfaces) is named with its bridge, so that `vip attach`
// refuses it with a reason; one out of it is not.
func TestBridgeOf(t *testing.T) {
	netnstest.Run(t, func() {
		for _, args := range [][]string{
			{"link", "add", "vmbr0", "type", "bridge"},
			{"link", "add", "tap100i0", "type", "veth", "peer", "name", "vm100"},
			{"link", "set", "tap100i0", "master", "vmbr0"},
		} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
		if b := bridgeOf("tap100i0"); b != "vmbr0" {
			t.Errorf("bridgeOf(tap100i0) = %q, want vmbr0", b)
		}
		if b := bridgeOf("vm100"); b != "" {
			t.Errorf("bridgeOf(vm100) = %q, want none", b)
		}
		if out, err := exec.Command("ip", "link", "set", "tap100i0", "nomaster").CombinedOutput(); err != nil {
			t.Fatalf("nomaster: %v %s", err, out)
		}
		if b := bridgeOf("tap100i0"); b != "" {
			t.Errorf("out of the bridge: bridgeOf = %q, want none", b)
		}
	})
}
