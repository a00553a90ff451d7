package migrate

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
)

// fromPeer says whether a handover connection comes from the overlay
// address of a current WireGuard peer (an alive or suspect member, admitted
// by the allowlist if there is one). Anything else is refused before a
// byte is read, counted and logged (at most once a second): a VM, which
// reaches hosts' overlay addresses through the tunnel from its VIP, a
// local process (Linux delivers local connections to a socket bound to any
// device), or a member that is not a peer. The listener is bound to the
// WireGuard interface, so connections from the underlay do not get here.
func (e *Engine) fromPeer(conn net.Conn) bool {
	remote, err := netip.ParseAddrPort(conn.RemoteAddr().String())
	if err == nil && e.host.Peer(remote.Addr()) != "" {
		return true
	}
	n := e.handoverRefused.Add(1)
	now := time.Now().UnixNano()
	if last := e.handoverLogged.Load(); now-last >= int64(time.Second) && e.handoverLogged.CompareAndSwap(last, now) {
		e.log.Warn("handover: refused a connection that is not from a WireGuard peer's overlay address",
			"remote", conn.RemoteAddr(), "refused_total", n)
	}
	return false
}

// Serve starts answering handover requests from other agents on ln, until
// ln is closed; Close waits for it and the handovers under way.
func (e *Engine) Serve(ln net.Listener) {
	e.bg.Add(1)
	go e.serve(ln)
}

func (e *Engine) serve(ln net.Listener) {
	defer e.bg.Done()
	for {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		if !e.fromPeer(conn) {
			conn.Close()
			continue
		}
		e.bg.Add(1)
		go func() {
			defer e.bg.Done()
			defer conn.Close()
			switch err := e.handleHandover(conn); {
			case errors.Is(err, errSessionCheck):
				e.log.Debug("handover: a session check", "remote", conn.RemoteAddr())
			case err != nil:
				e.log.Warn("handover", "remote", conn.RemoteAddr(), "err", err)
			}
		}()
	}
}

// handoverTick is how often the old host writes a tick while it lingers
// (cache.Sender.Tick): it bounds how much a tick adds to a flow's
// settle at the new host.
const handoverTick = 2 * time.Millisecond

// errSessionCheck is a handover connection closed before its first frame:
// a peer's check that its WireGuard session carries a round trip
// (checkSession).
var errSessionCheck = errors.New("closed before the first frame: a session check")

