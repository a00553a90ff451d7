package barrier

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"
)

var testAddr = netip.MustParseAddr("169.254.0.9")

// packet is what the kernel makes of SendOn's datagram to dst carrying
// payload.
func packet(dst netip.Addr, payload []byte) []byte {
	p := make([]byte, 20+8+len(payload))
	p[0], p[8], p[9] = 0x45, 64, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	copy(p[12:16], []byte{100, 64, 0, 1})
	copy(p[16:20], dst.AsSlice())
	binary.BigEndian.PutUint16(p[20:], 40000)
	binary.BigEndian.PutUint16(p[22:], Port)
	binary.BigEndian.PutUint16(p[24:], uint16(8+len(payload)))
	copy(p[28:], payload)
	return p
}

func TestMatch(t *testing.T) {
	ok := packet(testAddr, []byte{1, 2, 3, 4, 5, 6, 7, 8})
	mod := func(f func(b []byte)) []byte {
		b := bytes.Clone(ok)
		f(b)
		return b
	}
	cases := map[string][]byte{
		"barrier":         ok,
		"with options":    append(append(append([]byte{0x46}, ok[1:20]...), 1, 1, 1, 0), ok[20:]...),
		"more fragments":  mod(func(b []byte) { b[6] |= 0x20 }),
		"fragment offset": mod(func(b []byte) { b[7] = 1 }),
		"other port":      mod(func(b []byte) { b[23] = 10 }),
		"other address":   mod(func(b []byte) { b[19] = 10 }),
		"tcp":             mod(func(b []byte) { b[9] = 6 }),
		"ipv6":            mod(func(b []byte) { b[0] = 0x65 }),
		"short nonce":     ok[:len(ok)-1],
		"ihl 4":           mod(func(b []byte) { b[0] = 0x44 }),
		"empty":           nil,
		"header only":     ok[:20],
	}
	b := New(testAddr, "test", nil)
	for name, pkt := range cases {
		n, matched := b.Match(pkt)
		want := name == "barrier" || name == "with options"
		if matched != want || matched && n != 0x0102030405060708 {
			t.Errorf("%s: Match = %#x, %v; want a match: %v", name, n, matched, want)
		}
	}
}

// queue is a device queue: Wait's packet goes in behind what is there, and
// a reader passes each barrier packet it reads.
type queue struct {
	b   *Barrier
	pkt chan []byte
}

func newQueue() *queue {
	q := &queue{pkt: make(chan []byte, 16)}
	q.b = New(testAddr, "test", func(payload []byte) error {
		q.pkt <- packet(testAddr, payload)
		return nil
	})
	return q
}

func (q *queue) readOne() {
	if n, ok := q.b.Match(<-q.pkt); ok {
		q.b.Pass(n)
	}
}

// TestWaitPassesInOrder: Wait returns only once the reader has read its
// packet, after everything queued before it.
func TestWaitPassesInOrder(t *testing.T) {
	q := newQueue()
	q.pkt <- []byte("before")
	done := make(chan error, 1)
	go func() { done <- q.b.Wait(5 * time.Second) }()
	if pkt := <-q.pkt; string(pkt) != "before" {
		t.Fatalf("read %q first", pkt)
	}
	select {
	case err := <-done:
		t.Fatalf("Wait returned (%v) before its packet was read", err)
	case <-time.After(20 * time.Millisecond):
	}
	q.readOne()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if q.b.Waiting() != 0 {
		t.Error("Waiting is not 0 after Wait returned")
	}
}

// TestWaitIgnoresOtherNonces: a stranger's barrier packet, or a late one
// of an earlier Wait that timed out, does not end a Wait.
func TestWaitIgnoresOtherNonces(t *testing.T) {
	q := newQueue()
	if err := q.b.Wait(10 * time.Millisecond); err == nil || !strings.Contains(err.Error(), "not read within") {
		t.Fatalf("a Wait nobody read: %v", err)
	}
	stale := <-q.pkt // the timed-out Wait's packet, read late
	done := make(chan error, 1)
	go func() { done <- q.b.Wait(5 * time.Second) }()
	for q.b.Waiting() == 0 {
		time.Sleep(time.Millisecond)
	}
	for _, p := range [][]byte{stale, packet(testAddr, []byte{0, 0, 0, 0, 0, 0, 0, 3})} {
		if n, ok := q.b.Match(p); ok {
			q.b.Pass(n)
		}
	}
	select {
	case err := <-done:
		t.Fatalf("Wait returned (%v) on another nonce", err)
	case <-time.After(20 * time.Millisecond):
	}
	q.readOne()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestWaitSendError(t *testing.T) {
	b := New(testAddr, "test", func([]byte) error { return errors.New("no device") })
	if err := b.Wait(time.Second); err == nil || !strings.Contains(err.Error(), "no device") {
		t.Fatalf("Wait = %v, want the send error", err)
	}
}
