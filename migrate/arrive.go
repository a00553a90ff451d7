package migrate

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
	"github.com/vmroam/vmroam/wgagent/route"
)

// ArriveLocked handles `vip attach` of a VIP another host owns (old is
// its record): claim it, hold its packets here, ask the old owner for its
// cache, deliver once the VM's interface is up. Agent lock held; returns
// the new record.
func (e *Engine) ArriveLocked(vip netip.Addr, dev string, old gossip.Record) gossip.Record {
	if prev := e.ctls[vip]; prev != nil {
		prev.mu.Lock()
		if _, act := prev.stepLocked(evArrive); act == actHold && prev.stop != nil {
			// Back here while the move away still forwards stragglers:
			// end that stream; what comes now is this arrival's to hold.
			close(prev.stop)
			prev.stop = nil
		}
		e.stopPipesLocked(prev)
		prev.mu.Unlock()
	}
	// The controller takes the VIP's packets before any route leads them
	// to the cache device, so none arrives without a sink.
	holding, _ := step(vipPhase{state: stateNone}, evArrive)
	tl := cache.NewTimeline(time.Now()) // from before the first held packet
	c := e.addCtlLocked(vip, dev, holding)
	// Divert before claiming: senders switch to this host as soon as the
	// claim reaches them, and what they send must be held here, not
	// routed back to the old owner through the tunnel.
	if err := e.host.AddRoute(route.Route{Dst: hostPrefix(vip), Dev: e.dev.Name(), Metric: divertMetric(vip)}); err != nil {
		e.log.Warn("holding route", "vip", vip, "err", err)
	}
	r := e.host.Claim(vip)
	claimed := time.Now()
	if old.Owner != "" && old.Owner != e.cfg.Name {
		// The old owner streams only once its table names us: tell it
		// now rather than at the next gossip round.
		if err := e.host.Tell(old.Owner, r); err != nil {
			e.log.Debug("claim not told to the old owner directly; gossip carries it", "vip", vip, "to", old.Owner, "err", err)
		}
	}
	req := cache.Request{VIP: vip, Epoch: r.Epoch, Claimer: e.cfg.Name, Ticks: true}
	pc := e.takePrepared(vip, old.Owner)
	var stream *cache.Queue
	var offer cache.Offer
	if pc != nil {
		// The copies the old owner sent ahead are the stream's start.
		stream, req.Resume, offer = pc.preview.Ask(vip, r.Epoch)
		// Now, not in fetchHandover: on a busy host its goroutine waited
		// 1-4 ms for a CPU, a tenth of the whole handover across a WAN.
		pc.ask(req)
	} else {
		stream = e.newQueue()
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(offer.MAC) == 6 {
		c.mac = offer.MAC
	}
	c.started = claimed
	c.source = false
	c.rec = control.Migration{ID: e.migrationIDLocked(vip, old.Epoch), VIP: vip.String(), From: old.Owner, To: e.cfg.Name, Epoch: r.Epoch, Claim: timePtr(c.started), Role: metrics.RoleDestination}
	e.cfg.Metrics.MigrationStarted(metrics.RoleDestination)
	c.tl = tl
	// c.queue has held what arrived since the holding route went in.
	e.startDeliveryLocked(c, stream, c.queue, false)
	o, stop := c.orderer, c.stop
	e.log.Info("VM arriving: holding its packets and asking the old host for its cache", "vip", vip, "from", old.Owner, "epoch", r.Epoch, "copies_here", stream.Len())
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		e.fetchHandover(c, old.Owner, req, pc, stream, o, stop)
	}()
	return r
}

// fetchHandover asks the old owner for its cache, on the prepared
// connection pc if there is one (req already sent on it), and feeds the
// stream queue (fetch.run).
func (e *Engine) fetchHandover(c *vipCtl, from string, req cache.Request, pc *preparedConn, stream *cache.Queue, o *cache.Orderer, stop chan struct{}) {
	f := &fetch{c: c, from: from, req: req, pc: pc, stream: stream, o: o, stop: stop,
		settle: e.live().Settle, log: e.log,
		connect: func() (net.Conn, time.Duration) { return e.connectHandover(c, from, stop) }}
	f.run()
}

// fetch is the new host's side of one handover: it needs nothing of the
// agent but a way to connect to the old owner, so that every answer a
// source can give is tested over a pipe (arrive_test.go).
type fetch struct {
	c      *vipCtl
	from   string // the old owner
	req    cache.Request
	pc     *preparedConn // nil: not prepared
	stream *cache.Queue
	o      *cache.Orderer
	stop   chan struct{} // closed: the migration no longer wants the cache
	settle time.Duration // Tunables.Settle, the least settle
	log    *slog.Logger
	// connect connects to the old owner's handover port, retrying until
	// it gives up (nil) or stop closes; it returns the connect's round trip.
	connect func() (net.Conn, time.Duration)
}

