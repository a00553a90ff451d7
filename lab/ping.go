package lab

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/internal/csum"
)

// The lab pings with its own ICMP echo code over a raw socket opened inside
// the VM's namespace, so it needs no ping binary and can count loss, duplicates
// and reordering per sequence number during a migration.

// Ping sends count echo requests from vm from to addr, 200 ms apart, and
// returns nil only when every one was answered within timeout (0 = count*200ms
// + 1s). The error tells how many replies came and the last ICMP error seen.
func (l *Lab) Ping(from *VM, to netip.Addr, count int, timeout time.Duration) error {
	if count < 1 {
		count = 1
	}
	if timeout <= 0 {
		timeout = time.Duration(count)*200*time.Millisecond + time.Second
	}
	s, err := newPingSession(from, to)
	if err != nil {
		return err
	}
	defer s.close()
	deadline := time.NewTimer(timeout)
	defer deadline.Stop()
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	sent := 0
	s.send(uint64(sent))
	sent++
	for {
		if s.receivedCount() >= count {
			return nil
		}
		select {
		case <-tick.C:
			if sent < count {
				s.send(uint64(sent))
				sent++
			}
		case <-s.notify:
		case <-deadline.C:
			st := s.stats()
			return fmt.Errorf("lab: ping %s (%s) -> %s: %d/%d replies within %v%s",
				from.Name, from.NS, to, st.Received, count, timeout, st.errSuffix())
		}
	}
}

// WaitPing sends single pings from vm from to addr until one is answered, for
// up to deadline; it returns the last failure otherwise.
func (l *Lab) WaitPing(from *VM, to netip.Addr, deadline time.Duration) error {
	end := time.Now().Add(deadline)
	for {
		wait := time.Until(end)
		if wait > time.Second {
			wait = time.Second
		}
		if wait < 50*time.Millisecond {
			wait = 50 * time.Millisecond
		}
		err := l.Ping(from, to, 1, wait)
		if err == nil {
			return nil
		}
		if time.Now().After(end) {
			return fmt.Errorf("lab: no reply from %s to %s within %v: %w", from.Name, to, deadline, err)
		}
	}
}

// PingStats is the result of a Pinger.
type PingStats struct {
	Sent       int
	Received   int            // distinct sequence numbers answered
	Duplicates int            // extra replies for an already answered sequence number
	Reordered  int            // replies that arrived after a reply to a later request
	Lost       []uint64       // unanswered sequence numbers (at most the first 1000)
	LostCount  int            // all unanswered sequence numbers
	MinRTT     time.Duration  //
	MaxRTT     time.Duration  //
	AvgRTT     time.Duration  //
	ICMPErrors map[string]int // e.g. "destination unreachable code 1 from 100.100.0.1"
	SendErrors map[string]int // errors from the socket when sending
	Duration   time.Duration  // from the first request to this count
	// LongestLossRun is the longest run of consecutive unanswered sequence
	// numbers; times the interval it approximates the outage.
	LongestLossRun int
	// RTTs of every answered request, in the order the replies came.
	RTTs []time.Duration
}

// RTTPercentile returns the p-th percentile (0 to 100) of the RTTs.
func (st PingStats) RTTPercentile(p float64) time.Duration {
	if len(st.RTTs) == 0 {
		return 0
	}
	s := slices.Clone(st.RTTs)
	slices.Sort(s)
	i := int(p / 100 * float64(len(s)-1))
	return s[min(max(i, 0), len(s)-1)]
}

func (st PingStats) String() string {
	s := fmt.Sprintf("sent %d received %d lost %d dup %d reordered %d rtt min/avg/max %v/%v/%v",
		st.Sent, st.Received, st.LostCount, st.Duplicates, st.Reordered, st.MinRTT, st.AvgRTT, st.MaxRTT)
	return s + st.errSuffix()
}

func (st PingStats) errSuffix() string {
	var parts []string
	for _, m := range []map[string]int{st.ICMPErrors, st.SendErrors} {
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			parts = append(parts, fmt.Sprintf("%s (x%d)", k, m[k]))
		}
	}
	if len(parts) == 0 {
		return ""
	}
	return "; " + strings.Join(parts, ", ")
}

// Pinger sends echo requests at a fixed interval until stopped, to measure
// loss, duplication and reordering across a migration.
type Pinger struct {
	s    *pingSession
	stop chan struct{}
	done chan struct{}
}

