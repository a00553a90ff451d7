// Package barrier marks a moment in a device's packet queue. A packet
// queue (a TUN device's, which the kernel fills and one reader empties) is
// first in, first out: a packet of our own put into it now comes out after
// everything queued before it. Wait sends such a packet, a UDP datagram to
// a link-local address nobody uses carrying a random nonce, and returns
// when the queue's reader says it has seen it (Pass). The cache device and
// embedded wireguard-go's tunnel device each have one.
package barrier

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Port is the UDP port of barrier packets: discard.
const Port = 9

// Barrier is one device's barrier. The reader calls Match and Pass; Wait
// runs on any goroutine, one at a time.
type Barrier struct {
	addr netip.Addr
	send func(payload []byte) error
	what string // names the queue in errors

	mu     sync.Mutex    // one Wait at a time
	want   atomic.Uint64 // the nonce Wait waits for, 0 if none
	passed chan uint64
}

// New returns the barrier of a queue whose barrier packets go to addr
// (IPv4, link-local: no route but the device's leads there, and one that
// escaped would be dropped), sent by send. what names the queue in errors.
func New(addr netip.Addr, what string, send func(payload []byte) error) *Barrier {
	return &Barrier{addr: addr, send: send, what: what, passed: make(chan uint64, 1)}
}

// Addr is where the barrier's packets go.
func (b *Barrier) Addr() netip.Addr { return b.addr }

// Waiting is the nonce of the barrier under way, 0 if none: a reader on a
// hot path may skip Match while it is 0.
func (b *Barrier) Waiting() uint64 { return b.want.Load() }

// Match reads the nonce of a barrier packet: IPv4 to the barrier's
// address, not a fragment, UDP to Port, 8 bytes of payload. The reader
// drops every packet it matches, whatever its nonce.
func (b *Barrier) Match(pkt []byte) (nonce uint64, ok bool) {
	if len(pkt) < 20 || pkt[0]>>4 != 4 || pkt[9] != unix.IPPROTO_UDP || netip.AddrFrom4([4]byte(pkt[16:20])) != b.addr {
		return 0, false
	}
	if pkt[6]&0x3f != 0 || pkt[7] != 0 { // more fragments, or an offset
		return 0, false
	}
	ihl := int(pkt[0]&0x0f) * 4
	if ihl < 20 || len(pkt) < ihl+8+8 || binary.BigEndian.Uint16(pkt[ihl+2:]) != Port {
		return 0, false
	}
	return binary.BigEndian.Uint64(pkt[ihl+8:]), true
}

// Pass says the barrier packet with nonce has passed: everything queued
// before it has been read. It never blocks; a nonce nobody waits for (a
// late packet of an earlier Wait, one a stranger sent) is ignored.
func (b *Barrier) Pass(nonce uint64) {
	if nonce == 0 || nonce != b.want.Load() {
		return
	}
	select {
	case b.passed <- nonce:
	default:
	}
}

// Wait returns once every packet queued before the call has been read:
// it sends a barrier packet and waits until the reader passes it.
func (b *Barrier) Wait(timeout time.Duration) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	// Random: anyone who can route a packet into the queue (a local VM)
	// could otherwise send the next barrier's packet ahead of it and end
	// the wait early.
	var nb [8]byte
	rand.Read(nb[:])                            // never fails (it crashes the program instead)
	nonce := binary.BigEndian.Uint64(nb[:]) | 1 // never 0, which means none
	binary.BigEndian.PutUint64(nb[:], nonce)
	b.want.Store(nonce)
	defer b.want.Store(0)
	select {
	case <-b.passed: // an earlier Wait's, passed after it gave up
	default:
	}
	if err := b.send(nb[:]); err != nil {
		return fmt.Errorf("%s barrier: %w", b.what, err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case n := <-b.passed:
			if n == nonce {
				return nil
			}
		case <-t.C:
			return fmt.Errorf("%s barrier: its packet was not read within %v", b.what, timeout)
		}
	}
}

// SendOn returns a sender of barrier packets to addr through interface
// dev: a UDP socket bound to dev (SO_BINDTODEVICE), which routes a
// destination there even when no route names it.
func SendOn(dev string, addr netip.Addr) func(payload []byte) error {
	return func(payload []byte) error {
		d := net.Dialer{Control: func(_, _ string, c syscall.RawConn) error {
			var err error
			if cerr := c.Control(func(fd uintptr) { err = unix.BindToDevice(int(fd), dev) }); cerr != nil {
				return cerr
			}
			return err
		}}
		conn, err := d.Dial("udp4", netip.AddrPortFrom(addr, Port).String())
		if err != nil {
			return fmt.Errorf("socket on %s: %w", dev, err)
		}
		defer conn.Close()
		if _, err := conn.Write(payload); err != nil {
			return fmt.Errorf("send on %s: %w", dev, err)
		}
		return nil
	}
}