// run fetches the cache. Whatever happens, it ends by telling the orderer
// the source is closed.
func (f *fetch) run() {
	c, from, req, pc, stream, o, stop := f.c, f.from, f.req, f.pc, f.stream, f.o, f.stop
	defer o.Closed()
	var conn net.Conn
	var rd *cache.Reader
	var first cache.Frame // of the answer
	var rtt, dialRTT time.Duration
	var copies uint64 // sent ahead on the prepared connection
	for {
		asked := pc
		prepared := pc != nil
		if prepared {
			conn, dialRTT = pc.conn, pc.dialRTT
			pc = nil
		} else if conn, dialRTT = f.connect(); conn == nil {
			c.noteCacheLost(f.log, from, stop, "no connection", nil)
			return
		}
		// Long enough for a source that makes the request wait; the
		// header shortens it (see handoverIdle).
		if ic, ok := conn.(*idleConn); ok {
			// Prepared: its preview may be waiting in a read already.
			ic.setLimit(claimWait + handoverIdle)
			ic.SetReadDeadline(time.Now().Add(claimWait + handoverIdle))
		} else {
			conn = newIdleConn(conn, claimWait+handoverIdle)
		}
		released := make(chan struct{})
		go func(conn net.Conn) {
			select {
			case <-stop:
				conn.Close()
			case <-released:
			}
		}(conn)
		var err error
		switch {
		case asked == nil:
			sent := time.Now()
			if err = cache.SendRequest(conn, req); err == nil {
				rd = cache.NewReader(conn)
				if first, err = rd.Next(); err != nil {
					err = fmt.Errorf("handover: no answer: %w", err)
				}
				rtt = time.Since(sent)
			}
		case asked.askErr != nil:
			err = asked.askErr
		default:
			var at time.Time
			rd, first, at, err = asked.preview.Await()
			rtt = at.Sub(asked.asked)
		}
		if err == nil {
			defer func() {
				close(released)
				conn.Close()
			}()
			if prepared {
				copies = asked.preview.Copies()
				f.log.Info("handover: requested on the prepared connection", "vip", c.vip, "from", from, "rtt", rtt, "copies_ahead", copies)
			}
			break
		}
		close(released)
		conn.Close()
		select {
		case <-stop:
			return
		default:
		}
		if prepared {
			// What came ahead stays in the stream: ask from there, once
			// the preview has taken all it will (the close ends it).
			asked.preview.Await()
			req.Resume = asked.preview.Resume()
			f.log.Info("handover: the prepared connection failed; connecting anew", "vip", c.vip, "from", from, "err", err, "resume", req.Resume.Seq)
			continue
		}
		if req.Ticks && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
			// An agent from before ticks closes on a request with flags.
			f.log.Warn("handover: the old host does not know ticks (an older vmroam?); asking again without, so a loss in the stream may reorder", "vip", c.vip, "from", from)
			req.Ticks = false
			continue
		}
		c.noteCacheLost(f.log, from, stop, "handover request", err)
		return
	}
	o.ExpectTicks(req.Ticks)
	// The answer's round trip is the path's, unless the source made the
	// request wait (see waitForClaim); the connect's is one too.
	o.Settle = max(f.settle, min(rtt, dialRTT)+2*time.Millisecond)
	st, err := cache.Receiver{Queue: stream, OnTick: o.Tick,
		OnHeader: func(h cache.Header) error {
			if h.VIP != req.VIP || h.Epoch != req.Epoch {
				// A source that answers another request than ours:
				// its packets are not this VM's.
				return fmt.Errorf("%w: the old host sent %s at epoch %d for a request of %s at epoch %d",
					cache.ErrMalformed, h.VIP, h.Epoch, req.VIP, req.Epoch)
			}
			if ic, ok := conn.(*idleConn); ok && req.Ticks {
				ic.setLimit(handoverIdle)
			}
			o.Tick(0) // the source's tick clock starts with the header
			c.mu.Lock()
			if len(h.MAC) == 6 {
				c.mac = h.MAC
			}
			c.rec.FlushStart = timePtr(time.Now())
			c.mu.Unlock()
			return nil
		},
		OnEnd: func(e cache.End) {
			c.mu.Lock()
			c.rec.FlushEnd = timePtr(time.Now())
			c.rec.Lost += e.Dropped
			c.mu.Unlock()
			o.Ended()
		},
	}.Receive(rd, first)
	st.Flushed += copies
	st.Ahead = copies
	c.mu.Lock()
	c.rec.Flushed, c.rec.Forwarded, c.rec.Ahead = st.Flushed, st.Forwarded, st.Ahead
	c.flush = st
	c.mu.Unlock()
	if err != nil {
		c.noteCacheLost(f.log, from, stop, "handover stream ended early", err)
	}
}

