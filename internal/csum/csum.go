// Package csum is the Internet checksum (RFC 1071): the one's-complement
// sum of 16-bit big-endian words that IPv4, ICMP, UDP and TCP carry. It is
// the project's only implementation of it.
package csum

import "encoding/binary"

// Add adds b to sum as big-endian 16-bit words, unfolded; an odd last
// byte is the high byte of a word. Sums of several pieces (a pseudo-header,
// then a payload) chain through it, each piece but the last of even length.
func Add(sum uint64, b []byte) uint64 {
	for len(b) >= 8 {
		sum += uint64(binary.BigEndian.Uint16(b)) + uint64(binary.BigEndian.Uint16(b[2:])) +
			uint64(binary.BigEndian.Uint16(b[4:])) + uint64(binary.BigEndian.Uint16(b[6:]))
		b = b[8:]
	}
	for len(b) >= 2 {
		sum += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint64(b[0]) << 8
	}
	return sum
}

// Fold folds sum to 16 bits, carries added back in.
func Fold(sum uint64) uint16 {
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return uint16(sum)
}

// Checksum is the value for a checksum field: the complement of b's folded
// sum, b read with its checksum field zero.
func Checksum(b []byte) uint16 { return ^Fold(Add(0, b)) }
