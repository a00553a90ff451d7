package gossip

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"testing"
)

func TestStateRoundTrip(t *testing.T) {
	cases := map[string]struct {
		rs []Record
		ns []Network
	}{
		"empty":    {[]Record{}, []Network{}},
		"records":  {sampleRecords(), []Network{}},
		"networks": {[]Record{}, sampleNetworks()},
		"both":     {sampleRecords(), sampleNetworks()},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			b := encodeState(c.rs, c.ns)
			rs, ns, err := decodeState(b)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !reflect.DeepEqual(rs, c.rs) || !reflect.DeepEqual(ns, c.ns) {
				t.Fatalf("round trip:\n got %v %v\nwant %v %v", rs, ns, c.rs, c.ns)
			}
		})
	}
}

// rawState builds a state from its parts as given, right or wrong.
func rawState(recs, nets []byte) []byte {
	return stateWithLengths(uint64(len(recs)), recs, uint64(len(nets)), nets)
}

// stateWithLengths builds a state whose length fields may lie.
func stateWithLengths(recsLen uint64, recs []byte, netsLen uint64, nets []byte) []byte {
	b := binary.AppendUvarint([]byte{msgState}, recsLen)
	b = append(b, recs...)
	b = binary.AppendUvarint(b, netsLen)
	return append(b, nets...)
}

// paddedUvarint encodes v one byte longer than needed, which
// binary.Uvarint accepts and this package must not.
func paddedUvarint(v uint64) []byte {
	b := binary.AppendUvarint(nil, v)
	b[len(b)-1] |= 0x80
	return append(b, 0)
}

func TestDecodeStateErrors(t *testing.T) {
	recs, nets := EncodeRecords(sampleRecords()), EncodeNetworks(sampleNetworks())
	valid := encodeState(sampleRecords(), sampleNetworks())
	if !bytes.Equal(rawState(recs, nets), valid) {
		t.Fatal("the raw builder is wrong")
	}
	for n := range len(valid) {
		if _, _, err := decodeState(valid[:n]); err == nil {
			t.Errorf("truncated to %d of %d bytes: no error", n, len(valid))
		}
	}
	cases := map[string][]byte{
		"trailing":              append(bytes.Clone(valid), 0),
		"bare records":          recs,
		"bare networks":         nets,
		"wrong type":            append([]byte{msgLeave}, valid[1:]...),
		"parts swapped":         rawState(nets, recs),
		"empty records part":    rawState(nil, nets),
		"empty networks part":   rawState(recs, nil),
		"records part trailing": rawState(append(bytes.Clone(recs), 0), nets),
		"records part short":    stateWithLengths(uint64(len(recs)-1), recs, uint64(len(nets)), nets),
		"networks part long":    stateWithLengths(uint64(len(recs)), recs, uint64(len(nets)+1), nets),
		"padded records length": append(append([]byte{msgState}, paddedUvarint(uint64(len(recs)))...), valid[1+uvarintLen(uint64(len(recs))):]...),
		"bad record":            rawState(rawRecord(family4, []byte{0, 0, 0, 0}, []byte{1}, "a"), nets),
		"bad network":           rawState(recs, rawNetwork("A", v4Prefix(10, 0, 0, 0, 8), []byte{1}, "h")),
		"huge length":           append([]byte{msgState}, binary.AppendUvarint(nil, 1<<62)...),
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			if rs, ns, err := decodeState(b); err == nil {
				t.Fatalf("decoded %v %v", rs, ns)
			}
		})
	}
}

// The seed corpus is also in testdata/fuzz/FuzzDecodeState.
func FuzzDecodeState(f *testing.F) {
	f.Add(encodeState(nil, nil))
	f.Add(encodeState(sampleRecords(), sampleNetworks()))
	f.Add(rawState(EncodeNetworks(sampleNetworks()[:1]), EncodeRecords(sampleRecords()[:1])))
	f.Fuzz(func(t *testing.T, b []byte) {
		type state struct {
			rs []Record
			ns []Network
		}
		strictRoundTrip(t, b,
			func(b []byte) (state, error) { rs, ns, err := decodeState(b); return state{rs, ns}, err },
			func(s state) ([]byte, error) { return encodeState(s.rs, s.ns), nil })
	})
}