func (e *Engine) handleHandover(conn net.Conn) error {
	rd := cache.NewReader(conn)
	f, err := e.readHandoverRequest(conn, rd)
	if errors.Is(err, io.EOF) {
		return errSessionCheck
	}
	if err != nil {
		return err
	}
	w := cache.NewWriter(conn)
	refuse := func(format string, args ...any) error {
		reason := fmt.Sprintf(format, args...)
		w.Refuse(cache.Refuse{Reason: reason})
		w.Flush()
		return errors.New("refused: " + reason)
	}
	var copied cache.Resume // what the prepared connection carried ahead
	if f.Type == cache.FramePrepare {
		if err := e.checkClaimer(conn, f.Prepare.Claimer); err != nil {
			return refuse("%v", err)
		}
		stop, done := make(chan struct{}), make(chan error, 1)
		go func() {
			var err error
			copied, err = e.offerCache(conn, f.Prepare.VIP.Unmap(), stop)
			if err != nil {
				conn.Close() // ends the wait for the request below
			}
			done <- err
		}()
		f, err = e.readHandoverRequest(conn, rd)
		close(stop)
		if oerr := <-done; oerr != nil {
			// The stream is out of step: the claimer connects anew,
			// and asks from what it has.
			return fmt.Errorf("copying the cache ahead: %w", oerr)
		}
		if err != nil {
			return err
		}
	}
	if f.Type != cache.FrameRequest {
		return refuse("expected a request")
	}
	req := f.Request
	e.log.Debug("handover request", "vip", req.VIP, "claimer", req.Claimer, "epoch", req.Epoch)
	if err := e.checkClaimer(conn, req.Claimer); err != nil {
		return refuse("%v", err)
	}
	if err := e.waitForClaim(req); err != nil {
		return refuse("%v", err)
	}

	asked := time.Now()
	e.host.Lock()
	c := e.ctls[req.VIP]
	at, attached := e.host.Attachment(req.VIP)
	if c == nil || !(attached || c.state == stateCaching) || (attached && req.Epoch <= at.Epoch) {
		e.host.Unlock()
		return refuse("%s is not held here at an epoch below %d", req.VIP, req.Epoch)
	}
	if e.dropLostInRestartLocked(c, req) {
		e.host.Unlock()
		return refuse("the cache of %s was lost when this agent restarted", req.VIP)
	}
	if _, err := e.onLocked(c, evClaim, "claimed by "+req.Claimer); err != nil {
		e.host.Unlock()
		return refuse("%v", err)
	}
	c.mu.Lock()
	c.rec.To = req.Claimer
	c.rec.Epoch = req.Epoch
	c.rec.Claim = timePtr(time.Now())
	q, mac, stop := c.queue, c.mac, make(chan struct{})
	c.stop = stop
	c.mu.Unlock()
	e.host.Disown(req.VIP, gossip.Record{VIP: req.VIP, Owner: req.Claimer, Epoch: req.Epoch})
	e.host.Unlock()
	// Move the VIP to the new owner's peer while the flush starts: the
	// reconcile takes milliseconds (a tenth of a handover across a WAN)
	// that the new host need not wait for. The end marker waits for it:
	// what our own senders sent before the move is in the cache and
	// flushed ahead of the marker, what they send after it goes straight
	// to the new host, newer than all of it. (An end marker ahead of the
	// move reordered 29-32 packets in every third hybrid move: packets
	// still on the old path overtook the stream.) The Assert kicked the
	// reconcile loop, which may well take the lock before the goroutine
	// below starts (1-7 ms later on a busy host): its run then does the
	// move, and the goroutine's is skipped.
	t0 := time.Now()
	routed := make(chan struct{})
	var reconciled time.Duration
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		e.host.ReconcileFor(t0)
		reconciled = time.Since(t0)
		close(routed)
	}()
	e.log.Debug("handover: streaming", "vip", req.VIP, "queued", q.Len(), "mac", mac.String(), "after", time.Since(asked), "copied_ahead", copied.Seq, "resume", req.Resume.Seq)
	var tick time.Duration
	if req.Ticks {
		tick = handoverTick
	}
	lingerOver, streamDone := e.endLinger(c, stop)
	// The claimer has the copies its request names; and, if it took
	// this connection's copies (it names their cache: it drops the
	// copies of an offer that does not match its claim), also those that
	// were still on their way when it asked, up to copied.
	var from uint64
	if req.Resume.Cache == q.ID() {
		from = req.Resume.Seq
		if copied.Cache == q.ID() {
			from = max(from, copied.Seq)
		}
	}
	st, err := cache.Sender{Queue: q, Header: cache.Header{VIP: req.VIP, Epoch: req.Epoch, MAC: mac}, From: from,
		Linger: e.live().Linger + pipeWait + time.Second, Tick: tick, FlushUntil: routed, Stop: lingerOver}.Send(conn)
	close(streamDone)
	<-routed
	e.log.Debug("handover: sent", "vip", req.VIP, "flush", st.FlushEnd.Sub(st.FlushStart), "total", time.Since(t0), "reconcile", reconciled)
	e.host.Lock()
	c.mu.Lock()
	c.rec.Flushed, c.rec.Forwarded, c.rec.Ahead = st.Flushed, st.Forwarded, st.Ahead
	c.flush = st
	qs := q.Stats()
	c.rec.Cached, c.rec.CachedBytes = qs.Packets, qs.Bytes
	c.rec.Dropped = dropMap(qs, nil)
	if !st.FlushStart.IsZero() {
		c.rec.FlushStart = timePtr(st.FlushStart)
	}
	if !st.FlushEnd.IsZero() {
		c.rec.FlushEnd = timePtr(st.FlushEnd)
	}
	c.rec.Done = timePtr(time.Now())
	e.finishLocked(c, migrationQueues{cache: q})
	e.stopPipesLocked(c)
	c.mu.Unlock()
	mine := e.ctls[req.VIP] == c
	if mine {
		delete(e.ctls, req.VIP)
	}
	e.host.Unlock()
	// Routes first, then the sink: a straggler that still reaches the
	// cache device in between is not dropped unclaimed.
	e.host.Reconcile()
	if mine {
		time.Sleep(50 * time.Millisecond)
		if n := q.Len(); n > 0 {
			e.log.Warn("handover: packets reached the old host after the stream closed", "vip", req.VIP, "count", n)
		}
		e.dev.Detach(req.VIP, c)
	}
	e.log.Info("handover done", "vip", req.VIP, "to", req.Claimer, "flushed", st.Flushed, "ahead", st.Ahead, "forwarded", st.Forwarded, "err", err)
	return err
}

// checkClaimer says why a handover connection cannot be from claimer, if
// it cannot: it must come from the overlay address of that live member,
// its WireGuard peer.
func (e *Engine) checkClaimer(conn net.Conn, claimer string) error {
	remote, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	if addr, alive := e.host.Member(claimer); !alive || addr != remote.Addr().Unmap() {
		return fmt.Errorf("%s is not the overlay address of a live member %q", remote.Addr(), claimer)
	}
	if peer := e.host.Peer(remote.Addr()); peer != claimer {
		return fmt.Errorf("%s is the overlay address of peer %q, not of %q", remote.Addr(), peer, claimer)
	}
	return nil
}

