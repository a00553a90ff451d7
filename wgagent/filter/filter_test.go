package filter

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netns"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/internal/netnstest"
)

// How long a packet that should pass gets, and how long the tests wait to
// be sure one that should be dropped really was. Inside one machine a
// delivered packet arrives in well under a millisecond.
const (
	passTimeout = 3 * time.Second
	dropTimeout = 400 * time.Millisecond
)

// vm is a namespace standing for a VM behind its own veth into the router.
type vm struct {
	ns         string
	link       string // the router's end of the veth
	addr4      netip.Addr
	addr6      netip.Addr
	net4, net6 netip.Prefix
}

// lab is a router namespace and three VMs: a1 and a2 in network A, b1 in
// network B. VMs reach the router through the anycast gateway, as in
// vmroam's data plane, so every VM-to-VM packet is forwarded.
type lab struct {
	router     string
	a1, a2, b1 vm
}

var (
	netA4 = netip.MustParsePrefix("100.64.1.0/24")
	netA6 = netip.MustParsePrefix("fd00:64:1::/64")
	netB4 = netip.MustParsePrefix("100.64.2.0/24")
	netB6 = netip.MustParsePrefix("fd00:64:2::/64")
)

func networksAB() []Network {
	return []Network{
		{Name: "A", Prefix: netA4}, {Name: "A6", Prefix: netA6},
		{Name: "B", Prefix: netB4}, {Name: "B6", Prefix: netB6},
	}
}

func needRoot(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("network namespace test: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	for _, tool := range []string{"ip", "nft"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("needs %s (scripts/install-deps.sh installs it)", tool)
		}
	}
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func newLab(t *testing.T) *lab {
	t.Helper()
	needRoot(t)
	var rnd [2]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		t.Fatal(err)
	}
	prefix := "vrf" + hex.EncodeToString(rnd[:]) + "-"
	l := &lab{
		router: prefix + "r",
		a1:     vm{ns: prefix + "a1", link: "a1", addr4: netip.MustParseAddr("100.64.1.11"), addr6: netip.MustParseAddr("fd00:64:1::11"), net4: netA4, net6: netA6},
		a2:     vm{ns: prefix + "a2", link: "a2", addr4: netip.MustParseAddr("100.64.1.12"), addr6: netip.MustParseAddr("fd00:64:1::12"), net4: netA4, net6: netA6},
		b1:     vm{ns: prefix + "b1", link: "b1", addr4: netip.MustParseAddr("100.64.2.11"), addr6: netip.MustParseAddr("fd00:64:2::11"), net4: netB4, net6: netB6},
	}
	for _, ns := range []string{l.router, l.a1.ns, l.a2.ns, l.b1.ns} {
		run(t, "ip", "netns", "add", ns)
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
				t.Errorf("delete namespace %s: %v %s", ns, err, out)
			}
		})
		// DAD would keep the IPv6 addresses unusable for a second or so.
		sysctl(t, ns, "net/ipv6/conf/all/accept_dad", "0")
		sysctl(t, ns, "net/ipv6/conf/default/accept_dad", "0")
		run(t, "ip", "-n", ns, "link", "set", "lo", "up")
	}
	sysctl(t, l.router, "net/ipv4/ip_forward", "1")
	sysctl(t, l.router, "net/ipv6/conf/all/forwarding", "1")
	for _, v := range []vm{l.a1, l.a2, l.b1} {
		r, n := l.router, v.ns
		run(t, "ip", "link", "add", v.link, "netns", r, "type", "veth", "peer", "name", "eth0", "netns", n)
		run(t, "ip", "-n", n, "link", "set", "eth0", "up")
		run(t, "ip", "-n", n, "addr", "add", v.addr4.String()+"/32", "dev", "eth0")
		run(t, "ip", "-n", n, "addr", "add", v.addr6.String()+"/128", "dev", "eth0", "nodad")
		run(t, "ip", "-n", n, "route", "add", "default", "via", "169.254.0.1", "dev", "eth0", "onlink")
		run(t, "ip", "-n", n, "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0")
		run(t, "ip", "-n", r, "link", "set", v.link, "up")
		run(t, "ip", "-n", r, "addr", "add", "169.254.0.1/32", "dev", v.link)
		run(t, "ip", "-n", r, "addr", "add", "fe80::1/64", "dev", v.link, "nodad")
		run(t, "ip", "-n", r, "route", "add", v.addr4.String()+"/32", "dev", v.link)
		run(t, "ip", "-n", r, "-6", "route", "add", v.addr6.String()+"/128", "dev", v.link)
	}
	return l
}

