package gossip

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// MaxOwnerLen is the longest owner (member name) a record carries, in bytes.
const MaxOwnerLen = 255

// Message types: the first byte of every user message and of the push/pull
// state, so that a later message kind never parses as records.
const (
	msgRecords  byte = 0x01
	msgLeave    byte = 0x02
	msgNetworks byte = 0x03
	msgState    byte = 0x04 // push/pull state: records and networks
	msgKeyOp    byte = 0x05 // a key operation asked of one member
	msgKeyReply byte = 0x06 // its answer
)

// minRecordLen is the smallest encoded record: IPv4 family and address, a
// one-byte epoch and an empty owner. It bounds the count a message can claim.
const minRecordLen = 1 + 4 + 1 + 1

// Record is one location record: which member owns a VIP, and since which
// epoch.
type Record struct {
	VIP   netip.Addr // unmapped, IPv4 or IPv6; a /32 or /128
	Owner string     // member name owning it; "" means released (a tombstone)
	Epoch uint64
}

// Supersedes reports whether r wins over o for the same VIP: higher Epoch
// wins; at equal epochs the greater Owner (string comparison) wins. It is a
// strict total order on (Epoch, Owner), so every agent picks the same winner
// whatever order records arrive in.
func (r Record) Supersedes(o Record) bool {
	if r.Epoch != o.Epoch {
		return r.Epoch > o.Epoch
	}
	return r.Owner > o.Owner
}

func (r Record) validate() error {
	if err := ValidVIP(r.VIP); err != nil {
		return err
	}
	if len(r.Owner) > MaxOwnerLen {
		return fmt.Errorf("owner is %d bytes, limit is %d", len(r.Owner), MaxOwnerLen)
	}
	return nil
}

// ValidVIP reports why a cannot be a VIP: it must be a unicast IPv4 or IPv6
// address, without zone, and not IPv4-mapped (use a.Unmap()).
func ValidVIP(a netip.Addr) error {
	switch {
	case !a.IsValid():
		return errors.New("VIP is not set")
	case a.Is4In6():
		return fmt.Errorf("VIP %s is IPv4-mapped", a)
	case a.Zone() != "":
		return fmt.Errorf("VIP %s has a zone", a)
	case a.IsUnspecified() || a.IsMulticast():
		return fmt.Errorf("VIP %s is not a unicast address", a)
	}
	return nil
}

// EncodeRecords encodes rs as one message:
//
//	type(1) count(uvarint) { family(1) addr(4|16) epoch(uvarint) owner-len(1) owner }...
//
// Records that DecodeRecords would reject (invalid VIP, owner longer than
// MaxOwnerLen) are left out, so one bad record cannot make a whole message
// or a whole push/pull state undecodable.
func EncodeRecords(rs []Record) []byte {
	n := 0
	size := 1 + binary.MaxVarintLen64
	for _, r := range rs {
		if r.validate() == nil {
			n++
			size += 1 + 16 + binary.MaxVarintLen64 + 1 + len(r.Owner)
		}
	}
	b := make([]byte, 0, size)
	b = append(b, msgRecords)
	b = binary.AppendUvarint(b, uint64(n))
	for _, r := range rs {
		if r.validate() != nil {
			continue
		}
		b = appendAddr(b, r.VIP)
		b = binary.AppendUvarint(b, r.Epoch)
		b = append(b, byte(len(r.Owner)))
		b = append(b, r.Owner...)
	}
	return b
}

// DecodeRecords decodes what EncodeRecords wrote and nothing else: a wrong
// type byte, an unknown family, an invalid VIP, a non-minimal varint, a count
// the remaining bytes cannot hold, a truncated record or trailing bytes are
// errors. It never allocates more than the input can justify.
func DecodeRecords(b []byte) ([]Record, error) {
	return decodeList(b, msgRecords, "records", "record", minRecordLen, func(b []byte) (r Record, rest []byte, field string, err error) {
		if r.VIP, b, err = readAddr(b); err != nil {
			return r, nil, "VIP: ", err
		}
		if r.Epoch, b, err = readUvarint(b); err != nil {
			return r, nil, "epoch: ", err
		}
		if r.Owner, b, err = readString(b); err != nil {
			return r, nil, "owner: ", err
		}
		return r, b, "", r.validate()
	})
}

// decodeList decodes a message of type typ, the skeleton of records and
// networks alike: the type byte, a minimal uvarint count, that many items
// of at least minLen bytes each, read by item, and nothing after them. It
// allocates no more than the input can justify. what and one name the
// items in errors; item names the field it failed on, so that an error is
// wrapped once.
func decodeList[T any](b []byte, typ byte, what, one string, minLen int, item func([]byte) (v T, rest []byte, field string, err error)) ([]T, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("decode %s: %w", what, errTruncated)
	}
	if b[0] != typ {
		return nil, fmt.Errorf("decode %s: unknown message type %#x", what, b[0])
	}
	n, b, err := readUvarint(b[1:])
	if err != nil {
		return nil, fmt.Errorf("decode %s: count: %w", what, err)
	}
	if n > uint64(len(b))/uint64(minLen) {
		return nil, fmt.Errorf("decode %s: count %d does not fit in %d bytes", what, n, len(b))
	}
	out := make([]T, 0, n)
	for i := range n {
		var v T
		var field string
		if v, b, field, err = item(b); err != nil {
			return nil, &itemError{what: what, one: one, i: i, field: field, err: err}
		}
		out = append(out, v)
	}
	if len(b) != 0 {
		return nil, fmt.Errorf("decode %s: %w (%d)", what, errTrailing, len(b))
	}
	return out, nil
}

// itemError is decodeList's error for one item, formatted only when read:
// a hostile message costs one allocation for it.
type itemError struct {
	what, one, field string
	i                uint64
	err              error
}

func (e *itemError) Error() string {
	return fmt.Sprintf("decode %s: %s %d: %s%v", e.what, e.one, e.i, e.field, e.err)
}

func (e *itemError) Unwrap() error { return e.err }

// readUvarint reads a minimal uvarint: binary.Uvarint also takes padded
// encodings, which would give one value several encodings.
func readUvarint(b []byte) (uint64, []byte, error) {
	v, n := binary.Uvarint(b)
	switch {
	case n == 0:
		return 0, nil, errTruncated
	case n < 0:
		return 0, nil, errors.New("varint overflows 64 bits")
	case n != uvarintLen(v):
		return 0, nil, errors.New("varint is not minimal")
	}
	return v, b[n:], nil
}

func uvarintLen(v uint64) int {
	n := 1
	for v >= 0x80 {
		v >>= 7
		n++
	}
	return n
}
