package cache

import (
	"bytes"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"
)

// previewPipe runs a Preview on one end of a pipe; the test is the source
// on the other end.
func previewPipe(t *testing.T) (*Preview, net.Conn, *Writer) {
	t.Helper()
	a, b := net.Pipe()
	p := NewPreview(b, func() *Queue { return NewQueue(DefaultLimits(), nil) })
	done := make(chan struct{})
	go func() {
		defer close(done)
		p.Run()
	}()
	t.Cleanup(func() {
		a.Close()
		b.Close()
		<-done
	})
	return p, a, NewWriter(a)
}

func send(t *testing.T, w *Writer, frames ...Frame) {
	t.Helper()
	for _, f := range frames {
		if err := writeFrame(w, f); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
}

func packets(t *testing.T, from, to int) []Frame {
	var fs []Frame
	for i := from; i < to; i++ {
		fs = append(fs, Frame{Type: FramePacket, Packet: udpFrom(t, 1, uint32(i))})
	}
	return fs
}

// waitCopies waits until the preview has n copies.
func waitCopies(t *testing.T, p *Preview, n uint64) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); p.Copies() != n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d copies, want %d", p.Copies(), n)
		}
	}
}

// TestPreviewHandover: a whole prepared handover between Sender
// and a Preview. The copies written before the request are the stream's
// start; copies written after the claimer asked (still in flight) follow
// them; the flush goes on after the last copy; every packet arrives once,
// in order.
func TestPreviewHandover(t *testing.T) {
	vip := netip.MustParseAddr("100.64.1.2")
	src := NewQueue(DefaultLimits(), nil)
	for i := range 300 {
		src.Push(udpFrom(t, 1, uint32(i)), time.Now())
	}
	p, conn, w := previewPipe(t)
	// The source copies what it has: 0..199 before the request, 200..249
	// after it (it has not read the request yet).
	head := src.Head()
	send(t, w, Frame{Type: FrameOffer, Offer: Offer{Cache: src.ID(), Seq: head, VIP: vip, Epoch: 6, MAC: mac6}})
	pkts, next := src.CopyOut(head, make([]byte, 0, 1<<20), 200)
	for _, pk := range pkts {
		send(t, w, Frame{Type: FramePacket, Packet: pk})
	}
	waitCopies(t, p, 200)
	q, resume, offer := p.Ask(vip, 7)
	if resume != (Resume{Cache: src.ID(), Seq: 200}) || offer.MAC.String() != mac6.String() {
		t.Fatalf("Ask: resume %+v, offer %+v", resume, offer)
	}
	if q.Len() != 200 {
		t.Fatalf("stream queue has %d packets, want the 200 copies", q.Len())
	}
	pkts, next = src.CopyOut(next, make([]byte, 0, 1<<20), 50)
	for _, pk := range pkts {
		send(t, w, Frame{Type: FramePacket, Packet: pk})
	}
	var wg sync.WaitGroup
	var sent FlushStats
	var sendErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		sent, sendErr = Sender{Queue: src, Header: Header{VIP: vip, Epoch: 7}, From: max(resume.Seq, next), Linger: 50 * time.Millisecond}.Send(conn)
	}()
	rd, first, at, err := p.Await()
	if err != nil || first.Type != FrameHeader || at.IsZero() {
		t.Fatalf("Await: %v %v", first.Type, err)
	}
	st, err := Receiver{Queue: q}.Receive(rd, first)
	wg.Wait()
	if err != nil || sendErr != nil {
		t.Fatalf("receive %v, send %v", err, sendErr)
	}
	st.Flushed += p.Copies()
	if sent.Flushed != 300 || sent.Ahead != 250 || st.Flushed != 300 || p.Copies() != 250 {
		t.Fatalf("flushed: sent %d, received %d (copies %d), want 300", sent.Flushed, st.Flushed, p.Copies())
	}
	for i := range 300 {
		pkt, _, ok := q.Pop(time.Now())
		if !ok {
			t.Fatalf("packet %d missing", i)
		}
		if _, seq := seqOf(pkt); seq != uint32(i) {
			t.Fatalf("packet %d has seq %d", i, seq)
		}
	}
	if q.Len() != 0 {
		t.Fatalf("%d packets more than sent", q.Len())
	}
}

