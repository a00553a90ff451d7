package cache

import (
	"bytes"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/internal/netnstest"
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
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			t.Fatal(err)
		}
		in, err := OpenInterceptor("vmrtest0", 1500, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer in.Close()
		vip := netip.MustParseAddr("100.64.9.9")
		link, err := netlink.LinkByName("vmrtest0")
		if err != nil {
			t.Fatal(err)
		}
		if err := netlink.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: &net.IPNet{IP: vip.AsSlice(), Mask: net.CIDRMask(32, 32)}}); err != nil {
			t.Fatal(err)
		}
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

// barrierPackets are a barrier packet as the kernel sends it and the same
// with a flag or field changed.
func barrierPackets(t testing.TB) map[string][]byte {
	i := ip4(layers.IPProtocolUDP)
	i.DstIP = BarrierAddr.AsSlice()
	u := &layers.UDP{SrcPort: 40000, DstPort: barrierPort}
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

func TestBarrierNonce(t *testing.T) {
	for name, pkt := range barrierPackets(t) {
		n, ok := barrierNonce(pkt)
		if want := name == "barrier"; ok != want || ok && n != 0x0102030405060708 {
			t.Errorf("%s: barrierNonce = %#x, %v", name, n, ok)
		}
	}
}
