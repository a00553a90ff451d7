package cache

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/internal/barrier"
	"github.com/vmroam/vmroam/internal/netnstest"
	"github.com/vmroam/vmroam/internal/udpcsum"
)

type countSink struct {
	mu sync.Mutex
	n  int
}

func (s *countSink) Take([]byte) { s.mu.Lock(); s.n++; s.mu.Unlock() }

func (s *countSink) count() int { s.mu.Lock(); defer s.mu.Unlock(); return s.n }

// TestBarrier: once Barrier returns, every packet the kernel routed to the
// cache device before it has reached its sink.
func TestBarrier(t *testing.T) {
	netnstest.Run(t, func() {
		in := openTestInterceptor(t, "vmrtest0", 1500)
		defer in.Close()
		vip := netip.MustParseAddr("100.64.9.9")
		routeToInterceptor(t, in, vip)
		s := &countSink{}
		in.Attach(vip, s)
		conn, err := net.DialUDP("udp4", nil, &net.UDPAddr{IP: vip.AsSlice(), Port: 5000})
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		for round := 1; round <= 20; round++ {
			for range 50 {
				if _, err := conn.Write([]byte("x")); err != nil {
					t.Fatal(err)
				}
			}
			if err := in.Barrier(time.Second); err != nil {
				t.Fatal(err)
			}
			if got := s.count(); got != round*50 {
				t.Fatalf("round %d: the sink has %d packets after the barrier, want %d", round, got, round*50)
			}
		}
		if in.Unclaimed() != 0 {
			t.Errorf("barrier packets counted as unclaimed: %d", in.Unclaimed())
		}
	})
}

// openTestInterceptor brings lo up in the test's namespace and opens the
// cache device name there; the caller closes it.
func openTestInterceptor(t *testing.T, name string, mtu int) *Interceptor {
	t.Helper()
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	in, err := OpenInterceptor(name, mtu, nil)
	if err != nil {
		t.Fatal(err)
	}
	return in
}

// routeToInterceptor routes dst to the cache device.
func routeToInterceptor(t *testing.T, in *Interceptor, dst netip.Addr) {
	t.Helper()
	link, err := netlink.LinkByName(in.Name())
	if err != nil {
		t.Fatal(err)
	}
	bits := dst.BitLen()
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: dst.AsSlice(), Mask: net.CIDRMask(bits, bits)}}); err != nil {
		t.Fatal(err)
	}
}

// keepSink keeps copies of the packets it takes.
type keepSink struct {
	mu   sync.Mutex
	pkts [][]byte
}

func (s *keepSink) Take(pkt []byte) {
	s.mu.Lock()
	s.pkts = append(s.pkts, bytes.Clone(pkt))
	s.mu.Unlock()
}

func (s *keepSink) taken() [][]byte { s.mu.Lock(); defer s.mu.Unlock(); return slices.Clone(s.pkts) }

// TestInterceptorMendsZeroChecksums: a local IPv6 UDP datagram reaches the
// cache device with its checksum left to the device, and one whose sum is
// zero must come out with 0xffff, not the zero an IPv6 VM would drop.
func TestInterceptorMendsZeroChecksums(t *testing.T) {
	netnstest.Run(t, func() {
		in := openTestInterceptor(t, "vmrtest0", 1500)
		defer in.Close()
		src := netip.MustParseAddrPort("[fd76:6d72::2]:40000")
		vip := netip.MustParseAddrPort("[fd76:6d72::e1]:5201")
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: src.Addr().AsSlice(), Mask: net.CIDRMask(128, 128)}, Flags: unix.IFA_F_NODAD}); err != nil {
			t.Fatal(err)
		}
		routeToInterceptor(t, in, vip.Addr())
		s := &keepSink{}
		in.Attach(vip.Addr(), s)
		conn, err := net.DialUDP("udp6", net.UDPAddrFromAddrPort(src), net.UDPAddrFromAddrPort(vip))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write(udpcsum.ZeroSumPayload(src, vip, 200)); err != nil {
			t.Fatal(err)
		}
		if err := in.Barrier(time.Second); err != nil {
			t.Fatal(err)
		}
		got := s.taken()
		if len(got) != 1 || len(got[0]) != 40+8+200 {
			t.Fatalf("the sink took %d packets (%v), want the datagram", len(got), got)
		}
		if sum := got[0][46:48]; !bytes.Equal(sum, []byte{0xff, 0xff}) {
			t.Errorf("UDP checksum %x, want ffff", sum)
		}
	})
}

// barrierPackets are a barrier packet as the kernel sends it and the same
// with a flag or field changed (package barrier tests its parser; these
// seed the classifier's fuzz target).
func barrierPackets(t testing.TB) map[string][]byte {
	i := ip4(layers.IPProtocolUDP)
	i.DstIP = BarrierAddr.AsSlice()
	u := &layers.UDP{SrcPort: 40000, DstPort: barrier.Port}
	if err := u.SetNetworkLayerForChecksum(i); err != nil {
		t.Fatal(err)
	}
	ok := serialize(t, i, u, gopacket.Payload([]byte{1, 2, 3, 4, 5, 6, 7, 8}))
	mod := func(f func(b []byte)) []byte {
		b := bytes.Clone(ok)
		f(b)
		return b
	}
	return map[string][]byte{
		"barrier":         ok,
		"more fragments":  mod(func(b []byte) { b[6] |= 0x20 }),
		"fragment offset": mod(func(b []byte) { b[7] = 1 }),
		"other port":      mod(func(b []byte) { b[23] = 10 }),
		"tcp":             mod(func(b []byte) { b[9] = 6 }),
		"short nonce":     ok[:len(ok)-1],
		"ihl 4":           mod(func(b []byte) { b[0] = 0x44 }),
	}
}
