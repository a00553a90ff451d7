package cache

import (
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

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
