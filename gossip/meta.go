package gossip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// ProtocolVersion is the version of the vmroam agent protocol this package
// speaks; agents put it in Meta.Version.
const ProtocolVersion = 1

// MetaMaxSize is the most metadata memberlist carries per member
// (memberlist.MetaMaxSize).
const MetaMaxSize = 512

// MaxSiteLen is the longest site name Meta accepts, in bytes.
const MaxSiteLen = 64

// metaFormat1 is the first byte of every encoded Meta; a new layout gets a new
// value so that old agents reject it instead of misreading it.
const metaFormat1 byte = 0x01

// metaFormat2 is format 1 followed by a flags byte. It is written only when
// a flag is set, so agents that know format 1 only still read every host
// that uses no flag.
const metaFormat2 byte = 0x02

// Meta flags (format 2).
const (
	flagTrusted byte = 1 << 0
	knownFlags       = flagTrusted
)

const (
	family4 byte = 4
	family6 byte = 6
)

var (
	errTruncated = errors.New("truncated")
	errTrailing  = errors.New("trailing bytes")
)

// Meta is what an agent tells the others about itself through memberlist's
// node metadata.
type Meta struct {
	Version   uint8          // protocol version of the agent
	PublicKey [32]byte       // WireGuard public key
	Endpoint  netip.AddrPort // WireGuard endpoint on the underlay (IPv4 or IPv6)
	Address   netip.Addr     // agent's own overlay address (IPv4 or IPv6)
	Site      string         // site name, may be empty, at most MaxSiteLen bytes
	// Trusted: this host routes VIPs of its site's trusted hosts over
	// the LAN, unencrypted, and accepts theirs the same way.
	Trusted bool
}

// MarshalBinary encodes m compactly:
//
//	format(1) version(1) key(32) endpoint-family(1) addr(4|16) port(2) address-family(1) addr(4|16) site-len(1) site [flags(1)]
//
// Format 1 has no flags byte; format 2, written only when a flag is set,
// ends with it.
// IPv4-mapped IPv6 addresses are written as IPv4, so that equal addresses
// have one encoding.
func (m Meta) MarshalBinary() ([]byte, error) {
	m.Endpoint = netip.AddrPortFrom(m.Endpoint.Addr().Unmap(), m.Endpoint.Port())
	m.Address = m.Address.Unmap()
	if err := m.validate(); err != nil {
		return nil, fmt.Errorf("encode meta: %w", err)
	}
	b := make([]byte, 0, 2+32+1+16+2+1+16+1+len(m.Site))
	format := metaFormat1
	if m.Trusted {
		format = metaFormat2
	}
	b = append(b, format, m.Version)
	b = append(b, m.PublicKey[:]...)
	b = appendAddr(b, m.Endpoint.Addr())
	b = binary.BigEndian.AppendUint16(b, m.Endpoint.Port())
	b = appendAddr(b, m.Address)
	b = append(b, byte(len(m.Site)))
	b = append(b, m.Site...)
	if format == metaFormat2 {
		var flags byte
		if m.Trusted {
			flags |= flagTrusted
		}
		b = append(b, flags)
	}
	if len(b) > MetaMaxSize {
		return nil, fmt.Errorf("encode meta: %d bytes, limit is %d", len(b), MetaMaxSize)
	}
	return b, nil
}

