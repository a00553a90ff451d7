package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// udpFrom builds a UDP packet from src port sport carrying seq, so tests
// can check order per flow.
func udpFrom(t testing.TB, sport uint16, seq uint32) []byte {
	ip := ip4(layers.IPProtocolUDP)
	u := &layers.UDP{SrcPort: layers.UDPPort(sport), DstPort: 5201}
	if err := u.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	payload := make([]byte, 4)
	binary.BigEndian.PutUint32(payload, seq)
	return serialize(t, ip, u, gopacket.Payload(payload))
}

func seqOf(pkt []byte) (sport uint16, seq uint32) {
	return binary.BigEndian.Uint16(pkt[20:22]), binary.BigEndian.Uint32(pkt[28:32])
}

func TestSendReceive(t *testing.T) {
	src := NewQueue(DefaultLimits(), nil)
	for i := range 1000 {
		src.Push(udpFrom(t, 1, uint32(i)), time.Now())
	}
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 1}
	vip := netip.MustParseAddr("100.64.1.2")

	var sent FlushStats
	var sendErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		sent, sendErr = Sender{Queue: src, Header: Header{VIP: vip, Epoch: 7, MAC: mac}, Linger: 300 * time.Millisecond}.Send(a)
	}()

	dst := NewQueue(DefaultLimits(), nil)
	var hdr Header
	var end End
	ended := make(chan struct{})
	var st FlushStats
	var recvErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		st, recvErr = receive(b, Receiver{Queue: dst, OnHeader: func(h Header) error { hdr = h; return nil }, OnEnd: func(e End) { end = e; close(ended) }})
	}()
	<-ended
	// Stragglers after the end marker still come, in order.
	for i := 1000; i < 1100; i++ {
		src.Push(udpFrom(t, 1, uint32(i)), time.Now())
	}
	wg.Wait()
	if sendErr != nil || recvErr != nil {
		t.Fatalf("send %v, receive %v", sendErr, recvErr)
	}
	if hdr.VIP != vip || hdr.Epoch != 7 || hdr.MAC.String() != mac.String() || hdr.Queued != 1000 {
		t.Fatalf("header %+v", hdr)
	}
	if end.Packets != 1000 || sent.Flushed != 1000 || st.Flushed != 1000 {
		t.Fatalf("end %+v, sent %+v, received %+v", end, sent, st)
	}
	if sent.Forwarded != 100 || st.Forwarded != 100 {
		t.Fatalf("stragglers: sent %d, received %d, want 100", sent.Forwarded, st.Forwarded)
	}
	for i := range 1100 {
		pkt, _, ok := dst.Pop(time.Now())
		if !ok {
			t.Fatalf("packet %d missing", i)
		}
		if _, seq := seqOf(pkt); seq != uint32(i) {
			t.Fatalf("packet %d has seq %d", i, seq)
		}
	}
}

// TestSendTicks: asked for ticks, the source writes one with the end
// marker and then one per tick while it lingers, each later than the one
// before and behind every straggler it took before it.
func TestSendTicks(t *testing.T) {
	src := NewQueue(DefaultLimits(), nil)
	src.Push(udpFrom(t, 1, 0), time.Now())
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	var sendErr error
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		_, sendErr = Sender{Queue: src, Header: Header{VIP: netip.MustParseAddr("100.64.1.2"), Epoch: 7}, Linger: 100 * time.Millisecond, Tick: 5 * time.Millisecond}.Send(a)
	}()
	dst := NewQueue(DefaultLimits(), nil)
	var ticks []time.Duration
	var atTick []int // packets received when each tick came
	ended := make(chan struct{})
	_, err := receive(b, Receiver{Queue: dst, OnEnd: func(End) {
		close(ended)
		go src.Push(udpFrom(t, 1, 1), time.Now())
	}, OnTick: func(d time.Duration) {
		ticks = append(ticks, d)
		atTick = append(atTick, dst.Len())
	}})
	wg.Wait()
	if err != nil || sendErr != nil {
		t.Fatalf("receive %v, send %v", err, sendErr)
	}
	if len(ticks) < 5 {
		t.Fatalf("%d ticks in 100 ms at 5 ms: %v", len(ticks), ticks)
	}
	for i := 1; i < len(ticks); i++ {
		if ticks[i] <= ticks[i-1] {
			t.Fatalf("ticks not increasing: %v", ticks)
		}
	}
	if atTick[len(atTick)-1] != 2 {
		t.Fatalf("the last tick came with %d packets in, want the straggler ahead of it too (2)", atTick[len(atTick)-1])
	}
}