// TestPreviewVoid: copies that must not reach the VM do not: withdrawn
// (the VM stayed at the source), of another VIP or epoch than the claim,
// or on a connection that failed before the claim (the new connection's
// request asks for the whole cache).
func TestPreviewVoid(t *testing.T) {
	vip := netip.MustParseAddr("100.64.1.2")
	offer := Frame{Type: FrameOffer, Offer: Offer{Cache: 9, Seq: 100, VIP: vip, Epoch: 6}}
	// offered is a preview that has taken the offer and its first ten
	// copies.
	offered := func(t *testing.T) (*Preview, net.Conn, *Writer) {
		t.Helper()
		p, conn, w := previewPipe(t)
		send(t, w, offer)
		send(t, w, packets(t, 0, 10)...)
		waitCopies(t, p, 10)
		return p, conn, w
	}

	t.Run("withdrawn", func(t *testing.T) {
		p, _, w := previewPipe(t)
		send(t, w, offer)
		send(t, w, packets(t, 0, 10)...)
		send(t, w, Frame{Type: FrameWithdraw})
		waitCopies(t, p, 0)
		// A second suspend: a new offer, its own copies.
		send(t, w, Frame{Type: FrameOffer, Offer: Offer{Cache: 9, Seq: 110, VIP: vip, Epoch: 6}})
		send(t, w, packets(t, 10, 13)...)
		waitCopies(t, p, 3)
		q, resume, _ := p.Ask(vip, 7)
		if q.Len() != 3 || resume != (Resume{Cache: 9, Seq: 113}) || q.Stats().DroppedTotal() != 0 {
			t.Fatalf("after a withdrawal and a new offer: %d queued, resume %+v, stats %+v", q.Len(), resume, q.Stats())
		}
		pkt, _, _ := q.Pop(time.Now())
		if _, seq := seqOf(pkt); seq != 10 {
			t.Fatalf("first packet %d, want 10", seq)
		}
	})
	t.Run("other epoch", func(t *testing.T) {
		p, _, w := offered(t)
		q, resume, _ := p.Ask(vip, 9)
		if q.Len() != 0 || resume != (Resume{}) {
			t.Fatalf("claim at epoch 9 of an offer at 6: %d queued, resume %+v", q.Len(), resume)
		}
		send(t, w, packets(t, 10, 12)...) // in flight: dropped too
		send(t, w, Frame{Type: FrameHeader, Header: Header{VIP: vip, Epoch: 9}})
		if _, _, _, err := p.Await(); err != nil {
			t.Fatal(err)
		}
		if q.Len() != 0 {
			t.Fatalf("%d copies of a void offer queued", q.Len())
		}
	})
	t.Run("other VIP", func(t *testing.T) {
		p, _, _ := offered(t)
		if q, resume, _ := p.Ask(netip.MustParseAddr("100.64.1.3"), 7); q.Len() != 0 || resume != (Resume{}) {
			t.Fatalf("claim of another VIP: %d queued, resume %+v", q.Len(), resume)
		}
	})
	t.Run("cut before the claim", func(t *testing.T) {
		p, conn, _ := offered(t)
		conn.Close()
		if _, _, _, err := p.Await(); !errors.Is(err, ErrNoAnswer) {
			t.Fatalf("Await after a cut: %v", err)
		}
		q, resume, _ := p.Ask(vip, 7)
		if q.Len() != 0 || resume != (Resume{}) || p.Resume() != (Resume{}) {
			t.Fatalf("after a cut before the claim: %d queued, resume %+v", q.Len(), resume)
		}
	})
	t.Run("cut after the claim", func(t *testing.T) {
		p, conn, w := offered(t)
		q, _, _ := p.Ask(vip, 7)
		send(t, w, packets(t, 10, 12)...)
		conn.Close()
		if _, _, _, err := p.Await(); !errors.Is(err, ErrNoAnswer) {
			t.Fatalf("Await after a cut: %v", err)
		}
		// The copies may be delivered already: the next request resumes
		// after them.
		if q.Len() != 12 || p.Resume() != (Resume{Cache: 9, Seq: 112}) {
			t.Fatalf("after a cut after the claim: %d queued, resume %+v", q.Len(), p.Resume())
		}
	})
}

