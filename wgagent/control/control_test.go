package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

type fakeBackend struct{ attached map[netip.Addr]string }

func (f *fakeBackend) Status(context.Context) (Status, error) {
	st := Status{Name: "h1"}
	for vip, dev := range f.attached {
		st.VIPs = append(st.VIPs, VIP{VIP: vip.String(), Dev: dev, Local: true, State: "local"})
	}
	return st, nil
}

func (f *fakeBackend) Attach(_ context.Context, vip netip.Addr, dev string) (VIP, error) {
	if dev == "" {
		return VIP{}, fmt.Errorf("%w: --dev is required", ErrBadRequest)
	}
	f.attached[vip] = dev
	return VIP{VIP: vip.String(), Dev: dev, Local: true}, nil
}

func (f *fakeBackend) Detach(_ context.Context, vip netip.Addr) (VIP, error) {
	if _, ok := f.attached[vip]; !ok {
		return VIP{}, fmt.Errorf("%w: %s is not attached here", ErrBadRequest, vip)
	}
	delete(f.attached, vip)
	return VIP{VIP: vip.String()}, nil
}

func (f *fakeBackend) Suspend(_ context.Context, vip netip.Addr) (VIP, error) {
	return VIP{VIP: vip.String(), State: "caching"}, nil
}

func (f *fakeBackend) Abort(_ context.Context, vip netip.Addr) (VIP, error) {
	return VIP{}, fmt.Errorf("%w: %s is not caching", ErrBadRequest, vip)
}

func TestRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	srv, err := Listen(path, &fakeBackend{attached: map[netip.Addr]string{}}, log)
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode %v, want 0600", fi.Mode().Perm())
	}
	if _, err := Listen(path, &fakeBackend{}, log); err == nil {
		t.Error("a second server took over a live socket")
	}

	ctx := context.Background()
	c := NewClient(path)
	vip := netip.MustParseAddr("100.100.10.1")
	if _, err := c.Attach(ctx, vip, "vif1"); err != nil {
		t.Fatal(err)
	}
	st, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Name != "h1" || len(st.VIPs) != 1 || st.VIPs[0].Dev != "vif1" {
		t.Fatalf("status = %+v", st)
	}
	_, err = c.Attach(ctx, vip, "")
	if !errors.Is(err, ErrBadRequest) || err.Error() != "bad request: --dev is required" {
		t.Fatalf("attach without dev: %v", err)
	}
	if v, err := c.Suspend(ctx, vip); err != nil || v.State != "caching" {
		t.Fatalf("suspend: %+v %v", v, err)
	}
	if _, err := c.Abort(ctx, vip); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("abort: %v", err)
	}
	if _, err := c.Detach(ctx, vip); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Detach(ctx, vip); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("second detach: %v", err)
	}
}

func TestNoAgent(t *testing.T) {
	c := NewClient(filepath.Join(t.TempDir(), "none.sock"))
	_, err := c.Status(context.Background())
	if !errors.Is(err, ErrNoAgent) {
		t.Fatalf("err = %v, want ErrNoAgent", err)
	}
}

func TestSocketPath(t *testing.T) {
	t.Setenv(SocketEnv, "")
	if got := SocketPath(""); got != DefaultSocket {
		t.Errorf("default: %q", got)
	}
	t.Setenv(SocketEnv, "/tmp/env.sock")
	if got := SocketPath(""); got != "/tmp/env.sock" {
		t.Errorf("env: %q", got)
	}
	if got := SocketPath("/tmp/flag.sock"); got != "/tmp/flag.sock" {
		t.Errorf("flag: %q", got)
	}
}