// TestSendFlushUntil: while FlushUntil is open, what reaches the
// queue is flushed, before the end marker; after it closes, a packet is a
// straggler.
func TestSendFlushUntil(t *testing.T) {
	src := NewQueue(DefaultLimits(), nil)
	src.Push(udpFrom(t, 1, 0), time.Now())
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	routed, stop := make(chan struct{}), make(chan struct{})
	var (
		sent    FlushStats
		sendErr error
		wg      sync.WaitGroup
	)
	wg.Add(1)
	go func() {
		defer wg.Done()
		sent, sendErr = Sender{Queue: src, Header: Header{VIP: netip.MustParseAddr("100.64.1.2"), Epoch: 7}, Linger: time.Minute, FlushUntil: routed, Stop: stop}.Send(a)
	}()
	dst := NewQueue(DefaultLimits(), nil)
	var end End
	ended := make(chan struct{})
	_, err := receive(b, Receiver{Queue: dst, OnHeader: func(Header) error {
		// The header is out before the route moved; two more packets
		// come in meanwhile, then the move ends.
		go func() {
			src.Push(udpFrom(t, 1, 1), time.Now())
			src.Push(udpFrom(t, 1, 2), time.Now())
			for src.Len() > 0 {
				time.Sleep(time.Millisecond)
			}
			close(routed)
		}()
		return nil
	}, OnEnd: func(e End) {
		end = e
		close(ended)
		go func() {
			src.Push(udpFrom(t, 1, 3), time.Now())
			for src.Len() > 0 {
				time.Sleep(time.Millisecond)
			}
			close(stop)
		}()
	}})
	wg.Wait()
	if err != nil || sendErr != nil {
		t.Fatalf("receive %v, send %v", err, sendErr)
	}
	if end.Packets != 3 || sent.Flushed != 3 || sent.Forwarded != 1 || dst.Len() != 4 {
		t.Fatalf("end marker after %d packets, flushed %d, forwarded %d, received %d: want 3 before the end marker, 1 after, 4 in all",
			end.Packets, sent.Flushed, sent.Forwarded, dst.Len())
	}
}

func TestReceiveRefused(t *testing.T) {
	a, b := net.Pipe()
	defer b.Close()
	go func() {
		w := NewWriter(a)
		w.Refuse(Refuse{Reason: "not here"})
		w.Flush()
		a.Close()
	}()
	_, err := receive(b, Receiver{Queue: NewQueue(DefaultLimits(), nil)})
	if !errors.Is(err, ErrRefused) {
		t.Fatalf("err = %v, want ErrRefused", err)
	}
}

// recorder collects what an orderer delivers.
type recorder struct {
	mu  sync.Mutex
	got [][2]uint32 // sport, seq
	at  []time.Time
}

func (r *recorder) write(pkt []byte) error {
	sport, seq := seqOf(pkt)
	r.mu.Lock()
	r.got = append(r.got, [2]uint32{uint32(sport), seq})
	r.at = append(r.at, time.Now())
	r.mu.Unlock()
	return nil
}

func (r *recorder) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.got)
}

func waitCount(t *testing.T, r *recorder, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for r.count() < n {
		if time.Now().After(deadline) {
			t.Fatalf("delivered %d, want %d", r.count(), n)
		}
		time.Sleep(time.Millisecond)
	}
}

// runOrderer runs o until the test ends.
func runOrderer(t *testing.T, o *Orderer) {
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- o.Run(stop) }()
	t.Cleanup(func() {
		close(stop)
		if err := <-done; err != nil {
			t.Error(err)
		}
	})
}

