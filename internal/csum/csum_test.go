package csum

import (
	"math/rand/v2"
	"testing"
)

// naive is RFC 1071's reference loop, word by word.
func naive(b []byte) uint16 {
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// TestChecksumRFC1071 is the worked example of RFC 1071, 3: the words
// 0001 f203 f4f5 f6f7 sum to ddf2 (folded), so the checksum is 220d.
func TestChecksumRFC1071(t *testing.T) {
	b := []byte{0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7}
	if got := Fold(Add(0, b)); got != 0xddf2 {
		t.Fatalf("sum = %04x, want ddf2", got)
	}
	if got := Checksum(b); got != 0x220d {
		t.Fatalf("checksum = %04x, want 220d", got)
	}
}

// TestChecksumMatchesNaive compares random inputs of every length up to
// 100, odd ones included, with the reference loop; and a message with its
// checksum filled in sums to 0xffff.
func TestChecksumMatchesNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for n := 0; n <= 100; n++ {
		for range 20 {
			b := make([]byte, n)
			for i := range b {
				b[i] = byte(r.Uint32())
			}
			if got, want := Checksum(b), naive(b); got != want {
				t.Fatalf("len %d %x: Checksum %04x, reference %04x", n, b, got, want)
			}
			if n >= 4 && n%2 == 0 {
				b[2], b[3] = 0, 0
				c := Checksum(b)
				b[2], b[3] = byte(c>>8), byte(c)
				if s := Fold(Add(0, b)); s != 0xffff {
					t.Fatalf("len %d: with its checksum the sum is %04x, want ffff", n, s)
				}
			}
		}
	}
}
