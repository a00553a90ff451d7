package xenhook

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/internal/netnstest"
)

// vethLab is a veth pair in a test's namespace: vif is the VM's interface
// on the host (the one watched), guest the VM's end.
type vethLab struct {
	ns       netns.NsHandle
	h        *netlink.Handle
	vif      string
	vm, host *sender // write as the VM (in through vif) and as the host (out of vif)
}

// newVethLab must run on netnstest.Run's thread: it makes the links, and
// the handles and sockets that later work from any goroutine.
func newVethLab(t *testing.T, vif, guest string) *vethLab {
	t.Helper()
	ns, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandle()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(h.Close)
	l := &vethLab{ns: ns, h: h, vif: vif}
	l.addPair(t, vif, guest)
	l.vm = newSender(t, h, guest)
	l.host = newSender(t, h, vif)
	return l
}

func (l *vethLab) addPair(t *testing.T, vif, guest string) {
	t.Helper()
	if err := l.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: vif}, PeerName: guest}); err != nil {
		t.Fatal(err)
	}
	for _, dev := range []string{vif, guest} {
		// The kernel's own IPv6 chatter (DAD, MLD) would be noise.
		if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+dev+"/disable_ipv6", []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := l.h.LinkSetUp(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: dev}}); err != nil {
			t.Fatal(err)
		}
	}
}

// sender writes whole Ethernet frames out of one device.
type sender struct {
	fd int
	sa unix.SockaddrLinklayer
}

func newSender(t *testing.T, h *netlink.Handle, dev string) *sender {
	t.Helper()
	link, err := h.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	return &sender{fd: fd, sa: unix.SockaddrLinklayer{Ifindex: link.Attrs().Index, Halen: 6}}
}

func (s *sender) send(t *testing.T, frame []byte) {
	t.Helper()
	if err := unix.Sendto(s.fd, frame, 0, &s.sa); err != nil {
		t.Fatalf("send: %v", err)
	}
}

// watchRun is one WatchAnnouncements in its own goroutine.
type watchRun struct {
	got    chan Announcement
	done   chan error
	cancel context.CancelFunc
}

