package doctor

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/internal/csum"
)

// smallPing is the size of the ping that shows a peer answers at all.
const smallPing = 84

// maxProbed is how many endpoints fit in the 16-bit sequence numbers, two
// pings each; endpoints past it count as not answering.
const maxProbed = 1 << 15

// answer is what came back from one endpoint.
type answer struct {
	small, big bool       // echo replies
	tooBig     int        // the MTU a router reported for the big ping, 0 if none
	reporter   netip.Addr // the router that reported it
}

// probeMTU sends every endpoint a small ping and a ping as large as a full
// tunnel packet, both with Don't Fragment, and waits cfg.ProbeWait for the
// answers (resending halfway). A router whose next link is smaller answers
// the big one with "fragmentation needed" / "packet too big": that is a
// Fail. A big ping lost while the small one came back is a black hole
// (Warn). A peer that answers no ping tells nothing (Info). It returns the
// endpoints with no problem found and how many of them answered the big
// ping.
func probeMTU(cfg Config, eps []endpoint, tunMTU int) (ok []endpoint, confirmed int, results []Result) {
	answers, err := ping(eps, tunMTU, cfg.ProbeWait)
	if err != nil {
		return eps, 0, []Result{{Check: "mtu", Level: Info, Found: fmt.Sprintf("path MTU not probed: %v", err), Fix: "run vmroam doctor as root to probe"}}
	}
	var silent []string
	for i, e := range eps {
		a := answers[i]
		need := tunMTU + overhead(e.addr)
		switch {
		case a.tooBig > 0 && a.tooBig < need:
			results = append(results, Result{Check: "mtu", Level: Fail,
				Found: fmt.Sprintf("to %s: router %s on the path forwards at most %d bytes, a full tunnel packet is %d (MTU %d + %d): every full packet is fragmented, and lost where fragments or ICMP are filtered", e, a.reporter, a.tooBig, need, tunMTU, overhead(e.addr)),
				Fix:   mtuFix(a.tooBig-overhead(e.addr), "", false, need)})
		case a.big:
			confirmed++
			ok = append(ok, e)
		case a.small:
			results = append(results, Result{Check: "mtu", Level: Warn,
				Found: fmt.Sprintf("%s answers small pings but not one of %d bytes with Don't Fragment: an MTU black hole (a smaller link further on whose ICMP \"fragmentation needed\" is filtered) drops full tunnel packets", e, need),
				Fix:   fmt.Sprintf("find the largest MTU for which `%s` answers and use it: --mtu MTU (mtu = MTU in the config file)", pingCommand(e))})
		default:
			silent = append(silent, e.String())
			ok = append(ok, e)
		}
	}
	if len(silent) > 0 {
		results = append(results, Result{Check: "mtu", Level: Info,
			Found: fmt.Sprintf("%d hosts answer no ping, their path MTU was checked on this host only: %s", len(silent), strings.Join(silent, ", "))})
	}
	return ok, confirmed, results
}

// ping probes every endpoint over raw ICMP sockets, one per address family,
// made on the calling thread (so in its network namespace). Reading and
// writing happen on that thread too, with poll: a doctor run is short.
func ping(eps []endpoint, tunMTU int, wait time.Duration) ([]answer, error) {
	var idb [2]byte
	rand.Read(idb[:])
	id := binary.BigEndian.Uint16(idb[:])
	socks := map[bool]int{} // by Is4
	defer func() {
		for _, fd := range socks {
			unix.Close(fd)
		}
	}()
	for _, e := range eps {
		v4 := e.addr.Is4()
		if _, ok := socks[v4]; ok {
			continue
		}
		fd, err := icmpSocket(v4)
		if err != nil {
			return nil, err
		}
		socks[v4] = fd
	}
	answers := make([]answer, len(eps))
	send := func() {
		for i, e := range eps {
			if i >= maxProbed {
				break
			}
			if answers[i].big || answers[i].tooBig > 0 {
				continue
			}
			fd := socks[e.addr.Is4()]
			if !answers[i].small {
				sendEcho(fd, e.addr, id, uint16(2*i), smallPing)
			}
			sendEcho(fd, e.addr, id, uint16(2*i+1), tunMTU+overhead(e.addr))
		}
	}
	send()
	deadline, resendAt := time.Now().Add(wait), time.Now().Add(wait/2)
	resent := false
	buf := make([]byte, 65536)
	for {
		now := time.Now()
		if !resent && !now.Before(resendAt) {
			send()
			resent = true
		}
		if !now.Before(deadline) || allAnswered(answers) {
			return answers, nil
		}
		next := deadline
		if !resent {
			next = resendAt
		}
		var pfds []unix.PollFd
		for _, fd := range socks {
			pfds = append(pfds, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
		}
		if _, err := unix.Poll(pfds, int(next.Sub(now).Milliseconds())+1); err != nil && !errors.Is(err, unix.EINTR) {
			return nil, fmt.Errorf("poll: %w", err)
		}
		for v4, fd := range socks {
			for {
				n, from, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
				if err != nil {
					break
				}
				var src netip.Addr
				switch sa := from.(type) {
				case *unix.SockaddrInet4:
					src = netip.AddrFrom4(sa.Addr)
				case *unix.SockaddrInet6:
					src = netip.AddrFrom16(sa.Addr)
				}
				seq, kind, mtu, ok := parseICMP(buf[:n], v4, id)
				if !ok || int(seq/2) >= len(eps) {
					continue
				}
				a := &answers[seq/2]
				switch {
				case kind == echoReply && src == eps[seq/2].addr && seq%2 == 0:
					a.small = true
				case kind == echoReply && src == eps[seq/2].addr:
					a.big = true
				case kind == tooBig && seq%2 == 1:
					a.tooBig, a.reporter = mtu, src
				}
			}
		}
	}
}

func allAnswered(answers []answer) bool {
	for _, a := range answers {
		if !a.big && a.tooBig == 0 {
			return false
		}
	}
	return true
}

// icmpSocket opens a raw ICMP socket whose packets carry Don't Fragment and
// ignore a path MTU the kernel learnt before: each probe measures anew.
func icmpSocket(v4 bool) (int, error) {
	family, proto, level, opt, probe := unix.AF_INET, unix.IPPROTO_ICMP, unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_PROBE
	if !v4 {
		family, proto, level, opt, probe = unix.AF_INET6, unix.IPPROTO_ICMPV6, unix.IPPROTO_IPV6, unix.IPV6_MTU_DISCOVER, unix.IPV6_PMTUDISC_PROBE
	}
	fd, err := unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, proto)
	if err != nil {
		return -1, fmt.Errorf("raw ICMP socket: %w", err)
	}
	if err := unix.SetsockoptInt(fd, level, opt, probe); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("raw ICMP socket: set Don't Fragment: %w", err)
	}
	return fd, nil
}

