package gossip

import (
	"bytes"
	"reflect"
	"testing"
)

// strictRoundTrip is the property every decoder's fuzz target checks:
// whatever decodes re-encodes, decodes again to the same value, and, the
// decoders being strict, re-encodes to the very input bytes.
func strictRoundTrip[T any](t *testing.T, b []byte, decode func([]byte) (T, error), encode func(T) ([]byte, error)) {
	t.Helper()
	v, err := decode(b)
	if err != nil {
		return
	}
	enc, err := encode(v)
	if err != nil {
		t.Fatalf("decoded %+v does not re-encode: %v", v, err)
	}
	again, err := decode(enc)
	if err != nil {
		t.Fatalf("re-encoding does not decode: %v", err)
	}
	if !reflect.DeepEqual(again, v) {
		t.Fatalf("re-decoded %+v, want %+v", again, v)
	}
	if !bytes.Equal(enc, b) {
		t.Fatalf("re-encoded %x, input %x", enc, b)
	}
}

// noErr adapts an encoder that cannot fail.
func noErr[T any](enc func(T) []byte) func(T) ([]byte, error) {
	return func(v T) ([]byte, error) { return enc(v), nil }
}
