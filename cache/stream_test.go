package cache

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
)

var mac6 = net.HardwareAddr{0x02, 0x16, 0x3e, 0x00, 0x00, 0x01}

// sampleFrames covers every frame type, both VIP families and both MAC
// lengths.
func sampleFrames() []Frame {
	return []Frame{
		{Type: FrameRequest, Request: Request{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 7, Claimer: "host-2"}},
		{Type: FrameRequest, Request: Request{VIP: netip.MustParseAddr("fd00::10"), Epoch: 1 << 40, Claimer: strings.Repeat("c", MaxClaimer)}},
		{Type: FrameRequest, Request: Request{VIP: netip.MustParseAddr("::ffff:100.64.0.10"), Epoch: 0}},
		{Type: FrameRequest, Request: Request{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 7, Claimer: "host-2", Ticks: true}},
		{Type: FrameHeader, Header: Header{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 8, MAC: mac6, Queued: 12500, QueuedBytes: 12500 * 200}},
		{Type: FrameHeader, Header: Header{VIP: netip.MustParseAddr("fd00::10"), Epoch: 9}},
		{Type: FramePacket, Packet: []byte{0x45, 0, 0, 20}},
		{Type: FramePacket, Packet: []byte{}},
		{Type: FramePacket, Packet: bytes.Repeat([]byte{0xab}, MaxFramePayload)},
		{Type: FrameEnd, End: End{Packets: 12500, Bytes: 2500000, Dropped: 3}},
		{Type: FrameClose},
		{Type: FrameRefuse, Refuse: Refuse{Reason: "not the owner"}},
		{Type: FrameRefuse, Refuse: Refuse{Reason: strings.Repeat("r", MaxReason)}},
		{Type: FrameTick, Tick: 0},
		{Type: FrameTick, Tick: 1500 * time.Millisecond},
		{Type: FrameRequest, Request: Request{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 7, Claimer: "host-2", Resume: Resume{Cache: 1 << 62, Seq: 300}}},
		{Type: FrameRequest, Request: Request{VIP: netip.MustParseAddr("fd00::10"), Epoch: 7, Claimer: "host-2", Ticks: true, Resume: Resume{Cache: 1, Seq: 0}}},
		{Type: FramePrepare, Prepare: Prepare{VIP: netip.MustParseAddr("100.64.0.10"), Claimer: "host-2"}},
		{Type: FramePrepare, Prepare: Prepare{VIP: netip.MustParseAddr("fd00::10"), Claimer: strings.Repeat("c", MaxClaimer)}},
		{Type: FrameOffer, Offer: Offer{Cache: 42, Seq: 1 << 33, VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 7, MAC: mac6}},
		{Type: FrameOffer, Offer: Offer{Cache: 1, VIP: netip.MustParseAddr("fd00::10")}},
		{Type: FrameWithdraw},
	}
}

func writeFrame(w *Writer, f Frame) error {
	switch f.Type {
	case FrameRequest:
		return w.Request(f.Request)
	case FrameHeader:
		return w.Header(f.Header)
	case FramePacket:
		return w.Packet(f.Packet)
	case FrameEnd:
		return w.End(f.End)
	case FrameClose:
		return w.Close()
	case FrameRefuse:
		return w.Refuse(f.Refuse)
	case FrameTick:
		return w.Tick(f.Tick)
	case FramePrepare:
		return w.Prepare(f.Prepare)
	case FrameOffer:
		return w.Offer(f.Offer)
	case FrameWithdraw:
		return w.Withdraw()
	}
	return fmt.Errorf("no such frame type %d", f.Type)
}

