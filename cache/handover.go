package cache

import (
	"errors"
	"fmt"
	"io"
	"time"
)

// FlushStats is what one side saw of a handover.
type FlushStats struct {
	FlushStart time.Time // header sent (source) or received (destination)
	FlushEnd   time.Time // end marker sent or received
	Flushed    uint64    // packets of the queue sent before the end marker
	FlushedB   uint64
	Ahead      uint64 // of Flushed: the destination had them before the header (Preview)
	Forwarded  uint64 // stragglers sent after the end marker
	ForwardedB uint64
}

// Sender is the source side of one handover. Send writes Header, the
// packets queued in Queue when it starts, the end marker, and then, until
// Linger has passed or Stop is closed, every packet that still reaches
// Queue (senders whose view is stale), and finally the close marker. Queue
// keeps receiving from the interceptor meanwhile.
type Sender struct {
	Queue  *Queue
	Header Header
	// From is the number (Queue.Head) of the first packet to send: the
	// destination has those before it already, copies sent ahead
	// (Preview). They count as flushed.
	From uint64
	// Linger is how long stragglers are forwarded after the end marker.
	Linger time.Duration
	// Tick, if not 0, writes a FrameTick right after the end marker and
	// every Tick while lingering, for a destination that asked
	// (Request.Ticks; see Orderer.Tick).
	Tick time.Duration
	// FlushUntil, if not nil, makes the flush also take what reaches
	// Queue until it is closed, and only then write the end marker: the
	// source streams at once while it moves the VIP's route away from
	// its cache, and the end marker still says that nothing sent to the
	// VIP before the move is left behind it.
	FlushUntil <-chan struct{}
	// Stop, if not nil, ends the flush wait and the linger early.
	Stop <-chan struct{}
	// Progress, if not nil, is called after each batch with the stats so
	// far.
	Progress func(FlushStats)
}

// Send runs the handover on conn.
func (s Sender) Send(conn io.Writer) (FlushStats, error) {
	q, hdr, from, linger, tick, flushUntil, stop, progress := s.Queue, s.Header, s.From, s.Linger, s.Tick, s.FlushUntil, s.Stop, s.Progress
	var st FlushStats
	w := NewWriter(conn)
	ahead, aheadB := q.Skip(from, time.Now())
	st.Ahead, st.Flushed, st.FlushedB = uint64(ahead), uint64(ahead), aheadB
	backlog := q.Len()
	hdr.Queued = uint32(backlog)
	hdr.QueuedBytes = uint64(q.Stats().QueuedBytes)
	st.FlushStart = time.Now()
	if err := w.Header(hdr); err != nil {
		return st, err
	}
	send := func(limit int) (int, error) {
		n := 0
		for limit < 0 || n < limit {
			pkt, _, ok := q.Pop(time.Now())
			if !ok {
				break
			}
			if err := w.Packet(pkt); err != nil {
				return n, err
			}
			n++
			if limit < 0 {
				st.Forwarded++
				st.ForwardedB += uint64(len(pkt))
			} else {
				st.Flushed++
				st.FlushedB += uint64(len(pkt))
			}
		}
		return n, w.Flush()
	}
	if _, err := send(backlog); err != nil {
		return st, err
	}
	if flushUntil != nil {
	wait:
		for {
			select {
			case <-q.Notify():
				if _, err := send(q.Len()); err != nil {
					return st, err
				}
			case <-flushUntil:
				break wait
			case <-stop:
				break wait
			}
		}
		if _, err := send(q.Len()); err != nil {
			return st, err
		}
	}
	dropped := uint64(0)
	for _, n := range q.Stats().Dropped {
		dropped += n
	}
	if err := w.End(End{Packets: st.Flushed, Bytes: st.FlushedB, Dropped: dropped}); err != nil {
		return st, err
	}
	writeTick := func() error {
		if tick <= 0 {
			return nil
		}
		return w.Tick(time.Since(st.FlushStart))
	}
	if err := writeTick(); err != nil {
		return st, err
	}
	if err := w.Flush(); err != nil {
		return st, err
	}
	st.FlushEnd = time.Now()
	if progress != nil {
		progress(st)
	}
	deadline := time.NewTimer(linger)
	defer deadline.Stop()
	var ticks <-chan time.Time
	if tick > 0 {
		t := time.NewTicker(tick)
		defer t.Stop()
		ticks = t.C
	}
	for {
		select {
		case <-q.Notify():
			if _, err := send(-1); err != nil {
				return st, err
			}
			if progress != nil {
				progress(st)
			}
			continue
		case <-ticks:
			// After whatever the queue holds now, so that the tick
			// vouches for it.
			if _, err := send(-1); err != nil {
				return st, err
			}
			if err := writeTick(); err != nil {
				return st, err
			}
			if err := w.Flush(); err != nil {
				return st, err
			}
			continue
		case <-deadline.C:
		case <-stop:
		}
		break
	}
	if _, err := send(-1); err != nil {
		return st, err
	}
	if err := w.Close(); err != nil {
		return st, err
	}
	return st, w.Flush()
}