func TestOrdererStreamFirstThenSettledFlows(t *testing.T) {
	stream, direct := NewQueue(DefaultLimits(), nil), NewQueue(DefaultLimits(), nil)
	rec := &recorder{}
	o := &Orderer{Stream: stream, Direct: direct, Settle: 100 * time.Millisecond, Write: rec.write}
	runOrderer(t, o)

	// Flow 1's old path (stream) and new path (direct) overlap; flow 2
	// only arrives directly.
	for i := range 10 {
		stream.Push(udpFrom(t, 1, uint32(i)), time.Now())
	}
	firstDirect := time.Now()
	direct.Push(udpFrom(t, 1, 20), firstDirect)
	direct.Push(udpFrom(t, 2, 0), time.Now())

	time.Sleep(20 * time.Millisecond)
	if rec.count() != 0 {
		t.Fatalf("delivered %d packets before the VM had carrier", rec.count())
	}
	o.SetCarrier(true)
	waitCount(t, rec, 10)
	time.Sleep(20 * time.Millisecond)
	if rec.count() != 10 {
		t.Fatalf("held packets delivered before the end marker: %v", rec.got)
	}
	o.Ended()
	// A straggler of flow 1 on the old path arrives after the end marker,
	// within the settle time: it must still come before flow 1's direct
	// packet.
	stream.Push(udpFrom(t, 1, 10), time.Now())
	waitCount(t, rec, 13)
	rec.mu.Lock()
	released := rec.at[11]
	rec.mu.Unlock()
	if held := released.Sub(firstDirect); held < 100*time.Millisecond {
		t.Errorf("a direct packet was released %v after it arrived, before its flow settled (100ms)", held)
	}
	want := [][2]uint32{{1, 0}, {1, 1}, {1, 2}, {1, 3}, {1, 4}, {1, 5}, {1, 6}, {1, 7}, {1, 8}, {1, 9}, {1, 10}, {1, 20}, {2, 0}}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for i := range want {
		if rec.got[i] != want[i] {
			t.Fatalf("delivery order %v, want %v", rec.got, want)
		}
	}
}

// TestOrdererWaitsForTicks: with ticks asked for, a flow's direct packets
// wait past settle while the stream is held up (a lost segment), until a
// tick shows that the source sent everything it took by then: the
// straggler stuck behind the loss then still comes first.
func TestOrdererWaitsForTicks(t *testing.T) {
	const settle = 30 * time.Millisecond
	stream, direct := NewQueue(DefaultLimits(), nil), NewQueue(DefaultLimits(), nil)
	rec := &recorder{}
	o := &Orderer{Stream: stream, Direct: direct, Settle: settle, Write: rec.write}
	o.ExpectTicks(true)
	runOrderer(t, o)
	o.SetCarrier(true)
	o.Tick(0) // the header: the source's clock starts now
	origin := time.Now()
	stream.Push(udpFrom(t, 1, 0), time.Now())
	o.Ended()
	o.Tick(time.Since(origin))
	waitCount(t, rec, 1)
	firstDirect := time.Now()
	direct.Push(udpFrom(t, 1, 20), firstDirect)

	// Settle passes; the stream is stuck: ticks the source wrote are held
	// up with the straggler. Nothing direct may go.
	time.Sleep(3 * settle)
	if n := rec.count(); n != 1 {
		t.Fatalf("delivered %d: a direct packet went while the stream was held up", n)
	}
	// A tick written before the flow could have settled proves nothing.
	o.Tick(firstDirect.Sub(origin))
	time.Sleep(settle)
	if n := rec.count(); n != 1 {
		t.Fatalf("delivered %d: released on an early tick", n)
	}
	// The retransmission arrives: the straggler, then a later tick.
	stream.Push(udpFrom(t, 1, 10), time.Now())
	o.Tick(firstDirect.Sub(origin) + settle + time.Millisecond)
	waitCount(t, rec, 3)
	want := [][2]uint32{{1, 0}, {1, 10}, {1, 20}}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	for i := range want {
		if rec.got[i] != want[i] {
			t.Fatalf("delivery order %v, want %v", rec.got, want)
		}
	}
	if o.Stats().Late != 0 {
		t.Errorf("late %d, want 0", o.Stats().Late)
	}
}

