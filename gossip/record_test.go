package gossip

import (
	"bytes"
	"encoding/binary"
	"math"
	"net/netip"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

func sampleRecords() []Record {
	return []Record{
		{VIP: netip.MustParseAddr("100.64.1.10"), Owner: "host-a", Epoch: 1},
		{VIP: netip.MustParseAddr("100.64.1.11"), Owner: "", Epoch: 7},
		{VIP: netip.MustParseAddr("fd7a:115c::10"), Owner: "host-b", Epoch: math.MaxUint64},
		{VIP: netip.MustParseAddr("100.64.1.12"), Owner: strings.Repeat("o", MaxOwnerLen), Epoch: 300},
		{VIP: netip.MustParseAddr("100.64.1.13"), Owner: "h", Epoch: 0},
	}
}

func TestRecordsRoundTrip(t *testing.T) {
	for name, rs := range map[string][]Record{"empty": {}, "one": sampleRecords()[:1], "mixed": sampleRecords()} {
		t.Run(name, func(t *testing.T) {
			b := EncodeRecords(rs)
			got, err := DecodeRecords(b)
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			if !reflect.DeepEqual(got, rs) {
				t.Fatalf("round trip:\n got %v\nwant %v", got, rs)
			}
		})
	}
}

func TestEncodeRecordsSkipsInvalid(t *testing.T) {
	good := sampleRecords()[0]
	rs := []Record{
		{VIP: netip.Addr{}, Owner: "x", Epoch: 1},
		good,
		{VIP: netip.MustParseAddr("100.64.0.9"), Owner: strings.Repeat("o", MaxOwnerLen+1), Epoch: 1},
		{VIP: netip.MustParseAddr("ff02::1"), Owner: "x", Epoch: 1},
	}
	got, err := DecodeRecords(EncodeRecords(rs))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, []Record{good}) {
		t.Fatalf("got %v, want only %v", got, good)
	}
}

// rawRecord builds a one-record message byte by byte, to express encodings
// EncodeRecords refuses to produce.
func rawRecord(family byte, addr []byte, epoch []byte, owner string) []byte {
	b := []byte{msgRecords, 1, family}
	b = append(b, addr...)
	b = append(b, epoch...)
	b = append(b, byte(len(owner)))
	return append(b, owner...)
}

func TestDecodeRecordsErrors(t *testing.T) {
	valid := EncodeRecords(sampleRecords())
	for n := range len(valid) {
		if _, err := DecodeRecords(valid[:n]); err == nil {
			t.Errorf("truncated to %d of %d bytes: no error", n, len(valid))
		}
	}
	mapped := netip.MustParseAddr("::ffff:100.64.0.1").As16()
	cases := map[string][]byte{
		"trailing":          append(bytes.Clone(valid), 0),
		"wrong type":        append([]byte{msgLeave}, valid[1:]...),
		"bad family":        rawRecord(5, []byte{100, 64, 0, 1}, []byte{1}, "a"),
		"unspecified v4":    rawRecord(family4, []byte{0, 0, 0, 0}, []byte{1}, "a"),
		"unspecified v6":    rawRecord(family6, make([]byte, 16), []byte{1}, "a"),
		"multicast":         rawRecord(family4, []byte{224, 0, 0, 1}, []byte{1}, "a"),
		"mapped under v6":   rawRecord(family6, mapped[:], []byte{1}, "a"),
		"padded epoch":      rawRecord(family4, []byte{100, 64, 0, 1}, []byte{0x81, 0x00}, "a"),
		"overflowing epoch": rawRecord(family4, []byte{100, 64, 0, 1}, bytes.Repeat([]byte{0xff}, 11), "a"),
		"owner past end":    append(rawRecord(family4, []byte{100, 64, 0, 1}, []byte{1}, "")[:8], 200, 'a'),
		"padded count":      {msgRecords, 0x80, 0x00},
	}
	for name, b := range cases {
		t.Run(name, func(t *testing.T) {
			if rs, err := DecodeRecords(b); err == nil {
				t.Fatalf("decoded %v", rs)
			}
		})
	}
}

func TestDecodeRecordsHostileCount(t *testing.T) {
	for _, count := range []uint64{2, 1000, 1 << 40, math.MaxUint64} {
		b := binary.AppendUvarint([]byte{msgRecords}, count)
		// One real record: the count claims more than the bytes hold.
		b = append(b, rawRecord(family4, []byte{100, 64, 0, 1}, []byte{1}, "a")[2:]...)
		// Bytes, not allocations: one make() of a count's worth of
		// records would be a single allocation too. (The count of
		// allocations also varies under the race detector.)
		if n := allocatedBytes(func() {
			if _, err := DecodeRecords(b); err == nil {
				t.Fatalf("count %d: no error", count)
			}
		}); n > 1024 {
			t.Errorf("count %d: %d bytes allocated for a rejected message of %d bytes", count, n, len(b))
		}
	}
}

func FuzzDecodeRecords(f *testing.F) {
	f.Add(EncodeRecords(nil))
	f.Add(EncodeRecords(sampleRecords()))
	f.Add(EncodeRecords(sampleRecords()[2:3]))
	f.Add(rawRecord(family6, make([]byte, 16), []byte{1}, "a"))
	f.Fuzz(func(t *testing.T, b []byte) {
		strictRoundTrip(t, b, DecodeRecords, noErr(EncodeRecords))
	})
}

// allocatedBytes is what f allocates on the heap, the least of 10 runs
// (a run may pay for a GC's or the runtime's own allocations).
func allocatedBytes(f func()) uint64 {
	least := uint64(math.MaxUint64)
	for range 10 {
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		f()
		runtime.ReadMemStats(&after)
		least = min(least, after.TotalAlloc-before.TotalAlloc)
	}
	return least
}
