package wgagent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/control"
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

// ask sends req on the prepared connection, with a.mu held: the claim's
// request goes out before anything else the claim sets off competes for
// the CPU. A failure is kept for fetchHandover, which connects anew.
func (pc *preparedConn) ask(req cache.Request) {
	pc.conn.SetWriteDeadline(time.Now().Add(askTimeout))
	pc.asked = time.Now()
	pc.askErr = cache.SendRequest(pc.conn, req)
	pc.conn.SetWriteDeadline(time.Time{})
}

// Prepare connects to the current owner of a VIP about to arrive here.
func (b backend) Prepare(ctx context.Context, vip netip.Addr) (control.VIP, error) {
	a := b.a
	if a.intercept == nil {
		return control.VIP{}, badRequest("the migration cache is off (--cache=false)")
	}
	vip = vip.Unmap()
	if !vip.Is4() && !vip.Is6() {
		return control.VIP{}, badRequest("not an IP address")
	}
	r, ok := a.cluster.Table().Get(vip)
	if !ok || r.Owner == "" || r.Owner == a.cfg.Name {
		// Nothing to fetch: a new VIP, a released one, or one already here.
		return a.vipStatus(vip), nil
	}
	a.prepMu.Lock()
	pc := a.prepared[vip]
	a.prepMu.Unlock()
	if pc != nil && pc.from == r.Owner && !pc.preview.Ended() {
		return a.vipStatus(vip), nil
	}
	conn, rtt, err := a.dialHandover(ctx, r.Owner, time.Second)
	if err != nil {
		// Not fatal for the VM: the claim connects again.
		return control.VIP{}, fmt.Errorf("prepare %s: connect to its host %s: %w", vip, r.Owner, err)
	}
	if err := setUserTimeout(conn, prepareUserTimeout); err != nil {
		a.log.Debug("prepare: TCP_USER_TIMEOUT", "err", err)
	}
	// Say what for: the owner sends copies of the VIP's cache ahead.
	conn.SetWriteDeadline(time.Now().Add(askTimeout))
	w := cache.NewWriter(conn)
	if err := errors.Join(w.Prepare(cache.Prepare{VIP: vip, Claimer: a.cfg.Name}), w.Flush()); err != nil {
		conn.Close()
		return control.VIP{}, fmt.Errorf("prepare %s: write to its host %s: %w", vip, r.Owner, err)
	}
	conn.SetWriteDeadline(time.Time{})
	if now, _ := a.cluster.Table().Get(vip); now.Owner != r.Owner || now.Epoch != r.Epoch {
		// Claimed while we dialed: Xen's vif hotplug hook (the claim)
		// races the xenstore watch that prepares. Kept, the connection
		// would idle at the old owner until prepareTTL.
		conn.Close()
		a.log.Debug("prepare: the VIP moved while connecting; not kept", "vip", vip, "owner", now.Owner, "epoch", now.Epoch)
		return a.vipStatus(vip), nil
	}
	a.prepMu.Lock()
	if old := a.prepared[vip]; old != nil {
		old.conn.Close()
	}
	if a.prepared == nil {
		a.prepared = map[netip.Addr]*preparedConn{}
	}
	// The claim bounds reading (fetchHandover); until then expirePrepared
	// closes it.
	conn = newIdleConn(conn, prepareTTL+time.Minute)
	pc = &preparedConn{from: r.Owner, conn: conn, dialRTT: rtt, at: time.Now(), preview: cache.NewPreview(conn, a.newQueue)}
	a.prepared[vip] = pc
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		pc.preview.Run()
		if _, _, _, err := pc.preview.Await(); err != nil {
			a.log.Debug("prepared connection ended", "vip", vip, "owner", pc.from, "err", err)
		}
	}()
	a.prepMu.Unlock()
	a.log.Info("prepared for an arriving VM: connected to its host", "vip", vip, "owner", r.Owner, "rtt", rtt)
	return a.vipStatus(vip), nil
}

// closeIdleHandovers closes the accepted connections still waiting for a
// request (Prepare's, from other hosts), so that stopping does not wait
// for them, and refuses new ones.
func (a *Agent) closeIdleHandovers() {
	a.prepMu.Lock()
	defer a.prepMu.Unlock()
	a.closing = true
	for c := range a.waiting {
		c.Close()
	}
}

// takePrepared returns the prepared connection for vip to from, if any,
// and forgets it.
func (a *Agent) takePrepared(vip netip.Addr, from string) *preparedConn {
	a.prepMu.Lock()
	defer a.prepMu.Unlock()
	pc := a.prepared[vip]
	if pc == nil {
		return nil
	}
	delete(a.prepared, vip)
	if pc.from != from {
		pc.conn.Close()
		return nil
	}
	return pc
}

// dropPrepared closes and forgets the prepared connection for vip, if
// any, and says whether there was one.
func (a *Agent) dropPrepared(vip netip.Addr) bool {
	a.prepMu.Lock()
	defer a.prepMu.Unlock()
	pc := a.prepared[vip]
	if pc == nil {
		return false
	}
	pc.conn.Close()
	delete(a.prepared, vip)
	return true
}

// expirePrepared closes prepared connections whose claim never came, or
// all of them when the agent stops (all).
func (a *Agent) expirePrepared(all bool) {
	a.prepMu.Lock()
	defer a.prepMu.Unlock()
	for vip, pc := range a.prepared {
		if all || time.Since(pc.at) > prepareTTL {
			pc.conn.Close()
			delete(a.prepared, vip)
		}
	}
}

// dialHandover makes one attempt to connect to a member's handover port
// and returns the connection with its round trip.
func (a *Agent) dialHandover(ctx context.Context, member string, timeout time.Duration) (net.Conn, time.Duration, error) {
	addr, alive := a.memberOverlay(member)
	if !alive {
		return nil, 0, errNotAlive
	}
	d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: a.cfg.Address.Addr().AsSlice()}}
	t0 := time.Now()
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(addr.String(), strconv.Itoa(a.cfg.HandoverPort)))
	if err != nil {
		return nil, 0, err
	}
	return conn, time.Since(t0), nil
}

var errNotAlive = errors.New("not an alive member")

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
