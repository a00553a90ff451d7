package gossip

import (
	"encoding/binary"
	"strings"
	"testing"
)

func TestLeaveMessage(t *testing.T) {
	for _, name := range []string{"h", "host-1", strings.Repeat("n", MaxOwnerLen)} {
		b := encodeLeave(name, 0x0102030405060708)
		got, nonce, err := decodeLeave(b)
		if err != nil || got != name || nonce != 0x0102030405060708 {
			t.Errorf("%d-byte name: decoded %q %#x %v", len(name), got, nonce, err)
		}
	}
	ok := encodeLeave("host-1", 7)
	for what, b := range map[string][]byte{
		"empty":         nil,
		"type only":     {msgLeave},
		"records type":  append([]byte{msgRecords}, ok[1:]...),
		"empty name":    binary.BigEndian.AppendUint64([]byte{msgLeave, 0}, 7),
		"no nonce":      ok[:len(ok)-8],
		"short nonce":   ok[:len(ok)-1],
		"trailing byte": append(append([]byte{}, ok...), 0),
		"name past end": {msgLeave, 200, 'h'},
	} {
		if name, nonce, err := decodeLeave(b); err == nil {
			t.Errorf("%s: decoded %q %#x", what, name, nonce)
		}
	}
}

// The seed corpus is also in testdata/fuzz/FuzzDecodeLeave.
func FuzzDecodeLeave(f *testing.F) {
	f.Add(encodeLeave("host-1", 1))
	f.Add(encodeLeave(strings.Repeat("n", MaxOwnerLen), 1<<63))
	f.Add([]byte{msgLeave, 1, 'h'})
	f.Fuzz(func(t *testing.T, b []byte) {
		type leave struct {
			name  string
			nonce uint64
		}
		strictRoundTrip(t, b,
			func(b []byte) (leave, error) { n, nonce, err := decodeLeave(b); return leave{n, nonce}, err },
			func(l leave) ([]byte, error) { return encodeLeave(l.name, l.nonce), nil })
	})
}
