// Package wanem is the lab's WAN emulator: it reads IP packets from a device
// (a TUN in the lab's router namespace), holds each one for a configured
// one-way delay, optionally with jitter and random loss, and writes it back
// to the same device, where policy routing sends it on to its site.
//
// Timing: Go's timers wake up to about 1 ms late on Linux (the runtime's
// epoll waits have millisecond resolution), which is the whole error budget.
// So the writer goroutine sleeps on its own locked OS thread in ppoll(2)
// with a 1 ns timer slack, and busy-waits only for the last SpinWindow before
// a packet is due; with nothing queued it blocks. At 50,000 packets/s the
// next packet is always due within the spin window, so the writer would keep
// one core busy: so it spins only within a budget of 1/SpinShare of the
// time, and beyond that sleeps to the due time (wake-ups then come about
// 0.1 ms late). On a machine busy with other work a normal thread may still
// wait milliseconds for a CPU; SetRealtime (the command's -rt flag) makes
// the process real-time. A TUN is read on a thread of its own too, that the
// kernel wakes directly, so that packets are stamped when they arrive.
//
// Linux only (eventfd, ppoll, TUN, sched_setattr).
package wanem

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// LateAfter is how far past its due time a packet may be written before
// Stats counts it as Late.
const LateAfter = time.Millisecond

// MaxQueue bounds the packets held at once; more are dropped and counted in
// Stats.Dropped. At 50,000 packets/s it allows 2 s of delay.
const MaxQueue = 100_000

// SpinWindow is how long before a packet's due time the writer stops
// sleeping and busy-waits, budget permitting (SpinShare): wake-ups from
// ppoll on the lab machine (a VM) came 40-75 µs late at the median and up
// to ~350 µs at p99.
const SpinWindow = 300 * time.Microsecond

// SpinShare: the writer busy-waits at most 1/SpinShare of the time, on
// average (see runner.spend).
const SpinShare = 10

// maxPacket is the largest packet a Read may return: 64 KiB covers any IP
// packet a TUN without offloads hands out.
const maxPacket = 65535

// poolBufSize is the size of the pooled packet buffers: every packet of a
// 1500-byte MTU fits; larger ones get a buffer of their own.
const poolBufSize = 2048

// Config is what the emulator does to each packet.
type Config struct {
	// Delay is the one-way delay added to every packet: it is written Delay
	// after it was read. 0 forwards at once.
	Delay time.Duration
	// Jitter adds a uniformly random extra delay in [0, Jitter] to each
	// packet, but never lets a packet of a flow (same addresses, protocol
	// and ports) become due before the previous packet of that flow: a
	// flow is delayed unevenly but never reordered. 0 = none.
	Jitter time.Duration
	// Loss is the probability, in [0, 1), that a packet is dropped on
	// arrival. It can be changed while running with Emulator.SetLoss.
	Loss float64
	// Seed seeds the random source of jitter and loss, so a run can be
	// repeated; 0 picks a random seed.
	Seed int64
}

// Validate reports whether c can be used.
func (c Config) Validate() error {
	if c.Delay < 0 {
		return fmt.Errorf("wanem: negative delay %v", c.Delay)
	}
	if c.Jitter < 0 {
		return fmt.Errorf("wanem: negative jitter %v", c.Jitter)
	}
	return validLoss(c.Loss)
}

func validLoss(p float64) error {
	// The negated comparison also rejects NaN.
	if !(p >= 0 && p < 1) {
		return fmt.Errorf("wanem: loss %v outside [0, 1)", p)
	}
	return nil
}

// Stats counts what the emulator did.
type Stats struct {
	Received uint64 // packets read from the device
	Sent     uint64 // packets written back
	Lost     uint64 // dropped on purpose (Config.Loss)
	// LostByPath splits Lost by "SRC>DST" IP addresses, so that a test
	// can tell what the emulated underlay took from one flow's path.
	LostByPath  map[string]uint64 `json:",omitempty"`
	Dropped     uint64            // dropped for want of room (MaxQueue) or by a failed write
	Late        uint64            // written more than LateAfter after their due time
	MaxLateness time.Duration     // the latest any packet was written after its due time
	P50Lateness time.Duration     // median lateness of the packets written (up to 12.5 % high)
	P99Lateness time.Duration     // its 99th percentile (up to 12.5 % high)
}

