package filter

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// Names of the objects inside the table. Check and the tests find them by
// these names, and operators see them in `nft list table inet vmroam`.
const (
	chainForward = "forward"
	chainMangle  = "mangle"
	setNets4     = "nets4"
	setNets6     = "nets6"
)

// Set IDs only have to be unique inside one batch, and every Apply sends the
// whole table in one batch, so fixed IDs are enough.
const (
	setID4 uint32 = 1
	setID6 uint32 = 2
)

const (
	// ifNameSize is the kernel's IFNAMSIZ: interface names are compared as
	// this many bytes, NUL padded.
	ifNameSize = 16
	// minTunnelMTU is IPv4's minimum datagram every host must accept; below
	// it a clamp would push the MSS under what TCP stacks still send.
	minTunnelMTU = 576
	maxTunnelMTU = 65535
	// maxCommentLen keeps a rule comment well inside a userdata TLV, whose
	// length is one byte.
	maxCommentLen = 120
)

// family is one IP version as the rules see it.
type family struct {
	nfproto  byte   // meta nfproto value
	l4icmp   byte   // ICMP protocol number of this version
	addrLen  uint32 // bytes of an address
	saddrOff uint32 // offset of the source address in the network header
	daddrOff uint32
	set      string
	setID    uint32
	keyType  nftables.SetDatatype
	// mssOverhead is the IP plus TCP header size without options: a
	// tunnel MTU minus this is the largest MSS that fits.
	mssOverhead int
}

var (
	fam4 = family{
		nfproto: unix.NFPROTO_IPV4, l4icmp: unix.IPPROTO_ICMP, addrLen: 4, saddrOff: 12, daddrOff: 16,
		set: setNets4, setID: setID4, keyType: nftables.TypeIPAddr, mssOverhead: 40,
	}
	fam6 = family{
		nfproto: unix.NFPROTO_IPV6, l4icmp: unix.IPPROTO_ICMPV6, addrLen: 16, saddrOff: 8, daddrOff: 24,
		set: setNets6, setID: setID6, keyType: nftables.TypeIP6Addr, mssOverhead: 60,
	}
)

func familyOf(a netip.Addr) family {
	if a.Is4() {
		return fam4
	}
	return fam6
}

// plan is the whole table as Apply sends it, built without touching the
// kernel so that bad input fails before anything is sent.
type plan struct {
	table  *nftables.Table
	chains []*nftables.Chain
	sets   []planSet
	rules  []*nftables.Rule
}

type planSet struct {
	set   *nftables.Set
	elems []nftables.SetElement
}

// layout counts what a plan puts into the kernel, for Check.
type layout struct {
	rules map[string]int // per chain
	elems map[string]int // per set
}

func (p *plan) layout() layout {
	l := layout{rules: map[string]int{}, elems: map[string]int{}}
	for _, c := range p.chains {
		l.rules[c.Name] = 0
	}
	for _, r := range p.rules {
		l.rules[r.Chain.Name]++
	}
	for _, s := range p.sets {
		l.elems[s.set.Name] = len(s.elems)
	}
	return l
}

// validate rejects what would otherwise make a wrong or failing batch. It
// returns the networks with their prefixes masked.
func validate(r Ruleset) ([]Network, error) {
	nets := make([]Network, 0, len(r.Networks))
	for _, n := range r.Networks {
		if !n.Prefix.IsValid() {
			return nil, fmt.Errorf("network %q: invalid prefix %q", n.Name, n.Prefix)
		}
		if n.Prefix.Addr().Is4In6() {
			// An IPv4-mapped prefix would be matched against IPv6 headers,
			// where IPv4 traffic never shows up: say so instead.
			return nil, fmt.Errorf("network %q: prefix %s is IPv4-mapped IPv6, give it as IPv4", n.Name, n.Prefix)
		}
		nets = append(nets, Network{Name: n.Name, Prefix: n.Prefix.Masked()})
	}
	if r.TunnelDev != "" {
		if len(r.TunnelDev) >= ifNameSize {
			return nil, fmt.Errorf("tunnel device %q: name longer than %d bytes", r.TunnelDev, ifNameSize-1)
		}
		if slices.Contains([]byte(r.TunnelDev), 0) {
			return nil, fmt.Errorf("tunnel device %q: name contains NUL", r.TunnelDev)
		}
		if r.TunnelMTU < minTunnelMTU || r.TunnelMTU > maxTunnelMTU {
			return nil, fmt.Errorf("tunnel MTU %d: want %d to %d", r.TunnelMTU, minTunnelMTU, maxTunnelMTU)
		}
	}
	return nets, nil
}