func encode(t testing.TB, frames ...Frame) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	for _, f := range frames {
		if err := writeFrame(w, f); err != nil {
			t.Fatalf("write %v: %v", f.Type, err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

func sameFrame(a, b Frame) bool {
	return a.Type == b.Type && a.Request == b.Request && a.End == b.End && a.Refuse == b.Refuse && a.Prepare == b.Prepare &&
		a.Offer.Cache == b.Offer.Cache && a.Offer.Seq == b.Offer.Seq && a.Offer.VIP == b.Offer.VIP &&
		a.Offer.Epoch == b.Offer.Epoch && bytes.Equal(a.Offer.MAC, b.Offer.MAC) &&
		a.Header.VIP == b.Header.VIP && a.Header.Epoch == b.Header.Epoch && bytes.Equal(a.Header.MAC, b.Header.MAC) &&
		a.Header.Queued == b.Header.Queued && a.Header.QueuedBytes == b.Header.QueuedBytes &&
		bytes.Equal(a.Packet, b.Packet) && (a.Type != FramePacket || a.Packet != nil) == (b.Type != FramePacket || b.Packet != nil)
}

func TestStreamRoundTrip(t *testing.T) {
	frames := sampleFrames()
	r := NewReader(bytes.NewReader(encode(t, frames...)))
	for i, want := range frames {
		got, err := r.Next()
		if err != nil {
			t.Fatalf("frame %d (%v): %v", i, want.Type, err)
		}
		if !sameFrame(got, want) {
			t.Fatalf("frame %d: got %+v, want %+v", i, got, want)
		}
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("at the end: %v, want io.EOF", err)
	}
	if _, err := r.Next(); err != io.EOF {
		t.Fatalf("after the end: %v, want io.EOF", err)
	}
}

func TestStreamManyPackets(t *testing.T) {
	const n = 20000
	var buf bytes.Buffer
	w := NewWriter(&buf)
	if err := w.Header(Header{VIP: netip.MustParseAddr("100.64.0.10"), Epoch: 2, Queued: n}); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := w.Packet(mkPacket(uint64(i), sizeOf(i))); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.End(End{Packets: n}); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	// A reader fed one byte at a time sees the same frames.
	for _, src := range []io.Reader{bytes.NewReader(buf.Bytes()), &oneByteReader{buf.Bytes()}} {
		r := NewReader(src)
		if f, err := r.Next(); err != nil || f.Type != FrameHeader || f.Header.Queued != n {
			t.Fatalf("header: %+v %v", f, err)
		}
		for i := 0; i < n; i++ {
			f, err := r.Next()
			if err != nil || f.Type != FramePacket {
				t.Fatalf("packet %d: %v %v", i, f.Type, err)
			}
			checkPacket(t, f.Packet, uint64(i), sizeOf(i))
		}
		if f, err := r.Next(); err != nil || f.Type != FrameEnd || f.End.Packets != n {
			t.Fatalf("end: %+v %v", f, err)
		}
		if f, err := r.Next(); err != nil || f.Type != FrameClose {
			t.Fatalf("close: %+v %v", f, err)
		}
		if _, err := r.Next(); err != io.EOF {
			t.Fatalf("after close: %v", err)
		}
	}
}

type oneByteReader struct{ b []byte }

func (r *oneByteReader) Read(p []byte) (int, error) {
	if len(r.b) == 0 {
		return 0, io.EOF
	}
	p[0] = r.b[0]
	r.b = r.b[1:]
	return 1, nil
}

func TestStreamTruncated(t *testing.T) {
	for _, f := range sampleFrames() {
		full := encode(t, f)
		// Every proper prefix but the empty one is cut inside a frame; for
		// the largest frame, a sample of them.
		for cut := 1; cut < len(full); cut++ {
			if cut == 64 && len(full) > 256 {
				cut = len(full) - 64
			}
			_, err := NewReader(bytes.NewReader(full[:cut])).Next()
			if !errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, ErrMalformed) {
				t.Fatalf("%v frame cut at %d of %d: %v, want io.ErrUnexpectedEOF", f.Type, cut, len(full), err)
			}
		}
	}
	if _, err := NewReader(bytes.NewReader(nil)).Next(); err != io.EOF {
		t.Fatalf("empty stream: %v, want io.EOF", err)
	}
}

func TestStreamOversized(t *testing.T) {
	cases := map[string][]byte{
		"max+1":            {byte(FramePacket), 0xc0, 0x80, 0x04}, // 65600
		"2^21-1":           {byte(FramePacket), 0xff, 0xff, 0x7f},
		"4-byte varint":    {byte(FramePacket), 0x80, 0x80, 0x80, 0x01},
		"10-byte varint":   append([]byte{byte(FramePacket)}, bytes.Repeat([]byte{0xff}, 10)...),
		"non-minimal zero": {byte(FrameClose), 0x80, 0x00},
		"non-minimal 1":    {byte(FramePacket), 0x81, 0x00, 0x00},
	}
	for name, in := range cases {
		r := NewReader(bytes.NewReader(in))
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		_, err := r.Next()
		runtime.ReadMemStats(&after)
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
		}
		// The error message is all Next may allocate: nothing sized by the
		// hostile length.
		if n := after.TotalAlloc - before.TotalAlloc; n > 4096 {
			t.Errorf("%s: Next allocated %d bytes", name, n)
		}
		t.Logf("%s: %v", name, err)
	}
	// The largest allowed length is accepted.
	if _, err := NewReader(bytes.NewReader(encode(t, Frame{Type: FramePacket, Packet: make([]byte, MaxFramePayload)}))).Next(); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := NewWriter(&buf).Packet(make([]byte, MaxFramePayload+1)); !errors.Is(err, ErrFrameField) {
		t.Fatalf("writer took an oversized packet: %v", err)
	}
}

func TestStreamMalformed(t *testing.T) {
	vip4 := []byte{4, 100, 64, 0, 1}
	epoch := []byte{0, 0, 0, 0, 0, 0, 0, 1}
	frame := func(t FrameType, parts ...[]byte) []byte {
		p := bytes.Join(parts, nil)
		return append([]byte{byte(t), byte(len(p))}, p...)
	}
	cases := map[string][]byte{
		"type 0":                 {0, 0},
		"type 11":                {11, 0},
		"type 255":               {255, 1, 0},
		"request vip len 5":      frame(FrameRequest, []byte{5, 1, 2, 3, 4, 5}, epoch, []byte{0}),
		"request no vip":         frame(FrameRequest),
		"request short claimer":  frame(FrameRequest, vip4, epoch, []byte{3, 'a'}),
		"request trailing":       frame(FrameRequest, vip4, epoch, []byte{0, 1, 9}),
		"request flags 0":        frame(FrameRequest, vip4, epoch, []byte{0, 0}),
		"request resume cut":     frame(FrameRequest, vip4, epoch, []byte{0, 2}, make([]byte, 15)),
		"request resume cache 0": frame(FrameRequest, vip4, epoch, []byte{0, 2}, make([]byte, 16)),
		"request flags 4":        frame(FrameRequest, vip4, epoch, []byte{0, 4}),
		"prepare trailing":       frame(FramePrepare, vip4, []byte{0, 1}),
		"prepare short claimer":  frame(FramePrepare, vip4, []byte{2, 'a'}),
		"offer cache 0":          frame(FrameOffer, make([]byte, 16), vip4, epoch, []byte{0}),
		"offer mac len 1":        frame(FrameOffer, epoch, epoch, vip4, epoch, []byte{1, 1}),
		"offer trailing":         frame(FrameOffer, epoch, epoch, vip4, epoch, []byte{0, 0}),
		"withdraw with payload":  frame(FrameWithdraw, []byte{0}),
		"tick short":             frame(FrameTick, make([]byte, 7)),
		"tick out of range":      frame(FrameTick, []byte{0x80, 0, 0, 0, 0, 0, 0, 0}),
		"header mac len 5":       frame(FrameHeader, vip4, epoch, []byte{5, 1, 2, 3, 4, 5}, make([]byte, 12)),
		"header short":           frame(FrameHeader, vip4, epoch, []byte{0}, make([]byte, 11)),
		"header trailing":        frame(FrameHeader, vip4, epoch, []byte{0}, make([]byte, 13)),
		"end short":              frame(FrameEnd, make([]byte, 23)),
		"end long":               frame(FrameEnd, make([]byte, 25)),
		"close with payload":     frame(FrameClose, []byte{0}),
		"refuse reason too long": append([]byte{byte(FrameRefuse), 0x81, 0x08}, make([]byte, MaxReason+1)...),
	}
	for name, in := range cases {
		r := NewReader(bytes.NewReader(in))
		_, err := r.Next()
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v, want ErrMalformed", name, err)
			continue
		}
		// Sticky: the stream is out of step after a bad frame.
		if _, err2 := r.Next(); err2 != err {
			t.Errorf("%s: second call %v", name, err2)
		}
	}
}