// connectHandover connects to the old owner's handover port, retrying
// until it answers, stops being alive, the cache's age limit passes or
// stop closes; nil if it gave up.
func (e *Engine) connectHandover(c *vipCtl, from string, stop chan struct{}) (net.Conn, time.Duration) {
	deadline := time.Now().Add(e.live().Limits.MaxAge)
	var warned time.Time // held packets wait: say why, every few seconds
	for attempt := 1; ; attempt++ {
		// Short attempts: a lost SYN is retried by a new dial sooner than
		// by TCP's own 1 s backoff.
		conn, rtt, err := e.host.Dial(context.Background(), from, 300*time.Millisecond)
		if err == nil {
			lv := slog.LevelDebug
			if time.Since(c.started) > time.Second {
				lv = slog.LevelWarn // worth knowing: every held packet waits
			}
			e.log.Log(context.Background(), lv, "handover: connected", "vip", c.vip, "from", from, "after", time.Since(c.started))
			return conn, rtt
		}
		if errors.Is(err, ErrNotAlive) {
			e.log.Warn("old owner is not alive: delivering what is held without its cache", "vip", c.vip, "from", from)
			return nil, 0
		}
		if waited := time.Since(c.started); waited > time.Second && time.Since(warned) > 3*time.Second {
			warned = time.Now()
			e.log.Warn("handover: cannot connect to the old host yet; its VM's packets are held here", "vip", c.vip, "from", from,
				"waited", waited.Round(time.Millisecond), "attempts", attempt, "err", err, "tunnel", e.host.TunnelState(from))
		} else {
			e.log.Debug("handover: connect", "vip", c.vip, "from", from, "err", err)
		}
		if time.Now().After(deadline) {
			e.log.Error("handover: old owner unreachable; its cache is lost", "vip", c.vip, "from", from, "err", err)
			return nil, 0
		}
		select {
		case <-stop:
			return nil, 0
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// A dead or cut-off old host must not keep a destination holding forever:
// its agent's death takes its WireGuard device with it, so no FIN or RST
// reaches the destination, and a TCP connection that only reads never
// notices. The destination therefore reads the handover stream with an
// idle timeout, and files what it could not get as lost.

// handoverIdle is how long the new host waits for the next frame of a
// handover stream with ticks before it gives the old host up: the old host
// writes a tick every handoverTick while it lingers, so only a dead agent
// or a cut underlay is this quiet. Long enough for TCP to get through an
// underlay outage of a few seconds (its retransmissions back off to ~1.6 s).
const handoverIdle = 5 * time.Second

// idleConn is a net.Conn whose every Read fails with a timeout once
// nothing arrived for its current limit.
type idleConn struct {
	net.Conn
	limit atomic.Int64 // time.Duration
}

func newIdleConn(conn net.Conn, limit time.Duration) *idleConn {
	c := &idleConn{Conn: conn}
	c.limit.Store(int64(limit))
	return c
}

func (c *idleConn) setLimit(d time.Duration) { c.limit.Store(int64(d)) }

func (c *idleConn) Read(b []byte) (int, error) {
	if err := c.Conn.SetReadDeadline(time.Now().Add(time.Duration(c.limit.Load()))); err != nil {
		return 0, err
	}
	return c.Conn.Read(b)
}

// noteCacheLost marks the migration of c as having lost the old host's
// cache, unless the handover was stopped on purpose. A stream cut after
// the end marker brought the whole cache: only stragglers the old host
// still forwarded may be lost, and that is logged only. c.mu not held.
func (c *vipCtl) noteCacheLost(log *slog.Logger, from string, stop chan struct{}, why string, err error) {
	select {
	case <-stop:
		return
	default:
	}
	c.mu.Lock()
	whole := c.rec.FlushEnd != nil
	c.rec.CacheLost = c.rec.CacheLost || !whole
	c.mu.Unlock()
	if whole {
		log.Warn("handover: the stream was cut after the whole cache came; stragglers the old host still had are lost", "vip", c.vip, "from", from, "err", err)
		return
	}
	log.Error("handover: the old host's cache is lost; delivering what is held here", "vip", c.vip, "from", from, "why", why, "err", err)
}
