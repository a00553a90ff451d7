package cache

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"sync"
	"time"
)

// Preview is the destination's side of a prepared connection: it reads
// what the source sends before it answers the request, that is the copies
// of the VIP's cache that the source offers while the cache fills (Offer,
// then FramePacket), into a queue that becomes the handover's stream.
// At the claim the oldest cached packets are then here already, and the
// first can reach the VM at once instead of one round trip later; the
// request tells the source where to go on (Request.Resume).
//
// Run reads; Ask marks the request sent; Await returns the answer. A
// Preview whose connection ends before Ask drops its copies: the request
// on a new connection then asks for the whole cache.
type Preview struct {
	newQueue func() *Queue
	rd       *Reader

	mu       sync.Mutex
	q        *Queue
	offer    Offer
	offered  bool
	copies   uint64 // packets since the offer
	asked    bool
	void     bool // the offer is not the claimed VIP's: copies are dropped
	answered chan struct{}
	ans      Frame
	ansAt    time.Time
	err      error
}

// NewPreview returns a Preview reading r into a queue from newQueue, and
// into a new one whenever the copies so far are void (their counters would
// count them as dropped).
func NewPreview(r io.Reader, newQueue func() *Queue) *Preview {
	return &Preview{newQueue: newQueue, q: newQueue(), rd: NewReader(r), answered: make(chan struct{})}
}

// void drops the copies so far. No consumer has the queue yet.
func (p *Preview) voidLocked() {
	p.q.Discard()
	p.q = p.newQueue()
	p.offered, p.copies = false, 0
}

// ErrNoAnswer wraps the error of a prepared connection that ended before
// the source answered the request.
var ErrNoAnswer = errors.New("cache: prepared connection ended without an answer")

// Run reads until the source answers the request (a header or a refusal)
// or the connection fails; Await returns which. A frame that answers
// before the request was sent ends it too: a source from before previews
// closes on a prepare, or refuses it.
func (p *Preview) Run() {
	for {
		f, err := p.rd.Next()
		p.mu.Lock()
		if err == nil {
			err = p.takeLocked(f)
		}
		if err != nil || f.Type == FrameHeader || f.Type == FrameRefuse {
			if err == nil && !p.asked {
				err = fmt.Errorf("%w: %v before the request", ErrMalformed, f.Type)
			}
			if err != nil {
				p.err = fmt.Errorf("%w: %w", ErrNoAnswer, err)
				if !p.asked {
					// Nobody delivers them: the next connection's
					// request asks for the whole cache.
					p.voidLocked()
				}
			} else {
				p.ans, p.ansAt = f, time.Now()
			}
			p.mu.Unlock()
			close(p.answered)
			return
		}
		p.mu.Unlock()
	}
}

// takeLocked handles a frame that comes before the answer.
func (p *Preview) takeLocked(f Frame) error {
	switch f.Type {
	case FrameOffer:
		if p.asked {
			return fmt.Errorf("%w: an offer after the request", ErrMalformed)
		}
		if p.offered {
			p.voidLocked() // copies of an earlier offer
		}
		p.offer, p.offered = f.Offer, true
	case FramePacket:
		if p.void {
			return nil
		}
		if !p.offered {
			return fmt.Errorf("%w: a packet before an offer", ErrMalformed)
		}
		p.q.Push(f.Packet, time.Now())
		p.copies++
	case FrameWithdraw:
		if p.asked {
			// The VM runs at the source again and here: what was
			// delivered cannot be taken back.
			return fmt.Errorf("%w: the offer was withdrawn after the request", ErrMalformed)
		}
		p.voidLocked()
	case FrameHeader, FrameRefuse:
	default:
		return fmt.Errorf("%w: unexpected %v frame before the answer", ErrMalformed, f.Type)
	}
	return nil
}

// Ask marks the request for vip at claim epoch as sent. It returns the
// queue that is the stream's from now on, with the copies in it if the
// offer was for vip while the source held it at epoch-1 (else they are
// dropped), the offer, and where the request resumes the source's cache.
func (p *Preview) Ask(vip netip.Addr, epoch uint64) (*Queue, Resume, Offer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.asked = true
	if p.offered && (p.offer.VIP != vip || p.offer.Epoch+1 != epoch) {
		p.voidLocked()
		p.void = true // and what still comes
	}
	if !p.offered {
		return p.q, Resume{}, Offer{}
	}
	return p.q, Resume{Cache: p.offer.Cache, Seq: p.offer.Seq + p.copies}, p.offer
}

// Resume returns where the source's cache resumes after the copies here,
// for a request on a new connection once this one failed.
func (p *Preview) Resume() Resume {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.offered {
		return Resume{}
	}
	return Resume{Cache: p.offer.Cache, Seq: p.offer.Seq + p.copies}
}

// Copies returns how many copies arrived since the offer.
func (p *Preview) Copies() uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.copies
}

// Ended says whether Run has ended: the connection failed, or the source
// answered.
func (p *Preview) Ended() bool {
	select {
	case <-p.answered:
		return true
	default:
		return false
	}
}

// Await waits for Run to end and returns the answer's first frame, when it
// came, and the reader to go on with (Receiver.Receive); or an error wrapping
// ErrNoAnswer.
func (p *Preview) Await() (*Reader, Frame, time.Time, error) {
	<-p.answered
	if p.err != nil {
		return nil, Frame{}, time.Time{}, p.err
	}
	return p.rd, p.ans, p.ansAt, nil
}