func TestWriterRejects(t *testing.T) {
	w := NewWriter(io.Discard)
	for name, err := range map[string]error{
		"no vip":         w.Request(Request{}),
		"zone":           w.Request(Request{VIP: netip.MustParseAddr("fe80::1%eth0")}),
		"long claimer":   w.Request(Request{VIP: v4a, Claimer: strings.Repeat("x", MaxClaimer+1)}),
		"mac 5":          w.Header(Header{VIP: v4a, MAC: mac6[:5]}),
		"offer mac 5":    w.Offer(Offer{Cache: 1, VIP: v4a, MAC: mac6[:5]}),
		"offer cache 0":  w.Offer(Offer{VIP: v4a}),
		"prepare no vip": w.Prepare(Prepare{Claimer: "h"}),
		"long reason":    w.Refuse(Refuse{Reason: strings.Repeat("x", MaxReason+1)}),
	} {
		if !errors.Is(err, ErrFrameField) {
			t.Errorf("%s: %v, want ErrFrameField", name, err)
		}
	}
	if w.Buffered() != 0 {
		t.Fatalf("rejected frames left %d bytes", w.Buffered())
	}
}

// errWriter fails every write, like a connection reset.
type errWriter struct{}

func (errWriter) Write([]byte) (int, error) { return 0, errors.New("connection reset") }

