package control

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

type fakeBackend struct {
	attached   map[netip.Addr]string
	awaiting   map[netip.Addr]string
	networks   map[string]netip.Prefix
	migrations []Migration
}

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

func (f *fakeBackend) AttachWhenAnnounced(_ context.Context, vip netip.Addr, dev string) (VIP, error) {
	if dev == "" {
		return VIP{}, fmt.Errorf("%w: --dev is required", ErrBadRequest)
	}
	f.awaiting[vip] = dev
	return VIP{VIP: vip.String(), Dev: dev, State: "awaiting"}, nil
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

func (f *fakeBackend) Prepare(_ context.Context, vip netip.Addr) (VIP, error) {
	return VIP{VIP: vip.String(), State: "remote"}, nil
}

func (f *fakeBackend) Abort(_ context.Context, vip netip.Addr) (VIP, error) {
	return VIP{}, fmt.Errorf("%w: %s is not caching", ErrBadRequest, vip)
}

func (f *fakeBackend) AddNetwork(_ context.Context, name string, prefix netip.Prefix) (Network, error) {
	if !prefix.IsValid() {
		return Network{}, fmt.Errorf("%w: a prefix is required", ErrBadRequest)
	}
	f.networks[name] = prefix
	return Network{Name: name, Prefix: prefix, Epoch: 1, Active: true}, nil
}

func (f *fakeBackend) RemoveNetwork(_ context.Context, name string) (Network, error) {
	if _, ok := f.networks[name]; !ok {
		return Network{}, fmt.Errorf("%w: no network %q", ErrBadRequest, name)
	}
	delete(f.networks, name)
	return Network{Name: name, Epoch: 2}, nil
}

func (f *fakeBackend) Allocate(_ context.Context, network, dev string) (VIP, error) {
	p, ok := f.networks[network]
	if !ok {
		return VIP{}, fmt.Errorf("%w: no virtual network %q", ErrBadRequest, network)
	}
	return VIP{VIP: p.Addr().Next().String(), Dev: dev, State: "reserved"}, nil
}

func (f *fakeBackend) Keys(context.Context) (Keys, error) {
	return Keys{Keys: []KeyUse{{Fingerprint: "00112233", Members: 2, Primary: 2}}, Members: []MemberKeys{{Member: "h1", Keys: []string{"00112233"}}}}, nil
}

func (f *fakeBackend) ChangeKeys(_ context.Context, op string, key []byte, force bool) (Keys, error) {
	if len(key) != 32 {
		return Keys{}, fmt.Errorf("%w: a %d-byte key", ErrBadRequest, len(key))
	}
	if op == KeyOpRemove && !force {
		return Keys{}, errors.New("remove key refused: h2 encrypts with it")
	}
	return Keys{Members: []MemberKeys{{Member: "h1", Keys: []string{op}}}}, nil
}

func (f *fakeBackend) Migrations(context.Context) ([]Migration, error) {
	out := []Migration{}
	for _, m := range f.migrations {
		m.Timeline = nil
		out = append(out, m)
	}
	return out, nil
}

func (f *fakeBackend) Migration(_ context.Context, id string) (Migration, error) {
	for _, m := range f.migrations {
		if m.ID == id {
			return m, nil
		}
	}
	return Migration{}, fmt.Errorf("%w: no migration %q on this host", ErrNotFound, id)
}

func TestMigrations(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	start := time.Date(2026, 11, 26, 10, 0, 0, 123456789, time.UTC)
	tl := &Timeline{Start: start, Series: []TimelineSeries{{Name: SeriesCached, First: 3, Counts: []uint32{1, 0, 7}, Beyond: 2}}}
	f := &fakeBackend{migrations: []Migration{
		{ID: "100.100.20.1@4", VIP: "100.100.20.1", Role: "source", Cached: 10, Timeline: tl},
		{ID: "fd00::1@7#2", VIP: "fd00::1", Role: "destination"},
	}}
	srv, err := Listen(path, f, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx := context.Background()
	c := NewClient(path)
	ms, err := c.Migrations(ctx)
	if err != nil || len(ms) != 2 || ms[0].ID != "100.100.20.1@4" || ms[0].Timeline != nil {
		t.Fatalf("list: %+v %v", ms, err)
	}
	m, err := c.Migration(ctx, "100.100.20.1@4")
	if err != nil || m.Cached != 10 || m.Timeline == nil {
		t.Fatalf("one: %+v %v", m, err)
	}
	if got := m.Timeline; !got.Start.Equal(start) || len(got.Series) != 1 || got.Series[0].First != 3 || got.Series[0].Total() != 10 {
		t.Errorf("timeline came back as %+v", got)
	}
	// An ID with characters that need escaping in a URL path.
	if m, err := c.Migration(ctx, "fd00::1@7#2"); err != nil || m.VIP != "fd00::1" {
		t.Errorf("odd ID: %+v %v", m, err)
	}
	if _, err := c.Migration(ctx, "100.100.20.1@9"); !errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), `no migration "100.100.20.1@9"`) {
		t.Errorf("unknown ID: %v", err)
	}
}