func sysctl(t *testing.T, ns, key, value string) {
	t.Helper()
	// /proc/sys/net shows the namespace of the thread that opens it.
	if _, err := inNS(ns, func() (struct{}, error) {
		return struct{}{}, os.WriteFile("/proc/sys/"+key, []byte(value), 0o644)
	}); err != nil {
		t.Fatalf("%s: sysctl %s=%s: %v", ns, key, value, err)
	}
}

// inNS calls f on a fresh OS thread switched into the named namespace.
// Sockets f opens stay in that namespace and may be used from any
// goroutine afterwards.
func inNS[T any](ns string, f func() (T, error)) (T, error) {
	type result struct {
		v   T
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the runtime then ends the thread with the
		// goroutine, so no other goroutine runs in the wrong namespace.
		runtime.LockOSThread()
		h, err := netns.GetFromName(ns)
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer h.Close()
		if err := netns.Set(h); err != nil {
			ch <- result{err: err}
			return
		}
		v, err := f()
		ch <- result{v, err}
	}()
	r := <-ch
	return r.v, r.err
}

// routerTable opens the filter table in the lab's router namespace.
func (l *lab) routerTable(t *testing.T) *Table {
	t.Helper()
	h, err := netns.GetFromName(l.router)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	tab, err := NewInNamespace("", int(h))
	if err != nil {
		t.Fatal(err)
	}
	return tab
}

func addrPort(a netip.Addr) string { return net.JoinHostPort(a.String(), "0") }

// udpPasses reports whether a datagram from src reaches dst within timeout.
func udpPasses(t *testing.T, src, dst vm, v6 bool, timeout time.Duration) bool {
	t.Helper()
	from, to := src.addr4, dst.addr4
	if v6 {
		from, to = src.addr6, dst.addr6
	}
	ln, err := inNS(dst.ns, func() (net.PacketConn, error) { return net.ListenPacket("udp", addrPort(to)) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := inNS(src.ns, func() (net.Conn, error) {
		return net.DialUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(from, 0)), net.UDPAddrFromAddrPort(ln.LocalAddr().(*net.UDPAddr).AddrPort()))
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	for end := time.Now().Add(timeout); time.Now().Before(end); {
		if _, err := c.Write([]byte("hello")); err != nil {
			t.Fatal(err)
		}
		_ = ln.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if n, _, err := ln.ReadFrom(buf); err == nil && string(buf[:n]) == "hello" {
			return true
		}
	}
	return false
}

// tcpPasses reports whether a TCP connection from src to dst is set up
// within timeout.
func tcpPasses(t *testing.T, src, dst vm, v6 bool, timeout time.Duration) bool {
	t.Helper()
	from, to := src.addr4, dst.addr4
	if v6 {
		from, to = src.addr6, dst.addr6
	}
	ln, err := inNS(dst.ns, func() (net.Listener, error) { return net.Listen("tcp", addrPort(to)) })
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer ln.Close()
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	})
	c, err := inNS(src.ns, func() (net.Conn, error) {
		d := net.Dialer{Timeout: timeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
		return d.Dial("tcp", ln.Addr().String())
	})
	if err != nil {
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return false
		}
		t.Fatalf("dial %s: %v", ln.Addr(), err)
	}
	c.Close()
	return true
}