// TestPreviewRejects: frames out of place end the preview with an error,
// never an answer.
func TestPreviewRejects(t *testing.T) {
	vip := netip.MustParseAddr("100.64.1.2")
	offer := Frame{Type: FrameOffer, Offer: Offer{Cache: 1, VIP: vip, Epoch: 6}}
	for name, c := range map[string]struct {
		before, after []Frame // the claim
	}{
		// A source from before previews refuses the prepare frame.
		"answer before the request": {before: []Frame{{Type: FrameRefuse, Refuse: Refuse{Reason: "expected a request"}}}},
		"packet before an offer":    {before: packets(t, 0, 1)},
		"end before the answer":     {before: []Frame{{Type: FrameEnd}}},
		"withdrawn after the claim": {before: []Frame{offer}, after: []Frame{{Type: FrameWithdraw}}},
		"offer after the claim":     {after: []Frame{offer}},
	} {
		t.Run(name, func(t *testing.T) {
			p, _, w := previewPipe(t)
			send(t, w, c.before...)
			if c.after != nil {
				for deadline := time.Now().Add(5 * time.Second); len(c.before) > 0 && p.Resume() == (Resume{}); time.Sleep(time.Millisecond) {
					if time.Now().After(deadline) {
						t.Fatal("the offer was not taken")
					}
				}
				p.Ask(vip, 7)
				send(t, w, c.after...)
			}
			if _, _, _, err := p.Await(); !errors.Is(err, ErrNoAnswer) || !errors.Is(err, ErrMalformed) {
				t.Fatalf("Await: %v, want ErrNoAnswer and ErrMalformed", err)
			}
		})
	}
}

// gatedReader serves head, then waits for open before it serves tail; it
// closes reached when the reader first asks for more than head, which is
// after every frame wholly inside head has been taken.
type gatedReader struct {
	head, tail    io.Reader
	reached, open chan struct{}
	once          sync.Once
}

func (g *gatedReader) Read(p []byte) (int, error) {
	if n, err := g.head.Read(p); n > 0 || err != io.EOF {
		return n, err
	}
	g.once.Do(func() { close(g.reached) })
	<-g.open
	return g.tail.Read(p)
}

