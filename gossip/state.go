package gossip

import (
	"encoding/binary"
	"fmt"
)

// encodeState encodes the push/pull state, everything a member replicates:
//
//	type(1) records-len(uvarint) records-message networks-len(uvarint) networks-message
//
// Each part is a whole EncodeRecords or EncodeNetworks message. Their
// decoders refuse trailing bytes, so the lengths hand each one exactly its
// part, and a part is checked as strictly as a broadcast of its kind.
func encodeState(rs []Record, ns []Network) []byte {
	recs, nets := EncodeRecords(rs), EncodeNetworks(ns)
	b := make([]byte, 0, 1+2*binary.MaxVarintLen64+len(recs)+len(nets))
	b = append(b, msgState)
	b = binary.AppendUvarint(b, uint64(len(recs)))
	b = append(b, recs...)
	b = binary.AppendUvarint(b, uint64(len(nets)))
	return append(b, nets...)
}

// decodeState decodes what encodeState wrote and nothing else: a wrong type
// byte, a non-minimal varint, a part longer than the bytes left, a part
// that does not decode or trailing bytes are errors.
func decodeState(b []byte) ([]Record, []Network, error) {
	if len(b) == 0 {
		return nil, nil, fmt.Errorf("decode state: %w", errTruncated)
	}
	if b[0] != msgState {
		return nil, nil, fmt.Errorf("decode state: unknown message type %#x", b[0])
	}
	recs, b, err := readPart(b[1:])
	if err != nil {
		return nil, nil, fmt.Errorf("decode state: records: %w", err)
	}
	nets, b, err := readPart(b)
	if err != nil {
		return nil, nil, fmt.Errorf("decode state: networks: %w", err)
	}
	if len(b) != 0 {
		return nil, nil, fmt.Errorf("decode state: %w (%d)", errTrailing, len(b))
	}
	rs, err := DecodeRecords(recs)
	if err != nil {
		return nil, nil, fmt.Errorf("decode state: %w", err)
	}
	ns, err := DecodeNetworks(nets)
	if err != nil {
		return nil, nil, fmt.Errorf("decode state: %w", err)
	}
	return rs, ns, nil
}

// readPart reads a uvarint length and that many bytes.
func readPart(b []byte) (part, rest []byte, err error) {
	n, b, err := readUvarint(b)
	if err != nil {
		return nil, nil, fmt.Errorf("length: %w", err)
	}
	if n > uint64(len(b)) {
		return nil, nil, fmt.Errorf("%d bytes, only %d left: %w", n, len(b), errTruncated)
	}
	return b[:n], b[n:], nil
}
