package migrate

import (
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
)

// A fake old host for fetch: each connection fetch makes is answered by
// the test's source.
type fakeSource struct {
	answer  func(n int, req cache.Request, conn net.Conn) // the n-th connection's answer
	mu      sync.Mutex
	reqs    []cache.Request
	conns   int
	giveUp  int // connect returns nil from the giveUp-th on (0: never)
	wg      sync.WaitGroup
	packets [][]byte
}

func (s *fakeSource) connect() (net.Conn, time.Duration) {
	s.mu.Lock()
	s.conns++
	n := s.conns
	s.mu.Unlock()
	if s.giveUp > 0 && n >= s.giveUp {
		return nil, 0
	}
	// TCP on loopback, not net.Pipe: a closed connection reads as TCP's
	// do (EOF, a reset), which fetch tells apart.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	defer ln.Close()
	mine, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		panic(err)
	}
	theirs, err := ln.Accept()
	if err != nil {
		panic(err)
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer theirs.Close()
		f, err := cache.NewReader(theirs).Next()
		if err != nil || f.Type != cache.FrameRequest {
			return
		}
		s.mu.Lock()
		s.reqs = append(s.reqs, f.Request)
		s.mu.Unlock()
		s.answer(n, f.Request, theirs)
	}()
	return mine, time.Millisecond
}

// stream answers req with the source's packets, a whole handover under
// the header hdr, with ticks if asked for.
func (s *fakeSource) stream(req cache.Request, conn net.Conn, hdr cache.Header) {
	q := cache.NewQueue(cache.DefaultLimits(), nil)
	for _, p := range s.packets {
		q.Push(p, time.Now())
	}
	var tick time.Duration
	if req.Ticks {
		tick = 2 * time.Millisecond
	}
	cache.Sender{Queue: q, Header: hdr, Linger: 10 * time.Millisecond, Tick: tick}.Send(conn)
}

// testPackets are n IPv4 UDP headers, numbered in their last byte.
func testPackets(n int) [][]byte {
	var ps [][]byte
	for i := range n {
		p := make([]byte, 28)
		p[0] = 0x45
		p[2], p[3] = 0, 28
		p[9] = 17
		copy(p[12:16], []byte{100, 100, 20, 3})
		copy(p[16:20], []byte{100, 100, 20, 1})
		p[27] = byte(i)
		ps = append(ps, p)
	}
	return ps
}

