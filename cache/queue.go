package cache

import (
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"
)

// MaxPacket is the largest packet a Queue keeps and a stream frame carries.
// It is above 65535 so that an IPv6 packet with a full 65535-byte payload
// (65575 bytes with its header) still fits.
const MaxPacket = MaxFramePayload

// Limits bound one queue. A zero or negative field takes its default, so a
// caller can set only the bound it cares about; memory must never grow
// without bound, so there is no "unlimited".
type Limits struct {
	MaxBytes   int64         // per queue, packet bytes; default 64 MiB
	MaxPackets int           // per queue; default 262144
	MaxAge     time.Duration // oldest packet kept; default 30 s
}

// Defaults of Limits.
const (
	DefaultMaxBytes   = 64 << 20
	DefaultMaxPackets = 262144
	DefaultMaxAge     = 30 * time.Second
)

// DefaultLimits returns the limits the issue asks for by default.
func DefaultLimits() Limits {
	return Limits{MaxBytes: DefaultMaxBytes, MaxPackets: DefaultMaxPackets, MaxAge: DefaultMaxAge}
}

func (l Limits) withDefaults() Limits {
	d := DefaultLimits()
	if l.MaxBytes <= 0 {
		l.MaxBytes = d.MaxBytes
	}
	if l.MaxPackets <= 0 {
		l.MaxPackets = d.MaxPackets
	}
	if l.MaxAge <= 0 {
		l.MaxAge = d.MaxAge
	}
	return l
}

// Budget is a global cap on bytes held by all queues, shared between them.
// Safe for concurrent use.
type Budget struct {
	max  atomic.Int64
	used atomic.Int64
}

// NewBudget returns a budget of maxBytes packet bytes. maxBytes <= 0 means
// no global cap: the per-queue limits still hold, and Used still counts.
func NewBudget(maxBytes int64) *Budget {
	b := &Budget{}
	b.SetMax(maxBytes)
	return b
}

// SetMax changes the cap while queues use the budget (a config reload).
// Bytes already held stay; below a lowered cap, pushes fail until enough
// are released. maxBytes <= 0 means no cap, as in NewBudget.
func (b *Budget) SetMax(maxBytes int64) {
	if maxBytes <= 0 {
		maxBytes = math.MaxInt64
	}
	b.max.Store(maxBytes)
}

// Used returns the packet bytes held now by the queues sharing b.
func (b *Budget) Used() int64 { return b.used.Load() }

// Max returns the cap (math.MaxInt64 when there is none).
func (b *Budget) Max() int64 { return b.max.Load() }

// reserve takes n bytes if they fit. A CAS loop rather than Add-then-undo,
// so that a failed reservation never makes another queue's fit fail too.
func (b *Budget) reserve(n int64) bool {
	for {
		u := b.used.Load()
		if u+n > b.max.Load() || u+n < u {
			return false
		}
		if b.used.CompareAndSwap(u, u+n) {
			return true
		}
	}
}

func (b *Budget) release(n int64) { b.used.Add(-n) }

// DropReason says why a packet was not delivered.
type DropReason string

// Drop reasons, as they appear in Stats.Dropped and in status output.
const (
	DropBytes   DropReason = "max-bytes"   // per-queue byte bound
	DropPackets DropReason = "max-packets" // per-queue packet bound
	DropAge     DropReason = "max-age"     // expired before delivery
	DropGlobal  DropReason = "global-cap"  // Budget exhausted
	DropTooBig  DropReason = "too-big"     // one packet larger than MaxPacket or than MaxBytes
	DropFlushed DropReason = "discarded"   // queue discarded whole (timeout, shutdown)
)

// dropReasons indexes the counters so that counting a drop on the hot path
// is an array increment, not a map write.
var dropReasons = [...]DropReason{DropBytes, DropPackets, DropAge, DropGlobal, DropTooBig, DropFlushed}

// DropReasons returns every drop reason, in a fixed order.
func DropReasons() []DropReason { return dropReasons[:] }