func TestOrdererClosedReleasesAndDrains(t *testing.T) {
	stream, direct := NewQueue(DefaultLimits(), nil), NewQueue(DefaultLimits(), nil)
	rec := &recorder{}
	o := &Orderer{Stream: stream, Direct: direct, Settle: time.Hour, Write: rec.write}
	direct.Push(udpFrom(t, 3, 1), time.Now())
	o.SetCarrier(true)
	o.Closed()
	stop := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- o.Run(stop) }()
	waitCount(t, rec, 1)
	deadline := time.Now().Add(5 * time.Second)
	select {
	case <-o.Done():
	case <-time.After(time.Until(deadline)):
		t.Fatal("not drained")
	}
	if st := o.Stats(); st.Delivered != 1 || st.FirstDelivery.IsZero() {
		t.Errorf("stats %+v", st)
	}
	close(stop)
	<-done
}

func TestOrdererPaces(t *testing.T) {
	stream, direct := NewQueue(DefaultLimits(), nil), NewQueue(DefaultLimits(), nil)
	for i := range 2000 {
		stream.Push(udpFrom(t, 1, uint32(i)), time.Now())
	}
	rec := &recorder{}
	o := &Orderer{Stream: stream, Direct: direct, Write: rec.write, MinRate: 20000, Speedup: 1}
	o.SetCarrier(true)
	o.Closed()
	stop := make(chan struct{})
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- o.Run(stop) }()
	waitCount(t, rec, 2000)
	took := time.Since(start)
	close(stop)
	<-done
	// 2000 packets at 20,000/s (plus a 64-packet burst) take ~97 ms.
	if took < 80*time.Millisecond {
		t.Errorf("2000 packets delivered in %v: not paced at 20,000/s", took)
	}
}

// TestReceiveRejects: Receive takes only what Send can write: a
// header, packets, one end marker, packets, a close marker.
func TestReceiveRejects(t *testing.T) {
	hdr := Frame{Type: FrameHeader, Header: Header{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 2}}
	pkt := Frame{Type: FramePacket, Packet: []byte{0x45, 0, 0, 20}}
	end := Frame{Type: FrameEnd, End: End{Packets: 1}}
	closing := Frame{Type: FrameClose}
	req := Frame{Type: FrameRequest, Request: Request{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 2, Claimer: "b"}}
	if _, err := receive(bytes.NewReader(encode(t, hdr, pkt, end, pkt, closing)), Receiver{Queue: NewQueue(DefaultLimits(), nil)}); err != nil {
		t.Fatalf("a well-formed stream: %v", err)
	}
	for name, frames := range map[string][]Frame{
		"packet first":    {pkt, hdr, end, closing},
		"request first":   {req},
		"two headers":     {hdr, hdr, end, closing},
		"two end markers": {hdr, pkt, end, end, closing},
		"close first":     {hdr, closing},
		"request inside":  {hdr, req, end, closing},
	} {
		ends := 0
		_, err := receive(bytes.NewReader(encode(t, frames...)), Receiver{Queue: NewQueue(DefaultLimits(), nil), OnEnd: func(End) { ends++ }})
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
		if ends > 1 {
			t.Errorf("%s: onEnd called %d times", name, ends)
		}
	}
	// A header the caller refuses (another VIP or epoch than asked for)
	// ends the receive before a packet reaches the queue.
	q := NewQueue(DefaultLimits(), nil)
	refused := errors.New("epoch 2, asked for 3")
	_, err := receive(bytes.NewReader(encode(t, hdr, pkt, end, pkt, closing)),
		Receiver{Queue: q, OnHeader: func(Header) error { return refused }})
	if !errors.Is(err, refused) || q.Len() != 0 {
		t.Errorf("a refused header: %v with %d packets queued, want the refusal and none", err, q.Len())
	}
}

// receive is Receiver.Receive on a stream read from r from its first
// frame, as the agent reads an answer: a stream cut before it is
// io.ErrUnexpectedEOF (the source owes a header or a refusal).
func receive(r io.Reader, rv Receiver) (FlushStats, error) {
	rd := NewReader(r)
	f, err := rd.Next()
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return FlushStats{}, fmt.Errorf("handover: read header: %w", err)
	}
	return rv.Receive(rd, f)
}

