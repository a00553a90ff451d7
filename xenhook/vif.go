package xenhook

import (
	"strconv"
	"strings"
)

// domidMax is DOMID_FIRST_RESERVED (0x7FF0): the ids at and above it name
// special domains (DOMID_SELF, DOMID_IO, ...), never a guest with a vif.
const domidMax = 0x7ff0

// DomidOfVif parses Xen's vif name "vif<domid>.<devid>" (also
// "vif<domid>.<devid>-emu", the emulated NIC's tap of an HVM guest): ok=false
// otherwise. A vif renamed through xenstore's vifname carries no domid and
// is not recognised.
func DomidOfVif(name string) (domid int, ok bool) {
	rest, found := strings.CutPrefix(name, "vif")
	if !found {
		return 0, false
	}
	rest = strings.TrimSuffix(rest, "-emu")
	dom, dev, found := strings.Cut(rest, ".")
	if !found {
		return 0, false
	}
	d, ok := decimal(dom)
	if !ok || d >= domidMax {
		return 0, false
	}
	if _, ok := decimal(dev); !ok {
		return 0, false
	}
	return d, true
}

// decimal parses what netback's "vif%u.%u" prints: digits, no sign, no
// leading zero, small enough for an int.
func decimal(s string) (int, bool) {
	if s == "" || len(s) > 9 || (len(s) > 1 && s[0] == '0') {
		return 0, false
	}
	for _, c := range []byte(s) {
		if c < '0' || c > '9' {
			return 0, false
		}
	}
	n, err := strconv.Atoi(s)
	return n, err == nil
}