const (
	iBytes = iota
	iPackets
	iAge
	iGlobal
	iTooBig
	iFlushed
	nReasons
)

// Stats are a queue's counters.
type Stats struct {
	Packets, Bytes            uint64 // accepted into the queue, ever
	Delivered, DeliveredBytes uint64 // popped, ever
	Dropped                   map[DropReason]uint64
	DroppedBytes              map[DropReason]uint64
	Len                       int   // queued now
	QueuedBytes               int64 // packet bytes queued now
}

// DroppedTotal sums Dropped over all reasons.
func (s Stats) DroppedTotal() uint64 {
	var t uint64
	for _, n := range s.Dropped {
		t += n
	}
	return t
}

// slab holds many packets back to back, so that a queued packet costs one
// small ring entry instead of its own heap object.
type slab [slabSize]byte

const slabSize = 256 << 10

// slabPool recycles slabs between queues: a migration's queue fills and
// drains in seconds, and the next one should not pay for fresh memory.
var slabPool = sync.Pool{New: func() any { return new(slab) }}

// entry is one queued packet: 16 bytes, the whole per-packet bookkeeping.
type entry struct {
	at  int64  // arrival, nanoseconds since the queue's base time
	off uint32 // offset in its slab
	n   uint32 // length, with newSlabBit when the packet opened a new slab
}

// newSlabBit marks the first packet of a slab. The reader needs nothing
// else to know when it has left a slab behind: slabs hold packets in order,
// so the packet that opens a slab is the first one read from it.
const newSlabBit = 1 << 31

// Queue keeps packets in arrival order, within its Limits and its Budget.
// At a bound it drops the new packet (tail drop), so what is kept stays in
// order and the oldest packets, which a sender is least able to resend in
// time, survive.
//
// A Queue is safe for concurrent use. The slice Pop returns stays valid
// until the next Pop or Discard, whatever Push does meanwhile, so one
// consumer goroutine should own Pop and Discard while producers Push.
type Queue struct {
	lim    Limits
	budget *Budget
	notify chan struct{}

	mu sync.Mutex
	// base anchors entry.at. Offsets from a time.Time that keeps its
	// monotonic reading make ages immune to wall clock steps, and
	// base.Add(at) gives the caller a time.Time back.
	base    time.Time
	hasBase bool

	ring  []entry // power-of-two ring buffer
	head  int     // index of the oldest entry
	n     int     // entries queued
	taken uint64  // entries ever removed from the head: the oldest's sequence number
	id    uint64
	qb    int64 // packet bytes queued

	slabs   []*slab // slabs holding queued packets, oldest first
	woff    int     // write offset in the last slab
	entered bool    // the reader has taken a packet from slabs[0]
	spare   *slab   // one recycled slab kept back from the pool

	// pinned is the slab of the packet Pop last returned: it is not
	// recycled before the next Pop or Discard even if the head moves on
	// (an expiry by Push), because the consumer may still be writing the
	// packet out.
	pinned        *slab
	pinnedRetired bool

	packets, bytes            uint64
	delivered, deliveredBytes uint64
	dropped, droppedBytes     [nReasons]uint64

	// tl, if set, counts kept packets in tlPush and popped ones in tlPop
	// (see Record).
	tl            *Timeline
	tlPush, tlPop Series
}

// NewQueue returns an empty queue. b may be nil: no global cap.
func NewQueue(l Limits, b *Budget) *Queue {
	return &Queue{lim: l.withDefaults(), budget: b, notify: make(chan struct{}, 1), id: queueIDs.Add(1)}
}

// queueIDs numbers queues from a random start, so that a queue's ID is not
// that of a queue of the same agent before a restart.
var queueIDs = func() *atomic.Uint64 {
	var v atomic.Uint64
	v.Store(rand.Uint64() &^ (1 << 63))
	return &v
}()