// String formats s on one line.
func (s Stats) String() string {
	return fmt.Sprintf("received %d sent %d lost %d dropped %d late %d lateness p50 %v p99 %v max %v",
		s.Received, s.Sent, s.Lost, s.Dropped, s.Late, s.P50Lateness, s.P99Lateness, s.MaxLateness)
}

type deadliner interface{ SetReadDeadline(time.Time) error }

// Device is where packets come from and go back to: each Read returns one
// whole IP packet, each Write takes one. A Linux TUN opened with
// IFF_TUN|IFF_NO_PI (OpenTUN) is exactly that.
//
// A Device with a SyscallConn method (an *os.File, OpenTUN's) is not used
// through Read and Write but through its descriptor, directly, on threads
// of Run's own. Otherwise, so that Run can stop a blocked Read when its
// context ends, a Device should have a SetReadDeadline(time.Time) error
// method; without one Run closes it if it is an io.Closer; otherwise Run
// returns only after the pending Read returns.
type Device interface {
	Read(p []byte) (int, error)
	Write(p []byte) (int, error)
}

// Emulator applies a Config to the packets of a Device. Its methods may be
// called from several goroutines.
type Emulator struct {
	cfg   Config
	start time.Time // origin of the monotonic clock below
	loss  atomic.Uint64
	busy  atomic.Bool

	received, sent, lost, dropped, late atomic.Uint64
	maxLate                             atomic.Int64
	lateness                            histogram

	lostMu   sync.Mutex
	lostPath map[string]uint64 // Stats.LostByPath
}

// New returns an emulator for cfg.
func New(cfg Config) (*Emulator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	e := &Emulator{cfg: cfg, start: time.Now()}
	e.loss.Store(math.Float64bits(cfg.Loss))
	return e, nil
}

// Run is New(cfg) followed by Run(ctx, dev).
func Run(ctx context.Context, dev Device, cfg Config) (Stats, error) {
	e, err := New(cfg)
	if err != nil {
		return Stats{}, err
	}
	return e.Run(ctx, dev)
}

// SetLoss changes the loss probability from the next packet read on.
func (e *Emulator) SetLoss(p float64) error {
	if err := validLoss(p); err != nil {
		return err
	}
	e.loss.Store(math.Float64bits(p))
	return nil
}

// Loss returns the current loss probability.
func (e *Emulator) Loss() float64 { return math.Float64frombits(e.loss.Load()) }

// Stats returns the counts so far, over every Run of e.
func (e *Emulator) Stats() Stats {
	return Stats{
		Received:    e.received.Load(),
		Sent:        e.sent.Load(),
		Lost:        e.lost.Load(),
		Dropped:     e.dropped.Load(),
		Late:        e.late.Load(),
		MaxLateness: time.Duration(e.maxLate.Load()),
		P50Lateness: e.lateness.quantile(0.5),
		P99Lateness: e.lateness.quantile(0.99),
		LostByPath:  e.lostByPath(),
	}
}

func (e *Emulator) lostByPath() map[string]uint64 {
	e.lostMu.Lock()
	defer e.lostMu.Unlock()
	if len(e.lostPath) == 0 {
		return nil
	}
	return maps.Clone(e.lostPath)
}

// countLost adds a packet dropped on purpose to LostByPath.
func (e *Emulator) countLost(pkt []byte) {
	src, dst, ok := ipAddrs(pkt)
	if !ok {
		return
	}
	e.lostMu.Lock()
	if e.lostPath == nil {
		e.lostPath = map[string]uint64{}
	}
	e.lostPath[src.String()+">"+dst.String()]++
	e.lostMu.Unlock()
}

// ipAddrs reads an IPv4 or IPv6 packet's source and destination.
func ipAddrs(pkt []byte) (src, dst netip.Addr, ok bool) {
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		return netip.AddrFrom4([4]byte(pkt[12:16])), netip.AddrFrom4([4]byte(pkt[16:20])), true
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		return netip.AddrFrom16([16]byte(pkt[8:24])), netip.AddrFrom16([16]byte(pkt[24:40])), true
	}
	return netip.Addr{}, netip.Addr{}, false
}

