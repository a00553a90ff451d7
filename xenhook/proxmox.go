package xenhook

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// The facts the Proxmox VE hookscript builds on, from Proxmox's
// qemu-server (src/PVE/QemuServer.pm, QemuMigrate.pm, CLI/qm.pm,
// QemuServer/Network.pm), pve-guest-common (GuestHelpers.pm) and
// pve-common (JSONSchema.pm, ParseUtils.pm):
//
//   - A VM's `hookscript: <storage>:snippets/<file>` is run as
//     `<file> <vmid> <phase>` (GuestHelpers.pm exec_hookscript), with the
//     daemon's environment: PATH is /sbin:/bin:/usr/sbin:/usr/bin
//     (PVE::Daemon, PVE::CLIHandler). A non-zero exit aborts the start in
//     "pre-start"; in the other phases it is only a warning.
//   - "pre-start" runs before QEMU is spawned, "post-start" once it runs
//     (vm_start_nolock). On a live migration's target the source runs
//     `qm start <vmid> --migratedfrom <source node>`: both phases run
//     there, with PVE_MIGRATED_FROM=<source node> in the environment,
//     "post-start" while the incoming QEMU waits for the memory, before
//     the source resumes it (QemuMigrate.pm phase2, phase3_cleanup).
//     The VM's config is still the source node's file then
//     (/etc/pve/nodes/<source>/qemu-server/<vmid>.conf, vm_start loads
//     it with migratedfrom): `qm config` on the target does not find it.
//   - On the source of a successful live migration no phase runs: the
//     QEMU there is stopped without "pre-stop" (vm_stop with nocheck) and
//     cleaned up without "post-stop" (phase3_cleanup passes
//     skip_hookscript). "pre-stop" runs before a stop or shutdown through
//     the API, "post-stop" after any end of QEMU, a crash included, and on
//     a target whose incoming migration failed (phase2_cleanup's
//     `qm stop --migratedfrom`), again with the config still at the
//     source node.
//   - The config is `key: value` lines, keys sorted; the description is
//     `#` lines at the top, percent-encoded (encode_text: control and
//     non-ASCII bytes, ':' and '%'); `[PENDING]`, `[special:...]` and
//     snapshot sections (`[name]`) follow the current config. `qm config`
//     prints the same keys, with `description: <encoded text>` on one
//     line (newlines as %0A).
//   - net<N> (N < 32) is `<model>=<MAC>,bridge=<bridge>[,tag=..,...]`; its
//     tap is tap<vmid>i<N> (print_netdev_full), with or without the
//     firewall bridge; without a bridge QEMU uses its user network and
//     there is no tap. ipconfig<N> (cloud-init) is
//     `[ip=<CIDR>|dhcp|manual][,gw=..][,ip6=<CIDR>|dhcp|auto|manual][,gw6=..]`
//     for the guest side of net<N>.
//   - tags are `;`-separated words of [a-z0-9_][a-z0-9_+.-]*: no room for
//     an IPv6 address, so VIPs are not declared in tags.

// ProxmoxPhase is the phase a Proxmox VE hookscript is run for.
type ProxmoxPhase string

// The phases Proxmox VE runs a VM's hookscript for.
const (
	PhasePreStart  ProxmoxPhase = "pre-start"
	PhasePostStart ProxmoxPhase = "post-start"
	PhasePreStop   ProxmoxPhase = "pre-stop"
	PhasePostStop  ProxmoxPhase = "post-stop"
)

// Acts reports whether the hook tells the agent anything at phase p, and
// so needs the VM's config: at "pre-stop" and at phases it does not know,
// it does not.
func (p ProxmoxPhase) Acts() bool {
	return p == PhasePreStart || p == PhasePostStart || p == PhasePostStop
}

// ProxmoxEvent is one run of a VM's hookscript.
type ProxmoxEvent struct {
	VMID  int
	Phase ProxmoxPhase
	// Config is the VM's config: its file, or what `qm config` prints.
	Config []byte
}

const (
	// maxNets is Proxmox's number of net<N>/ipconfig<N> slots ($MAX_NETS).
	maxNets = 32
	// maxVMID is the highest VMID Proxmox gives out.
	maxVMID = 999999999
	// vipMarker starts a line of a VM's description (its Notes) that
	// declares a VIP.
	vipMarker = "vmroam-vip:"
)

