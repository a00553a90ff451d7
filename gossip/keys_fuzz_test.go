package gossip

import (
	"bytes"
	"encoding/base64"
	"reflect"
	"strings"
	"testing"
)

// FuzzDecodeKeyOp: a key operation that decodes re-encodes to exactly its
// bytes, names a member, carries a valid key unless it only lists, and
// does not share memory with the message (memberlist reuses its buffers).
func FuzzDecodeKeyOp(f *testing.F) {
	f.Add(encodeKeyOp(42, keyOpList, "host-1", nil))
	f.Add(encodeKeyOp(1, keyOpInstall, "h", key1))
	f.Add(encodeKeyOp(1<<63, keyOpUse, strings.Repeat("n", MaxOwnerLen), make([]byte, 24)))
	f.Add(encodeKeyOp(7, keyOpRemove, "host-2", make([]byte, 32)))
	f.Add(encodeKeyOp(7, keyOpList, "host-2", key1))
	f.Fuzz(func(t *testing.T, b []byte) {
		in := bytes.Clone(b)
		id, op, from, key, err := decodeKeyOp(b)
		if !bytes.Equal(in, b) {
			t.Fatal("decoding changed its input")
		}
		if err != nil {
			if id != 0 || op != 0 || from != "" || key != nil {
				t.Fatalf("rejected message left values: %d %d %q %x", id, op, from, key)
			}
			return
		}
		if from == "" || len(from) > MaxOwnerLen {
			t.Fatalf("member name of %d bytes", len(from))
		}
		switch {
		case op == keyOpList && key != nil:
			t.Fatalf("list carries a key %x", key)
		case op != keyOpList && len(key) != 16 && len(key) != 24 && len(key) != 32:
			t.Fatalf("%s with a %d-byte key", keyOpName(op), len(key))
		}
		if enc := encodeKeyOp(id, op, from, key); !bytes.Equal(enc, b) {
			t.Fatalf("re-encoded %x, input %x", enc, b)
		}
		if len(key) > 0 {
			b[len(b)-1] ^= 0xff
			if key[len(key)-1] == b[len(b)-1] {
				t.Fatal("the decoded key shares memory with the message")
			}
		}
	})
}

// FuzzDecodeKeyReply: an answer that decodes re-encodes to exactly its
// bytes, within the bounds the encoder keeps (name, count, error text).
func FuzzDecodeKeyReply(f *testing.F) {
	f.Add(encodeKeyReply(7, KeyReport{Member: "host-2", Keys: []string{KeyFingerprint(key1), KeyFingerprint(key2)}, Err: "no"}))
	f.Add(encodeKeyReply(0, KeyReport{Member: "h"}))
	f.Add(encodeKeyReply(1, KeyReport{Member: "h", Err: strings.Repeat("e", maxKeyErrLen)}))
	f.Add(encodeKeyReply(1, KeyReport{Member: strings.Repeat("n", MaxOwnerLen), Keys: make([]string, 255)}))
	f.Add([]byte{msgKeyReply, 0, 0, 0, 0, 0, 0, 0, 1, 1, 'h', 255, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		id, r, err := decodeKeyReply(b)
		if err != nil {
			if id != 0 || !reflect.DeepEqual(r, KeyReport{}) {
				t.Fatalf("rejected answer left values: %d %+v", id, r)
			}
			return
		}
		if r.Member == "" || len(r.Member) > MaxOwnerLen || len(r.Keys) > 255 || len(r.Err) > maxKeyErrLen {
			t.Fatalf("out of bounds: name %d bytes, %d keys, error %d bytes", len(r.Member), len(r.Keys), len(r.Err))
		}
		for _, fp := range r.Keys {
			if len(fp) != 16 {
				t.Fatalf("fingerprint %q", fp)
			}
		}
		if enc := encodeKeyReply(id, r); !bytes.Equal(enc, b) {
			t.Fatalf("re-encoded %x, input %x", enc, b)
		}
	})
}

// FuzzParseKeys: the keys of a key file that parses are valid gossip keys,
// and WriteKeyFile's edit of that file (same keys, or the keys turned
// around) parses to exactly the keys written.
func FuzzParseKeys(f *testing.F) {
	k1, k2 := base64.StdEncoding.EncodeToString(key1), base64.StdEncoding.EncodeToString(key2)
	f.Add([]byte(k1 + "\n"))
	f.Add([]byte("# primary\n" + k1 + "\n\n  # old\n\t" + k2 + "  \r\n"))
	f.Add([]byte(k1))
	f.Add([]byte("# nothing\n"))
	f.Add([]byte("AAAA\n"))
	f.Add([]byte(base64.StdEncoding.EncodeToString(make([]byte, 24)) + "\n#\n" + base64.StdEncoding.EncodeToString(make([]byte, 32))))
	f.Fuzz(func(t *testing.T, data []byte) {
		keys, err := ParseKeys(data)
		if err != nil {
			if keys != nil {
				t.Fatalf("rejected file gave %d keys", len(keys))
			}
			return
		}
		if len(keys) == 0 {
			t.Fatal("a file with no key parsed")
		}
		for _, k := range keys {
			if n := len(k); n != 16 && n != 24 && n != 32 {
				t.Fatalf("a %d-byte key", n)
			}
		}
		rev := make([][]byte, len(keys))
		for i, k := range keys {
			rev[len(keys)-1-i] = k
		}
		for _, want := range [][][]byte{keys, rev, keys[:1]} {
			got, err := ParseKeys(replaceKeyLines(data, want))
			if err != nil || !reflect.DeepEqual(got, want) {
				t.Fatalf("rewritten file: %d keys %v, want %d", len(got), err, len(want))
			}
		}
	})
}