// now is the monotonic time since e was made, in nanoseconds.
func (e *Emulator) now() int64 { return int64(time.Since(e.start)) }

// Run moves packets from dev through the emulator back to dev until ctx ends
// (then it returns nil) or a Read fails (then it returns that error).
// Packets still held when it returns are discarded. Every goroutine it
// starts has ended when it returns. One Run at a time per Emulator.
//
// While it runs, its writer (and, for a TUN, its reader) keeps an OS thread
// and one of the runtime's Ps (GOMAXPROCS) even while it sleeps: a program
// that does much else meanwhile should raise GOMAXPROCS by two.
func (e *Emulator) Run(ctx context.Context, dev Device) (Stats, error) {
	if !e.busy.CompareAndSwap(false, true) {
		return e.Stats(), errors.New("wanem: Run already running")
	}
	defer e.busy.Store(false)
	w, err := newWaker()
	if err != nil {
		return e.Stats(), err
	}
	defer w.close()

	stopFD, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return e.Stats(), fmt.Errorf("wanem: eventfd: %w", err)
	}
	defer unix.Close(stopFD)

	r := &runner{e: e, dev: dev, waker: w, stopFD: stopFD, raw: rawConn(dev)}
	r.wakeAt.Store(math.MaxInt64)
	if e.cfg.Jitter > 0 {
		r.q = &heapQueue{}
		r.lastDue = make([]int64, flowSlots)
	} else {
		r.q = &fifo{}
	}
	seed := uint64(e.cfg.Seed)
	if seed == 0 {
		seed = rand.Uint64()
	}
	r.rng = rand.New(rand.NewPCG(seed, seed^0x766d726f616d))

	readErr := make(chan error, 1)
	ready := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		if r.raw != nil {
			// Hold the descriptor for the writer's whole life.
			ran := false
			_ = r.raw.Control(func(fd uintptr) {
				ran = true
				r.schedule(ready, int(fd))
			})
			if ran {
				return
			}
		}
		r.schedule(ready, -1)
	}()
	// The writer's thread must be set up before the first packet, or that
	// packet waits for it (tens of ms were seen).
	<-ready
	go func() {
		defer wg.Done()
		readErr <- r.read()
	}()

	var result error
	select {
	case <-ctx.Done():
	case result = <-readErr:
	}
	r.stop()
	wg.Wait()
	r.discard()
	if d, ok := dev.(deadliner); ok && r.raw == nil {
		_ = d.SetReadDeadline(time.Time{}) // stop's; the device may be used again
	}
	return e.Stats(), result
}

// runner is the state of one Run.
type runner struct {
	e      *Emulator
	dev    Device
	waker  *waker          // wakes the writer
	stopFD int             // an eventfd, readable once the reader must stop
	raw    syscall.RawConn // dev's descriptor, if it is a non-blocking one (rawConn)
	wfd    int             // the writer's: dev's descriptor while it holds it, or -1
	rng    *rand.Rand      // reader goroutine only

	budget, refilled int64 // writer only: spin budget, and when it was last refilled (spend)

	stopping atomic.Bool

	// wakeAt is the due time the writer waits for: MaxInt64 when it waits
	// for a first packet, MinInt64 while it is writing. The reader lowers it
	// (and wakes the writer) when it queues a packet due earlier.
	wakeAt atomic.Int64

	mu      sync.Mutex
	q       queue
	seq     uint64
	lastDue []int64 // per flow slot, with jitter only; reader goroutine only
}

var bufPool = sync.Pool{New: func() any {
	b := make([]byte, poolBufSize)
	return &b
}}

// stop ends the reader and the writer.
func (r *runner) stop() {
	r.stopping.Store(true)
	r.waker.wake()
	var one [8]byte
	one[0] = 1 // any non-zero count; read back by nobody
	_, _ = unix.Write(r.stopFD, one[:])
	if r.raw != nil {
		return // readFD polls stopFD
	}
	switch d := r.dev.(type) {
	case deadliner:
		if err := d.SetReadDeadline(time.Unix(1, 0)); err == nil {
			return
		}
		if c, ok := r.dev.(io.Closer); ok {
			_ = c.Close()
		}
	case io.Closer:
		_ = d.Close()
	}
}

