package gossip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// MaxNetworkNameLen bounds a network's name as a DNS label is bounded, so
// that a name fits wherever a label does (host names, kernel object names).
const MaxNetworkNameLen = 63

// familyNone stands for the zero prefix of a tombstone in an encoded
// network, where appendAddr would write the family.
const familyNone byte = 0

// minNetworkLen is the smallest encoded network: a one-byte name, a
// tombstone's family byte, a one-byte epoch and an empty origin. It bounds
// the count a message can claim.
const minNetworkLen = 1 + 1 + 1 + 1 + 1

// Network is one version of a virtual network's declaration. Versions of
// one name replace each other as location records do: see Supersedes.
type Network struct {
	Name   string       // 1..63 bytes of [a-z0-9._-], starting with a letter or digit
	Prefix netip.Prefix // masked, unmapped; the zero Prefix means removed (a tombstone)
	Epoch  uint64
	Origin string // member that wrote this version (<= MaxOwnerLen bytes)
}

// Removed reports whether n is a tombstone. A removal is kept as a version
// of its own so that it wins over the declaration it removes wherever the
// two meet, in whatever order.
func (n Network) Removed() bool { return n.Prefix == netip.Prefix{} }

// Supersedes reports whether n wins over o for the same name: higher Epoch
// wins; at equal epochs the greater Origin wins, then (same origin, same
// epoch, different content, which a correct member never writes) the
// greater Prefix string. The order is total, so every member picks the same
// version whatever the arrival order. A tombstone's prefix string, "invalid
// Prefix", sorts above every real one, so in that last tie removal wins.
func (n Network) Supersedes(o Network) bool {
	if n.Epoch != o.Epoch {
		return n.Epoch > o.Epoch
	}
	if n.Origin != o.Origin {
		return n.Origin > o.Origin
	}
	return n.Prefix.String() > o.Prefix.String()
}

func (n Network) validate() error {
	if err := ValidNetworkName(n.Name); err != nil {
		return err
	}
	if !n.Removed() {
		if err := ValidNetworkPrefix(n.Prefix); err != nil {
			return fmt.Errorf("network %q: %w", n.Name, err)
		}
	}
	if len(n.Origin) > MaxOwnerLen {
		return fmt.Errorf("network %q: origin is %d bytes, limit is %d", n.Name, len(n.Origin), MaxOwnerLen)
	}
	return nil
}

// ValidNetworkName reports why name cannot name a network. Names are
// restricted to lower-case letters, digits, '.', '_' and '-' so that they
// are safe in log lines, CLI output and nftables object names.
func ValidNetworkName(name string) error {
	switch {
	case name == "":
		return errors.New("network name is empty")
	case len(name) > MaxNetworkNameLen:
		return fmt.Errorf("network name %q is %d bytes, limit is %d", name, len(name), MaxNetworkNameLen)
	case !isLowerAlnum(name[0]):
		return fmt.Errorf("network name %q must start with a lower-case letter or a digit", name)
	}
	for i := range len(name) {
		if c := name[i]; !isLowerAlnum(c) && c != '.' && c != '_' && c != '-' {
			return fmt.Errorf("network name %q has %q at byte %d; allowed are a-z, 0-9, '.', '_' and '-'", name, name[i:i+1], i)
		}
	}
	return nil
}

func isLowerAlnum(c byte) bool { return 'a' <= c && c <= 'z' || '0' <= c && c <= '9' }

// Prefix lengths a network may have: a shorter one would take a large part
// of the address space, a longer one leaves no room for VMs.
const (
	minNetworkBits4, maxNetworkBits4 = 8, 30
	minNetworkBits6, maxNetworkBits6 = 16, 126
)

// reservedRanges are ranges a VM address must never be in: packets to them
// are not routed to another host (loopback, link-local, where the anycast
// gateway lives), mean something else (multicast, broadcast, unspecified),
// or stand for IPv4 addresses (mapped, which this package always unmaps).
var reservedRanges = []struct {
	prefix netip.Prefix
	what   string
}{
	{netip.MustParsePrefix("0.0.0.0/8"), "the unspecified range"},
	{netip.MustParsePrefix("127.0.0.0/8"), "the loopback range"},
	{netip.MustParsePrefix("169.254.0.0/16"), "the link-local range"},
	{netip.MustParsePrefix("224.0.0.0/4"), "the multicast range"},
	{netip.MustParsePrefix("255.255.255.255/32"), "the broadcast address"},
	{netip.MustParsePrefix("::/128"), "the unspecified address"},
	{netip.MustParsePrefix("::1/128"), "the loopback address"},
	{netip.MustParsePrefix("::ffff:0:0/96"), "the IPv4-mapped range"},
	{netip.MustParsePrefix("fe80::/10"), "the link-local range"},
	{netip.MustParsePrefix("ff00::/8"), "the multicast range"},
}