// icmpConn opens a raw ICMP socket of one family in ns.
func icmpConn(t *testing.T, ns string, v6 bool) *icmp.PacketConn {
	t.Helper()
	c, err := inNS(ns, func() (*icmp.PacketConn, error) {
		if v6 {
			return icmp.ListenPacket("ip6:ipv6-icmp", "::")
		}
		return icmp.ListenPacket("ip4:icmp", "0.0.0.0")
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func icmpProto(v6 bool) int {
	if v6 {
		return 58
	}
	return 1
}

// receiveICMP waits for a message on c for which match is true.
func receiveICMP(c *icmp.PacketConn, v6 bool, timeout time.Duration, match func(*icmp.Message) bool) bool {
	buf := make([]byte, 1500)
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	for {
		n, _, err := c.ReadFrom(buf)
		if err != nil {
			return false
		}
		m, err := icmp.ParseMessage(icmpProto(v6), buf[:n])
		if err == nil && match(m) {
			return true
		}
	}
}

func sendICMP(t *testing.T, c *icmp.PacketConn, to netip.Addr, m icmp.Message) {
	t.Helper()
	// The kernel fills in the ICMPv6 checksum of raw sockets itself.
	b, err := m.Marshal(nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.WriteTo(b, &net.IPAddr{IP: to.AsSlice()}); err != nil {
		t.Fatal(err)
	}
}

// pingPasses reports whether src gets an echo reply from dst.
func pingPasses(t *testing.T, src, dst vm, v6 bool, timeout time.Duration) bool {
	t.Helper()
	c := icmpConn(t, src.ns, v6)
	defer c.Close()
	to := dst.addr4
	var req, reply icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	if v6 {
		to = dst.addr6
		req, reply = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	id := os.Getpid() & 0xffff
	for seq := 1; seq <= 3; seq++ {
		sendICMP(t, c, to, icmp.Message{Type: req, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("vmroam")}})
		if receiveICMP(c, v6, timeout/3, func(m *icmp.Message) bool {
			e, ok := m.Body.(*icmp.Echo)
			return m.Type == reply && ok && e.ID == id && e.Seq == seq
		}) {
			return true
		}
	}
	return false
}

// pmtuErrorPasses sends from src to dst the ICMP error path MTU discovery
// lives on (fragmentation needed, packet too big), quoting a packet dst
// could have sent to src, and reports whether dst gets it.
func pmtuErrorPasses(t *testing.T, src, dst vm, v6 bool) bool {
	t.Helper()
	rx := icmpConn(t, dst.ns, v6)
	defer rx.Close()
	tx := icmpConn(t, src.ns, v6)
	defer tx.Close()
	var m icmp.Message
	to := dst.addr4
	if v6 {
		to = dst.addr6
		quoted := make([]byte, 48)
		quoted[0] = 0x60
		quoted[6] = unix.IPPROTO_UDP
		copy(quoted[8:], dst.addr6.AsSlice())
		copy(quoted[24:], src.addr6.AsSlice())
		m = icmp.Message{Type: ipv6.ICMPTypePacketTooBig, Body: &icmp.PacketTooBig{MTU: 1280, Data: quoted}}
	} else {
		quoted := make([]byte, 28)
		quoted[0] = 0x45
		quoted[9] = unix.IPPROTO_UDP
		copy(quoted[12:], dst.addr4.AsSlice())
		copy(quoted[16:], src.addr4.AsSlice())
		// Code 4 is "fragmentation needed"; the next-hop MTU is in the
		// unused field, which x/net/icmp does not model, so it stays 0.
		m = icmp.Message{Type: ipv4.ICMPTypeDestinationUnreachable, Code: 4, Body: &icmp.DstUnreach{Data: quoted}}
	}
	sendICMP(t, tx, to, m)
	return receiveICMP(rx, v6, passTimeout, func(got *icmp.Message) bool { return got.Type == m.Type && got.Code == m.Code })
}

// dropCounts reads the packet counters of the isolation rules, by network.
func dropCounts(t *testing.T, tab *Table) map[string]uint64 {
	t.Helper()
	c, err := tab.conn()
	if err != nil {
		t.Fatal(err)
	}
	nt := &nftables.Table{Family: nftables.TableFamilyINet, Name: tab.name}
	rules, err := c.GetRules(nt, &nftables.Chain{Table: nt, Name: chainForward})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]uint64{}
	for _, r := range rules {
		comment, _ := userdata.GetString(r.UserData, userdata.TypeComment)
		name, ok := strings.CutPrefix(comment, "isolate ")
		if !ok {
			continue
		}
		for _, e := range r.Exprs {
			if c, ok := e.(*expr.Counter); ok {
				out[name] = c.Packets
			}
		}
	}
	return out
}

func TestIsolation(t *testing.T) {
	l := newLab(t)
	tab := l.routerTable(t)

	// Before any table, everything passes: the lab itself works.
	for _, v6 := range []bool{false, true} {
		if !udpPasses(t, l.a1, l.b1, v6, passTimeout) {
			t.Fatalf("v6=%v: a1 -> b1 UDP fails without any filter: the lab is broken", v6)
		}
	}

	r := Ruleset{Networks: networksAB()}
	if err := tab.Apply(r); err != nil {
		t.Fatal(err)
	}
	if err := tab.Apply(r); err != nil {
		t.Fatalf("second Apply of the same ruleset: %v", err)
	}
	if ok, err := tab.Check(); !ok || err != nil {
		t.Fatalf("Check right after Apply = %v, %v", ok, err)
	}

	for _, v6 := range []bool{false, true} {
		fam := map[bool]string{false: "IPv4", true: "IPv6"}[v6]
		if !udpPasses(t, l.a1, l.a2, v6, passTimeout) {
			t.Errorf("%s: a1 -> a2 UDP dropped inside one network", fam)
		}
		if !tcpPasses(t, l.a1, l.a2, v6, passTimeout) {
			t.Errorf("%s: a1 -> a2 TCP dropped inside one network", fam)
		}
		if !pingPasses(t, l.a1, l.a2, v6, passTimeout) {
			t.Errorf("%s: a1 -> a2 ping dropped inside one network", fam)
		}
		before := dropCounts(t, tab)
		for _, p := range [][2]vm{{l.a1, l.b1}, {l.b1, l.a1}} {
			src, dst := p[0], p[1]
			if udpPasses(t, src, dst, v6, dropTimeout) {
				t.Errorf("%s: %s -> %s UDP passes between networks", fam, src.link, dst.link)
			}
			if tcpPasses(t, src, dst, v6, dropTimeout) {
				t.Errorf("%s: %s -> %s TCP passes between networks", fam, src.link, dst.link)
			}
			if pingPasses(t, src, dst, v6, dropTimeout) {
				t.Errorf("%s: %s -> %s ping passes between networks", fam, src.link, dst.link)
			}
			if !pmtuErrorPasses(t, src, dst, v6) {
				t.Errorf("%s: %s -> %s path MTU ICMP error dropped", fam, src.link, dst.link)
			}
		}
		after := dropCounts(t, tab)
		for _, n := range []string{"A", "B"} {
			if v6 {
				n += "6"
			}
			if after[n] <= before[n] {
				t.Errorf("drop counter of %s did not grow: %d -> %d", n, before[n], after[n])
			}
		}
	}

	// Without network B, b1's addresses are nobody's VIPs: A may reach them.
	r.Networks = slices.DeleteFunc(networksAB(), func(n Network) bool { return strings.HasPrefix(n.Name, "B") })
	if err := tab.Apply(r); err != nil {
		t.Fatal(err)
	}
	for _, v6 := range []bool{false, true} {
		if !udpPasses(t, l.a1, l.b1, v6, passTimeout) || !tcpPasses(t, l.a1, l.b1, v6, passTimeout) {
			t.Errorf("v6=%v: a1 -> b1 still dropped after network B was removed", v6)
		}
	}

	// Someone deletes the table: Check notices and Apply puts it back.
	run(t, "ip", "netns", "exec", l.router, "nft", "delete", "table", "inet", "vmroam")
	if ok, err := tab.Check(); ok || err != nil {
		t.Fatalf("Check after the table was deleted = %v, %v", ok, err)
	}
	r.Networks = networksAB()
	if err := tab.Apply(r); err != nil {
		t.Fatal(err)
	}
	if ok, err := tab.Check(); !ok || err != nil {
		t.Fatalf("Check after re-applying = %v, %v", ok, err)
	}
	if udpPasses(t, l.a1, l.b1, false, dropTimeout) {
		t.Error("a1 -> b1 passes after the table was restored")
	}

	if err := tab.Close(); err != nil {
		t.Fatal(err)
	}
	if out := run(t, "ip", "netns", "exec", l.router, "nft", "list", "tables"); strings.Contains(out, "vmroam") {
		t.Fatalf("table left after Close:\n%s", out)
	}
	if err := tab.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if !udpPasses(t, l.a1, l.b1, false, passTimeout) {
		t.Error("a1 -> b1 dropped after Close")
	}
}

// synCapture records the TCP SYNs a namespace's eth0 receives, as the VM's
// kernel sees them, after the router's rules ran.
type synCapture struct {
	fd int
}

func captureSYNs(t *testing.T, ns string) *synCapture {
	t.Helper()
	fd, err := inNS(ns, func() (int, error) {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return -1, err
		}
		proto := int(htons(unix.ETH_P_ALL))
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, proto)
		if err != nil {
			return -1, err
		}
		if err := unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: uint16(proto), Ifindex: ifi.Index}); err != nil {
			unix.Close(fd)
			return -1, err
		}
		return fd, nil
	})
	if err != nil {
		t.Fatalf("%s: packet socket: %v", ns, err)
	}
	tv := unix.NsecToTimeval(int64(100 * time.Millisecond))
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	c := &synCapture{fd: fd}
	t.Cleanup(func() { unix.Close(c.fd) })
	return c
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// mss returns the MSS option of the first SYN (ack set or not, as asked)
// with the given destination port, or -1 if none came within passTimeout.
func (c *synCapture) mss(t *testing.T, port uint16, ack bool) int {
	t.Helper()
	buf := make([]byte, 65536)
	for end := time.Now().Add(passTimeout); time.Now().Before(end); {
		n, _, err := unix.Recvfrom(c.fd, buf, 0)
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			continue
		}
		first := layers.LayerTypeIPv4
		if buf[0]>>4 == 6 {
			first = layers.LayerTypeIPv6
		}
		pkt := gopacket.NewPacket(buf[:n], first, gopacket.NoCopy)
		tcp, ok := pkt.Layer(layers.LayerTypeTCP).(*layers.TCP)
		if !ok || !tcp.SYN || tcp.ACK != ack || uint16(tcp.DstPort) != port {
			continue
		}
		for _, o := range tcp.Options {
			if o.OptionType == layers.TCPOptionKindMSS && len(o.OptionData) == 2 {
				return int(o.OptionData[0])<<8 | int(o.OptionData[1])
			}
		}
		return 0
	}
	return -1
}

