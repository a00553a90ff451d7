package xenhook

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
)

// The facts the libvirt hook builds on, from libvirt's docs/hooks.rst and
// src/util/virhook.c, src/qemu/qemu_process.c and qemu_migration.c:
//
//   - libvirt runs /etc/libvirt/hooks/qemu, then every executable in
//     /etc/libvirt/hooks/qemu.d/ in alphabetical order (since 6.5.0), as
//     `<domain> <op> <sub-op> <extra>` with the domain XML on stdin and an
//     environment of only LC_ALL, PATH, HOME, USER, LOGNAME and TMPDIR.
//   - On a migration's destination: "migrate begin" (the XML as it
//     arrives; the hook's stdout, when not empty, replaces it), then
//     "prepare begin" and "start begin" before QEMU is spawned, then
//     "started begin" once QEMU runs, paused, waiting for the incoming
//     state (qemuMigrationDstPrepareAny calls qemuProcessFinishStartup
//     without starting the CPUs). The XML of "started" is the live one:
//     every interface has its <target dev>.
//   - On the source, after a successful migration: "stopped end", then
//     "release end <shutoff-reason>" (the reason, "migrated" here, since
//     10.5.0; "-" before).
//   - A non-zero exit from prepare, start or migrate aborts the start or
//     the migration; libvirt logs a hook's stderr only when it fails.

// LibvirtEvent is one call of libvirt's qemu hook.
type LibvirtEvent struct {
	// Domain, Op, SubOp and Extra are the hook's four arguments
	// ("web1", "started", "begin", "-").
	Domain, Op, SubOp, Extra string
	// XML is the domain XML libvirt wrote on the hook's stdin.
	XML []byte
}

// DomainVIP is one of a domain's VIPs and the host interface behind which
// the VM has it.
type DomainVIP struct {
	VIP netip.Addr
	// Dev is the interface's <target dev> on this host, "" when unknown
	// (not named in the XML, or not assigned yet).
	Dev string
}

// domainVIP returns v itself; the internal VIP types that embed a
// DomainVIP (with why its Dev is unknown) get it, for plainVIPs.
func (v DomainVIP) domainVIP() DomainVIP { return v }

// plainVIPs strips what the internal VIP types add to their DomainVIPs.
func plainVIPs[V interface{ domainVIP() DomainVIP }](vips []V) []DomainVIP {
	out := make([]DomainVIP, len(vips))
	for i, v := range vips {
		out[i] = v.domainVIP()
	}
	return out
}

// Action is one thing the agent must be told for a LibvirtEvent.
type Action struct {
	// Verb is "prepare" (a migration is coming: pre-provision VIP),
	// "attach" (the VM runs here behind Dev) or "detach" (it no longer
	// does).
	Verb string
	VIP  netip.Addr
	// Dev is the VM's interface: set for "attach", and for "prepare" when
	// known.
	Dev string
	// WhenAnnounced asks an "attach" to claim only once the VM announces
	// itself on Dev, if another host runs it (control.WhenAnnounced).
	WhenAnnounced bool
}

// vipNamespace is the XML namespace of vmroam's element in a domain's
// <metadata> (libvirt keeps there one element per namespace, as given).
const vipNamespace = "https://vmroam.dev/xmlns/1"

// libvirtDomain is what the hook reads of a domain XML; everything else is
// ignored.
type libvirtDomain struct {
	Metadata struct {
		VIPs []struct {
			// "vip" without a namespace matches <vip> and <vmroam:vip>.
			VIP []struct {
				Address   string `xml:"address,attr"`
				Interface string `xml:"interface,attr"`
			} `xml:"vip"`
		} `xml:"https://vmroam.dev/xmlns/1 vips"`
	} `xml:"metadata"`
	Devices struct {
		Interfaces []domainInterface `xml:"interface"`
	} `xml:"devices"`
}

type domainInterface struct {
	MAC struct {
		Address string `xml:"address,attr"`
	} `xml:"mac"`
	Target struct {
		Dev string `xml:"dev,attr"`
	} `xml:"target"`
	Alias struct {
		Name string `xml:"name,attr"`
	} `xml:"alias"`
	// Only <ip> directly under <interface>: the guest's side. The <ip>
	// elements under <source> of type='ethernet' are the host's.
	IPs []struct {
		Address string `xml:"address,attr"`
	} `xml:"ip"`
}

