package lab

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// VM is a virtual machine: a namespace whose eth0 holds the VIPs, joined by
// a veth to its vif in the namespace of the host that runs it.
type VM struct {
	Name string
	NS   string       // the VM's namespace
	Vif  string       // host-side veth name ("vr1a2bvNAME", at most 15 bytes)
	Host *Host        // the host that runs it now
	VIPs []netip.Addr // its addresses, IPv4 as /32, IPv6 as /128

	frozen bool // FreezeVM'd: its processes are stopped (guarded by Lab.mu)
}

// String returns the VM's name.
func (vm *VM) String() string { return vm.Name }

// VIP4 returns the VM's first IPv4 VIP, or the zero Addr.
func (vm *VM) VIP4() netip.Addr { return vm.firstVIP(false) }

// VIP6 returns the VM's first IPv6 VIP, or the zero Addr.
func (vm *VM) VIP6() netip.Addr { return vm.firstVIP(true) }

func (vm *VM) firstVIP(v6 bool) netip.Addr {
	for _, a := range vm.VIPs {
		if a.Is6() == v6 {
			return a
		}
	}
	return netip.Addr{}
}

func (vm *VM) hasV6() bool { return vm.VIP6().IsValid() }

var vmNameRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,30}$`)

// AddVM creates VM name on host h with the given VIPs. The VM namespace gets
// eth0 (MTU 1420) with each VIP (/32 or /128, nodad), lo up, and default
// routes via 169.254.0.1 (onlink) and, with an IPv6 VIP, via fe80::1. The
// vif in h's namespace gets what Xen's vif-route gives it: up, 169.254.0.1/32,
// fe80::1/64, proxy_arp, and one route per VIP (`proto static metric 2`).
// AddVM does not talk to vmroam. Keep names short: the vif name is
// "vr<id>v<name>" cut to 15 bytes and must be unique in the lab.
func (l *Lab) AddVM(name string, h *Host, vips ...netip.Addr) (*VM, error) {
	vif := "vr" + l.ID + "v" + name
	return l.AddVMWithVif(name, vif[:min(len(vif), 15)], h, vips...)
}

// AddVMWithVif is AddVM with the vif's name given, e.g. Xen's "vif7.0"
// for a test of what the agent reads from the name.
func (l *Lab) AddVMWithVif(name, vif string, h *Host, vips ...netip.Addr) (*VM, error) {
	if len(vif) == 0 || len(vif) > 15 {
		return nil, fmt.Errorf("lab: AddVM %s: vif name %q: want 1 to 15 bytes", name, vif)
	}
	if !vmNameRE.MatchString(name) {
		return nil, fmt.Errorf("lab: AddVM: bad VM name %q (want [a-z0-9-], up to 31 chars)", name)
	}
	if err := l.ownHost(h); err != nil {
		return nil, err
	}
	if len(vips) == 0 {
		return nil, fmt.Errorf("lab: AddVM %s: no VIPs", name)
	}
	vm := &VM{
		Name: name,
		NS:   l.nsName("vm-" + name),
		Vif:  vif,
		Host: h,
	}
	for _, a := range vips {
		if !a.IsValid() {
			return nil, fmt.Errorf("lab: AddVM %s: invalid VIP", name)
		}
		vm.VIPs = append(vm.VIPs, a.Unmap())
	}

	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return nil, errors.New("lab: AddVM after Close")
	}
	for _, o := range l.vms {
		if o.Name == name || o.Vif == vm.Vif {
			l.mu.Unlock()
			return nil, fmt.Errorf("lab: AddVM %s: name or vif %s clashes with VM %s", name, vm.Vif, o.Name)
		}
	}
	l.vms[name] = vm
	l.mu.Unlock()

	if err := l.buildVM(vm); err != nil {
		// Deleting the VM namespace destroys the veth pair, and with it
		// the vif and the routes through it.
		l.killNSProcs(vm.NS)
		if derr := l.delNS(vm.NS); derr != nil {
			err = errors.Join(err, derr)
		}
		l.mu.Lock()
		delete(l.vms, name)
		l.mu.Unlock()
		return nil, err
	}
	l.logf("lab %s: VM %s %v on %s (vif %s)", l.ID, name, vm.VIPs, h.Name, vm.Vif)
	return vm, nil
}

func (l *Lab) buildVM(vm *VM) error {
	if err := l.addNS(vm.NS); err != nil {
		return err
	}
	if err := l.ip(vm.NS, "link", "set", "lo", "up"); err != nil {
		return err
	}
	mtu := strconv.Itoa(VifMTU)
	if err := l.ip(vm.Host.NS, "link", "add", vm.Vif, "mtu", mtu, "type", "veth",
		"peer", "name", "eth0", "mtu", mtu, "netns", vm.NS); err != nil {
		return err
	}
	for _, a := range vm.VIPs {
		args := []string{"addr", "add", hostPrefix(a).String(), "dev", "eth0"}
		if a.Is6() {
			args = append(args, "nodad")
		}
		if err := l.ip(vm.NS, args...); err != nil {
			return err
		}
	}
	if err := l.ip(vm.NS, "link", "set", "eth0", "up"); err != nil {
		return err
	}
	if err := l.ip(vm.NS, "-4", "route", "add", "default", "via", GatewayV4.String(), "dev", "eth0", "onlink"); err != nil {
		return err
	}
	if vm.hasV6() {
		if err := l.ip(vm.NS, "-6", "route", "add", "default", "via", GatewayV6.String(), "dev", "eth0"); err != nil {
			return err
		}
	}
	return l.plugVif(vm, vm.Host)
}

// plugVif configures vm's vif in h's namespace as Xen's vif-route does.
func (l *Lab) plugVif(vm *VM, h *Host) error {
	steps := [][]string{
		{"link", "set", vm.Vif, "up"},
		{"addr", "replace", netip.PrefixFrom(GatewayV4, 32).String(), "dev", vm.Vif},
		{"addr", "replace", netip.PrefixFrom(GatewayV6, 64).String(), "dev", vm.Vif, "nodad"},
	}
	for _, s := range steps {
		if err := l.ip(h.NS, s...); err != nil {
			return err
		}
	}
	// The slash form: Xen's vif names ("vif7.0") carry a dot.
	if err := l.sysctl(h.NS, "net/ipv4/conf/"+vm.Vif+"/proxy_arp=1"); err != nil {
		return err
	}
	for _, a := range vm.VIPs {
		if err := l.ip(h.NS, "route", "replace", hostPrefix(a).String(), "dev", vm.Vif,
			"proto", "static", "metric", "2"); err != nil {
			return err
		}
	}
	return nil
}

// MoveVM simulates a live migration of vm to host to: it deletes the VIP
// routes on the old host, moves the vif into to's namespace and configures it
// there as AddVM does. The VM keeps its namespace, addresses and neighbour
// cache (the vif keeps its MAC). It sets vm.Host.
func (l *Lab) MoveVM(vm *VM, to *Host) error {
	if err := l.ownHost(to); err != nil {
		return err
	}
	from := vm.Host
	if from == to {
		if err := l.plugVif(vm, to); err != nil {
			return err
		}
		return l.ThawVM(vm)
	}
	for _, a := range vm.VIPs {
		err := l.ip(from.NS, "route", "del", hostPrefix(a).String(), "dev", vm.Vif, "proto", "static", "metric", "2")
		if err != nil && !isGone(err) {
			return err
		}
	}
	if _, err := l.Exec(from.NS, "ip", "link", "set", vm.Vif, "netns", to.NS); err != nil {
		return err
	}
	vm.Host = to
	if err := l.plugVif(vm, to); err != nil {
		return err
	}
	l.logf("lab %s: VM %s moved %s -> %s", l.ID, vm.Name, from.Name, to.Name)
	return l.ThawVM(vm)
}

// SuspendVM pauses vm (FreezeVM) and sets its vif down on its host, as when
// the hypervisor pauses or tears down the domain: the VM loses carrier and
// the host's routes to the VIPs go away. ResumeVM or MoveVM brings it back.
func (l *Lab) SuspendVM(vm *VM) error {
	if err := l.FreezeVM(vm); err != nil {
		return err
	}
	for _, a := range vm.VIPs {
		err := l.ip(vm.Host.NS, "route", "del", hostPrefix(a).String(), "dev", vm.Vif, "proto", "static", "metric", "2")
		if err != nil && !isGone(err) {
			return err
		}
	}
	return l.ip(vm.Host.NS, "link", "set", vm.Vif, "down")
}

// ResumeVM sets vm's vif up again on its current host, restores the
// gateway addresses and VIP routes, and lets the VM run again (ThawVM).
func (l *Lab) ResumeVM(vm *VM) error {
	if err := l.plugVif(vm, vm.Host); err != nil {
		return err
	}
	return l.ThawVM(vm)
}

// SNMP reads vm's kernel counters (/proc/net/snmp in its namespace) by
// protocol and field: SNMP["Icmp"]["InEchos"].
func (l *Lab) SNMP(vm *VM) (map[string]map[string]int64, error) {
	out, err := l.Exec(vm.NS, "cat", "/proc/net/snmp")
	if err != nil {
		return nil, fmt.Errorf("lab: %s's counters: %w", vm.Name, err)
	}
	snmp, err := parseSNMP(strings.Split(string(out), "\n"))
	if err != nil || len(snmp) == 0 {
		return nil, fmt.Errorf("lab: %s's counters: %q: %v", vm.Name, out, err)
	}
	return snmp, nil
}

// VMs returns the lab's VMs (in no particular order).
func (l *Lab) VMs() []*VM {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]*VM, 0, len(l.vms))
	for _, vm := range l.vms {
		out = append(out, vm)
	}
	return out
}

// VM returns the VM called name, or nil.
func (l *Lab) VM(name string) *VM {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.vms[name]
}

func hostPrefix(a netip.Addr) netip.Prefix {
	return netip.PrefixFrom(a, a.BitLen())
}

// isGone reports whether an ip error says the route or device no longer exists.
func isGone(err error) bool {
	s := err.Error()
	return strings.Contains(s, "No such process") || strings.Contains(s, "Cannot find device") ||
		strings.Contains(s, "No such device")
}

// UnplugVM pauses vm (FreezeVM) and moves its vif into host to's namespace,
// leaving it down: the VM is paused in transit (its old host sees the vif
// vanish, the new one has no carrier yet). ResumeVM ends the pause, as
// MoveVM does at once.
func (l *Lab) UnplugVM(vm *VM, to *Host) error {
	if err := l.ownHost(to); err != nil {
		return err
	}
	if err := l.FreezeVM(vm); err != nil {
		return err
	}
	from := vm.Host
	if from == to {
		return l.ip(from.NS, "link", "set", vm.Vif, "down")
	}
	if _, err := l.Exec(from.NS, "ip", "link", "set", vm.Vif, "netns", to.NS); err != nil {
		return err
	}
	vm.Host = to
	l.logf("lab %s: VM %s unplugged from %s, waiting on %s", l.ID, vm.Name, from.Name, to.Name)
	return nil
}

// MigrateVM moves vm to `to` as a live migration does, through the agents.
// The VM pauses first (FreezeVM: it sends nothing until it runs again).
// With announce, the old host is then told the VM is suspending (`vmroam
// migrate suspend`, as a Xen suspend watch does), so nothing is in flight
// to the VM's interface when it goes; without, the interface just
// vanishes. Then the new host's hook attaches the VIPs while the VM is
// still paused, after downtime it runs there, and last the old host's hook
// detaches it (Xen calls it after success).
func (l *Lab) MigrateVM(vm *VM, to *Host, downtime time.Duration, announce bool) error {
	from := vm.Host
	if err := l.FreezeVM(vm); err != nil {
		return err
	}
	if announce {
		for _, v := range vm.VIPs {
			if _, err := l.CLI(from, "migrate", "suspend", v.String()); err != nil {
				return err
			}
		}
	}
	if err := l.UnplugVM(vm, to); err != nil {
		return err
	}
	for _, v := range vm.VIPs {
		if _, err := l.CLI(to, "vip", "attach", v.String(), "--dev", vm.Vif); err != nil {
			return err
		}
	}
	time.Sleep(downtime)
	if err := l.ResumeVM(vm); err != nil {
		return err
	}
	for _, v := range vm.VIPs {
		if _, err := l.CLI(from, "vip", "detach", v.String()); err != nil {
			return err
		}
	}
	return nil
}