// handshakeMSS connects from src to dst (asking for userMSS when not 0)
// and returns the MSS of the SYN as dst received it and of the SYN-ACK as
// src received it.
func handshakeMSS(t *testing.T, src, dst vm, v6 bool, userMSS int) (syn, synAck int) {
	t.Helper()
	from, to := src.addr4, dst.addr4
	if v6 {
		from, to = src.addr6, dst.addr6
	}
	atDst := captureSYNs(t, dst.ns)
	atSrc := captureSYNs(t, src.ns)
	ln, err := inNS(dst.ns, func() (net.Listener, error) { return net.Listen("tcp", addrPort(to)) })
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		if c, err := ln.Accept(); err == nil {
			c.Close()
		}
	})
	c, err := inNS(src.ns, func() (net.Conn, error) {
		d := net.Dialer{Timeout: passTimeout, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(from, 0))}
		if userMSS != 0 {
			d.Control = func(_, _ string, rc syscall.RawConn) error {
				var serr error
				err := rc.Control(func(fd uintptr) {
					serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG, userMSS)
				})
				return errors.Join(err, serr)
			}
		}
		return d.Dial("tcp", ln.Addr().String())
	})
	if err != nil {
		t.Fatalf("dial %s: %v", ln.Addr(), err)
	}
	local := c.LocalAddr().(*net.TCPAddr)
	c.Close()
	serverPort := uint16(ln.Addr().(*net.TCPAddr).Port)
	return atDst.mss(t, serverPort, false), atSrc.mss(t, uint16(local.Port), true)
}