// FuzzReceive is the destination's side of a handover fed arbitrary bytes
// as the source's stream. Whatever comes, the queue holds exactly the
// stream's packets in order, within its bounds; the callbacks see at most
// one header and one end marker; and the stream is accepted only if it is
// what Send writes.
func FuzzReceive(f *testing.F) {
	hdr := Frame{Type: FrameHeader, Header: Header{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 8, MAC: mac6, Queued: 2, QueuedBytes: 24}}
	pkt := Frame{Type: FramePacket, Packet: []byte{0x45, 0, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8}}
	end := Frame{Type: FrameEnd, End: End{Packets: 2, Bytes: 24, Dropped: 1}}
	closing := Frame{Type: FrameClose}
	f.Add(encode(f, hdr, pkt, pkt, end, pkt, closing))
	f.Add(encode(f, hdr, end, closing))
	f.Add(encode(f, hdr, pkt, end, end, closing))
	f.Add(encode(f, Frame{Type: FrameRefuse, Refuse: Refuse{Reason: "no"}}))
	f.Add(encode(f, hdr, pkt)[:20])
	// Small bounds, so that the fuzzer reaches them.
	lim := Limits{MaxBytes: 4096, MaxPackets: 16, MaxAge: time.Hour}
	f.Fuzz(func(t *testing.T, in []byte) {
		// The frames as the Reader sees them, up to the first bad one.
		var frames []Frame
		r := NewReader(bytes.NewReader(in))
		for {
			fr, err := r.Next()
			if err != nil {
				break
			}
			fr.Packet = bytes.Clone(fr.Packet)
			frames = append(frames, fr)
		}

		q := NewQueue(lim, nil)
		headers, ends := 0, 0
		st, err := receive(bytes.NewReader(in), Receiver{Queue: q, OnHeader: func(Header) error { headers++; return nil }, OnEnd: func(End) { ends++ }})

		wellFormed, streamed := handoverShape(frames)
		if wellFormed != (err == nil) {
			t.Fatalf("frames %v: Receive returned %v", frameTypes(frames), err)
		}
		if err != nil && !errors.Is(err, ErrMalformed) && !errors.Is(err, io.ErrUnexpectedEOF) && !errors.Is(err, ErrRefused) {
			t.Fatalf("error of an unexpected kind: %v", err)
		}
		if headers > 1 || ends > 1 || (err == nil && (headers != 1 || ends != 1)) {
			t.Fatalf("%d headers, %d end markers reported (err %v)", headers, ends, err)
		}
		if got := int(st.Flushed + st.Forwarded); got != len(streamed) {
			t.Fatalf("stats count %d packets, the stream had %d", got, len(streamed))
		}

		// The queue keeps a prefix-closed, in-order subset: what fits.
		qs := q.Stats()
		if qs.Len > lim.MaxPackets || qs.QueuedBytes > lim.MaxBytes {
			t.Fatalf("queue over its bounds: %d packets, %d bytes", qs.Len, qs.QueuedBytes)
		}
		if int(qs.Packets)+int(qs.DroppedTotal()) != len(streamed) {
			t.Fatalf("queue took %d and dropped %d of %d packets", qs.Packets, qs.DroppedTotal(), len(streamed))
		}
		next := 0
		for {
			p, _, ok := q.Pop(time.Now())
			if !ok {
				break
			}
			for next < len(streamed) && !bytes.Equal(streamed[next], p) {
				next++
			}
			if next == len(streamed) {
				t.Fatalf("queue holds %x, not a stream packet in order", p)
			}
			next++
		}
	})
}

// handoverShape says whether frames are what Send writes (header,
// packets, one end marker, packets, close; anything after the close is
// not read) and returns the packets Receive takes before it stops.
func handoverShape(frames []Frame) (wellFormed bool, packets [][]byte) {
	if len(frames) == 0 || frames[0].Type != FrameHeader {
		return false, nil
	}
	ended := false
	for _, fr := range frames[1:] {
		switch {
		case fr.Type == FramePacket:
			packets = append(packets, fr.Packet)
		case fr.Type == FrameEnd && !ended:
			ended = true
		case fr.Type == FrameClose && ended:
			return true, packets
		default:
			return false, packets
		}
	}
	return false, packets
}

func frameTypes(frames []Frame) []FrameType {
	ts := make([]FrameType, len(frames))
	for i, f := range frames {
		ts[i] = f.Type
	}
	return ts
}