// DomainVIPs reads the VIPs of a domain and their interfaces from its XML:
// the addresses in vmroam's metadata element,
//
//	<metadata>
//	  <vmroam:vips xmlns:vmroam="https://vmroam.dev/xmlns/1">
//	    <vmroam:vip address="100.64.1.5" interface="52:54:00:6b:3c:58"/>
//	  </vmroam:vips>
//	</metadata>
//
// and the guest addresses libvirt itself knows, <ip address="..."/> on an
// <interface> (link-local ones are not VIPs and are skipped). A VIP's
// interface is the <target dev> of the <interface> that holds its <ip>,
// or of the one its metadata "interface" attribute names, by MAC address,
// alias name or target dev. A MAC or an alias ("ua-..." in a persistent
// definition) survives a migration; a target dev ("vnet3") is one host's
// name for one run of the VM.
//
// VIPs come once each, in the order they first appear, each with its dev:
// "" when unknown (no interface named, none of that name, or the XML is
// not a running domain's and has no target devs yet). A malformed XML, an
// invalid address or a VIP behind two interfaces is an error; unknown
// elements are ignored.
func DomainVIPs(domainXML []byte) ([]DomainVIP, error) {
	vips, err := domainVIPs(domainXML)
	if err != nil {
		return nil, err
	}
	return plainVIPs(vips), nil
}

// namedVIP is a DomainVIP with the interface its metadata names, for
// saying why its Dev is unknown.
type namedVIP struct {
	DomainVIP
	named string
}