func TestMSSClamp(t *testing.T) {
	l := newLab(t)
	tab := l.routerTable(t)
	defer func() {
		if err := tab.Close(); err != nil {
			t.Error(err)
		}
	}()

	// The router's veth towards a2 plays the tunnel: SYNs from a1 leave
	// through it, SYN-ACKs from a2 come in through it.
	r := Ruleset{Networks: networksAB()}
	if err := tab.Apply(r); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		v6   bool
		want int // MSS a1 and a2 advertise on their 1500-byte links
	}{{false, 1460}, {true, 1440}} {
		if syn, synAck := handshakeMSS(t, l.a1, l.a2, tc.v6, 0); syn != tc.want || synAck != tc.want {
			t.Fatalf("v6=%v, no clamping: SYN MSS %d, SYN-ACK MSS %d, want %d", tc.v6, syn, synAck, tc.want)
		}
	}

	r.TunnelDev, r.TunnelMTU = l.a2.link, 1420
	if err := tab.Apply(r); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		v6   bool
		want int
	}{{false, 1380}, {true, 1360}} {
		if syn, synAck := handshakeMSS(t, l.a1, l.a2, tc.v6, 0); syn != tc.want || synAck != tc.want {
			t.Errorf("v6=%v, tunnel MTU 1420: SYN MSS %d, SYN-ACK MSS %d, want %d", tc.v6, syn, synAck, tc.want)
		}
		// A smaller MSS is left alone.
		if syn, _ := handshakeMSS(t, l.a1, l.a2, tc.v6, 1000); syn != 1000 {
			t.Errorf("v6=%v: SYN asking for MSS 1000 arrived with %d", tc.v6, syn)
		}
	}
	// Traffic that does not cross the tunnel keeps its MSS.
	if err := tab.Apply(Ruleset{TunnelDev: l.a2.link, TunnelMTU: 1420}); err != nil {
		t.Fatal(err)
	}
	if syn, _ := handshakeMSS(t, l.a2, l.b1, false, 0); syn != 1380 {
		t.Errorf("a2 -> b1 (in through the tunnel) SYN MSS %d, want 1380", syn)
	}
	if syn, _ := handshakeMSS(t, l.a1, l.b1, false, 0); syn != 1460 {
		t.Errorf("a1 -> b1 (not through the tunnel) SYN MSS %d, want 1460", syn)
	}
}