// An agent from before an endpoint answers 404 with no JSON body: the
// client says so rather than "not found".
func TestOlderAgent(t *testing.T) {
	path := filepath.Join(t.TempDir(), "old.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.NotFoundHandler()}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	defer func() {
		srv.Close()
		<-done
	}()
	_, err = NewClient(path).Migrations(context.Background())
	if err == nil || errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "older version") {
		t.Errorf("err = %v, want one that names an older agent", err)
	}
}

func TestKeys(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	srv, err := Listen(path, &fakeBackend{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx := context.Background()
	c := NewClient(path)
	if k, err := c.Keys(ctx); err != nil || len(k.Keys) != 1 || k.Keys[0].Members != 2 {
		t.Fatalf("list: %+v %v", k, err)
	}
	key := make([]byte, 32)
	for _, op := range []string{KeyOpInstall, KeyOpUse} {
		if k, err := c.ChangeKeys(ctx, op, key, false); err != nil || k.Members[0].Keys[0] != op {
			t.Fatalf("%s: %+v %v", op, k, err)
		}
	}
	if _, err := c.ChangeKeys(ctx, KeyOpRemove, key, false); err == nil || errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), "h2 encrypts with it") {
		t.Fatalf("refused remove: %v", err)
	}
	if _, err := c.ChangeKeys(ctx, KeyOpRemove, key, true); err != nil {
		t.Fatalf("forced remove: %v", err)
	}
	if _, err := c.ChangeKeys(ctx, KeyOpUse, key[:5], false); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("short key: %v", err)
	}
	if _, err := c.ChangeKeys(ctx, "rotate", key, false); !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), "unknown key operation") {
		t.Fatalf("unknown op: %v", err)
	}
}

func TestNetworks(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	f := &fakeBackend{networks: map[string]netip.Prefix{}}
	srv, err := Listen(path, f, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx := context.Background()
	c := NewClient(path)
	p := netip.MustParsePrefix("100.64.1.0/24")
	if n, err := c.AddNetwork(ctx, "blue", p); err != nil || n.Prefix != p || n.Name != "blue" || !n.Active {
		t.Fatalf("add: %+v %v", n, err)
	}
	if f.networks["blue"] != p {
		t.Fatalf("backend got %v", f.networks)
	}
	if _, err := c.AddNetwork(ctx, "red", netip.Prefix{}); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("add without prefix: %v", err)
	}
	// A name that needs escaping in the URL reaches the backend intact.
	if _, err := c.RemoveNetwork(ctx, "a/b c"); !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), `"a/b c"`) {
		t.Fatalf("remove odd name: %v", err)
	}
	if v, err := c.Allocate(ctx, "blue", "vif3"); err != nil || v.VIP != "100.64.1.1" || v.Dev != "vif3" {
		t.Fatalf("allocate: %+v %v", v, err)
	}
	if _, err := c.Allocate(ctx, "green", ""); !errors.Is(err, ErrBadRequest) {
		t.Fatalf("allocate in an unknown network: %v", err)
	}
	if n, err := c.RemoveNetwork(ctx, "blue"); err != nil || n.Epoch != 2 {
		t.Fatalf("remove: %+v %v", n, err)
	}
}

func TestRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	fb := &fakeBackend{attached: map[netip.Addr]string{}, awaiting: map[netip.Addr]string{}}
	srv, err := Listen(path, fb, log)
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
	vip2 := netip.MustParseAddr("100.100.10.2")
	if v, err := c.AttachWhenAnnounced(ctx, vip2, "vif2"); err != nil || v.State != "awaiting" || fb.awaiting[vip2] != "vif2" || fb.attached[vip2] != "" {
		t.Fatalf("attach when announced: %+v %v; backend awaiting %v attached %v", v, err, fb.awaiting, fb.attached)
	}
	// An unknown "when" is the client's mistake, not the agent's.
	var out VIP
	err = c.do(ctx, http.MethodPost, "/v1/vips", AttachRequest{VIP: vip2, Dev: "vif2", When: "later"}, &out)
	if !errors.Is(err, ErrBadRequest) || !strings.Contains(err.Error(), `when "later"`) {
		t.Fatalf("attach when later: %v", err)
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