// ID names the queue among all queues of this process and, with high
// probability, of its restarts: a peer that got copies of some of its
// packets (CopyOut) names the queue and a sequence number to resume from.
func (q *Queue) ID() uint64 { return q.id }

// Record counts, from now on, every packet Push keeps in series pushed of
// tl and every packet Pop returns in series popped (SeriesNone: not
// counted). When tl is not the timeline the queue recorded in before, the
// packets the queue accepted so far are counted in pushed too: those still
// queued at their arrival times, the others now. So the pushed series
// always sums to Stats().Packets. A nil tl stops recording.
func (q *Queue) Record(tl *Timeline, pushed, popped Series) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if tl != nil && tl != q.tl {
		for i := 0; i < q.n; i++ {
			e := q.ring[(q.head+i)&(len(q.ring)-1)]
			tl.Add(pushed, q.base.Add(time.Duration(e.at)))
		}
		for gone := q.packets - uint64(q.n); gone > 0; {
			n := uint32(min(gone, math.MaxUint32))
			tl.AddN(pushed, time.Now(), n)
			gone -= uint64(n)
		}
	}
	q.tl, q.tlPush, q.tlPop = tl, pushed, popped
}

// Limits returns the queue's limits, defaults filled in.
func (q *Queue) Limits() Limits { return q.lim }

// Push copies pkt (the caller reuses its buffer) with its arrival time;
// it returns "" when the packet is kept, else the reason it was dropped
// (and counts it). Expired packets at the head are dropped first, so that a
// queue full of stale packets does not turn fresh ones away.
func (q *Queue) Push(pkt []byte, now time.Time) DropReason {
	n := len(pkt)
	q.mu.Lock()
	if n > MaxPacket || int64(n) > q.lim.MaxBytes {
		q.countDrop(iTooBig, n)
		q.mu.Unlock()
		return DropTooBig
	}
	if !q.hasBase {
		q.base, q.hasBase = now, true
	}
	at := int64(now.Sub(q.base))
	if q.n > 0 && at-q.ring[q.head].at > int64(q.lim.MaxAge) {
		q.expireLocked(at)
	}
	if q.n >= q.lim.MaxPackets {
		q.countDrop(iPackets, n)
		q.mu.Unlock()
		return DropPackets
	}
	if q.qb+int64(n) > q.lim.MaxBytes {
		q.countDrop(iBytes, n)
		q.mu.Unlock()
		return DropBytes
	}
	if q.budget != nil && !q.budget.reserve(int64(n)) {
		q.countDrop(iGlobal, n)
		q.mu.Unlock()
		return DropGlobal
	}

	flag := uint32(0)
	if len(q.slabs) == 0 || q.woff+n > slabSize {
		q.slabs = append(q.slabs, q.newSlab())
		q.woff = 0
		flag = newSlabBit
	}
	s := q.slabs[len(q.slabs)-1]
	copy(s[q.woff:], pkt)
	if q.n == len(q.ring) {
		q.grow()
	}
	q.ring[(q.head+q.n)&(len(q.ring)-1)] = entry{at: at, off: uint32(q.woff), n: uint32(n) | flag}
	q.woff += n
	q.n++
	q.qb += int64(n)
	q.packets++
	q.bytes += uint64(n)
	q.tl.Add(q.tlPush, now)
	q.mu.Unlock()

	// len first: a send on a full channel still takes its lock, and at a
	// million pushes a second the consumer is usually already signalled.
	if len(q.notify) == 0 {
		select {
		case q.notify <- struct{}{}:
		default:
		}
	}
	return ""
}

func (q *Queue) countDrop(i int, n int) {
	q.dropped[i]++
	q.droppedBytes[i] += uint64(n)
}

func (q *Queue) newSlab() *slab {
	if s := q.spare; s != nil {
		q.spare = nil
		return s
	}
	return slabPool.Get().(*slab)
}

func (q *Queue) freeSlab(s *slab) {
	if q.spare == nil {
		q.spare = s
		return
	}
	slabPool.Put(s)
}