// startWatch runs WatchAnnouncements on a thread switched into the lab's
// namespace. The thread is never switched back: the runtime ends it with
// the goroutine.
func (l *vethLab) startWatch(t *testing.T, dev string) *watchRun {
	ctx, cancel := context.WithCancel(context.Background())
	w := &watchRun{got: make(chan Announcement, 100), done: make(chan error, 1), cancel: cancel}
	go func() {
		runtime.LockOSThread()
		if err := netns.Set(l.ns); err != nil {
			w.done <- err
			return
		}
		w.done <- WatchAnnouncements(ctx, dev, func(a Announcement) {
			select {
			case w.got <- a:
			default:
				t.Error("announcement channel full")
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-w.done:
		case <-time.After(5 * time.Second):
			t.Error("WatchAnnouncements still running at cleanup")
		}
	})
	return w
}

// probeIP is a GARP the tests send until the watch reports it: the watch
// has bound its socket then. Expectations skip probes.
var probeIP = netip.MustParseAddr("192.0.2.250")

func (l *vethLab) awaitReady(t *testing.T, w *watchRun) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		l.vm.send(t, garpFrame(t, layers.ARPRequest, probeIP))
		select {
		case a := <-w.got:
			if a.IP != probeIP {
				t.Fatalf("unexpected announcement while probing: %+v", a)
			}
			return
		case err := <-w.done:
			t.Fatalf("WatchAnnouncements returned while probing: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatal("the watch reported no probe within 5s")
}

// next returns the next announcement that is not a probe.
func (w *watchRun) next(t *testing.T) Announcement {
	t.Helper()
	for {
		select {
		case a := <-w.got:
			if a.IP == probeIP {
				continue
			}
			return a
		case err := <-w.done:
			t.Fatalf("WatchAnnouncements returned: %v", err)
		case <-time.After(5 * time.Second):
			t.Fatal("no announcement within 5s")
		}
	}
}

// result waits for WatchAnnouncements to return, failing after within.
func (w *watchRun) result(t *testing.T, within time.Duration) error {
	t.Helper()
	select {
	case err := <-w.done:
		w.done <- err // for the cleanup
		return err
	case <-time.After(within):
		t.Fatalf("WatchAnnouncements still running after %v", within)
		return nil
	}
}

func TestWatchAnnouncements(t *testing.T) {
	netnstest.Run(t, func() {
		l := newVethLab(t, "vif5.0", "guest")
		base := runtime.NumGoroutine()
		w := l.startWatch(t, l.vif)
		l.awaitReady(t, w)

		marker := netip.MustParseAddr("100.64.1.6")
		hostOut := garpFrame(t, layers.ARPRequest, netip.MustParseAddr("100.64.1.99"))
		for i, f := range [][]byte{
			hostOut, // the host's own frame, out of vif: not the VM's
			arpFrame(t, layers.EthernetTypeARP, layers.ARPRequest, vmMAC, bcastMAC, vmIP, gatewayIP),
			garpFrame(t, layers.ARPRequest, vmIP),
			udpFrame(t),
			rarpFrame(t, vmMAC),
			naFrame(t, naSolicited|naOverride, vmIP6, 255),
			naFrame(t, naOverride, netip.MustParseAddr("fd00:64::99"), 255),
			naFrame(t, naOverride, vmIP6, 255),
			// A GARP reply sent to another host's MAC arrives as
			// PACKET_OTHERHOST: not for this host, not counted.
			arpFrame(t, layers.EthernetTypeARP, layers.ARPReply, vmMAC, otherMAC, netip.MustParseAddr("100.64.1.98"), netip.MustParseAddr("100.64.1.98")),
			garpFrame(t, layers.ARPReply, marker),
		} {
			if i == 0 || i == 6 {
				l.host.send(t, f)
			} else {
				l.vm.send(t, f)
			}
		}
		want := []Announcement{
			{Kind: "garp", MAC: vmMAC, IP: vmIP},
			{Kind: "rarp", MAC: vmMAC},
			{Kind: "na", MAC: vmMAC, IP: vmIP6},
			{Kind: "garp", MAC: vmMAC, IP: marker},
		}
		var last time.Time
		for _, wa := range want {
			a := w.next(t)
			if a.Kind != wa.Kind || a.IP != wa.IP || !bytes.Equal(a.MAC, wa.MAC) {
				t.Fatalf("got %+v, want %+v", a, wa)
			}
			if a.At.IsZero() || a.At.Before(last) || time.Since(a.At) > 10*time.Second {
				t.Errorf("%s at %v (previous %v)", a.Kind, a.At, last)
			}
			last = a.At
		}
		select {
		case a := <-w.got:
			t.Fatalf("reported after the marker: %+v", a)
		case <-time.After(50 * time.Millisecond):
		}

		start := time.Now()
		w.cancel()
		if err := w.result(t, time.Second); err != nil {
			t.Fatalf("after cancel: %v, want nil", err)
		}
		if d := time.Since(start); d > 200*time.Millisecond {
			t.Errorf("took %v to stop", d)
		}
		waitGoroutines(t, base)
	})
}

// waitGoroutines fails unless the count falls back to base: the watch's
// goroutine ended and left nothing behind.
func waitGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, %d before:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestWatchAnnouncementsDeviceGoes(t *testing.T) {
	netnstest.Run(t, func() {
		l := newVethLab(t, "vif6.0", "guest")
		vif := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: l.vif}}
		w := l.startWatch(t, l.vif)
		l.awaitReady(t, w)

		// Down and up again (an operator, a restarting script): the watch
		// carries on.
		if err := l.h.LinkSetDown(vif); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
		if err := l.h.LinkSetUp(vif); err != nil {
			t.Fatal(err)
		}
		l.awaitReady(t, w)

		start := time.Now()
		if err := l.h.LinkDel(vif); err != nil {
			t.Fatal(err)
		}
		err := w.result(t, 2*time.Second)
		if !errors.Is(err, unix.ENODEV) {
			t.Fatalf("after deletion: %v, want ENODEV", err)
		}
		t.Logf("deleted: %v after %v", err, time.Since(start).Round(time.Millisecond))

		// Deleted while down: the socket hears nothing more, the watch
		// finds out by looking.
		l.addPair(t, "vif7.0", "guest7")
		l.vm = newSender(t, l.h, "guest7")
		vif7 := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vif7.0"}}
		w = l.startWatch(t, "vif7.0")
		l.awaitReady(t, w)
		if err := l.h.LinkSetDown(vif7); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
		if err := l.h.LinkDel(vif7); err != nil {
			t.Fatal(err)
		}
		if err := w.result(t, 2*time.Second); !errors.Is(err, unix.ENODEV) {
			t.Fatalf("deleted while down: %v, want ENODEV", err)
		}
	})
}

func TestWatchAnnouncementsNoDevice(t *testing.T) {
	netnstest.Run(t, func() {
		called := false
		err := WatchAnnouncements(context.Background(), "nosuchvif0", func(Announcement) { called = true })
		if !errors.Is(err, unix.ENODEV) || called {
			t.Fatalf("WatchAnnouncements on a missing device: %v (fn called: %v), want ENODEV", err, called)
		}
		err = WatchAnnouncements(context.Background(), "averyveryverylongname", func(Announcement) {})
		if err == nil {
			t.Fatal("a name longer than IFNAMSIZ was accepted")
		}
	})
}
