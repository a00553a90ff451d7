package wgdev

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vmroam/vmroam/internal/barrier"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// TestHoldWrites checks that a held device hands nothing to the kernel
// until it is released, and then everything, in order.
func TestHoldWrites(t *testing.T) {
	ch := tuntest.NewChannelTUN()
	h := newHoldTUN(ch.TUN(), nil)
	d := &Device{hold: h}

	release, ok := d.HoldWrites()
	if !ok {
		t.Fatal("a userspace device could not be held")
	}
	done := make(chan error, 1)
	go func() {
		_, err := h.Write([][]byte{{1}, {2}}, 0)
		done <- err
	}()
	select {
	case p := <-ch.Inbound:
		t.Fatalf("packet %v reached the kernel while held", p)
	case <-time.After(100 * time.Millisecond):
	}
	release()
	for want := byte(1); want <= 2; want++ {
		select {
		case p := <-ch.Inbound:
			if len(p) != 1 || p[0] != want {
				t.Fatalf("got packet %v, want [%d]", p, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("packet %d not written after the release", want)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// A kernel device (no hold) says so and its release is harmless.
	release, ok = (&Device{}).HoldWrites()
	if ok {
		t.Fatal("a kernel device claims to hold writes")
	}
	release()
}

// queueTUN is a TUN device whose kernel side is a queue the test fills:
// Read returns every packet queued, up to a batch, as a kernel's TUN
// queue gives them to wireguard-go.
type queueTUN struct {
	tun.Device // for writes and events
	mu         sync.Mutex
	cond       *sync.Cond
	queue      [][]byte
	closed     bool
}

func newQueueTUN(dev tun.Device) *queueTUN {
	q := &queueTUN{Device: dev}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *queueTUN) push(pkts ...[]byte) {
	q.mu.Lock()
	q.queue = append(q.queue, pkts...)
	q.mu.Unlock()
	q.cond.Broadcast()
}

func (q *queueTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.queue) == 0 && !q.closed {
		q.cond.Wait()
	}
	if q.closed {
		return 0, os.ErrClosed
	}
	n := 0
	for n < len(bufs) && len(q.queue) > 0 {
		sizes[n] = copy(bufs[n][offset:], q.queue[0])
		q.queue = q.queue[1:]
		n++
	}
	return n, nil
}

func (q *queueTUN) BatchSize() int { return 64 }

func (q *queueTUN) Close() error {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	q.cond.Broadcast()
	return q.Device.Close()
}

// barrierPacket is what the kernel makes of barrier.SendOn's datagram.
func barrierPacket(nonce uint64) []byte {
	p := make([]byte, 20+8+8)
	p[0], p[9] = 0x45, 17
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	copy(p[12:16], []byte{100, 64, 0, 1})
	copy(p[16:20], readBarrierAddr.AsSlice())
	binary.BigEndian.PutUint16(p[22:], barrier.Port)
	binary.BigEndian.PutUint16(p[24:], 16)
	binary.BigEndian.PutUint64(p[28:], nonce)
	return p
}

// TestReadBarrierPassesAfterTheBatch checks that a barrier passes only when
// wireguard-go reads again, having looked up the peers of the batch the
// barrier came in, and that the barrier packet goes no further.
func TestReadBarrierPassesAfterTheBatch(t *testing.T) {
	q := newQueueTUN(tuntest.NewChannelTUN().TUN())
	data := tuntest.Ping(netip.MustParseAddr("100.100.0.1"), netip.MustParseAddr("100.64.0.1"))
	h := newHoldTUN(q, func(payload []byte) error {
		q.push(data, barrierPacket(binary.BigEndian.Uint64(payload)), data)
		return nil
	})
	done := make(chan error, 1)
	go func() { done <- h.barrier.Wait(5 * time.Second) }()

	bufs, sizes := make([][]byte, 8), make([]int, 8)
	for i := range bufs {
		bufs[i] = make([]byte, 1500)
	}
	var n int
	for n == 0 { // until the barrier's batch has come in whole
		if h.barrier.Waiting() == 0 {
			time.Sleep(time.Millisecond)
			continue
		}
		var err error
		if n, err = h.Read(bufs, sizes, 0); err != nil {
			t.Fatal(err)
		}
	}
	if n != 3 || sizes[0] != len(data) || sizes[1] != 0 || sizes[2] != len(data) {
		t.Fatalf("batch of %d, sizes %v: want the barrier packet's size 0 between two packets", n, sizes[:n])
	}
	select {
	case err := <-done:
		t.Fatalf("barrier passed (%v) before wireguard-go read again", err)
	case <-time.After(50 * time.Millisecond):
	}
	go q.push(data)
	if _, err := h.Read(bufs, sizes, 0); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("barrier after the next read: %v", err)
	}

	// Nobody reads: the barrier times out, and says so.
	if err := newHoldTUN(q, func([]byte) error { return nil }).barrier.Wait(20 * time.Millisecond); err == nil {
		t.Error("a barrier nobody read passed")
	}
	// A kernel device has nothing to wait for.
	if err := (&Device{}).ReadBarrier(time.Millisecond); err != nil {
		t.Errorf("kernel device: %v", err)
	}
}

// TestReadBarrierBeforeAPeerChange runs embedded wireguard-go on a queue
// the test fills: packets queued before a barrier go to the peer their
// address had before the barrier returned, although the address moves to
// another peer at once after it. That is the agent's use: a VIP whose
// route left the tunnel, queued packets, and then a new peer for it.
func TestReadBarrierBeforeAPeerChange(t *testing.T) {
	binds := bindtest.NewChannelBinds()
	q := newQueueTUN(tuntest.NewChannelTUN().TUN())
	h := newHoldTUN(q, func(payload []byte) error {
		q.push(barrierPacket(binary.BigEndian.Uint64(payload)))
		return nil
	})
	recv := tuntest.NewChannelTUN()
	a, keyA := newTestDevice(t, h, binds[0])
	b, keyB := newTestDevice(t, recv.TUN(), binds[1])
	other, _ := wgtypes.GeneratePrivateKey()
	vip := netip.MustParseAddr("100.100.0.1")
	if err := a.IpcSet(fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:1\nallowed_ip=%s/32\npublic_key=%s\nallowed_ip=100.64.0.9/32\n",
		hexKey(keyB.PublicKey()), vip, hexKey(other.PublicKey()))); err != nil {
		t.Fatal(err)
	}
	if err := b.IpcSet(fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:2\nallowed_ip=100.64.0.1/32\n", hexKey(keyA.PublicKey()))); err != nil {
		t.Fatal(err)
	}
	var got atomic.Int64
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-recv.Inbound:
				got.Add(1)
			case <-stop:
				return
			}
		}
	}()

	const sent = 2000
	pkts := make([][]byte, sent)
	for i := range pkts {
		pkts[i] = tuntest.Ping(vip, netip.MustParseAddr("100.64.0.1"))
	}
	q.push(pkts...)
	if err := h.barrier.Wait(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	// The VIP moves to the other peer, which has no endpoint: what goes
	// there is never delivered.
	if err := a.IpcSet(fmt.Sprintf("public_key=%s\nupdate_only=true\nallowed_ip=%s/32\n", hexKey(other.PublicKey()), vip)); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for got.Load() < sent && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := got.Load(); n != sent {
		t.Fatalf("%d of %d packets queued before the barrier reached their peer", n, sent)
	}
}

func hexKey(k wgtypes.Key) string { return hex.EncodeToString(k[:]) }