// retire lets go of slabs[0] once the reader has moved past it.
func (q *Queue) retire() {
	s := q.slabs[0]
	q.slabs[0] = nil
	q.slabs = q.slabs[1:]
	if s == q.pinned {
		q.pinnedRetired = true
		return
	}
	q.freeSlab(s)
}

func (q *Queue) unpin() {
	if q.pinned != nil && q.pinnedRetired {
		q.freeSlab(q.pinned)
	}
	q.pinned, q.pinnedRetired = nil, false
}

// grow doubles the ring, up to what MaxPackets needs.
func (q *Queue) grow() {
	size := 2 * len(q.ring)
	if size == 0 {
		size = 64
	}
	if limit := ceilPow2(q.lim.MaxPackets); size > limit {
		size = limit
	}
	ring := make([]entry, size)
	for i := 0; i < q.n; i++ {
		ring[i] = q.ring[(q.head+i)&(len(q.ring)-1)]
	}
	q.ring, q.head = ring, 0
}

func ceilPow2(n int) int {
	p := 1
	for p < n {
		p <<= 1
	}
	return p
}

// take removes the head entry and returns its packet, which lives in
// slabs[0] afterwards.
func (q *Queue) take() []byte {
	e := q.ring[q.head]
	q.head = (q.head + 1) & (len(q.ring) - 1)
	q.n--
	q.taken++
	n := int(e.n &^ newSlabBit)
	if e.n&newSlabBit != 0 {
		if q.entered {
			q.retire()
		}
		q.entered = true
	}
	q.qb -= int64(n)
	if q.budget != nil {
		q.budget.release(int64(n))
	}
	off := int(e.off)
	return q.slabs[0][off : off+n : off+n]
}

// Pop returns the oldest packet and its arrival time; ok is false when the
// queue is empty. The slice stays valid until the next Pop or Discard, so
// the consumer can write it out without a copy; concurrent Pushes do not
// touch it. Packets older than MaxAge at now are dropped (DropAge) instead
// of returned.
func (q *Queue) Pop(now time.Time) (pkt []byte, arrived time.Time, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.unpin()
	at := int64(now.Sub(q.base))
	for q.n > 0 {
		e := q.ring[q.head]
		p := q.take()
		if at-e.at > int64(q.lim.MaxAge) {
			q.countDrop(iAge, len(p))
			continue
		}
		q.delivered++
		q.deliveredBytes += uint64(len(p))
		q.tl.Add(q.tlPop, now)
		q.pinned = q.slabs[0]
		q.shrinkIfEmpty()
		return p, q.base.Add(time.Duration(e.at)), true
	}
	q.shrinkIfEmpty()
	return nil, time.Time{}, false
}

// shrinkIfEmpty gives back a ring that a burst made large: an idle queue of
// a finished migration should cost next to nothing. Slabs stay: the tail
// one is still being written, and the pinned one is in use.
func (q *Queue) shrinkIfEmpty() {
	if q.n == 0 && len(q.ring) > 4096 {
		q.ring, q.head = nil, 0
	}
}

// Peek returns the arrival time of the oldest packet without removing it.
func (q *Queue) Peek() (arrived time.Time, ok bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		return time.Time{}, false
	}
	return q.base.Add(time.Duration(q.ring[q.head].at)), true
}

// Expire drops the packets at the head that are older than MaxAge at now
// and returns how many. It does not end the validity of the packet Pop last
// returned, so a timer goroutine may call it.
func (q *Queue) Expire(now time.Time) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.n == 0 {
		return 0
	}
	k := q.expireLocked(int64(now.Sub(q.base)))
	q.shrinkIfEmpty()
	return k
}

func (q *Queue) expireLocked(at int64) int {
	k := 0
	for q.n > 0 && at-q.ring[q.head].at > int64(q.lim.MaxAge) {
		q.countDrop(iAge, len(q.take()))
		k++
	}
	return k
}