func domainVIPs(domainXML []byte) ([]namedVIP, error) {
	dom, err := decodeDomain(domainXML)
	if err != nil {
		return nil, err
	}
	ifaces := dom.Devices.Interfaces

	var out []namedVIP
	add := func(vip netip.Addr, dev, named string) error {
		for i := range out {
			v := &out[i]
			if v.VIP != vip {
				continue
			}
			switch {
			case v.Dev == "":
				v.Dev = dev
			case dev != "" && dev != v.Dev:
				return fmt.Errorf("VIP %s is behind both %s and %s", vip, v.Dev, dev)
			}
			if v.named == "" {
				v.named = named
			}
			return nil
		}
		out = append(out, namedVIP{DomainVIP{VIP: vip, Dev: dev}, named})
		return nil
	}

	for _, vips := range dom.Metadata.VIPs {
		for _, v := range vips.VIP {
			vip, err := parseVIP(v.Address)
			if err != nil {
				return nil, fmt.Errorf("vmroam metadata: %w", err)
			}
			if err := add(vip, targetOf(ifaces, v.Interface), v.Interface); err != nil {
				return nil, err
			}
		}
	}
	for _, iface := range ifaces {
		for _, ip := range iface.IPs {
			a, err := netip.ParseAddr(ip.Address)
			if err != nil || a.Zone() != "" {
				return nil, fmt.Errorf("<interface> %s: <ip address=%q> is not an IP address", ifaceName(iface), ip.Address)
			}
			a = a.Unmap()
			if !routable(a) {
				continue
			}
			if err := add(a, iface.Target.Dev, ""); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// decodeDomain reads exactly one <domain> element, and nothing after it
// but comments and white space.
func decodeDomain(b []byte) (*libvirtDomain, error) {
	if len(bytes.TrimSpace(b)) == 0 {
		return nil, errors.New("domain XML: empty")
	}
	d := xml.NewDecoder(bytes.NewReader(b))
	var dom libvirtDomain
	seen := false
	for {
		tok, err := d.Token()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("domain XML: %w", err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if seen {
				return nil, fmt.Errorf("domain XML: <%s> after </domain>", t.Name.Local)
			}
			if t.Name.Local != "domain" || t.Name.Space != "" {
				return nil, fmt.Errorf("domain XML: root element is <%s>, not <domain>", t.Name.Local)
			}
			if err := d.DecodeElement(&dom, &t); err != nil {
				return nil, fmt.Errorf("domain XML: %w", err)
			}
			seen = true
		case xml.CharData:
			if len(bytes.TrimSpace(t)) != 0 {
				return nil, errors.New("domain XML: text outside <domain>")
			}
		case xml.Directive:
			// A DOCTYPE would let the document define entities; libvirt
			// never writes one.
			return nil, errors.New("domain XML: unexpected <!...> directive")
		}
	}
	if !seen {
		return nil, errors.New("domain XML: no <domain> element")
	}
	return &dom, nil
}

// parseVIP reads a VIP as vmroam's metadata may give it: an address, or
// an address with /32 or /128.
func parseVIP(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(s)
	if strings.Contains(s, "/") {
		p, perr := netip.ParsePrefix(s)
		if perr == nil && p.Bits() != p.Addr().BitLen() {
			return netip.Addr{}, fmt.Errorf("VIP %q is a network, not one address", s)
		}
		a, err = p.Addr(), perr
	}
	if err != nil || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("VIP %q is not an IP address", s)
	}
	a = a.Unmap()
	if !routable(a) {
		return netip.Addr{}, fmt.Errorf("VIP %s cannot be routed to a VM", a)
	}
	return a, nil
}

// routable is an address the agent can route to one VM.
func routable(a netip.Addr) bool {
	return a.IsValid() && !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() &&
		!a.IsLinkLocalUnicast() && a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// targetOf returns the target dev of the interface name refers to, by
// MAC, alias or target dev; "" if none.
func targetOf(ifaces []domainInterface, name string) string {
	if name == "" {
		return ""
	}
	mac, macErr := net.ParseMAC(name)
	for _, iface := range ifaces {
		switch {
		case macErr == nil && strings.EqualFold(iface.MAC.Address, mac.String()),
			iface.Alias.Name == name,
			iface.Target.Dev == name:
			return iface.Target.Dev
		}
	}
	return ""
}

func ifaceName(i domainInterface) string {
	for _, s := range []string{i.Target.Dev, i.Alias.Name, i.MAC.Address} {
		if s != "" {
			return s
		}
	}
	return "(unnamed)"
}

// LibvirtActions says what the agent must be told for ev:
//
//   - "prepare begin" and "start begin" (a start, or a migration's
//     destination before QEMU runs): "prepare" for each VIP;
//   - "started begin" (QEMU runs; on a migration's destination, paused,
//     waiting for the VM's state): "attach" for each VIP on its dev, when
//     the VM announces itself (WhenAnnounced): the memory copy is still
//     to come, and the VM runs at its old host until its end;
//   - "release end" (the VM is gone from this host, migrated or stopped):
//     "detach" for each VIP.
//
// Everything else asks for nothing, "stopped end" included: the VM may be
// stopping for a migration, and "release" follows it. The XML is read only
// for the events that act. An error names what could not be done; the
// actions returned with it are those that could still be computed (at
// "started", the VIPs whose dev is known), and the caller should carry
// them out.
func LibvirtActions(ev LibvirtEvent) ([]Action, error) {
	var verb string
	switch {
	case (ev.Op == "prepare" || ev.Op == "start") && ev.SubOp == "begin":
		verb = "prepare"
	case ev.Op == "started" && ev.SubOp == "begin":
		verb = "attach"
	case ev.Op == "release" && ev.SubOp == "end":
		verb = "detach"
	default:
		return nil, nil
	}
	vips, err := domainVIPs(ev.XML)
	if err != nil {
		return nil, fmt.Errorf("xenhook: domain %s, %s %s: %w", ev.Domain, ev.Op, ev.SubOp, err)
	}
	var (
		actions []Action
		nodev   []string
	)
	for _, v := range vips {
		switch verb {
		case "attach":
			if v.Dev != "" {
				actions = append(actions, Action{Verb: verb, VIP: v.VIP, Dev: v.Dev, WhenAnnounced: true})
				continue
			}
			why := "no interface named in vmroam's metadata"
			if v.named != "" {
				why = fmt.Sprintf("the domain has no interface %q with a target dev (%s)", v.named, targetDevs(ev.XML))
			}
			nodev = append(nodev, fmt.Sprintf("VIP %s: %s", v.VIP, why))
		case "prepare":
			actions = append(actions, Action{Verb: verb, VIP: v.VIP, Dev: v.Dev})
		case "detach":
			actions = append(actions, Action{Verb: verb, VIP: v.VIP})
		}
	}
	if len(nodev) > 0 {
		return actions, fmt.Errorf("xenhook: domain %s, %s %s: not attached, the interface is unknown: %s",
			ev.Domain, ev.Op, ev.SubOp, strings.Join(nodev, "; "))
	}
	return actions, nil
}

// targetDevs lists the domain's target devs for an error message.
func targetDevs(domainXML []byte) string {
	dom, err := decodeDomain(domainXML)
	if err != nil {
		return err.Error()
	}
	var devs []string
	for _, iface := range dom.Devices.Interfaces {
		if iface.Target.Dev != "" {
			devs = append(devs, fmt.Sprintf("%s: MAC %s, alias %s", iface.Target.Dev, iface.MAC.Address, iface.Alias.Name))
		}
	}
	if len(devs) == 0 {
		return "it has none"
	}
	return "it has " + strings.Join(devs, "; ")
}
