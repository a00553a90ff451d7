package cache

import (
	"sync"
	"sync/atomic"
	"time"
)

// Orderer delivers a destination's packets in the order that loses and
// reorders nothing: first what the source flushed (stream packets, in
// order), and a packet that reached the destination directly only once its
// flow has settled: settle has passed since both the flow's first direct
// packet and the end marker, so that every packet the same sender sent by
// the old path before switching has come through the stream.
//
// The backlog goes out paced, not in one burst: a VM that just resumed
// reads its sockets no faster than before, and a burst would overflow its
// receive buffers. The pace is Speedup times the rate packets arrive now,
// and never below MinRate.
//
// The orderer remembers each flow's first direct packet (to settle it) and
// the flows whose direct packets went (to count late stream packets); a
// sender that invents a new flow per packet must not grow that without
// bound. It keeps at most MaxFlows flows, in two generations of half as
// many each: when the newer is full it becomes the older and the older is
// forgotten, and a flow found in the older moves to the newer. So the
// MaxFlows/2 flows seen most recently are always remembered. Forgetting is
// safe for the order: a forgotten flow's next direct packet counts as its
// first, so it waits Settle (and its tick) again from its own arrival, a
// later moment than the flow's first; only its delay grows. A forgotten
// released flow's late stream packets go uncounted in Late.
type Orderer struct {
	Stream  *Queue // packets from the handover stream
	Direct  *Queue // packets that reached this host directly (held)
	Settle  time.Duration
	Write   func(pkt []byte) error
	Speedup float64 // default 1.5
	MinRate float64 // packets/s; default 20000
	// Timeline, if set, counts each packet written to the VM in
	// SeriesDelivered, at the moment Write returned.
	Timeline *Timeline
	// MaxFlows bounds the flows remembered (see above); default
	// DefaultMaxFlows. Read once, at the first use.
	MaxFlows int

	mu          sync.Mutex
	expectTicks bool
	tickBase    time.Time     // destination time of the source's tick clock origin, plus the least one-way delay seen
	tickSent    time.Duration // the latest tick's source time
	ticking     bool
	ended       bool // end marker seen: the flushed backlog is complete
	closed      bool // the source will send nothing more
	carrier     bool
	endAt       time.Time // when the end marker arrived
	carrierUp   time.Time
	wake        chan struct{}
	first       flowMemo[time.Time]
	pendFirst   time.Time // first[pendFlow], when the pending packet was taken
	cls         *Classifier
	pending     []byte
	pendFlow    Flow
	pendAt      time.Time
	hasPend     bool
	pendSeen    atomic.Bool // a packet is out of its queue and not yet written, for Idle
	released    flowMemo[struct{}]
	late        uint64

	// Pacing: a token bucket refilled at the current pace, unless
	// redirected.
	unpaced   atomic.Bool
	tokens    float64
	refilled  time.Time
	rateAt    time.Time
	rateCount uint64
	inRate    float64 // packets/s arriving, smoothed

	// Counters, read with Stats.
	delivered, deliveredB uint64
	firstDelivery         time.Time
	drained               chan struct{} // closed once drained for good
	isDrained             bool
}

// OrdererStats are the orderer's counters.
type OrdererStats struct {
	Delivered, DeliveredBytes uint64
	FirstDelivery             time.Time
	// CarrierUp is when the VM's interface was last seen getting carrier:
	// from then to FirstDelivery is the handover time.
	CarrierUp time.Time
	// Late counts stream packets that came after their flow's direct
	// packets had been delivered: the old path was slower than Settle.
	Late uint64
}

func (o *Orderer) init() {
	if o.wake == nil {
		o.wake = make(chan struct{}, 1)
		o.drained = make(chan struct{})
		n := o.MaxFlows
		if n <= 0 {
			n = DefaultMaxFlows
		}
		o.first.half = max(n/2, 1)
		o.released.half = o.first.half
		o.cls = NewClassifier()
	}
}

func (o *Orderer) poke() {
	select {
	case o.wake <- struct{}{}:
	default:
	}
}

// SetCarrier says whether the VM's interface is up: nothing is delivered
// before.
func (o *Orderer) SetCarrier(up bool) {
	o.set(func() {
		if up && !o.carrier {
			o.carrierUp = time.Now()
		}
		o.carrier = up
	})
}

// Redirect says Write no longer goes to a VM (the delivery spills into a
// cache): the orderer stops pacing, which is for a VM that must keep up,
// and stops counting in Timeline, which is the VM's.
func (o *Orderer) Redirect() {
	o.unpaced.Store(true)
	o.set(func() { o.Timeline = nil })
}

// Ended says the stream's end marker arrived.
func (o *Orderer) Ended() {
	o.set(func() {
		if !o.ended {
			o.endAt = time.Now()
		}
		o.ended = true
	})
}

