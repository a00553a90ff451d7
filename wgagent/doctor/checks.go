package doctor

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/wgagent/control"
)

// sysctlConf is where a fix's sysctl settings are kept across reboots.
const sysctlConf = "/etc/sysctl.d/90-vmroam.conf"

// genlWireGuard looks up the generic netlink family the kernel module
// registers; it exists exactly when the module is loaded or built in.
func genlWireGuard() error {
	_, err := netlink.GenlFamilyGet("wireguard")
	return err
}

// checkWireGuard says whether the agent will get kernel WireGuard (with
// --wg-impl auto) or fall back to the embedded wireguard-go.
func checkWireGuard(cfg Config, st *control.Status) Result {
	r := Result{Check: "wireguard", Level: OK}
	kernel := true
	switch {
	case cfg.wgFamily() == nil:
		r.Found = "kernel WireGuard module loaded"
	case exists(filepath.Join(cfg.SysModule, "wireguard")):
		r.Found = fmt.Sprintf("kernel WireGuard module loaded (%s)", filepath.Join(cfg.SysModule, "wireguard"))
	case moduleListed(filepath.Join(cfg.Modules, "modules.builtin")):
		r.Found = "kernel WireGuard built in"
	case moduleListed(filepath.Join(cfg.Modules, "modules.dep")):
		// Creating a link of type wireguard makes the kernel load it.
		r.Found = "kernel WireGuard module available, not loaded: the agent loads it when it creates its interface"
	default:
		kernel = false
		r.Level = Info
		r.Found = "no kernel WireGuard module: the agent runs the embedded wireguard-go, which works but costs more CPU per packet"
		r.Fix = "for kernel speed: boot a kernel with CONFIG_WIREGUARD (Linux >= 5.6, e.g. Debian's linux-image-amd64), then modprobe wireguard"
	}
	if st != nil && kernel && st.Impl == "userspace" {
		r.Level = Info
		r.Found += ", but the agent runs wireguard-go (--wg-impl userspace, or it started before the module was there)"
		r.Fix = "restart the agent with --wg-impl auto to use the kernel module"
	}
	return r
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// moduleListed reports whether a modules.dep or modules.builtin file names
// wireguard.ko (compressed or not) as a module.
func moduleListed(file string) bool {
	f, err := os.Open(file)
	if err != nil {
		return false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		mod, _, _ := strings.Cut(sc.Text(), ":")
		base := path.Base(mod)
		if base == "wireguard.ko" || strings.HasPrefix(base, "wireguard.ko.") {
			return true
		}
	}
	return false
}

// checkTUN opens the TUN clone device, as the cache device and wireguard-go
// do (opening it creates no interface).
func checkTUN(cfg Config) Result {
	r := Result{Check: "tun", Level: Fail}
	mknod := fmt.Sprintf("modprobe tun; mkdir -p %s && mknod %s c 10 200 && chmod 666 %s (in a container: pass the host's /dev/net/tun in)", filepath.Dir(cfg.TUN), cfg.TUN, cfg.TUN)
	var st unix.Stat_t
	if err := unix.Stat(cfg.TUN, &st); err != nil {
		r.Found = fmt.Sprintf("%s: %v: the migration cache device and wireguard-go cannot be created", cfg.TUN, err)
		r.Fix = mknod
		return r
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR || unix.Major(st.Rdev) != 10 || unix.Minor(st.Rdev) != 200 {
		r.Found = fmt.Sprintf("%s is not the TUN device (character device 10:200)", cfg.TUN)
		r.Fix = "rm " + cfg.TUN + "; " + mknod
		return r
	}
	fd, err := unix.Open(cfg.TUN, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		r.Found = fmt.Sprintf("open %s: %v: the migration cache device and wireguard-go cannot be created", cfg.TUN, err)
		r.Fix = "modprobe tun; run as root (or with CAP_NET_ADMIN)"
		return r
	}
	unix.Close(fd)
	r.Level, r.Found = OK, cfg.TUN+" opens (the migration cache device and wireguard-go need it)"
	return r
}

// checkForwarding checks that the kernel routes VM traffic between the
// VMs' interfaces and the tunnel: IPv4 always, IPv6 when the agent uses it.
func checkForwarding(cfg Config, st *control.Status) []Result {
	results := []Result{forwarding(cfg, "ip_forward", "net/ipv4/ip_forward", true)}
	v6, known := usesIPv6(st)
	if r := forwarding(cfg, "ipv6_forward", "net/ipv6/conf/all/forwarding", v6); r.Level != OK || v6 {
		if r.Level == Info && !known {
			r.Found += " (the agent did not answer, so whether it has IPv6 VIPs is unknown)"
		}
		results = append(results, r)
	}
	return results
}

// forwarding checks one forwarding sysctl; when it is off and not needed the
// finding is Info.
func forwarding(cfg Config, check, rel string, needed bool) Result {
	name := sysctlName(strings.Split(rel, "/")...)
	r := Result{Check: check}
	v, err := readSysctl(cfg.ProcSys, rel)
	switch {
	case errors.Is(err, os.ErrNotExist) && !needed:
		r.Level, r.Found = OK, name+" does not exist (no IPv6 here) and no IPv6 VIP needs it"
	case errors.Is(err, os.ErrNotExist):
		r.Level, r.Found = Fail, name+" does not exist: this kernel runs without IPv6, and the agent has IPv6 addresses"
		r.Fix = "boot without ipv6.disable=1"
	case err != nil:
		r.Level, r.Found = Fail, fmt.Sprintf("cannot read %s: %v", name, err)
		r.Fix = "run vmroam doctor as root, on the host itself"
	case v != 0:
		r.Level, r.Found = OK, fmt.Sprintf("%s = %d", name, v)
	case needed:
		r.Level, r.Found = Fail, fmt.Sprintf("%s = 0: this host does not route VM traffic between its VMs and the tunnel", name)
		r.Fix = fmt.Sprintf("sysctl -w %s=1 && echo %s=1 >> %s", name, name, sysctlConf)
	default:
		r.Level, r.Found = Info, fmt.Sprintf("%s = 0: needed only for IPv6 VIPs", name)
		r.Fix = fmt.Sprintf("before using IPv6 VIPs: sysctl -w %s=1 && echo %s=1 >> %s", name, name, sysctlConf)
	}
	return r
}

// usesIPv6 reports whether the agent's overlay, VIPs or networks have IPv6
// addresses; known is false without the agent's status.
func usesIPv6(st *control.Status) (v6, known bool) {
	if st == nil {
		return false, false
	}
	if p, err := netip.ParsePrefix(st.Address); err == nil && p.Addr().Is6() {
		return true, true
	}
	for _, v := range st.VIPs {
		if a, err := netip.ParseAddr(v.VIP); err == nil && a.Is6() {
			return true, true
		}
	}
	for _, n := range st.Networks {
		if n.Prefix.Addr().Is6() {
			return true, true
		}
	}
	return false, true
}

// checkRPFilter finds strict reverse-path filtering on the interfaces a
// migrated VM's packets arrive on. The kernel validates a packet arriving on
// an interface with max(conf/all/rp_filter, conf/IFACE/rp_filter): 0 is
// off, 2 loose (a route back by any interface), 1 strict (the route back
// must leave by the same interface). During a migration the VM's address is
// still routed elsewhere when its first packets arrive (on its new vif, on
// the tunnel from its new host, into the cache device), so strict filtering
// drops them.
func checkRPFilter(cfg Config, st *control.Status) Result {
	r := Result{Check: "rp_filter"}
	conf := "net/ipv4/conf"
	all, err := readSysctl(cfg.ProcSys, conf+"/all/rp_filter")
	if err != nil {
		r.Level, r.Found = Warn, fmt.Sprintf("cannot read net.ipv4.conf.all.rp_filter: %v", err)
		return r
	}
	if all == 1 {
		r.Level = Fail
		r.Found = "net.ipv4.conf.all.rp_filter = 1: strict reverse-path filtering on every interface drops the packets of migrating VMs (they arrive before this host routes the VM's address back that way)"
		r.Fix = fmt.Sprintf("sysctl -w net.ipv4.conf.all.rp_filter=2 && echo net.ipv4.conf.all.rp_filter=2 >> %s (loose: the kernel takes the larger of all and each interface)", sysctlConf)
		return r
	}
	// default: what the VM interfaces created from now on start with.
	ifaces := []string{"default"}
	vms := vmInterfaces(cfg, st)
	ifaces = append(ifaces, vms...)
	wg := wgInterface(cfg, st)
	if _, err := netlink.LinkByName(wg); err == nil {
		ifaces = append(ifaces, wg)
	}
	var strict []string
	for _, iface := range ifaces {
		v, err := readSysctl(cfg.ProcSys, conf+"/"+iface+"/rp_filter")
		if err != nil {
			continue // gone since we listed it
		}
		if max(all, v) == 1 {
			strict = append(strict, iface)
		}
	}
	if len(strict) == 0 {
		r.Level = OK
		r.Found = fmt.Sprintf("no strict rp_filter where migrating VMs' packets arrive (all=%d; checked default, %s and %d VM interfaces)", all, wg, len(vms))
		return r
	}
	var set []string
	for _, iface := range strict {
		set = append(set, sysctlName("net", "ipv4", "conf", iface, "rp_filter")+"=2")
	}
	r.Level = Fail
	r.Fix = "sysctl -w " + strings.Join(set, " ")
	if strict[0] == "default" {
		strict[0] = "default (every VM interface created from now on)"
		r.Fix += fmt.Sprintf(" && echo net.ipv4.conf.default.rp_filter=2 >> %s", sysctlConf)
	}
	r.Found = fmt.Sprintf("strict rp_filter (1) on %s: packets of migrating VMs arriving there are dropped", strings.Join(strict, ", "))
	return r
}

// wgInterface is the agent's WireGuard interface: what the agent says, else
// the configured name.
func wgInterface(cfg Config, st *control.Status) string {
	if st != nil && st.Interface != "" {
		return st.Interface
	}
	return cfg.Interface
}

// vmInterfaces lists the interfaces matching the VIF patterns and those the
// agent has VIPs on, sorted, each once.
func vmInterfaces(cfg Config, st *control.Status) []string {
	var names []string
	links, _ := netlink.LinkList()
	for _, l := range links {
		name := l.Attrs().Name
		for _, p := range cfg.VIFPatterns {
			if ok, _ := path.Match(p, name); ok {
				names = append(names, name)
				break
			}
		}
	}
	if st != nil {
		for _, v := range st.VIPs {
			if v.Local && v.Dev != "" {
				names = append(names, v.Dev)
			}
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// checkClock asks the kernel whether NTP (or another time daemon) keeps the
// clock synchronized. vmroam needs no agreement between the hosts' clocks:
// gossip, caches and quarantines count with local monotonic time. But
// migration records carry wall-clock times, and WireGuard accepts a peer's
// handshake only if its timestamp is later than the last one seen, so a
// clock that is stepped back later locks this host out of its tunnels.
func checkClock(cfg Config) Result {
	r := Result{Check: "clock"}
	var tx unix.Timex
	state, err := cfg.adjtimex(&tx)
	if err != nil {
		r.Level, r.Found = Warn, fmt.Sprintf("cannot read the clock's state (adjtimex): %v", err)
		return r
	}
	maxErr := float64(tx.Maxerror) / 1000 // µs to ms
	if tx.Status&unix.STA_UNSYNC != 0 || state == unix.TIME_ERROR {
		r.Level = Warn
		r.Found = "the kernel clock is not synchronized (no NTP): migration times in vmroam status cannot be compared between hosts, and a later step back of this clock makes WireGuard peers reject its handshakes until it passes the time they last saw"
		r.Fix = "timedatectl set-ntp true (or apt-get install chrony)"
		return r
	}
	r.Level, r.Found = OK, fmt.Sprintf("the kernel clock is synchronized (maximum error %.1f ms)", maxErr)
	return r
}