// FuzzPreview: whatever a source sends on a prepared connection, before
// and after the claim (the first input byte places the claim), the
// preview's copies are exactly the packets since the last offer of the
// claimed VIP and epoch, in order, nothing withdrawn among them; the
// answer is a header or refusal sent after the claim, or there is an error
// wrapping ErrNoAnswer; the resume point counts the copies.
func FuzzPreview(f *testing.F) {
	vip := netip.MustParseAddr("100.64.0.10")
	offer := Frame{Type: FrameOffer, Offer: Offer{Cache: 5, Seq: 40, VIP: vip, Epoch: 6, MAC: mac6}}
	other := Frame{Type: FrameOffer, Offer: Offer{Cache: 5, Seq: 40, VIP: vip, Epoch: 2}}
	pkt := Frame{Type: FramePacket, Packet: []byte{0x45, 0, 0, 12, 1, 2, 3, 4, 5, 6, 7, 8}}
	hdr := Frame{Type: FrameHeader, Header: Header{VIP: vip, Epoch: 7}}
	withdraw := Frame{Type: FrameWithdraw}
	for _, c := range []struct {
		before, after []Frame
	}{
		{[]Frame{offer, pkt, pkt}, []Frame{pkt, hdr}},
		{[]Frame{offer, pkt, withdraw, offer, pkt}, []Frame{hdr}},
		{[]Frame{other, pkt}, []Frame{pkt, hdr}},
		{[]Frame{offer, pkt}, []Frame{withdraw}},
		{[]Frame{hdr}, nil},
		{nil, []Frame{pkt}},
	} {
		head := encode(f, c.before...)
		f.Add(append([]byte{byte(len(head))}, append(head, encode(f, c.after...)...)...))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) == 0 {
			return
		}
		split := min(int(in[0]), len(in)-1)
		in = in[1:]
		// The frames the preview reads, and how many lie wholly before
		// the claim.
		var frames []Frame
		for r := NewReader(bytes.NewReader(in)); ; {
			fr, err := r.Next()
			if err != nil {
				break
			}
			fr.Packet = bytes.Clone(fr.Packet)
			frames = append(frames, fr)
		}
		ahead := 0
		for r := NewReader(bytes.NewReader(in[:split])); ; ahead++ {
			if _, err := r.Next(); err != nil {
				break
			}
		}
		// The model.
		var want [][]byte
		var wantResume Resume
		offered, void, asked, answered, failed := false, false, false, false, false
		var cur Offer
		for i, fr := range frames {
			if i == ahead {
				asked = true
				if offered && (cur.VIP != vip || cur.Epoch+1 != 7) {
					offered, void, want = false, true, nil
				}
			}
			switch {
			case fr.Type == FrameOffer && !asked:
				offered, cur, want = true, fr.Offer, nil
			case fr.Type == FramePacket && void:
			case fr.Type == FramePacket && offered:
				want = append(want, fr.Packet)
			case fr.Type == FrameWithdraw && !asked:
				offered, want = false, nil
			case (fr.Type == FrameHeader || fr.Type == FrameRefuse) && asked:
				answered = true
			default:
				failed = true
			}
			if answered || failed {
				break
			}
		}
		if !asked && !failed && !answered {
			// The input ended before the claim.
			asked = true
			if offered && (cur.VIP != vip || cur.Epoch+1 != 7) {
				offered, want = false, nil
			}
		}
		if offered {
			wantResume = Resume{Cache: cur.Cache, Seq: cur.Seq + uint64(len(want))}
		}

		g := &gatedReader{head: bytes.NewReader(in[:split]), tail: bytes.NewReader(in[split:]), reached: make(chan struct{}), open: make(chan struct{})}
		p := NewPreview(g, func() *Queue { return NewQueue(DefaultLimits(), nil) })
		done := make(chan struct{})
		go func() {
			defer close(done)
			p.Run()
		}()
		select {
		case <-g.reached:
		case <-done:
		}
		q, _, _ := p.Ask(vip, 7)
		close(g.open)
		<-done
		_, first, _, err := p.Await()
		if answered != (err == nil) {
			t.Fatalf("frames %v, claim after %d: answer %v, err %v", frameTypes(frames), ahead, first.Type, err)
		}
		if err != nil && !errors.Is(err, ErrNoAnswer) {
			t.Fatalf("error of an unexpected kind: %v", err)
		}
		if failed || !answered {
			// The preview ended without an answer: what came before the
			// claim is dropped only if the claim came after the end.
			return
		}
		if got := p.Resume(); got != wantResume {
			t.Fatalf("frames %v: resume %+v, want %+v", frameTypes(frames), got, wantResume)
		}
		for i, w := range want {
			got, _, ok := q.Pop(time.Now())
			if !ok || !bytes.Equal(got, w) {
				t.Fatalf("frames %v: copy %d is %x, want %x", frameTypes(frames), i, got, w)
			}
		}
		if q.Len() != 0 {
			t.Fatalf("%d copies more than sent", q.Len())
		}
	})
}