// ExpectTicks says whether the source was asked for ticks
// (Request.Ticks): then a flow's direct packets also wait for a tick that
// proves its stragglers are through the stream (see Tick).
func (o *Orderer) ExpectTicks(yes bool) { o.set(func() { o.expectTicks = yes }) }

// Tick says a FrameTick sent at source time sent (Tick 0: the header)
// arrived now. Every packet the source took before sending it is ahead of
// it in the stream. A straggler of a flow, sent by the old path before the
// flow's first direct packet, reaches the source at most about one one-way
// delay (between the hosts) after that packet reached the destination; so
// once a tick sent later than that has arrived, no straggler of the flow
// can still be in flight, even when a lost segment holds the stream up
// for a retransmission: the tick then waits behind it too. Settle after
// the flow's first direct packet is when such a tick arrives when nothing
// holds the stream up.
func (o *Orderer) Tick(sent time.Duration) {
	now := time.Now()
	o.set(func() {
		// The least arrival delay seen is the one no queue or loss
		// inflated: the clock's origin on this host's clock.
		if base := now.Add(-sent); !o.ticking || base.Before(o.tickBase) {
			o.tickBase = base
		}
		o.ticking = true
		o.tickSent = max(o.tickSent, sent)
	})
}

// Closed says the source will send nothing more (close marker, failure or
// timeout): every held packet may go.
func (o *Orderer) Closed() {
	o.set(func() {
		if !o.ended {
			o.endAt = time.Now()
		}
		o.ended, o.closed = true, true
	})
}

func (o *Orderer) set(f func()) {
	o.mu.Lock()
	o.init()
	f()
	o.mu.Unlock()
	o.poke()
}

// Stats reports what was delivered.
func (o *Orderer) Stats() OrdererStats {
	o.mu.Lock()
	defer o.mu.Unlock()
	return OrdererStats{Delivered: o.delivered, DeliveredBytes: o.deliveredB, FirstDelivery: o.firstDelivery, CarrierUp: o.carrierUp, Late: o.late}
}

// Done is closed once the source is closed and everything received until
// then is delivered: the caller may now route the VIP to the VM directly.
// Run goes on delivering stragglers that still reach the queues until
// stopped.
func (o *Orderer) Done() <-chan struct{} {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.init()
	return o.drained
}

// Idle reports that nothing received is waiting to be delivered. It reads
// the queues before the in-hand flag, which the orderer sets before it
// pops, so a packet on its way from a queue to the VM is always seen.
func (o *Orderer) Idle() bool {
	return o.Stream.Len() == 0 && o.Direct.Len() == 0 && !o.pendSeen.Load()
}

// Run delivers until stop is closed; it returns the first write error.
func (o *Orderer) Run(stop <-chan struct{}) error {
	o.mu.Lock()
	o.init()
	o.mu.Unlock()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		wait, drained, err := o.step()
		if err != nil {
			return err
		}
		if drained {
			o.mu.Lock()
			if !o.isDrained {
				o.isDrained = true
				close(o.drained)
			}
			o.mu.Unlock()
		}
		if wait > 0 {
			timer.Reset(wait)
		}
		select {
		case <-stop:
			return nil
		case <-o.wake:
		case <-o.Stream.Notify():
		case <-o.Direct.Notify():
		case <-timer.C:
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
	}
}

// step delivers what may go now; it returns how long to wait for the next
// held packet's flow to settle (0: wait for an event) and whether all is
// delivered for good.
func (o *Orderer) step() (time.Duration, bool, error) {
	o.mu.Lock()
	carrier, ended, closed, endAt := o.carrier, o.ended, o.closed, o.endAt
	expectTicks, ticked := o.expectTicks, o.ticking && o.tickSent > 0
	tickedTo := o.tickBase.Add(o.tickSent)
	o.mu.Unlock()
	if !carrier {
		return 0, false, nil
	}
	now := time.Now()
	o.refill(now)
	for o.Stream.Len() > 0 {
		if o.tokens < 1 {
			return o.tokenWait(), false, nil
		}
		// In hand from before the Pop until written: Idle must never
		// miss a packet that has left the queue but not reached the VM.
		o.pendSeen.Store(true)
		pkt, _, ok := o.Stream.Pop(now)
		if !ok {
			o.pendSeen.Store(false)
			break
		}
		if o.released.len() > 0 {
			if f, err := o.cls.Classify(pkt); err == nil && o.released.has(f) {
				o.late++ // its flow's direct packets went first: reordered
			}
		}
		err := o.deliver(pkt)
		o.pendSeen.Store(false)
		if err != nil {
			return 0, false, err
		}
	}
	if !ended {
		return 0, false, nil
	}
	for {
		if o.tokens < 1 && (o.hasPend || o.Direct.Len() > 0) {
			return o.tokenWait(), false, nil
		}
		if !o.hasPend {
			o.pendSeen.Store(true) // before the Pop, as above
			pkt, at, ok := o.Direct.Pop(now)
			if !ok {
				o.pendSeen.Store(false)
				break
			}
			o.pending = append(o.pending[:0], pkt...)
			o.pendAt = at
			o.hasPend = true
			if f, err := o.cls.Classify(o.pending); err == nil {
				o.pendFlow = f
			} else {
				o.pendFlow = Flow{}
			}
			first, seen := o.first.get(o.pendFlow)
			if !seen {
				first = at
				o.first.put(o.pendFlow, at)
			}
			o.pendFirst = first
		}
		// Settle from the flow's first direct packet, but not from before
		// the end marker: a packet the source took just before writing
		// the marker may still follow it as a straggler.
		release := o.pendFirst
		if release.Before(endAt) {
			release = endAt
		}
		release = release.Add(o.Settle)
		if !closed && now.Before(release) {
			return release.Sub(now), false, nil
		}
		if !closed && expectTicks && (!ticked || tickedTo.Before(o.pendFirst.Add(o.Settle))) {
			return 0, false, nil // the next tick wakes us
		}
		if err := o.deliver(o.pending); err != nil {
			return 0, false, err
		}
		o.released.put(o.pendFlow, struct{}{})
		o.hasPend = false
		o.pendSeen.Store(false)
	}
	if closed && o.Stream.Len() == 0 && o.Direct.Len() == 0 && !o.hasPend {
		return 0, true, nil
	}
	return 0, false, nil
}

