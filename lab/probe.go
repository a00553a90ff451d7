package lab

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"time"
)

// Reach checks that a TCP connection ("tcp") or a UDP datagram and its echo
// ("udp") gets from VM from to VM to at addr, one of to's VIPs, within
// timeout. It serves the other end itself inside to's namespace, so it
// needs no program in the VMs. A nil error means the traffic went both
// ways; an error says which step failed, so a test of isolation can tell
// "dropped" (a timeout) from a broken lab.
func (l *Lab) Reach(from, to *VM, addr netip.Addr, proto string, timeout time.Duration) error {
	if !slices.Contains(to.VIPs, addr) {
		return fmt.Errorf("lab: Reach: %s is not a VIP of %s", addr, to)
	}
	port := l.probePort()
	dst := net.JoinHostPort(addr.String(), strconv.Itoa(port))
	deadline := time.Now().Add(timeout)
	switch proto {
	case "tcp":
		var ln net.Listener
		if err := inNetNS(to.NS, func() (err error) { ln, err = net.Listen("tcp", dst); return err }); err != nil {
			return fmt.Errorf("lab: Reach: listen in %s: %w", to, err)
		}
		defer ln.Close()
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Write([]byte("ok"))
				c.Close()
			}
		}()
		var conn net.Conn
		err := inNetNS(from.NS, func() (err error) {
			conn, err = net.DialTimeout("tcp", dst, timeout)
			return err
		})
		if err != nil {
			return fmt.Errorf("tcp %s -> %s: %w", from, dst, err)
		}
		defer conn.Close()
		conn.SetDeadline(deadline)
		buf := make([]byte, 2)
		if _, err := conn.Read(buf); err != nil {
			return fmt.Errorf("tcp %s -> %s: read: %w", from, dst, err)
		}
		return nil
	case "udp":
		var srv net.PacketConn
		if err := inNetNS(to.NS, func() (err error) { srv, err = net.ListenPacket("udp", dst); return err }); err != nil {
			return fmt.Errorf("lab: Reach: listen in %s: %w", to, err)
		}
		defer srv.Close()
		go func() {
			buf := make([]byte, 64)
			for {
				n, peer, err := srv.ReadFrom(buf)
				if err != nil {
					return
				}
				srv.WriteTo(buf[:n], peer)
			}
		}()
		var conn net.Conn
		if err := inNetNS(from.NS, func() (err error) { conn, err = net.Dial("udp", dst); return err }); err != nil {
			return fmt.Errorf("udp %s -> %s: %w", from, dst, err)
		}
		defer conn.Close()
		// A few tries: the first datagram may wait for neighbour
		// resolution or a tunnel handshake.
		buf := make([]byte, 64)
		for time.Now().Before(deadline) {
			conn.Write([]byte("probe"))
			try := time.Now().Add(200 * time.Millisecond)
			if try.After(deadline) {
				try = deadline
			}
			conn.SetReadDeadline(try)
			if n, err := conn.Read(buf); err == nil && string(buf[:n]) == "probe" {
				return nil
			}
		}
		return fmt.Errorf("udp %s -> %s: %w", from, dst, errNoEcho)
	}
	return fmt.Errorf("lab: Reach: proto %q: want tcp or udp", proto)
}

var errNoEcho = errors.New("no echo before the deadline")

// SendDatagrams sends UDP datagrams from VM from to VM to at addr, one of
// to's VIPs, and returns how many of them arrived intact within timeout.
// payloads gets the two ends' addresses before anything is sent, so that
// a test can craft datagrams for a given checksum.
func (l *Lab) SendDatagrams(from, to *VM, addr netip.Addr, payloads func(src, dst netip.AddrPort) [][]byte, timeout time.Duration) (int, error) {
	if !slices.Contains(to.VIPs, addr) {
		return 0, fmt.Errorf("lab: SendDatagrams: %s is not a VIP of %s", addr, to)
	}
	dst := netip.AddrPortFrom(addr, uint16(l.probePort()))
	var srv *net.UDPConn
	if err := inNetNS(to.NS, func() (err error) { srv, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(dst)); return err }); err != nil {
		return 0, fmt.Errorf("lab: SendDatagrams: listen in %s: %w", to, err)
	}
	defer srv.Close()
	var conn *net.UDPConn
	if err := inNetNS(from.NS, func() (err error) { conn, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst)); return err }); err != nil {
		return 0, fmt.Errorf("udp %s -> %s: %w", from, dst, err)
	}
	defer conn.Close()
	src := conn.LocalAddr().(*net.UDPAddr).AddrPort()
	want := map[string]int{}
	pkts := payloads(netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), dst)
	for _, p := range pkts {
		want[string(p)]++
		if _, err := conn.Write(p); err != nil {
			return 0, fmt.Errorf("udp %s -> %s: %w", from, dst, err)
		}
	}
	got := 0
	srv.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 65536)
	for got < len(pkts) {
		n, err := srv.Read(buf)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return got, nil
			}
			return got, fmt.Errorf("udp %s -> %s: read: %w", from, dst, err)
		}
		if want[string(buf[:n])] > 0 {
			want[string(buf[:n])]--
			got++
		}
	}
	return got, nil
}

// probePort hands out ports for Reach, apart from iperf3's.
func (l *Lab) probePort() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.nextProbe++
	return 20000 + l.nextProbe%10000
}