// StartPinger starts pinging to from vm from every interval (>= 1 ms). It
// sends nothing while vm is frozen (FreezeVM).
func (l *Lab) StartPinger(from *VM, to netip.Addr, interval time.Duration) (*Pinger, error) {
	if interval < time.Millisecond {
		interval = time.Millisecond
	}
	s, err := newPingSession(from, to)
	if err != nil {
		return nil, err
	}
	p := &Pinger{s: s, stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(p.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for seq := uint64(0); ; {
			// A paused VM sends nothing, and does not catch up later: its
			// clock stopped with it.
			if !l.Frozen(from) {
				s.send(seq)
				seq++
			}
			select {
			case <-p.stop:
				return
			case <-t.C:
			}
		}
	}()
	return p, nil
}

// Stats returns the counts so far without stopping.
func (p *Pinger) Stats() PingStats { return p.s.stats() }

// Stop stops sending, waits up to grace for the outstanding replies, closes
// the socket and returns the final counts.
func (p *Pinger) Stop(grace time.Duration) PingStats {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
	end := time.Now().Add(grace)
	for time.Now().Before(end) {
		st := p.s.stats()
		if st.Received >= st.Sent {
			break
		}
		select {
		case <-p.s.notify:
		case <-time.After(time.Until(end)):
		}
	}
	st := p.s.stats()
	p.s.close()
	return st
}

// pingSession is one raw ICMP socket in a VM namespace plus the state of the
// echo requests sent through it.
type pingSession struct {
	conn   net.PacketConn
	dst    net.Addr
	v6     bool
	id     uint16
	magic  [8]byte
	notify chan struct{} // a reply arrived (buffered 1)
	rdone  chan struct{}

	mu        sync.Mutex
	start     time.Time
	sent      uint64
	got       map[uint64]bool
	dups      int
	reordered int
	maxSeq    uint64
	anyReply  bool
	rttSum    time.Duration
	rttMin    time.Duration
	rttMax    time.Duration
	rtts      []time.Duration
	icmpErrs  map[string]int
	sendErrs  map[string]int
	closeOnce sync.Once
}

func newPingSession(from *VM, to netip.Addr) (*pingSession, error) {
	if from == nil {
		return nil, errors.New("lab: ping: nil VM")
	}
	to = to.Unmap()
	s := &pingSession{
		v6:       to.Is6(),
		dst:      &net.IPAddr{IP: to.AsSlice(), Zone: to.Zone()},
		notify:   make(chan struct{}, 1),
		rdone:    make(chan struct{}),
		got:      map[uint64]bool{},
		icmpErrs: map[string]int{},
		sendErrs: map[string]int{},
	}
	var b [10]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	s.id = binary.BigEndian.Uint16(b[:2])
	copy(s.magic[:], b[2:])

	network, laddr := "ip4:icmp", "0.0.0.0"
	if s.v6 {
		network, laddr = "ip6:ipv6-icmp", "::"
	}
	if src := from.firstVIP(s.v6); src.IsValid() {
		laddr = src.String()
	}
	err := inNetNS(from.NS, func() error {
		c, err := net.ListenPacket(network, laddr)
		s.conn = c
		if err != nil {
			return err
		}
		// Replies to pings a migration held come back in a burst; the
		// default 208 KiB buffer holds about 300 of them.
		if sc, ok := c.(syscall.Conn); ok {
			if raw, err := sc.SyscallConn(); err == nil {
				raw.Control(func(fd uintptr) {
					unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
				})
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("lab: ping socket in %s: %w", from.NS, err)
	}
	go s.read()
	return s, nil
}

func (s *pingSession) close() {
	s.closeOnce.Do(func() {
		s.conn.Close()
		<-s.rdone
	})
}

// send sends the echo request with sequence number seq.
func (s *pingSession) send(seq uint64) {
	pkt := make([]byte, 64) // 8 header + 56 payload, like ping
	if s.v6 {
		pkt[0] = 128
	} else {
		pkt[0] = 8
	}
	binary.BigEndian.PutUint16(pkt[4:], s.id)
	binary.BigEndian.PutUint16(pkt[6:], uint16(seq))
	copy(pkt[8:], s.magic[:])
	binary.BigEndian.PutUint64(pkt[16:], seq)
	now := time.Now()
	binary.BigEndian.PutUint64(pkt[24:], uint64(now.UnixNano()))
	if !s.v6 { // the kernel fills in the ICMPv6 checksum
		binary.BigEndian.PutUint16(pkt[2:], csum.Checksum(pkt))
	}
	s.mu.Lock()
	if s.start.IsZero() {
		s.start = now
	}
	if seq+1 > s.sent {
		s.sent = seq + 1
	}
	s.mu.Unlock()
	if _, err := s.conn.WriteTo(pkt, s.dst); err != nil {
		s.mu.Lock()
		s.sendErrs[trimOpErr(err)]++
		s.mu.Unlock()
	}
}

func (s *pingSession) read() {
	defer close(s.rdone)
	buf := make([]byte, 2048)
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if err != nil {
			return // closed
		}
		s.handle(buf[:n], from)
	}
}

func (s *pingSession) handle(b []byte, from net.Addr) {
	if len(b) < 8 {
		return
	}
	typ, code := b[0], b[1]
	echoReply, echoReq := byte(0), byte(8)
	if s.v6 {
		echoReply, echoReq = 129, 128
	}
	switch {
	case typ == echoReply:
		if len(b) < 32 || binary.BigEndian.Uint16(b[4:]) != s.id || string(b[8:16]) != string(s.magic[:]) {
			return
		}
		seq := binary.BigEndian.Uint64(b[16:])
		rtt := time.Since(time.Unix(0, int64(binary.BigEndian.Uint64(b[24:]))))
		s.mu.Lock()
		if s.got[seq] {
			s.dups++
		} else {
			s.got[seq] = true
			if s.anyReply && seq < s.maxSeq {
				s.reordered++
			}
			if !s.anyReply || seq > s.maxSeq {
				s.maxSeq = seq
			}
			s.anyReply = true
			s.rttSum += rtt
			s.rtts = append(s.rtts, rtt)
			if s.rttMin == 0 || rtt < s.rttMin {
				s.rttMin = rtt
			}
			if rtt > s.rttMax {
				s.rttMax = rtt
			}
		}
		s.mu.Unlock()
		select {
		case s.notify <- struct{}{}:
		default:
		}
	case !s.v6 && (typ == 3 || typ == 11 || typ == 5), s.v6 && (typ >= 1 && typ <= 4):
		// An ICMP error quoting one of our requests?
		inner := b[8:]
		var q []byte
		if s.v6 {
			if len(inner) < 40+8 || inner[6] != 58 {
				return
			}
			q = inner[40:]
		} else {
			if len(inner) < 20 {
				return
			}
			ihl := int(inner[0]&0x0f) * 4
			if len(inner) < ihl+8 || inner[9] != 1 {
				return
			}
			q = inner[ihl:]
		}
		if q[0] != echoReq || binary.BigEndian.Uint16(q[4:]) != s.id {
			return
		}
		s.mu.Lock()
		s.icmpErrs[fmt.Sprintf("%s code %d from %s", icmpName(s.v6, typ), code, from)]++
		s.mu.Unlock()
	}
}

func (s *pingSession) receivedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.got)
}

func (s *pingSession) stats() PingStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := PingStats{
		Sent:       int(s.sent),
		Received:   len(s.got),
		Duplicates: s.dups,
		Reordered:  s.reordered,
		MinRTT:     s.rttMin,
		MaxRTT:     s.rttMax,
		RTTs:       slices.Clone(s.rtts),
		ICMPErrors: map[string]int{},
		SendErrors: map[string]int{},
	}
	if !s.start.IsZero() {
		st.Duration = time.Since(s.start)
	}
	if len(s.got) > 0 {
		st.AvgRTT = s.rttSum / time.Duration(len(s.got))
	}
	run := 0
	for seq := uint64(0); seq < s.sent; seq++ {
		if s.got[seq] {
			run = 0
		} else {
			run++
			st.LongestLossRun = max(st.LongestLossRun, run)
			st.LostCount++
			if len(st.Lost) < 1000 {
				st.Lost = append(st.Lost, seq)
			}
		}
	}
	for k, v := range s.icmpErrs {
		st.ICMPErrors[k] = v
	}
	for k, v := range s.sendErrs {
		st.SendErrors[k] = v
	}
	return st
}

func icmpName(v6 bool, typ byte) string {
	if v6 {
		switch typ {
		case 1:
			return "destination unreachable"
		case 2:
			return "packet too big"
		case 3:
			return "time exceeded"
		case 4:
			return "parameter problem"
		}
	} else {
		switch typ {
		case 3:
			return "destination unreachable"
		case 5:
			return "redirect"
		case 11:
			return "time exceeded"
		}
	}
	return fmt.Sprintf("icmp type %d", typ)
}

func trimOpErr(err error) string {
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Err != nil {
		return "send: " + oe.Err.Error()
	}
	return "send: " + err.Error()
}

// inNetNS runs fn on an OS thread switched into network namespace ns.
// Sockets fn creates stay in ns after the thread switches back.
func inNetNS(ns string, fn func() error) error {
	target, err := os.Open(filepath.Join(netnsDir, ns))
	if err != nil {
		return fmt.Errorf("lab: open netns %s: %w", ns, err)
	}
	defer target.Close()
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()))
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer orig.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("lab: setns %s: %w", ns, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: the runtime discards it when this
			// goroutine ends, so no other goroutine runs in ns.
			errc <- errors.Join(ferr, fmt.Errorf("lab: setns back: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