// ParseVMID reads a VMID as Proxmox passes it to the hookscript: a decimal
// number from 1 to 999999999, without sign or leading zeros (the tap names
// are made of it as written).
func ParseVMID(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > maxVMID || strconv.Itoa(n) != s {
		return 0, fmt.Errorf("VMID %q is not a number from 1 to %d", s, maxVMID)
	}
	return n, nil
}

// ProxmoxTap is the tap device of a VM's net<n>.
func ProxmoxTap(vmid, n int) string { return fmt.Sprintf("tap%di%d", vmid, n) }

// pveConfig is what the hook reads of a VM's current config.
type pveConfig struct {
	// nets holds the bridge of each net<N> ("" for none: no tap).
	nets map[int]string
	// ipconfig holds each ipconfig<N>'s value.
	ipconfig map[int]string
	descr    []string
	// warns names the lines skipped: neither blank, nor a comment, nor
	// `key: value`, nor a [section].
	warns []string
}

// parsePVEConfig reads the current config (everything before the first
// section) of a VM's config file or `qm config` output. As Proxmox's own
// parse_vm_config, it skips a line of any other shape with a warning: one
// odd line must not keep the hook from detaching the VM's VIPs at
// post-stop. An empty config is an error.
func parsePVEConfig(b []byte) (*pveConfig, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, errors.New("VM config: empty")
	}
	c := &pveConfig{nets: map[int]string{}, ipconfig: map[int]string{}}
	var descr strings.Builder
	for i, line := range strings.Split(string(b), "\n") {
		line = strings.TrimRight(line, " \t\r\v\f")
		switch {
		case strings.TrimSpace(line) == "":
			continue
		case strings.HasPrefix(line, "["):
			if !strings.HasSuffix(line, "]") {
				c.warns = append(c.warns, fmt.Sprintf("VM config: line %d: %.40q is not a [section]: skipped", i+1, line))
				continue
			}
			// Pending changes and snapshots: not what runs.
			return c.finish(descr.String()), nil
		case strings.HasPrefix(line, "#"):
			descr.WriteString(decodeText(line[1:]))
			descr.WriteByte('\n')
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		val = strings.TrimSpace(val)
		if !ok || !validKey(key) || val == "" {
			c.warns = append(c.warns, fmt.Sprintf("VM config: line %d: %.40q is not `key: value`: skipped", i+1, line))
			continue
		}
		if key == "description" {
			descr.WriteString(decodeText(val))
			descr.WriteByte('\n')
			continue
		}
		if n, ok := slot(key, "net"); ok {
			c.nets[n] = netBridge(val)
		} else if n, ok := slot(key, "ipconfig"); ok {
			c.ipconfig[n] = val
		}
	}
	return c.finish(descr.String()), nil
}

func (c *pveConfig) finish(descr string) *pveConfig {
	c.descr = strings.Split(strings.TrimRight(descr, "\n"), "\n")
	return c
}

// validKey is a config key as Proxmox writes them: [a-z][a-z_-]*[0-9]*.
func validKey(k string) bool {
	i := 0
	for i < len(k) && (k[i] >= 'a' && k[i] <= 'z' || i > 0 && (k[i] == '_' || k[i] == '-')) {
		i++
	}
	for i > 0 && i < len(k) && k[i] >= '0' && k[i] <= '9' {
		i++
	}
	return i > 0 && i == len(k)
}