// rawConn returns dev's descriptor if it has one (an *os.File), which Run
// then reads and writes itself (see readFD); else nil.
func rawConn(dev Device) syscall.RawConn {
	sc, ok := dev.(interface {
		SyscallConn() (syscall.RawConn, error)
	})
	if !ok {
		return nil
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return raw
}

// read is the reader goroutine: it stamps, drops or queues each packet.
func (r *runner) read() error {
	if r.raw != nil {
		return r.readFD()
	}
	scratch := make([]byte, maxPacket)
	for {
		n, err := r.dev.Read(scratch)
		if r.stopping.Load() {
			return nil
		}
		if err != nil {
			return fmt.Errorf("wanem: read: %w", err)
		}
		if n > 0 {
			r.accept(scratch[:n])
		}
	}
}

// readFD reads dev's descriptor directly, on a thread that sleeps in ppoll:
// the kernel then wakes this very thread when a packet arrives, where the
// runtime's poller would need two or three thread wake-ups (each up to
// ~100 µs on the lab machine, a VM) before the packet is even stamped. Its
// system calls bypass the runtime, see rawPpoll.
func (r *runner) readFD() error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	scratch := make([]byte, maxPacket)
	var err error
	cerr := r.raw.Control(func(fd uintptr) {
		// Non-blocking while we read, so that a read after the last packet
		// returns instead of waiting: ppoll does the waiting, together with
		// the stop signal. OpenTUN's descriptor is blocking otherwise.
		fl, ferr := unix.FcntlInt(fd, unix.F_GETFL, 0)
		if ferr != nil {
			err = fmt.Errorf("wanem: fcntl: %w", ferr)
			return
		}
		if fl&unix.O_NONBLOCK == 0 {
			if _, ferr := unix.FcntlInt(fd, unix.F_SETFL, fl|unix.O_NONBLOCK); ferr != nil {
				err = fmt.Errorf("wanem: fcntl: %w", ferr)
				return
			}
			defer unix.FcntlInt(fd, unix.F_SETFL, fl)
		}
		fds := [2]unix.PollFd{
			{Fd: int32(fd), Events: unix.POLLIN},
			{Fd: int32(r.stopFD), Events: unix.POLLIN},
		}
		for !r.stopping.Load() {
			n, rerr := rawRead(int(fd), scratch)
			switch {
			case rerr == nil && n > 0:
				r.accept(scratch[:n])
			case rerr == nil:
				err = fmt.Errorf("wanem: read: %w", io.EOF)
				return
			case rerr == unix.EAGAIN:
				// Errors and hang-ups show in the next read.
				if _, perr := rawPpoll(fds[:], nil); perr != nil && perr != unix.EINTR {
					err = fmt.Errorf("wanem: poll: %w", perr)
					return
				}
			case rerr == unix.EINTR:
			default:
				err = fmt.Errorf("wanem: read: %w", rerr)
				return
			}
		}
	})
	if cerr != nil {
		return fmt.Errorf("wanem: read: %w", cerr)
	}
	return err
}

// accept stamps one packet just read, then drops or queues it.
func (r *runner) accept(pkt []byte) {
	e := r.e
	now := e.now()
	e.received.Add(1)
	if loss := e.Loss(); loss > 0 && r.rng.Float64() < loss {
		e.lost.Add(1)
		e.countLost(pkt)
		return
	}
	n := len(pkt)
	var bp *[]byte
	if n <= poolBufSize {
		bp = bufPool.Get().(*[]byte)
	} else {
		b := make([]byte, n)
		bp = &b
	}
	copy(*bp, pkt)
	due := now + int64(e.cfg.Delay)
	if jitter := int64(e.cfg.Jitter); jitter > 0 {
		due += r.rng.Int64N(jitter + 1)
		slot := flowHash(pkt) & (flowSlots - 1)
		// Never before the flow's previous packet; ties keep arrival order
		// through the queue's sequence numbers.
		due = max(due, r.lastDue[slot])
		r.lastDue[slot] = due
	}

	r.mu.Lock()
	if r.q.len() >= MaxQueue {
		r.mu.Unlock()
		putBuf(bp)
		e.dropped.Add(1)
		return
	}
	r.seq++
	r.q.push(packet{buf: bp, n: n, due: due, seq: r.seq})
	wake := due < r.wakeAt.Load()
	if wake {
		r.wakeAt.Store(due)
	}
	r.mu.Unlock()
	if wake {
		r.waker.wake()
	}
}