// ValidNetworkPrefix reports why p cannot be a network's prefix. It must be
// valid and masked (p == p.Masked(), so that one network has one spelling),
// not IPv4-mapped, IPv4 /8../30 or IPv6 /16../126 (so it has room for VMs
// and is not the whole space), and outside the loopback, multicast,
// link-local and unspecified ranges. The error says which rule p breaks.
func ValidNetworkPrefix(p netip.Prefix) error {
	switch {
	case p == netip.Prefix{}:
		return errors.New("prefix is not set")
	case !p.IsValid():
		return errors.New("prefix is not valid")
	case p.Addr().Is4In6():
		if p.Bits() >= 96 {
			return fmt.Errorf("prefix %s is IPv4-mapped; use %s",
				p, netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96))
		}
		return fmt.Errorf("prefix %s is IPv4-mapped", p)
	case p != p.Masked():
		return fmt.Errorf("prefix %s has host bits set; the network is %s", p, p.Masked())
	}
	if p.Addr().Is4() {
		if p.Bits() < minNetworkBits4 || p.Bits() > maxNetworkBits4 {
			return fmt.Errorf("prefix %s: an IPv4 network is /%d to /%d", p, minNetworkBits4, maxNetworkBits4)
		}
	} else if p.Bits() < minNetworkBits6 || p.Bits() > maxNetworkBits6 {
		return fmt.Errorf("prefix %s: an IPv6 network is /%d to /%d", p, minNetworkBits6, maxNetworkBits6)
	}
	for _, r := range reservedRanges {
		if Overlaps(p, r.prefix) {
			return fmt.Errorf("prefix %s overlaps %s %s", p, r.what, r.prefix)
		}
	}
	return nil
}

// Overlaps reports whether two prefixes share any address. Prefixes of
// different families never do; an invalid prefix overlaps nothing.
func Overlaps(a, b netip.Prefix) bool { return a.Overlaps(b) }

// EncodeNetworks encodes ns as one message:
//
//	type(1) count(uvarint) { name-len(1) name family(1) [addr(4|16) bits(1)] epoch(uvarint) origin-len(1) origin }...
//
// A tombstone has family 0 and neither address nor bits. Networks that
// DecodeNetworks would reject are left out, so one bad version cannot make
// a whole message or a whole push/pull state undecodable.
func EncodeNetworks(ns []Network) []byte {
	n := 0
	size := 1 + binary.MaxVarintLen64
	for _, nw := range ns {
		if nw.validate() == nil {
			n++
			size += 1 + len(nw.Name) + 1 + 16 + 1 + binary.MaxVarintLen64 + 1 + len(nw.Origin)
		}
	}
	b := make([]byte, 0, size)
	b = append(b, msgNetworks)
	b = binary.AppendUvarint(b, uint64(n))
	for _, nw := range ns {
		if nw.validate() != nil {
			continue
		}
		b = append(b, byte(len(nw.Name)))
		b = append(b, nw.Name...)
		if nw.Removed() {
			b = append(b, familyNone)
		} else {
			b = appendAddr(b, nw.Prefix.Addr())
			b = append(b, byte(nw.Prefix.Bits()))
		}
		b = binary.AppendUvarint(b, nw.Epoch)
		b = append(b, byte(len(nw.Origin)))
		b = append(b, nw.Origin...)
	}
	return b
}

// DecodeNetworks decodes what EncodeNetworks wrote and nothing else: a wrong
// type byte, an invalid name or prefix (unmasked included), a non-minimal
// varint, a count the remaining bytes cannot hold, a truncated network or
// trailing bytes are errors. It never allocates more than the input can
// justify.
func DecodeNetworks(b []byte) ([]Network, error) {
	return decodeList(b, msgNetworks, "networks", "network", minNetworkLen, func(b []byte) (nw Network, rest []byte, field string, err error) {
		if nw.Name, b, err = readString(b); err != nil {
			return nw, nil, "name: ", err
		}
		if nw.Prefix, b, err = readPrefix(b); err != nil {
			return nw, nil, "prefix: ", err
		}
		if nw.Epoch, b, err = readUvarint(b); err != nil {
			return nw, nil, "epoch: ", err
		}
		if nw.Origin, b, err = readString(b); err != nil {
			return nw, nil, "origin: ", err
		}
		return nw, b, "", nw.validate()
	})
}

// readString reads a string after its one-byte length.
func readString(b []byte) (string, []byte, error) {
	if len(b) < 1 || len(b) < 1+int(b[0]) {
		return "", nil, errTruncated
	}
	l := int(b[0])
	return string(b[1 : 1+l]), b[1+l:], nil
}

// readPrefix reads what EncodeNetworks wrote for a prefix. Whether the
// prefix is a valid network (masked, of a sane length) is left to
// validation, which the decoder runs on every network.
func readPrefix(b []byte) (netip.Prefix, []byte, error) {
	if len(b) < 1 {
		return netip.Prefix{}, nil, errTruncated
	}
	if b[0] == familyNone {
		return netip.Prefix{}, b[1:], nil
	}
	a, b, err := readAddr(b)
	if err != nil {
		return netip.Prefix{}, nil, err
	}
	if len(b) < 1 {
		return netip.Prefix{}, nil, errTruncated
	}
	p := netip.PrefixFrom(a, int(b[0]))
	if !p.IsValid() {
		return netip.Prefix{}, nil, fmt.Errorf("%d bits for a %d-bit address", b[0], a.BitLen())
	}
	return p, b[1:], nil
}