// build turns r into the table's full content.
func build(name string, r Ruleset) (*plan, error) {
	nets, err := validate(r)
	if err != nil {
		return nil, err
	}
	tab := &nftables.Table{Family: nftables.TableFamilyINet, Name: name}
	p := &plan{table: tab}

	accept := nftables.ChainPolicyAccept
	fwd := &nftables.Chain{
		Name: chainForward, Table: tab, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept,
	}
	p.chains = append(p.chains, fwd)

	var prefixes4, prefixes6 []netip.Prefix
	for _, n := range nets {
		if n.Prefix.Addr().Is4() {
			prefixes4 = append(prefixes4, n.Prefix)
		} else {
			prefixes6 = append(prefixes6, n.Prefix)
		}
	}
	for _, f := range []struct {
		fam      family
		prefixes []netip.Prefix
	}{{fam4, prefixes4}, {fam6, prefixes6}} {
		p.sets = append(p.sets, planSet{
			set: &nftables.Set{
				Table: tab, ID: f.fam.setID, Name: f.fam.set, KeyType: f.fam.keyType,
				Interval: true, KeyByteOrder: binaryutil.BigEndian,
			},
			elems: setElements(mergeIntervals(f.prefixes), f.fam.addrLen),
		})
	}

	// A lost "fragmentation needed" or "packet too big" stalls every TCP
	// connection that meets a smaller MTU on the way (a PMTU black hole),
	// so these pass even between networks, where all else is dropped.
	p.rules = append(p.rules,
		rule(fwd, "pmtu icmp", icmpAccept(fam4, []byte{3, 4})...),
		rule(fwd, "pmtu icmpv6", icmpAccept(fam6, []byte{2})...),
	)
	for _, n := range nets {
		p.rules = append(p.rules, rule(fwd, isolateComment(n.Name), isolate(n.Prefix)...))
	}

	if r.TunnelDev != "" {
		mangle := &nftables.Chain{
			Name: chainMangle, Table: tab, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityMangle, Policy: &accept,
		}
		p.chains = append(p.chains, mangle)
		for _, key := range []expr.MetaKey{expr.MetaKeyOIFNAME, expr.MetaKeyIIFNAME} {
			for _, fam := range []family{fam4, fam6} {
				mss := clampMSS(fam, r.TunnelMTU)
				p.rules = append(p.rules, rule(mangle, fmt.Sprintf("mss %d", mss), mssClamp(fam, key, r.TunnelDev, mss)...))
			}
		}
	}
	return p, nil
}

func rule(c *nftables.Chain, comment string, exprs ...expr.Any) *nftables.Rule {
	return &nftables.Rule{
		Table: c.Table, Chain: c, Exprs: exprs,
		UserData: userdata.AppendString(nil, userdata.TypeComment, comment),
	}
}

// isolateComment names a network's rule; the tests and operators find a
// network's drop counter by it.
func isolateComment(name string) string {
	c := "isolate " + name
	if len(c) > maxCommentLen {
		c = strings.ToValidUTF8(c[:maxCommentLen], "")
	}
	return c
}

// clampMSS is the largest TCP MSS whose segments fit a tunnel of this MTU.
func clampMSS(f family, mtu int) int { return mtu - f.mssOverhead }

func matchNFProto(f family) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.nfproto}},
	}
}

// icmpAccept accepts ICMP messages of f whose first bytes (type, then code)
// equal typeCode.
func icmpAccept(f family, typeCode []byte) []expr.Any {
	return append(matchNFProto(f),
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.l4icmp}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: uint32(len(typeCode))},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: typeCode},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)
}

// isolate drops packets from inside p to any network prefix outside p.
func isolate(p netip.Prefix) []expr.Any {
	f := familyOf(p.Addr())
	mask := prefixMask(p)
	addr := p.Addr().AsSlice()
	load := func(off uint32) []expr.Any {
		return []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: f.addrLen},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: f.addrLen, Mask: mask, Xor: make([]byte, f.addrLen)},
		}
	}
	e := matchNFProto(f)
	e = append(e, load(f.saddrOff)...)
	e = append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: addr})
	e = append(e, load(f.daddrOff)...)
	e = append(e, &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: addr})
	e = append(e,
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.daddrOff, Len: f.addrLen},
		&expr.Lookup{SourceRegister: 1, SetName: f.set, SetID: f.setID},
		&expr.Counter{},
		&expr.Verdict{Kind: expr.VerdictDrop},
	)
	return e
}