func putBuf(bp *[]byte) {
	if cap(*bp) == poolBufSize {
		bufPool.Put(bp)
	}
}

// schedule is the writer goroutine: write each packet when it is due, to
// fd directly if it is not -1, else through Write.
func (r *runner) schedule(ready chan<- struct{}, fd int) {
	r.wfd = fd
	// A thread of its own, so that the timer slack set here applies to
	// every sleep and no other goroutine's work delays a wake-up. It stays
	// locked: the runtime then ends the thread with the goroutine instead of
	// reusing a thread whose slack was changed.
	runtime.LockOSThread()
	setTimerSlack()
	close(ready)

	batch := make([]packet, 0, 64)
	for !r.stopping.Load() {
		r.mu.Lock()
		now := r.e.now()
		for len(batch) < cap(batch) {
			p := r.q.peek()
			if p == nil || p.due > now {
				break
			}
			batch = append(batch, r.q.pop())
		}
		next := int64(math.MaxInt64)
		if len(batch) > 0 {
			next = math.MinInt64
		} else if p := r.q.peek(); p != nil {
			next = p.due
		}
		r.wakeAt.Store(next)
		r.mu.Unlock()

		if len(batch) == 0 {
			r.wait()
			continue
		}
		for i := range batch {
			r.write(&batch[i])
			batch[i] = packet{}
		}
		batch = batch[:0]
	}
}

// wait returns when wakeAt is reached, or at once on stop. It sleeps until
// SpinWindow before, then busy-waits if the spin budget allows, else sleeps
// the rest too.
func (r *runner) wait() {
	for !r.stopping.Load() {
		now := r.e.now()
		d := r.wakeAt.Load() - now
		if d <= 0 {
			return
		}
		if d > int64(SpinWindow) {
			r.waker.wait(time.Duration(d - int64(SpinWindow)))
			continue
		}
		if !r.spend(now, d) {
			r.waker.wait(time.Duration(d))
			continue
		}
		for r.e.now() < r.wakeAt.Load() && !r.stopping.Load() {
		}
		return
	}
}

// spend takes d ns of busy-waiting from the spin budget, if it holds that
// much. The budget grows by SpinShare of the time that passes, up to 2
// SpinWindows: at high packet rates the next packet is always due within
// the window, and an unbounded writer would keep a CPU busy, starving the
// rest of the packets' path (the reader, the kernel's softirq thread, the
// programs sending) on a small machine, more so when it is real-time.
func (r *runner) spend(now, d int64) bool {
	r.budget = min(r.budget+(now-r.refilled)/SpinShare, 2*int64(SpinWindow))
	r.refilled = now
	if r.budget < d {
		return false
	}
	r.budget -= d
	return true
}

func (r *runner) write(p *packet) {
	e := r.e
	late := e.now() - p.due
	var err error
	if r.wfd >= 0 {
		err = rawWrite(r.wfd, (*p.buf)[:p.n])
	} else {
		_, err = r.dev.Write((*p.buf)[:p.n])
	}
	putBuf(p.buf)
	if err != nil {
		e.dropped.Add(1)
		return
	}
	e.sent.Add(1)
	e.lateness.add(late)
	if late > int64(LateAfter) {
		e.late.Add(1)
	}
	for {
		m := e.maxLate.Load()
		if late <= m || e.maxLate.CompareAndSwap(m, late) {
			break
		}
	}
}

// discard returns the buffers of the packets left in the queue.
func (r *runner) discard() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for r.q.peek() != nil {
		p := r.q.pop()
		putBuf(p.buf)
	}
}