func TestWriterTransportError(t *testing.T) {
	w := NewWriter(errWriter{})
	if err := w.Packet(make([]byte, 100)); err != nil {
		t.Fatalf("buffered write failed: %v", err)
	}
	if err := w.Flush(); err == nil || !strings.Contains(err.Error(), "connection reset") {
		t.Fatalf("flush: %v", err)
	}
}

func FuzzReader(f *testing.F) {
	frames := sampleFrames()
	for _, fr := range frames {
		if fr.Type == FramePacket && len(fr.Packet) > 1000 {
			continue // keep the seed corpus small
		}
		f.Add(encode(f, fr))
	}
	f.Add(encode(f, frames[3], frames[5], frames[6], frames[8], frames[5], frames[9]))
	f.Add(encode(f, frames[0], frames[10]))
	f.Add([]byte{byte(FramePacket), 0x80})
	f.Fuzz(func(t *testing.T, in []byte) {
		r := NewReader(bytes.NewReader(in))
		var out bytes.Buffer
		w := NewWriter(&out)
		var err error
		for {
			var fr Frame
			fr, err = r.Next()
			if err != nil {
				break
			}
			if werr := writeFrame(w, fr); werr != nil {
				t.Fatalf("decoded %v frame does not re-encode: %v", fr.Type, werr)
			}
		}
		if ferr := w.Flush(); ferr != nil {
			t.Fatal(ferr)
		}
		// Frames re-encode to exactly the bytes they came from.
		if !bytes.HasPrefix(in, out.Bytes()) {
			t.Fatalf("re-encoded %x is not a prefix of the input %x", out.Bytes(), in)
		}
		switch {
		case err == io.EOF:
			if out.Len() != len(in) {
				t.Fatalf("clean EOF after %d of %d bytes", out.Len(), len(in))
			}
		case errors.Is(err, ErrMalformed), errors.Is(err, io.ErrUnexpectedEOF):
		default:
			t.Fatalf("unexpected error kind: %v", err)
		}
	})
}