// mssClamp lowers the MSS option of TCP SYNs of family f passing dev (in
// the direction key selects) to mss, and leaves smaller ones alone.
func mssClamp(f family, key expr.MetaKey, dev string, mss int) []expr.Any {
	const (
		tcpFlagsOff = 13
		tcpSYN      = 0x02
		optMaxseg   = 2 // TCP option kind; its value follows kind and length
	)
	want := binary.BigEndian.AppendUint16(nil, uint16(mss))
	e := matchNFProto(f)
	return append(e,
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(dev)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: tcpFlagsOff, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpSYN}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0}},
		// Without the option the load ends the rule: nothing to clamp.
		&expr.Exthdr{Op: expr.ExthdrOpTcpopt, Type: optMaxseg, Offset: 2, Len: 2, DestRegister: 1},
		// Big-endian bytes compare as numbers, so this is "MSS > mss". The
		// kernel never raises an MSS by itself either; this spares it the
		// rewrite.
		&expr.Cmp{Op: expr.CmpOpGt, Register: 1, Data: want},
		&expr.Immediate{Register: 1, Data: want},
		&expr.Exthdr{Op: expr.ExthdrOpTcpopt, Type: optMaxseg, Offset: 2, Len: 2, SourceRegister: 1},
	)
}

func ifname(n string) []byte {
	b := make([]byte, ifNameSize)
	copy(b, n)
	return b
}

func prefixMask(p netip.Prefix) []byte {
	m := make([]byte, p.Addr().BitLen()/8)
	for i := range p.Bits() {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// interval is the half-open address range [start, end). An invalid end
// means the range runs to the last address of its family, which has no
// successor to mark the end with.
type interval struct {
	start, end netip.Addr
}

// prefixRange is the interval p covers; p must be valid and masked.
func prefixRange(p netip.Prefix) interval {
	last := p.Addr().AsSlice()
	for i := p.Bits(); i < len(last)*8; i++ {
		last[i/8] |= 0x80 >> (i % 8)
	}
	l, _ := netip.AddrFromSlice(last)
	return interval{start: p.Addr(), end: l.Next()}
}

// mergeIntervals turns prefixes of one family into sorted, disjoint,
// non-adjacent intervals, the form the kernel's interval sets store:
// adjacent prefixes (100.64.1.0/24 and 100.64.2.0/24) would otherwise
// give an end and a start element with the same key.
func mergeIntervals(prefixes []netip.Prefix) []interval {
	ivs := make([]interval, 0, len(prefixes))
	for _, p := range prefixes {
		ivs = append(ivs, prefixRange(p.Masked()))
	}
	slices.SortFunc(ivs, func(a, b interval) int { return a.start.Compare(b.start) })
	var out []interval
	for _, iv := range ivs {
		if n := len(out); n > 0 {
			cur := &out[n-1]
			if !cur.end.IsValid() {
				break // the last one already runs to the end of the family
			}
			if iv.start.Compare(cur.end) <= 0 {
				if !iv.end.IsValid() || iv.end.Compare(cur.end) > 0 {
					cur.end = iv.end
				}
				continue
			}
		}
		out = append(out, iv)
	}
	return out
}

// setElements encodes intervals the way nft(8) does: a start element and an
// end element (flag interval end, exclusive) per interval; none for an
// interval that runs to the family's last address; and, as nft does, an end
// element at the zero address when the first interval does not start there,
// so the set's rbtree has the gap below it marked explicitly.
func setElements(ivs []interval, addrLen uint32) []nftables.SetElement {
	var out []nftables.SetElement
	if len(ivs) > 0 && !ivs[0].start.IsUnspecified() {
		out = append(out, nftables.SetElement{Key: make([]byte, addrLen), IntervalEnd: true})
	}
	for _, iv := range ivs {
		out = append(out, nftables.SetElement{Key: iv.start.AsSlice()})
		if iv.end.IsValid() {
			out = append(out, nftables.SetElement{Key: iv.end.AsSlice(), IntervalEnd: true})
		}
	}
	return out
}
