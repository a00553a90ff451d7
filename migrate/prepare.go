package migrate

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/cache"
)

// A prepared handover connection is opened when a hypervisor says a VM is
// about to arrive (libvirt's prepare hook, `vmroam migrate prepare`), so
// that at the claim the request goes out at once: the first cached packet
// then comes one round trip after the claim instead of two, which is most
// of a handover across a WAN.
const (
	// prepareTTL is how long a prepared connection waits for its claim:
	// a live migration copies memory for minutes before the switch-over.
	prepareTTL = 30 * time.Minute
	// prepareUserTimeout bounds how long a request on a prepared
	// connection may go unacknowledged (TCP_USER_TIMEOUT): a peer that
	// restarted meanwhile is then found out fast and a new connection
	// made, instead of waiting for TCP's retransmissions to give up.
	prepareUserTimeout = 2 * time.Second
	// maxIdleHandovers bounds the connections one address may keep open
	// at the source before sending its request.
	maxIdleHandovers = 64
)

// preparedConn is a handover connection opened before the claim.
type preparedConn struct {
	from    string // the owner it was opened to
	conn    net.Conn
	dialRTT time.Duration
	at      time.Time
	// preview reads the copies of the cache the owner sends ahead, and
	// then its answer.
	preview *cache.Preview
	// Set by ask.
	asked  time.Time
	askErr error
}

// askTimeout bounds the write of a request on a prepared connection. It
// is a few dozen bytes on an idle connection: the kernel takes them at
// once unless the connection is broken.
const askTimeout = 100 * time.Millisecond

// ask sends req on the prepared connection, with the agent lock held: the claim's
// request goes out before anything else the claim sets off competes for
// the CPU. A failure is kept for fetchHandover, which connects anew.
func (pc *preparedConn) ask(req cache.Request) {
	pc.conn.SetWriteDeadline(time.Now().Add(askTimeout))
	pc.asked = time.Now()
	pc.askErr = cache.SendRequest(pc.conn, req)
	pc.conn.SetWriteDeadline(time.Time{})
}

// Prepare connects to the current owner of vip, a VIP about to arrive
// here. The cache must be on.
func (e *Engine) Prepare(ctx context.Context, vip netip.Addr) error {
	r, ok := e.host.Record(vip)
	if !ok || r.Owner == "" || r.Owner == e.cfg.Name {
		// Nothing to fetch: a new VIP, a released one, or one already here.
		return nil
	}
	e.prepMu.Lock()
	pc := e.prepared[vip]
	e.prepMu.Unlock()
	if pc != nil && pc.from == r.Owner && !pc.preview.Ended() {
		return nil
	}
	conn, rtt, err := e.host.Dial(ctx, r.Owner, time.Second)
	if err != nil {
		// Not fatal for the VM: the claim connects again.
		return fmt.Errorf("prepare %s: connect to its host %s: %w", vip, r.Owner, err)
	}
	if err := setUserTimeout(conn, prepareUserTimeout); err != nil {
		e.log.Debug("prepare: TCP_USER_TIMEOUT", "err", err)
	}
	// Say what for: the owner sends copies of the VIP's cache ahead.
	conn.SetWriteDeadline(time.Now().Add(askTimeout))
	w := cache.NewWriter(conn)
	if err := errors.Join(w.Prepare(cache.Prepare{VIP: vip, Claimer: e.cfg.Name}), w.Flush()); err != nil {
		conn.Close()
		return fmt.Errorf("prepare %s: write to its host %s: %w", vip, r.Owner, err)
	}
	conn.SetWriteDeadline(time.Time{})
	if now, _ := e.host.Record(vip); now.Owner != r.Owner || now.Epoch != r.Epoch {
		// Claimed while we dialed: Xen's vif hotplug hook (the claim)
		// races the xenstore watch that prepares. Kept, the connection
		// would idle at the old owner until prepareTTL.
		conn.Close()
		e.log.Debug("prepare: the VIP moved while connecting; not kept", "vip", vip, "owner", now.Owner, "epoch", now.Epoch)
		return nil
	}
	e.prepMu.Lock()
	if e.closing {
		e.prepMu.Unlock()
		conn.Close()
		return errors.New("the agent is stopping")
	}
	if old := e.prepared[vip]; old != nil {
		old.conn.Close()
	}
	if e.prepared == nil {
		e.prepared = map[netip.Addr]*preparedConn{}
	}
	// The claim bounds reading (fetchHandover); until then expirePrepared
	// closes it.
	conn = newIdleConn(conn, prepareTTL+time.Minute)
	pc = &preparedConn{from: r.Owner, conn: conn, dialRTT: rtt, at: time.Now(), preview: cache.NewPreview(conn, e.newQueue)}
	e.prepared[vip] = pc
	e.bg.Add(1)
	go func() {
		defer e.bg.Done()
		pc.preview.Run()
		if _, _, _, err := pc.preview.Await(); err != nil {
			e.log.Debug("prepared connection ended", "vip", vip, "owner", pc.from, "err", err)
		}
	}()
	e.prepMu.Unlock()
	e.log.Info("prepared for an arriving VM: connected to its host", "vip", vip, "owner", r.Owner, "rtt", rtt)
	return nil
}

// closeIdleHandovers closes the accepted connections still waiting for a
// request (Prepare's, from other hosts), so that stopping does not wait
// for them, and refuses new ones.
func (e *Engine) closeIdleHandovers() {
	e.prepMu.Lock()
	defer e.prepMu.Unlock()
	e.closing = true
	for c := range e.waiting {
		c.Close()
	}
}

// takePrepared returns the prepared connection for vip to from, if any,
// and forgets it.
func (e *Engine) takePrepared(vip netip.Addr, from string) *preparedConn {
	e.prepMu.Lock()
	defer e.prepMu.Unlock()
	pc := e.prepared[vip]
	if pc == nil {
		return nil
	}
	delete(e.prepared, vip)
	if pc.from != from {
		pc.conn.Close()
		return nil
	}
	return pc
}

// DropPrepared closes and forgets the prepared connection for vip, if
// any, and says whether there was one.
func (e *Engine) DropPrepared(vip netip.Addr) bool {
	e.prepMu.Lock()
	defer e.prepMu.Unlock()
	pc := e.prepared[vip]
	if pc == nil {
		return false
	}
	pc.conn.Close()
	delete(e.prepared, vip)
	return true
}

// ExpirePrepared closes prepared connections whose claim never came.
func (e *Engine) ExpirePrepared() { e.expirePrepared(false) }

// expirePrepared closes prepared connections whose claim never came, or
// all of them when the engine stops (all).
func (e *Engine) expirePrepared(all bool) {
	e.prepMu.Lock()
	defer e.prepMu.Unlock()
	for vip, pc := range e.prepared {
		if all || time.Since(pc.at) > prepareTTL {
			pc.conn.Close()
			delete(e.prepared, vip)
		}
	}
}

func setUserTimeout(conn net.Conn, d time.Duration) error {
	sc, ok := conn.(syscall.Conn)
	if !ok {
		return errors.New("not a socket")
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	})
	return errors.Join(err, serr)
}