// UnmarshalBinary decodes what MarshalBinary wrote. It accepts nothing else:
// an unknown format, a truncated or over-long input, or a field that
// MarshalBinary would refuse is an error, and m is then left unchanged.
func (m *Meta) UnmarshalBinary(b []byte) error {
	var out Meta
	if len(b) > MetaMaxSize {
		return fmt.Errorf("decode meta: %d bytes, limit is %d", len(b), MetaMaxSize)
	}
	if len(b) < 2+32 {
		return fmt.Errorf("decode meta: %w", errTruncated)
	}
	format := b[0]
	if format != metaFormat1 && format != metaFormat2 {
		return fmt.Errorf("decode meta: unknown format %#x", b[0])
	}
	out.Version = b[1]
	copy(out.PublicKey[:], b[2:34])
	b = b[34:]

	ep, b, err := readAddr(b)
	if err != nil {
		return fmt.Errorf("decode meta: endpoint: %w", err)
	}
	if len(b) < 2 {
		return fmt.Errorf("decode meta: endpoint port: %w", errTruncated)
	}
	out.Endpoint = netip.AddrPortFrom(ep, binary.BigEndian.Uint16(b))
	b = b[2:]

	if out.Address, b, err = readAddr(b); err != nil {
		return fmt.Errorf("decode meta: address: %w", err)
	}

	if len(b) < 1 {
		return fmt.Errorf("decode meta: site: %w", errTruncated)
	}
	n := int(b[0])
	b = b[1:]
	if n > MaxSiteLen {
		return fmt.Errorf("decode meta: site is %d bytes, limit is %d", n, MaxSiteLen)
	}
	if len(b) < n {
		return fmt.Errorf("decode meta: site: %w", errTruncated)
	}
	out.Site = string(b[:n])
	b = b[n:]
	if format == metaFormat2 {
		if len(b) < 1 {
			return fmt.Errorf("decode meta: flags: %w", errTruncated)
		}
		// Unknown flags and format 2 without a flag are refused: every
		// Meta has one encoding, and a flag an agent does not know may
		// change what its peers must do.
		if b[0]&^knownFlags != 0 || b[0] == 0 {
			return fmt.Errorf("decode meta: flags %#x", b[0])
		}
		out.Trusted = b[0]&flagTrusted != 0
		b = b[1:]
	}
	if len(b) > 0 {
		return fmt.Errorf("decode meta: %w", errTrailing)
	}
	if err := out.validate(); err != nil {
		return fmt.Errorf("decode meta: %w", err)
	}
	*m = out
	return nil
}

func (m Meta) validate() error {
	ep := m.Endpoint.Addr()
	switch {
	case !m.Endpoint.IsValid():
		return errors.New("endpoint is not set")
	case ep.IsUnspecified() || ep.IsMulticast() || ep.Zone() != "" || m.Endpoint.Port() == 0:
		return fmt.Errorf("endpoint %s is not a unicast address and port", m.Endpoint)
	case !m.Address.IsValid():
		return errors.New("address is not set")
	case m.Address.IsUnspecified() || m.Address.IsMulticast() || m.Address.Zone() != "":
		return fmt.Errorf("address %s is not a unicast address", m.Address)
	case len(m.Site) > MaxSiteLen:
		return fmt.Errorf("site is %d bytes, limit is %d", len(m.Site), MaxSiteLen)
	}
	return nil
}

// appendAddr writes a family byte and the address bytes. Callers pass
// unmapped, zoneless addresses.
func appendAddr(b []byte, a netip.Addr) []byte {
	if a.Is4() {
		a4 := a.As4()
		return append(append(b, family4), a4[:]...)
	}
	a16 := a.As16()
	return append(append(b, family6), a16[:]...)
}

// readAddr reads what appendAddr wrote. An IPv4-mapped address under the
// IPv6 family is refused: it has a shorter encoding, and accepting both would
// give one address two encodings.
func readAddr(b []byte) (netip.Addr, []byte, error) {
	if len(b) < 1 {
		return netip.Addr{}, nil, errTruncated
	}
	switch b[0] {
	case family4:
		if len(b) < 1+4 {
			return netip.Addr{}, nil, errTruncated
		}
		return netip.AddrFrom4([4]byte(b[1:5])), b[5:], nil
	case family6:
		if len(b) < 1+16 {
			return netip.Addr{}, nil, errTruncated
		}
		a := netip.AddrFrom16([16]byte(b[1:17]))
		if a.Is4In6() {
			return netip.Addr{}, nil, fmt.Errorf("IPv4-mapped address %s under the IPv6 family", a)
		}
		return a, b[17:], nil
	default:
		return netip.Addr{}, nil, fmt.Errorf("unknown address family %d", b[0])
	}
}
