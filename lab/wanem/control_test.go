package wanem

import (
	"context"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestControl(t *testing.T) {
	e, err := New(Config{Delay: time.Millisecond, Seed: 3})
	if err != nil {
		t.Fatal(err)
	}
	d := newFakeDev()
	start(t, e, d)
	sock := filepath.Join(t.TempDir(), "c.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- e.ServeControl(ln) }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	for i := range 10 {
		d.in <- udp4(1, 2, 1, 2, uint64(i))
		<-d.out
	}
	// The writer counts a packet just after writing it: poll.
	var st Stats
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
		st, err = ControlStats(ctx, sock)
		if err != nil || st.Sent == 10 || time.Now().After(deadline) {
			break
		}
	}
	if err != nil || st.Received != 10 || st.Sent != 10 {
		t.Fatalf("ControlStats: %v %v", st, err)
	}
	if err := ControlSetLoss(ctx, sock, 0.01); err != nil || e.Loss() != 0.01 {
		t.Fatalf("ControlSetLoss: %v, loss %v", err, e.Loss())
	}
	if err := ControlSetLoss(ctx, sock, 1); err == nil {
		t.Fatal("loss 1 accepted")
	}
	for req, want := range map[string]string{
		"loss 2":     "error: wanem: loss 2 outside [0, 1)",
		"loss x":     "error: loss:",
		"frobnicate": "error: unknown request",
	} {
		if got := e.control(req); !strings.HasPrefix(got, want) {
			t.Errorf("%q: %q, want %q...", req, got, want)
		}
	}
	// A client that stays connected does not keep ServeControl from ending.
	idle, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	if _, err := idle.Write([]byte("stats\n")); err != nil {
		t.Fatal(err)
	}
	ln.Close()
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("ServeControl: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeControl did not return after its listener closed")
	}
	if _, err := ControlStats(ctx, sock); err == nil {
		t.Fatal("ControlStats after close succeeded")
	}
}