// PrepareIncoming creates the interface vm will have on host to, as Xen
// creates the destination vif before the source domain suspends: a second
// veth pair whose VM end (eth1, down) has the same MAC as eth0, and whose
// host end (returned) sits down in to's namespace. CompleteIncoming moves
// the VM onto it.
func (l *Lab) PrepareIncoming(vm *VM, to *Host) (string, error) {
	if err := l.ownHost(to); err != nil {
		return "", err
	}
	newVif := vm.Vif + "n"
	if len(newVif) > 15 {
		newVif = newVif[len(newVif)-15:]
	}
	out, err := l.Exec(vm.NS, "cat", "/sys/class/net/eth0/address")
	if err != nil {
		return "", err
	}
	mac := strings.TrimSpace(string(out))
	mtu := strconv.Itoa(VifMTU)
	if err := l.ip(to.NS, "link", "add", newVif, "mtu", mtu, "type", "veth",
		"peer", "name", "eth1", "mtu", mtu, "address", mac, "netns", vm.NS); err != nil {
		return "", err
	}
	return newVif, nil
}

// CompleteIncoming ends a move begun by PrepareIncoming: the VM's old
// interface pair goes away (the source domain is destroyed), eth1 becomes
// its eth0 with the same addresses and routes, and the new vif is plugged
// on to as Xen's vif-route would.
func (l *Lab) CompleteIncoming(vm *VM, to *Host, newVif string) error {
	steps := [][]string{{"link", "del", "eth0"}, {"link", "set", "eth1", "name", "eth0"}}
	for _, a := range vm.VIPs {
		args := []string{"addr", "add", hostPrefix(a).String(), "dev", "eth0"}
		if a.Is6() {
			args = append(args, "nodad")
		}
		steps = append(steps, args)
	}
	steps = append(steps, []string{"link", "set", "eth0", "up"},
		[]string{"-4", "route", "add", "default", "via", GatewayV4.String(), "dev", "eth0", "onlink"})
	if vm.hasV6() {
		steps = append(steps, []string{"-6", "route", "add", "default", "via", GatewayV6.String(), "dev", "eth0"})
	}
	for _, s := range steps {
		if err := l.ip(vm.NS, s...); err != nil {
			return err
		}
	}
	from := vm.Host
	vm.Vif, vm.Host = newVif, to
	if err := l.plugVif(vm, to); err != nil {
		return err
	}
	l.logf("lab %s: VM %s moved %s -> %s onto %s", l.ID, vm.Name, from.Name, to.Name, newVif)
	return l.ThawVM(vm)
}
