package migrate

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vmroam/vmroam/cache"
)

// The source's side of a prepared connection (cache.Preview): while the
// VIP's cache fills, copies of its packets go to the host that prepared,
// so that at the claim the oldest are there already. The cache keeps them
// until the request says the claimer has them: if the VM stays here they
// are delivered here, and the copies withdrawn.
const (
	// offerPoll is how often the copies catch up with the cache. Only
	// the packets cached in the last poll before the claim wait for the
	// request's round trip anyway.
	offerPoll = 2 * time.Millisecond
	// offerBatch bounds the copies taken from the cache under its lock.
	offerBatch = 256
	// offerWriteTimeout bounds one batch's write: a peer that stops
	// reading ends the offer, and its request, if it comes, gets the
	// whole cache on a new connection.
	offerWriteTimeout = 5 * time.Second
)

// cachingBeganLocked returns a channel closed when any VIP next starts
// caching here. agent lock held.
func (e *Engine) cachingBeganLocked() <-chan struct{} {
	if e.cachingBegan == nil {
		e.cachingBegan = make(chan struct{})
	}
	return e.cachingBegan
}

// signalCachingLocked wakes the offers waiting for a cache. agent lock held.
func (e *Engine) signalCachingLocked() {
	if e.cachingBegan != nil {
		close(e.cachingBegan)
		e.cachingBegan = nil
	}
}

// offeredCache is what an offer is to the cache it copies.
type offeredCache struct {
	c *vipCtl
	q *cache.Queue
}

// cacheToOffer returns vip's cache if it is one to copy: the VM is
// suspended here, and the cache holds all that came since (not one that
// restarted empty, which a request is refused). agent lock held.
func (e *Engine) cacheToOfferLocked(vip netip.Addr) (offeredCache, cache.Offer, bool) {
	c := e.ctls[vip]
	at, attached := e.host.Attachment(vip)
	if c == nil || !attached {
		return offeredCache{}, cache.Offer{}, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.state != stateCaching || c.lostInRestart || c.queue == nil {
		return offeredCache{}, cache.Offer{}, false
	}
	return offeredCache{c, c.queue}, cache.Offer{Cache: c.queue.ID(), VIP: vip, Epoch: at.Epoch, MAC: c.mac}, true
}

// offerCache writes copies of vip's cache on conn as it fills, from when
// the VM is suspended here until stop is closed (the request came): an
// offer, then the copies; a withdrawal when the cache stops being one to
// copy (the VM stayed, or the cache went to another claimer). It returns
// the cache and the number of the packet after the last copy written, for
// the flush to go on from there; a zero Resume if none is offered now.
func (e *Engine) offerCache(conn net.Conn, vip netip.Addr, stop <-chan struct{}) (cache.Resume, error) {
	w := cache.NewWriter(conn)
	defer conn.SetWriteDeadline(time.Time{})
	var cur offeredCache
	var next uint64
	buf := make([]byte, 0, 64<<10)
	poll := time.NewTimer(offerPoll)
	defer poll.Stop()
	for {
		e.host.Lock()
		now, offer, ok := e.cacheToOfferLocked(vip)
		began := e.cachingBeganLocked()
		e.host.Unlock()
		// The Writer writes through when its buffer fills.
		conn.SetWriteDeadline(time.Now().Add(offerWriteTimeout))
		if cur.q != nil && (!ok || now != cur) {
			e.log.Info("prepared handover: copies withdrawn", "vip", vip, "remote", conn.RemoteAddr())
			if err := w.Withdraw(); err != nil {
				return cache.Resume{}, err
			}
			cur = offeredCache{}
		}
		if cur.q == nil && ok {
			cur, next = now, now.q.Head()
			offer.Seq = next
			if err := w.Offer(offer); err != nil {
				return cache.Resume{}, fmt.Errorf("offer: %w", err)
			}
			e.log.Info("prepared handover: copying the cache ahead", "vip", vip, "remote", conn.RemoteAddr(), "from", next)
		}
		if cur.q != nil {
			for {
				pkts, nx := cur.q.CopyOut(next, buf, offerBatch)
				for _, p := range pkts {
					if err := w.Packet(p); err != nil {
						return cache.Resume{}, err
					}
				}
				next = nx
				if len(pkts) == 0 {
					break
				}
			}
		}
		if err := w.Flush(); err != nil {
			return cache.Resume{}, err
		}
		if cur.q == nil {
			select {
			case <-stop:
				return cache.Resume{}, nil
			case <-began:
			}
			continue
		}
		poll.Reset(offerPoll)
		select {
		case <-stop:
			return cache.Resume{Cache: cur.q.ID(), Seq: next}, nil
		case <-poll.C:
		}
	}
}