// claimWait bounds how long a handover request waits for the claim it
// follows to reach this host's table: the claimer tells this host directly
// (gossip.Cluster.Tell), so it is there within a round trip unless that
// datagram was lost; then the broadcast brings it at the next gossip
// rounds (200 ms apart on a LAN, 500 ms on a WAN).
const claimWait = 2 * time.Second

// waitForClaim returns once the gossip table names req's claimer the VIP's
// owner at req's epoch, and an error if it names another owner at that
// epoch or a later one, or nothing newer within claimWait. A member with
// the gossip key can claim any VIP, but the cache goes only where the
// whole cluster routes the VIP, never on the word of the request alone.
func (e *Engine) waitForClaim(req cache.Request) error {
	return waitForClaim(e.host.Record, req, claimWait)
}

// waitForClaim is Agent.waitForClaim over the table's get, waiting up to
// wait.
func waitForClaim(get func(netip.Addr) (gossip.Record, bool), req cache.Request, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for pause := 100 * time.Microsecond; ; pause = min(2*pause, 10*time.Millisecond) {
		r, ok := get(req.VIP)
		switch {
		case ok && r.Owner == req.Claimer && r.Epoch == req.Epoch:
			return nil
		case ok && r.Epoch >= req.Epoch:
			return fmt.Errorf("the gossip table names %q the owner of %s at epoch %d, not %q at epoch %d", r.Owner, req.VIP, r.Epoch, req.Claimer, req.Epoch)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no claim of %s by %q at epoch %d reached this host within %v (the table has epoch %d)", req.VIP, req.Claimer, req.Epoch, wait, r.Epoch)
		}
		time.Sleep(pause)
	}
}

// readHandoverRequest reads the next frame from a peer's connection: its
// request, or the prepare that comes first on a prepared connection. A
// peer may connect long before it asks (Prepare).
func (e *Engine) readHandoverRequest(conn net.Conn, rd *cache.Reader) (cache.Frame, error) {
	remote, _ := netip.ParseAddrPort(conn.RemoteAddr().String())
	from := remote.Addr().Unmap()
	wait := 5 * time.Second
	e.prepMu.Lock()
	if e.idleHandovers == nil {
		e.idleHandovers = map[netip.Addr]int{}
	}
	if n := e.idleHandovers[from]; n < maxIdleHandovers {
		wait = prepareTTL
		e.idleHandovers[from] = n + 1
		defer func() {
			e.prepMu.Lock()
			if e.idleHandovers[from]--; e.idleHandovers[from] <= 0 {
				delete(e.idleHandovers, from)
			}
			e.prepMu.Unlock()
		}()
	}
	if e.closing {
		e.prepMu.Unlock()
		return cache.Frame{}, errors.New("agent stopping")
	}
	if e.waiting == nil {
		e.waiting = map[net.Conn]bool{}
	}
	e.waiting[conn] = true
	e.prepMu.Unlock()
	conn.SetReadDeadline(time.Now().Add(wait))
	f, err := rd.Next()
	e.prepMu.Lock()
	delete(e.waiting, conn)
	e.prepMu.Unlock()
	if err != nil {
		return f, fmt.Errorf("read request: %w", err)
	}
	conn.SetReadDeadline(time.Time{})
	return f, nil
}

// endLinger ends an old host's straggler stream without losing what its
// own senders (VMs on this host, which follow its routes) still put into
// the cache: once the linger is over it routes the VIP to the new owner,
// waits until the cache device has handed over everything routed to it
// before (a barrier), and only then closes lingerOver, on which the stream
// sends what is left and closes. Closing the stream first lost what
// arrived until a reconcile changed the routes (tens to hundreds of
// packets per move at 12,500/s). Spilled deliveries of c are waited for
// too (waitPipes). lingerOver also closes when stop does
// or the caller closes streamDone (the stream ended some other way).
func (e *Engine) endLinger(c *vipCtl, stop <-chan struct{}) (lingerOver <-chan struct{}, streamDone chan struct{}) {
	over, done := make(chan struct{}), make(chan struct{})
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		defer close(over)
		t := time.NewTimer(e.live().Linger)
		defer t.Stop()
		select {
		case <-stop:
			return
		case <-done:
			return
		case <-t.C:
		}
		c.mu.Lock()
		c.undiverted = true
		c.mu.Unlock()
		e.host.Reconcile()
		if err := e.dev.Barrier(100 * time.Millisecond); err != nil {
			e.log.Debug("handover: barrier at the linger's end", "vip", c.vip, "err", err)
		}
		// A delivery the VM left (spilled) may still be ordering what
		// its own migration brings: that is the cache's too.
		c.waitPipes(stop, pipeWait)
	}()
	return over, done
}

// pipeWait bounds how long the end of a linger waits for spilled
// deliveries (waitPipes): their own handover streams end with their
// lingers, which began earlier, or fail within handoverIdle.
const pipeWait = handoverIdle
