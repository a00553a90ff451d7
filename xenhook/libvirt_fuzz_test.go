package xenhook

import (
	"encoding/xml"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// canonicalDomain writes the smallest domain XML that holds vips: each in
// vmroam's metadata, naming its dev, and one <interface> per dev.
func canonicalDomain(t *testing.T, vips []DomainVIP) []byte {
	type vipElem struct {
		Address   string `xml:"address,attr"`
		Interface string `xml:"interface,attr,omitempty"`
	}
	type iface struct {
		Target struct {
			Dev string `xml:"dev,attr"`
		} `xml:"target"`
	}
	var dom struct {
		XMLName  xml.Name `xml:"domain"`
		Metadata struct {
			VIPs struct {
				XMLName xml.Name  `xml:"https://vmroam.dev/xmlns/1 vips"`
				VIP     []vipElem `xml:"vip"`
			}
		} `xml:"metadata"`
		Interfaces []iface `xml:"devices>interface"`
	}
	var devs []string
	for _, v := range vips {
		dom.Metadata.VIPs.VIP = append(dom.Metadata.VIPs.VIP, vipElem{Address: v.VIP.String(), Interface: v.Dev})
		if v.Dev != "" && !slices.Contains(devs, v.Dev) {
			devs = append(devs, v.Dev)
			var i iface
			i.Target.Dev = v.Dev
			dom.Interfaces = append(dom.Interfaces, i)
		}
	}
	b, err := xml.Marshal(dom)
	if err != nil {
		t.Fatalf("marshal %v: %v", vips, err)
	}
	return b
}

// FuzzDomainVIPs reads arbitrary bytes as the domain XML libvirt hands
// the hook. What it accepts are distinct VIPs the agent can route; written
// back as the smallest domain XML they read the same; and the hook's
// actions for each event follow from them.
func FuzzDomainVIPs(f *testing.F) {
	for _, name := range []string{"web1-live.xml", "web1-inactive.xml"} {
		f.Add(readXML(f, name))
	}
	f.Add(withVIPs(`<vmroam:vip address="100.64.3.1" interface="vnet9"/><vmroam:vip address="::ffff:100.64.3.2/128" interface="52:54:00:00:00:01"/>`, twoNICs))
	f.Add(withVIPs(`<vmroam:vip address="100.64.3.1"/>`, `<interface><target dev='t&#9;1'/><ip address='100.64.3.1'/></interface>`))
	f.Add([]byte(`<domain><devices><interface><ip address='fd00::1'/><ip address='fe80::1'/></interface></devices></domain>`))
	f.Add([]byte(`<!DOCTYPE domain><domain/>`))
	f.Fuzz(func(t *testing.T, domainXML []byte) {
		vips, err := DomainVIPs(domainXML)
		if err != nil {
			if vips != nil {
				t.Fatalf("error %v with VIPs %v", err, vips)
			}
			for _, op := range [][2]string{{"started", "begin"}, {"release", "end"}} {
				if acts, aerr := LibvirtActions(LibvirtEvent{Op: op[0], SubOp: op[1], XML: domainXML}); aerr == nil || acts != nil {
					t.Fatalf("%s: actions %v, %v for XML that does not read", op[0], acts, aerr)
				}
			}
			return
		}
		for i, v := range vips {
			if v.VIP != v.VIP.Unmap() || v.VIP.Zone() != "" || !routable(v.VIP) {
				t.Fatalf("VIP %v cannot be routed to a VM", v.VIP)
			}
			for _, w := range vips[:i] {
				if w.VIP == v.VIP {
					t.Fatalf("VIP %v twice in %v", v.VIP, vips)
				}
			}
		}

		again, err := DomainVIPs(canonicalDomain(t, vips))
		if err != nil || !slices.Equal(again, vips) {
			t.Fatalf("%v written back reads as %v, %v", vips, again, err)
		}

		var withDev []Action
		for _, v := range vips {
			if v.Dev != "" {
				withDev = append(withDev, Action{Verb: "attach", VIP: v.VIP, Dev: v.Dev, WhenAnnounced: true})
			}
		}
		acts, err := LibvirtActions(LibvirtEvent{Op: "started", SubOp: "begin", XML: domainXML})
		if !slices.Equal(acts, withDev) || (err == nil) != (len(withDev) == len(vips)) {
			t.Fatalf("started: %v, %v for %v", acts, err, vips)
		}
		acts, err = LibvirtActions(LibvirtEvent{Op: "release", SubOp: "end", XML: domainXML})
		if err != nil || len(acts) != len(vips) {
			t.Fatalf("release: %v, %v for %v", acts, err, vips)
		}
		for i, a := range acts {
			if a != (Action{Verb: "detach", VIP: vips[i].VIP}) {
				t.Fatalf("release: %v for %v", acts, vips)
			}
		}
	})
}

// FuzzDomidOfVif reads arbitrary interface names as the vif names the
// hotplug hook and the agent see: a name is a vif of a domain only if it
// is exactly what netback names one.
func FuzzDomidOfVif(f *testing.F) {
	for _, s := range []string{"vif5.0", "vif5.0-emu", "vif32751.1", "vif32752.0", "vif05.0", "vif5.x", "eth0"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		domid, ok := DomidOfVif(name)
		if !ok {
			if domid != 0 {
				t.Fatalf("DomidOfVif(%q) = %d, false", name, domid)
			}
			return
		}
		if domid < 0 || domid >= domidMax {
			t.Fatalf("DomidOfVif(%q) = %d", name, domid)
		}
		rest := strings.TrimSuffix(name, "-emu")
		_, dev, _ := strings.Cut(rest, ".")
		devid, err := strconv.Atoi(dev)
		if err != nil || (fmt.Sprintf("vif%d.%d", domid, devid) != rest) {
			t.Fatalf("DomidOfVif(%q) = %d, but netback names that vif otherwise", name, domid)
		}
	})
}