// runFetch runs fetch for vip at epoch 5 against src and returns the
// migration's record and the stream it filled.
func runFetch(t *testing.T, src *fakeSource, stop chan struct{}) (*vipCtl, *cache.Queue) {
	t.Helper()
	vip := netip.MustParseAddr("100.100.20.1")
	c := &vipCtl{vip: vip}
	stream := cache.NewQueue(cache.DefaultLimits(), nil)
	o := &cache.Orderer{Stream: stream, Direct: cache.NewQueue(cache.DefaultLimits(), nil), Write: func([]byte) error { return nil }}
	if stop == nil {
		stop = make(chan struct{})
	}
	f := &fetch{c: c, from: "h1", req: cache.Request{VIP: vip, Epoch: 5, Claimer: "h2", Ticks: true},
		stream: stream, o: o, stop: stop, settle: 2 * time.Millisecond,
		log: slog.New(slog.NewTextHandler(io.Discard, nil)), connect: src.connect}
	done := make(chan struct{})
	go func() { f.run(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("fetch did not end")
	}
	src.wg.Wait()
	return c, stream
}

// TestFetchWholeStream: the old host's whole cache comes through, in
// order, with the header's MAC and the flush's times and counts recorded.
func TestFetchWholeStream(t *testing.T) {
	src := &fakeSource{packets: testPackets(50)}
	mac := net.HardwareAddr{2, 0, 0, 0, 0, 9}
	src.answer = func(_ int, req cache.Request, conn net.Conn) {
		src.stream(req, conn, cache.Header{VIP: req.VIP, Epoch: req.Epoch, MAC: mac})
	}
	c, stream := runFetch(t, src, nil)
	if c.rec.CacheLost || c.rec.FlushStart == nil || c.rec.FlushEnd == nil || c.rec.Flushed != 50 {
		t.Fatalf("record %+v, want the whole cache flushed", c.rec)
	}
	if c.mac.String() != mac.String() {
		t.Errorf("MAC %v, want the header's %v", c.mac, mac)
	}
	for i := range 50 {
		p, _, ok := stream.Pop(time.Now())
		if !ok || p[27] != byte(i) {
			t.Fatalf("packet %d: %v %v", i, ok, p)
		}
	}
	if len(src.reqs) != 1 || !src.reqs[0].Ticks || src.reqs[0].Epoch != 5 || src.reqs[0].Claimer != "h2" {
		t.Errorf("requests %+v", src.reqs)
	}
}

// TestFetchFailures: every way the old host can fail the new one ends the
// fetch with the cache counted lost when it did not come whole, and never
// with a packet of another VM in the stream.
func TestFetchFailures(t *testing.T) {
	for _, tc := range []struct {
		name   string
		answer func(src *fakeSource, n int, req cache.Request, conn net.Conn)
		giveUp int
		lost   bool // CacheLost
		queued int  // packets in the stream at the end
		conns  int  // connections made
	}{
		{name: "refused", lost: true, conns: 1, answer: func(_ *fakeSource, _ int, _ cache.Request, conn net.Conn) {
			w := cache.NewWriter(conn)
			w.Refuse(cache.Refuse{Reason: "no claim"})
			w.Flush()
		}},
		{name: "another epoch's header", lost: true, conns: 1, answer: func(src *fakeSource, _ int, req cache.Request, conn net.Conn) {
			src.stream(req, conn, cache.Header{VIP: req.VIP, Epoch: req.Epoch - 1})
		}},
		{name: "another VIP's header", lost: true, conns: 1, answer: func(src *fakeSource, _ int, req cache.Request, conn net.Conn) {
			src.stream(req, conn, cache.Header{VIP: netip.MustParseAddr("100.100.20.9"), Epoch: req.Epoch})
		}},
		{name: "cut before the end marker", lost: true, queued: 2, conns: 1, answer: func(src *fakeSource, _ int, req cache.Request, conn net.Conn) {
			w := cache.NewWriter(conn)
			w.Header(cache.Header{VIP: req.VIP, Epoch: req.Epoch})
			w.Packet(src.packets[0])
			w.Packet(src.packets[1])
			w.Flush()
		}},
		{name: "cut after the end marker: whole", lost: false, queued: 1, conns: 1, answer: func(src *fakeSource, _ int, req cache.Request, conn net.Conn) {
			w := cache.NewWriter(conn)
			w.Header(cache.Header{VIP: req.VIP, Epoch: req.Epoch})
			w.Packet(src.packets[0])
			w.End(cache.End{Packets: 1})
			w.Flush()
		}},
		{name: "closed unanswered", lost: true, conns: 2, answer: func(*fakeSource, int, cache.Request, net.Conn) {}},
		{name: "an older agent without ticks", lost: false, queued: 3, conns: 2, answer: func(src *fakeSource, n int, req cache.Request, conn net.Conn) {
			if req.Ticks {
				return // closes on a request with flags it does not know
			}
			src.stream(req, conn, cache.Header{VIP: req.VIP, Epoch: req.Epoch})
		}},
		{name: "no connection", giveUp: 1, lost: true, conns: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := &fakeSource{packets: testPackets(3), giveUp: tc.giveUp}
			src.answer = func(n int, req cache.Request, conn net.Conn) { tc.answer(src, n, req, conn) }
			c, stream := runFetch(t, src, nil)
			if c.rec.CacheLost != tc.lost {
				t.Errorf("cache lost %v, want %v (record %+v)", c.rec.CacheLost, tc.lost, c.rec)
			}
			if stream.Len() != tc.queued {
				t.Errorf("%d packets in the stream, want %d", stream.Len(), tc.queued)
			}
			if src.conns != tc.conns {
				t.Errorf("%d connections, want %d", src.conns, tc.conns)
			}
		})
	}
}

// TestFetchStopped: a fetch stopped on purpose (the VM moved on, or the
// migration ended) while the old host makes it wait is no loss.
func TestFetchStopped(t *testing.T) {
	src := &fakeSource{}
	answered := make(chan struct{})
	src.answer = func(_ int, _ cache.Request, conn net.Conn) {
		close(answered)
		io.Copy(io.Discard, conn) // makes the request wait, until closed
	}
	stop := make(chan struct{})
	go func() {
		<-answered
		close(stop)
	}()
	c, _ := runFetch(t, src, stop)
	if c.rec.CacheLost {
		t.Errorf("a stopped fetch counted the cache lost: %+v", c.rec)
	}
}