// refill adds the tokens earned since the last call at the current pace,
// re-estimating the arrival rate every 50 ms.
func (o *Orderer) refill(now time.Time) {
	if o.refilled.IsZero() {
		o.refilled, o.rateAt = now, now
		o.tokens = 64
		o.rateCount = o.Stream.Stats().Packets + o.Direct.Stats().Packets
		return
	}
	if dt := now.Sub(o.rateAt); dt >= 50*time.Millisecond {
		n := o.Stream.Stats().Packets + o.Direct.Stats().Packets
		r := float64(n-o.rateCount) / dt.Seconds()
		o.inRate = 0.5*o.inRate + 0.5*r
		o.rateAt, o.rateCount = now, n
	}
	o.tokens = min(o.tokens+now.Sub(o.refilled).Seconds()*o.pace(), 64)
	o.refilled = now
}

// pace is the delivery rate now, in packets per second.
func (o *Orderer) pace() float64 {
	speedup, floor := o.Speedup, o.MinRate
	if speedup <= 0 {
		speedup = 1.5
	}
	if floor <= 0 {
		floor = 20000
	}
	return max(floor, speedup*o.inRate)
}

// tokenWait is how long until the next token, at the current pace.
func (o *Orderer) tokenWait() time.Duration {
	return max(time.Duration((1-o.tokens)/o.pace()*float64(time.Second)), 20*time.Microsecond)
}

func (o *Orderer) deliver(pkt []byte) error {
	if err := o.Write(pkt); err != nil {
		return err
	}
	if !o.unpaced.Load() {
		o.tokens--
	}
	o.mu.Lock()
	o.delivered++
	o.deliveredB += uint64(len(pkt))
	if o.Timeline != nil || o.firstDelivery.IsZero() {
		now := time.Now()
		if o.firstDelivery.IsZero() {
			o.firstDelivery = now
		}
		// Under the lock with the counter, so that Stats and the
		// timeline agree whenever the orderer is idle.
		o.Timeline.Add(SeriesDelivered, now)
	}
	o.mu.Unlock()
	return nil
}

// DefaultMaxFlows is Orderer.MaxFlows by default. A remembered flow costs
// about 180 bytes in each map (TestOrdererFlowsBounded logs it), so both
// full take about 12 MiB, a fifth of one queue's default byte limit; the
// 16384 flows seen last are always remembered, and a forgotten one costs
// one Settle (2 ms by default) of delay.
const DefaultMaxFlows = 32768

// flowMemo maps flows to values, keeping at most 2*half of them: cur fills
// up to half, then becomes old and the previous old is dropped. A flow
// read from old moves to cur, so the flows in use survive a turn.
type flowMemo[V any] struct {
	cur, old map[Flow]V
	half     int
}

func (m *flowMemo[V]) len() int { return len(m.cur) + len(m.old) }

func (m *flowMemo[V]) has(f Flow) bool {
	_, ok := m.get(f)
	return ok
}

func (m *flowMemo[V]) get(f Flow) (V, bool) {
	if v, ok := m.cur[f]; ok {
		return v, true
	}
	v, ok := m.old[f]
	if ok {
		delete(m.old, f)
		m.put(f, v)
	}
	return v, ok
}

func (m *flowMemo[V]) put(f Flow, v V) {
	if _, ok := m.cur[f]; !ok && len(m.cur) >= m.half {
		m.old, m.cur = m.cur, nil
	}
	if m.cur == nil {
		m.cur = make(map[Flow]V)
	}
	m.cur[f] = v
}