// ErrRefused is returned when the source refuses a handover request.
var ErrRefused = errors.New("handover refused")

// Receiver is the destination side of one handover once the request went
// out. Receive pushes every packet into Queue in stream order. It returns
// when the stream is over: nil at the close marker, ErrRefused for a
// refusal, an error wrapping ErrMalformed for anything Sender does not
// write (a second header or end marker, a close before the end marker).
type Receiver struct {
	Queue *Queue
	// OnHeader, if not nil, sees the header and may refuse the stream: an
	// error from it ends the receive before any packet is pushed (a
	// header for another VIP or epoch than the request's must not reach
	// the VM).
	OnHeader func(Header) error
	// OnEnd, if not nil, is called at the end marker.
	OnEnd func(End)
	// OnTick, if not nil, gets each FrameTick's source time.
	OnTick func(time.Duration)
	// Progress, if not nil, is called after each frame with the stats so
	// far.
	Progress func(FlushStats)
}

// Receive reads the answer from rd, whose first frame f has been read
// already (Preview.Await, or the caller's own read).
func (r Receiver) Receive(rd *Reader, f Frame) (FlushStats, error) {
	q, onHeader, onEnd, onTick, progress := r.Queue, r.OnHeader, r.OnEnd, r.OnTick, r.Progress
	var st FlushStats
	switch f.Type {
	case FrameHeader:
	case FrameRefuse:
		return st, fmt.Errorf("%w: %s", ErrRefused, f.Refuse.Reason)
	default:
		return st, fmt.Errorf("handover: %w: frame %d before the header", ErrMalformed, f.Type)
	}
	st.FlushStart = time.Now()
	if onHeader != nil {
		if err := onHeader(f.Header); err != nil {
			return st, fmt.Errorf("handover: header: %w", err)
		}
	}
	ended := false
	for {
		f, err := rd.Next()
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return st, fmt.Errorf("handover: stream cut: %w", err)
		}
		switch f.Type {
		case FramePacket:
			q.Push(f.Packet, time.Now())
			if ended {
				st.Forwarded++
				st.ForwardedB += uint64(len(f.Packet))
			} else {
				st.Flushed++
				st.FlushedB += uint64(len(f.Packet))
			}
		case FrameEnd:
			if ended {
				// The source writes one: a second would count its
				// drops twice and restart the destination's settle.
				return st, fmt.Errorf("handover: %w: a second end marker", ErrMalformed)
			}
			ended = true
			st.FlushEnd = time.Now()
			if onEnd != nil {
				onEnd(f.End)
			}
		case FrameClose:
			if !ended {
				return st, fmt.Errorf("handover: %w: close before the end marker", ErrMalformed)
			}
			return st, nil
		case FrameTick:
			if !ended {
				return st, fmt.Errorf("handover: %w: tick before the end marker", ErrMalformed)
			}
			if onTick != nil {
				onTick(f.Tick)
			}
		default:
			return st, fmt.Errorf("handover: %w: unexpected frame %d", ErrMalformed, f.Type)
		}
		if progress != nil {
			progress(st)
		}
	}
}

// SendRequest writes the request that opens a handover.
func SendRequest(conn io.Writer, req Request) error {
	w := NewWriter(conn)
	if err := w.Request(req); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return fmt.Errorf("handover: send request: %w", err)
	}
	return nil
}