// sendEcho sends an echo request making an IP packet of size bytes. A send
// that fails counts as unanswered.
func sendEcho(fd int, dst netip.Addr, id, seq uint16, size int) {
	hdr, typ := 20, byte(8)
	if dst.Is6() {
		hdr, typ = 40, 128
	}
	msg := make([]byte, max(size-hdr, 8))
	msg[0] = typ
	binary.BigEndian.PutUint16(msg[4:], id)
	binary.BigEndian.PutUint16(msg[6:], seq)
	copy(msg[8:], "vmroam doctor: path MTU probe")
	if dst.Is4() {
		binary.BigEndian.PutUint16(msg[2:], csum.Checksum(msg)) // the kernel does ICMPv6's
		unix.Sendto(fd, msg, 0, &unix.SockaddrInet4{Addr: dst.As4()})
		return
	}
	unix.Sendto(fd, msg, 0, &unix.SockaddrInet6{Addr: dst.As16()})
}

type icmpKind int

const (
	echoReply icmpKind = iota + 1
	tooBig
)

// parseICMP reads an echo reply to one of our requests, or a router's
// "fragmentation needed" / "packet too big" about one of them, with the MTU
// it allows. A raw IPv4 socket delivers the IP header too, an IPv6 one not.
func parseICMP(b []byte, v4 bool, id uint16) (seq uint16, kind icmpKind, mtu int, ok bool) {
	if v4 {
		if len(b) < 20 {
			return 0, 0, 0, false
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || len(b) < ihl {
			return 0, 0, 0, false
		}
		b = b[ihl:]
	}
	if len(b) < 8 {
		return 0, 0, 0, false
	}
	echoType, replyType, errType := byte(8), byte(0), byte(3)
	if !v4 {
		echoType, replyType, errType = 128, 129, 2
	}
	switch {
	case b[0] == replyType && binary.BigEndian.Uint16(b[4:]) == id:
		return binary.BigEndian.Uint16(b[6:]), echoReply, 0, true
	case b[0] == errType && (!v4 || b[1] == 4): // IPv4: code 4, fragmentation needed
		var inner []byte
		if v4 {
			mtu = int(binary.BigEndian.Uint16(b[6:]))
			ip := b[8:]
			if len(ip) < 20 || ip[9] != unix.IPPROTO_ICMP {
				return 0, 0, 0, false
			}
			ihl := int(ip[0]&0x0f) * 4
			if ihl < 20 || len(ip) < ihl {
				return 0, 0, 0, false
			}
			inner = ip[ihl:]
		} else {
			mtu = int(binary.BigEndian.Uint32(b[4:]))
			ip := b[8:]
			if len(ip) < 40 || ip[6] != unix.IPPROTO_ICMPV6 {
				return 0, 0, 0, false
			}
			inner = ip[40:]
		}
		if len(inner) < 8 || inner[0] != echoType || binary.BigEndian.Uint16(inner[4:]) != id {
			return 0, 0, 0, false
		}
		return binary.BigEndian.Uint16(inner[6:]), tooBig, mtu, true
	}
	return 0, 0, 0, false
}
