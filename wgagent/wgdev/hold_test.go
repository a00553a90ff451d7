package wgdev

import (
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun/tuntest"
)

// TestHoldWrites checks that a held device hands nothing to the kernel
// until it is released, and then everything, in order.
func TestHoldWrites(t *testing.T) {
	ch := tuntest.NewChannelTUN()
	h := &holdTUN{Device: ch.TUN()}
	d := &Device{hold: h}

	release, ok := d.HoldWrites()
	if !ok {
		t.Fatal("a userspace device could not be held")
	}
	done := make(chan error, 1)
	go func() {
		_, err := h.Write([][]byte{{1}, {2}}, 0)
		done <- err
	}()
	select {
	case p := <-ch.Inbound:
		t.Fatalf("packet %v reached the kernel while held", p)
	case <-time.After(100 * time.Millisecond):
	}
	release()
	for want := byte(1); want <= 2; want++ {
		select {
		case p := <-ch.Inbound:
			if len(p) != 1 || p[0] != want {
				t.Fatalf("got packet %v, want [%d]", p, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("packet %d not written after the release", want)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}

	// A kernel device (no hold) says so and its release is harmless.
	release, ok = (&Device{}).HoldWrites()
	if ok {
		t.Fatal("a kernel device claims to hold writes")
	}
	release()
}