// Discard drops everything (DropFlushed), gives all memory back and
// returns how many packets it dropped. Call it when done with a queue too:
// its slabs then go to the pool for the next migration instead of waiting
// for the collector.
func (q *Queue) Discard() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.unpin()
	k := q.n
	for q.n > 0 {
		q.countDrop(iFlushed, len(q.take()))
	}
	for len(q.slabs) > 0 {
		q.retire()
	}
	q.slabs, q.woff, q.entered = nil, 0, false
	if q.spare != nil {
		slabPool.Put(q.spare)
		q.spare = nil
	}
	q.ring, q.head = nil, 0
	return k
}

// Head returns the sequence number of the oldest queued packet: how many
// packets ever left the queue's head, popped, skipped, expired or
// discarded. The packet after it has Head()+1, and so on; a number stays
// with its packet while the packet is queued.
func (q *Queue) Head() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.taken
}

// CopyOut copies queued packets, oldest first, from the one numbered from
// on (or from the oldest, if that one has left), without removing them: at
// most limit packets and, past the first, only while they fit in buf's
// capacity. It returns the copies, in buf's array when they fit, and the
// number of the packet after the last one copied. Producers and the
// consumer may go on meanwhile: the copies are the caller's.
func (q *Queue) CopyOut(from uint64, buf []byte, limit int) (pkts [][]byte, next uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if from < q.taken {
		from = q.taken
	}
	skip := from - q.taken
	if skip >= uint64(q.n) {
		return nil, from
	}
	// The slab of the head: slabs[0] once the reader has entered it, and a
	// packet that opens a slab moves one on (see newSlabBit).
	slab := -1
	if q.entered {
		slab = 0
	}
	buf = buf[:0]
	next = from
	for i := 0; i < q.n && len(pkts) < limit; i++ {
		e := q.ring[(q.head+i)&(len(q.ring)-1)]
		if e.n&newSlabBit != 0 {
			slab++
		}
		if uint64(i) < skip {
			continue
		}
		n := int(e.n &^ newSlabBit)
		if len(pkts) > 0 && len(buf)+n > cap(buf) {
			break
		}
		start := len(buf)
		buf = append(buf, q.slabs[slab][e.off:int(e.off)+n]...)
		pkts = append(pkts, buf[start:len(buf):len(buf)])
		next++
	}
	return pkts, next
}

// Skip removes the packets numbered below to (see Head): a peer already
// has them. They count as delivered, whatever their age. It returns how
// many it removed and their bytes. Like Pop, it ends the validity of the
// packet Pop last returned.
func (q *Queue) Skip(to uint64, now time.Time) (n int, bytes uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.unpin()
	for q.n > 0 && q.taken < to {
		p := q.take()
		n++
		bytes += uint64(len(p))
		q.delivered++
		q.deliveredBytes += uint64(len(p))
		q.tl.Add(q.tlPop, now)
	}
	q.shrinkIfEmpty()
	return n, bytes
}

// Len returns how many packets are queued.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.n
}

// Stats returns a snapshot of the counters.
func (q *Queue) Stats() Stats {
	q.mu.Lock()
	defer q.mu.Unlock()
	s := Stats{
		Packets: q.packets, Bytes: q.bytes,
		Delivered: q.delivered, DeliveredBytes: q.deliveredBytes,
		Dropped:      make(map[DropReason]uint64),
		DroppedBytes: make(map[DropReason]uint64),
		Len:          q.n, QueuedBytes: q.qb,
	}
	for i, r := range dropReasons {
		if q.dropped[i] != 0 {
			s.Dropped[r] = q.dropped[i]
			s.DroppedBytes[r] = q.droppedBytes[i]
		}
	}
	return s
}

// Notify returns a channel that gets a signal (coalesced, buffered 1) after
// each Push that kept a packet, for consumers that wait: drain with Pop
// until it reports empty, then wait on the channel.
func (q *Queue) Notify() <-chan struct{} { return q.notify }