// TestLifecycle runs the agent's own way, New in the current namespace.
func TestLifecycle(t *testing.T) {
	netnstest.Run(t, func() {
		tab, err := New("")
		if err != nil {
			t.Fatal(err)
		}
		if ok, err := tab.Check(); ok || err != nil {
			t.Fatalf("Check before any Apply = %v, %v", ok, err)
		}
		c, err := nftables.New()
		if err != nil {
			t.Fatal(err)
		}
		// Someone else's table, with a chain on the same hook.
		other := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "other"})
		c.AddChain(&nftables.Chain{Name: "forward", Table: other, Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter})
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}

		r := Ruleset{Networks: networksAB(), TunnelDev: "vmr0", TunnelMTU: 1420}
		if err := tab.Apply(r); err != nil {
			t.Fatal(err)
		}
		if ok, err := tab.Check(); !ok || err != nil {
			t.Fatalf("Check after Apply = %v, %v", ok, err)
		}

		// Bad input fails before the kernel sees anything.
		bad := r
		bad.Networks = append(slices.Clone(r.Networks), Network{Name: "broken"})
		if err := tab.Apply(bad); err == nil || !strings.HasPrefix(err.Error(), "filter: apply: ") {
			t.Fatalf("Apply with an invalid prefix: %v", err)
		}
		if ok, err := tab.Check(); !ok || err != nil {
			t.Fatalf("Check after a failed Apply = %v, %v", ok, err)
		}

		// A batch the kernel rejects half-way (its last rule looks up a set
		// that does not exist) leaves the previous table as it was.
		p, err := build("vmroam", Ruleset{Networks: networksAB()[:1]})
		if err != nil {
			t.Fatal(err)
		}
		p.rules = append(p.rules, rule(p.chains[0], "broken",
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 16, Len: 4},
			&expr.Lookup{SourceRegister: 1, SetName: "missing", SetID: 99}))
		if err := tab.apply(p); err == nil {
			t.Fatal("the kernel took a rule that looks up a missing set")
		}
		if ok, err := tab.Check(); !ok || err != nil {
			t.Fatalf("Check after a rejected batch = %v, %v", ok, err)
		}
		if got := dropCounts(t, tab); len(got) != 4 {
			t.Fatalf("isolation rules after a rejected batch: %v, want the 4 of before", got)
		}

		nt := &nftables.Table{Family: nftables.TableFamilyINet, Name: "vmroam"}
		for name, tamper := range map[string]func(){
			"extra rule": func() {
				c.AddRule(&nftables.Rule{Table: nt, Chain: &nftables.Chain{Table: nt, Name: chainForward},
					Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}})
			},
			"flushed chain": func() { c.FlushChain(&nftables.Chain{Table: nt, Name: chainMangle}) },
			"flushed set":   func() { c.FlushSet(&nftables.Set{Table: nt, Name: setNets4}) },
			"extra chain":   func() { c.AddChain(&nftables.Chain{Table: nt, Name: "extra"}) },
			"no table":      func() { c.DelTable(nt) },
		} {
			tamper()
			if err := c.Flush(); err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if ok, err := tab.Check(); ok || err != nil {
				t.Errorf("%s: Check = %v, %v", name, ok, err)
			}
			if err := tab.Apply(r); err != nil {
				t.Fatalf("%s: re-apply: %v", name, err)
			}
			if ok, err := tab.Check(); !ok || err != nil {
				t.Errorf("%s: Check after re-applying = %v, %v", name, ok, err)
			}
		}

		if err := tab.Close(); err != nil {
			t.Fatal(err)
		}
		if err := tab.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, x := range tables {
			names = append(names, x.Name)
		}
		if fmt.Sprint(names) != "[other]" {
			t.Fatalf("tables after Close: %v, want only the other one", names)
		}
		if ok, err := tab.Check(); ok || err != nil {
			t.Fatalf("Check after Close = %v, %v", ok, err)
		}
	})
}