func BenchmarkStream(b *testing.B) {
	pkt := make([]byte, 200)
	var buf bytes.Buffer
	w := NewWriter(&buf)
	r := NewReader(&buf)
	const batch = 256
	b.SetBytes(int64(len(pkt)))
	b.ReportAllocs()
	for i := 0; i < b.N; i += batch {
		k := min(batch, b.N-i)
		for j := 0; j < k; j++ {
			if err := w.Packet(pkt); err != nil {
				b.Fatal(err)
			}
		}
		if err := w.Flush(); err != nil {
			b.Fatal(err)
		}
		for j := 0; j < k; j++ {
			if f, err := r.Next(); err != nil || len(f.Packet) != len(pkt) {
				b.Fatal(err)
			}
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pkts/s")
}

// BenchmarkStreamTCP runs the codec over a loopback TCP connection, writer
// and reader in their own goroutines, as two agents would.
func BenchmarkStreamTCP(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Skip("no loopback TCP:", err)
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer c.Close()
		r := NewReader(c)
		for i := 0; i < b.N; i++ {
			if _, err := r.Next(); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	pkt := make([]byte, 200)
	w := NewWriter(c)
	b.SetBytes(int64(len(pkt)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if err := w.Packet(pkt); err != nil {
			b.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pkts/s")
}

// countingReader counts what a Reader takes from the connection.
type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

// endless is a peer that never stops sending 0x80: a byte that continues
// a length, fills a payload, and is no frame type.
type endless struct{}

func (endless) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = 0x80
	}
	return len(p), nil
}

// FuzzRequest is the source's side of a handover: it reads one frame from
// a peer and hands over only for a request. Whatever the peer sends, and
// however much, reading that frame ends and takes at most one buffer from
// the connection (a buffer and a frame header); a request it accepts has a VIP the agent can look up and
// a claimer a member name can be, and is the very bytes the destination's
// Writer sends for it.
func FuzzRequest(f *testing.F) {
	for _, fr := range sampleFrames() {
		if fr.Type == FrameRequest {
			f.Add(encode(f, fr))
		}
	}
	f.Add(encode(f, sampleFrames()[3]))
	f.Add([]byte{byte(FrameRequest), 14, 4, 100, 64, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0})
	f.Add([]byte{byte(FrameRequest), 0xff, 0xff, 0x03})
	f.Fuzz(func(t *testing.T, in []byte) {
		conn := &countingReader{r: io.MultiReader(bytes.NewReader(in), endless{})}
		fr, err := NewReader(conn).Next()
		// The read buffer, refilled once after the type and length.
		if conn.n > MaxFramePayload+16+4 {
			t.Fatalf("one frame read %d bytes from the connection", conn.n)
		}
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("an endless peer gave %v, want ErrMalformed", err)
			}
			return
		}
		if fr.Type != FrameRequest {
			return
		}
		req := fr.Request
		if !req.VIP.IsValid() || req.VIP.Zone() != "" || len(req.Claimer) > MaxClaimer {
			t.Fatalf("accepted request %+v", req)
		}
		var out bytes.Buffer
		w := NewWriter(&out)
		if err := w.Request(req); err != nil {
			t.Fatalf("accepted request %+v does not encode: %v", req, err)
		}
		if err := w.Flush(); err != nil {
			t.Fatal(err)
		}
		if !bytes.HasPrefix(append(bytes.Clone(in), bytes.Repeat([]byte{0x80}, out.Len())...), out.Bytes()) {
			t.Fatalf("request %+v encodes to %x, the peer sent %x", req, out.Bytes(), in)
		}
	})
}