// slot returns N of a key prefix<N>, N < maxNets written without leading
// zeros (Proxmox knows no other).
func slot(key, prefix string) (int, bool) {
	s, ok := strings.CutPrefix(key, prefix)
	if !ok {
		return 0, false
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n >= maxNets || strconv.Itoa(n) != s {
		return 0, false
	}
	return n, true
}

// netBridge returns the bridge= of a net<N> value, "" when it has none.
func netBridge(val string) string {
	for _, part := range strings.Split(val, ",") {
		if k, v, ok := strings.Cut(part, "="); ok && strings.TrimSpace(k) == "bridge" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// decodeText undoes Proxmox's encode_text: %XX is the byte XX; a % not
// followed by two hex digits stays as it is (as uri_unescape leaves it).
func decodeText(s string) string {
	if !strings.Contains(s, "%") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '%' && i+2 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+3], 16, 8); err == nil {
				b.WriteByte(byte(v))
				i += 2
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// pveVIP is a VIP with the net<N> it is behind (-1: none named) and, when
// its dev is unknown, why.
type pveVIP struct {
	DomainVIP
	why string
}

// ProxmoxVIPs reads the VIPs of VM vmid and their taps from its config.
// An operator declares them in one of two ways:
//
//   - lines of the VM's description (its Notes in the GUI) of the form
//     `vmroam-vip: <address> [net<N>]`, the address with or without /32
//     (/128); without net<N> the VIP is behind the VM's one network
//     device, and unknown if it has several. When there is any such line,
//     these are the VM's VIPs and nothing else is.
//   - else, the static addresses of its cloud-init ipconfig<N> (ip= and
//     ip6= in CIDR form, without the prefix length), behind net<N>;
//     dhcp, auto and manual are not addresses, link-local ones are not
//     VIPs.
//
// The description wins so that a VM with cloud-init can leave some of its
// addresses out (a storage or management network, say). A VIP's dev is
// tap<vmid>i<N> when net<N> exists and has a bridge, else "".
//
// VIPs come once each, in order (description lines as they come, else by
// N, ip before ip6). Lines of the config it cannot read are skipped, each
// with a warning for the caller to print. An empty config, a malformed
// vmroam-vip line or ipconfig<N> value, an invalid address or a VIP behind
// two devices is an error.
func ProxmoxVIPs(vmid int, conf []byte) (vips []DomainVIP, warnings []string, err error) {
	v, warnings, err := proxmoxVIPs(vmid, conf)
	if err != nil {
		return nil, warnings, err
	}
	return plainVIPs(v), warnings, nil
}

func proxmoxVIPs(vmid int, conf []byte) ([]pveVIP, []string, error) {
	c, err := parsePVEConfig(conf)
	if err != nil {
		return nil, nil, err
	}
	vips, err := c.vips(vmid)
	if err != nil {
		return nil, c.warns, err
	}
	return vips, c.warns, nil
}

func (c *pveConfig) vips(vmid int) ([]pveVIP, error) {
	var out []pveVIP
	add := func(vip netip.Addr, n int) error {
		if n < 0 {
			switch len(c.nets) {
			case 0:
				return mergeVIP(&out, pveVIP{DomainVIP{VIP: vip}, "no net<N> named, and the VM has no network device"})
			case 1:
				for m := range c.nets {
					n = m
				}
			default:
				return mergeVIP(&out, pveVIP{DomainVIP{VIP: vip}, "no net<N> named, and the VM has several network devices"})
			}
		}
		dev, why := "", ""
		switch bridge, ok := c.nets[n]; {
		case !ok:
			why = fmt.Sprintf("the VM has no net%d", n)
		case bridge == "":
			why = fmt.Sprintf("net%d has no bridge (QEMU's user network: no tap)", n)
		default:
			dev = ProxmoxTap(vmid, n)
		}
		return mergeVIP(&out, pveVIP{DomainVIP{VIP: vip, Dev: dev}, why})
	}

	declared := false
	for _, line := range c.descr {
		rest, ok := strings.CutPrefix(strings.TrimSpace(line), vipMarker)
		if !ok {
			continue
		}
		declared = true
		f := strings.Fields(rest)
		if len(f) == 0 || len(f) > 2 {
			return nil, fmt.Errorf("description: %.60q: want %s <address> [net<N>]", line, vipMarker)
		}
		vip, err := parseVIP(f[0])
		if err != nil {
			return nil, fmt.Errorf("description: %w", err)
		}
		n := -1
		if len(f) == 2 {
			if n, ok = slot(f[1], "net"); !ok {
				return nil, fmt.Errorf("description: VIP %s: %.20q is not net0 to net%d", vip, f[1], maxNets-1)
			}
		}
		if err := add(vip, n); err != nil {
			return nil, err
		}
	}
	if declared {
		return out, nil
	}

	slots := make([]int, 0, len(c.ipconfig))
	for n := range c.ipconfig {
		slots = append(slots, n)
	}
	slices.Sort(slots)
	for _, n := range slots {
		addrs, err := ipconfigAddrs(c.ipconfig[n])
		if err != nil {
			return nil, fmt.Errorf("ipconfig%d: %w", n, err)
		}
		for _, a := range addrs {
			if err := add(a, n); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// mergeVIP adds v to out, or its dev to the same VIP already there.
func mergeVIP(out *[]pveVIP, v pveVIP) error {
	for i := range *out {
		w := &(*out)[i]
		if w.VIP != v.VIP {
			continue
		}
		switch {
		case w.Dev == "" && v.Dev != "":
			w.Dev, w.why = v.Dev, ""
		case v.Dev != "" && v.Dev != w.Dev:
			return fmt.Errorf("VIP %s is behind both %s and %s", v.VIP, w.Dev, v.Dev)
		}
		return nil
	}
	*out = append(*out, v)
	return nil
}

// ipconfigAddrs returns the static addresses of an ipconfig<N> value, ip=
// before ip6= whatever their order.
func ipconfigAddrs(val string) ([]netip.Addr, error) {
	var v4, v6 []netip.Addr
	seen := map[string]bool{}
	for _, part := range strings.Split(val, ",") {
		if strings.TrimSpace(part) == "" {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok || k == "" || v == "" {
			return nil, fmt.Errorf("%.40q is not key=value", part)
		}
		if seen[k] {
			return nil, fmt.Errorf("%s twice", k)
		}
		seen[k] = true
		var want4 bool
		switch k {
		case "ip":
			want4 = true
			if v == "dhcp" || v == "manual" {
				continue
			}
		case "ip6":
			if v == "dhcp" || v == "auto" || v == "manual" {
				continue
			}
		default:
			continue // gw, gw6, and what later versions add
		}
		p, err := netip.ParsePrefix(v)
		if err != nil || p.Addr().Zone() != "" || p.Addr().Is4() != want4 || p.Addr().Is4In6() {
			fam := "IPv6"
			if want4 {
				fam = "IPv4"
			}
			return nil, fmt.Errorf("%s=%.50q is not an %s address in CIDR form", k, v, fam)
		}
		switch a := p.Addr(); {
		case !routable(a):
		case want4:
			v4 = append(v4, a)
		default:
			v6 = append(v6, a)
		}
	}
	return append(v4, v6...), nil
}

// ProxmoxActions says what the agent must be told for ev:
//
//   - "pre-start" (before QEMU starts; on a migration's target too):
//     "prepare" for each VIP;
//   - "post-start" (QEMU runs; on a migration's target it waits for the
//     memory, and the VM runs at its old host until the end of the copy):
//     "attach" for each VIP on its tap, when the VM announces itself
//     (WhenAnnounced);
//   - "post-stop" (QEMU ended here; also on a target whose incoming
//     migration failed): "detach" for each VIP.
//
// "pre-stop" and unknown phases ask for nothing: a stop may still fail,
// and "post-stop" follows every end of QEMU. The config is read only for
// the phases that act. An error names what could not be done; the actions
// returned with it are those that could still be computed (at
// "post-start", the VIPs whose tap is known), and the caller should carry
// them out. Warnings name the config's lines that were skipped, for the
// caller to print.
func ProxmoxActions(ev ProxmoxEvent) (actions []Action, warnings []string, err error) {
	var verb string
	switch ev.Phase {
	case PhasePreStart:
		verb = "prepare"
	case PhasePostStart:
		verb = "attach"
	case PhasePostStop:
		verb = "detach"
	default:
		return nil, nil, nil
	}
	vips, warnings, err := proxmoxVIPs(ev.VMID, ev.Config)
	if err != nil {
		return nil, warnings, fmt.Errorf("xenhook: VM %d, %s: %w", ev.VMID, ev.Phase, err)
	}
	var nodev []string
	for _, v := range vips {
		switch verb {
		case "attach":
			if v.Dev == "" {
				nodev = append(nodev, fmt.Sprintf("VIP %s: %s", v.VIP, v.why))
				continue
			}
			actions = append(actions, Action{Verb: verb, VIP: v.VIP, Dev: v.Dev, WhenAnnounced: true})
		case "prepare":
			actions = append(actions, Action{Verb: verb, VIP: v.VIP, Dev: v.Dev})
		case "detach":
			actions = append(actions, Action{Verb: verb, VIP: v.VIP})
		}
	}
	if len(nodev) > 0 {
		return actions, warnings, fmt.Errorf("xenhook: VM %d, %s: not attached, the tap is unknown: %s",
			ev.VMID, ev.Phase, strings.Join(nodev, "; "))
	}
	return actions, warnings, nil
}
