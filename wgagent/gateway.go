package wgagent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/migrate"
	"github.com/vmroam/vmroam/wgagent/metrics"
)

// The VM side of the anycast gateway (DESIGN.md, "Data plane"): every
// interface of a VM attached here carries 169.254.0.1/32 with proxy ARP,
// and fe80::1 for IPv6 VIPs, so that one guest configuration (its default
// route via 169.254.0.1, or fe80::1) works on every host of every site.
// No hotplug script gives it that: Xen's vif-route replaces the
// interface's first IPv4 address with dom0's own, and libvirt's and
// Proxmox's taps carry none. The agent adds the gateway beside whatever
// the script set (a guest whose gateway is dom0's address, the usual Xen
// setup, keeps working too) and puts it back when someone removes it.

// gatewayV6 is the IPv6 anycast gateway, link-local on every VM interface.
var gatewayV6 = netip.MustParseAddr("fe80::1")

// gatewayFamilies is which gateways an interface needs: IPv4, IPv6.
type gatewayFamilies struct{ v4, v6 bool }

// gatewayDevsLocked returns the VM interfaces here and the gateways each
// needs: those of attached VIPs, of arrivals held here and of VIPs
// awaiting their VM's announcement. a.mu held.
func (a *Agent) gatewayDevsLocked() map[string]gatewayFamilies {
	devs := map[string]gatewayFamilies{}
	add := func(dev string, vip netip.Addr) {
		if dev == "" {
			return
		}
		f := devs[dev]
		if vip.Is4() {
			f.v4 = true
		} else {
			f.v6 = true
		}
		devs[dev] = f
	}
	for vip, at := range a.attached {
		add(at.Dev, vip)
	}
	for vip, dev := range a.engine.HoldingDevsLocked() {
		add(dev, vip)
	}
	a.awaitMu.Lock()
	for vip, w := range a.awaited {
		add(w.dev, vip)
	}
	a.awaitMu.Unlock()
	return devs
}

// reconcileGatewaysLocked gives every VM interface here its gateway
// addresses. An interface once done is looked at again only by a
// verifying (periodic) run, so a reconcile on a migration's path costs
// nothing here; a hotplug script that replaced the address is repaired by
// the next periodic run. a.mu held.
func (a *Agent) reconcileGatewaysLocked(verify bool, failed func(step metrics.ReconcileStep, format string, args ...any)) {
	devs := a.gatewayDevsLocked()
	for dev := range a.gatewaysDone {
		if _, ok := devs[dev]; !ok {
			delete(a.gatewaysDone, dev)
		}
	}
	for dev, f := range devs {
		if done, ok := a.gatewaysDone[dev]; ok && done == f && !verify {
			continue
		}
		changed, err := ensureGateway(dev, f)
		switch {
		case errors.Is(err, errNoLink):
			// Gone (a VM that left) or not yet there (one arriving): the
			// next reconcile looks again.
			delete(a.gatewaysDone, dev)
			continue
		case err != nil:
			failed(metrics.StepGateway, "gateway on %s: %v", dev, err)
			delete(a.gatewaysDone, dev)
			continue
		}
		if changed != "" {
			a.log.Info("VM interface given the anycast gateway", "dev", dev, "added", changed)
		}
		a.gatewaysDone[dev] = f
	}
}

var errNoLink = errors.New("no such interface")

// ensureGateway adds to dev what of its gateways it lacks and turns on
// proxy ARP for IPv4; it says what it added ("" if nothing).
func ensureGateway(dev string, f gatewayFamilies) (added string, err error) {
	link, err := netlink.LinkByName(dev)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return "", errNoLink
		}
		return "", err
	}
	var did []string
	want := func(ip netip.Addr, bits, fam, flags int) error {
		addrs, err := netlink.AddrList(link, fam)
		if err != nil {
			return fmt.Errorf("list addresses: %w", err)
		}
		for _, a := range addrs {
			if got, ok := netip.AddrFromSlice(a.IP); ok && got.Unmap() == ip {
				return nil
			}
		}
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(bits, ip.BitLen())}, Flags: flags}
		if err := netlink.AddrAdd(link, addr); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("add %s: %w", addr.IPNet, err)
		}
		did = append(did, addr.IPNet.String())
		return nil
	}
	if f.v4 {
		if err := want(migrate.AnycastGateway, 32, netlink.FAMILY_V4, 0); err != nil {
			return "", err
		}
		// The VM asks for addresses of other VMs and hosts too (a guest
		// with an on-link prefix): the host answers for what it routes.
		p := "/proc/sys/net/ipv4/conf/" + dev + "/proxy_arp"
		if b, err := os.ReadFile(p); err != nil || strings.TrimSpace(string(b)) != "1" {
			if err := os.WriteFile(p, []byte("1"), 0o644); err != nil {
				return "", fmt.Errorf("proxy ARP: %w", err)
			}
			did = append(did, "proxy_arp")
		}
	}
	if f.v6 {
		if err := want(gatewayV6, 64, netlink.FAMILY_V6, unix.IFA_F_NODAD); err != nil {
			return "", err
		}
	}
	return strings.Join(did, " "), nil
}
