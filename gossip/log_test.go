package gossip

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"sync"
	"testing"
)

func TestParseMemberlistLine(t *testing.T) {
	cases := []struct {
		line  string
		level slog.Level
		msg   string
	}{
		{"[DEBUG] memberlist: Stream connection from=1.2.3.4\n", slog.LevelDebug, "Stream connection from=1.2.3.4"},
		{"[INFO] memberlist: Marking x as failed\n", slog.LevelInfo, "Marking x as failed"},
		{"[WARN] memberlist: Refuting a dead message\n", slog.LevelWarn, "Refuting a dead message"},
		{"[ERR] memberlist: Failed to receive\n", slog.LevelError, "Failed to receive"},
		{"[ERR] Failed to shutdown transport: x", slog.LevelError, "Failed to shutdown transport: x"},
		{"no prefix at all\n", slog.LevelInfo, "no prefix at all"},
	}
	for _, c := range cases {
		level, msg := parseMemberlistLine(c.line)
		if level != c.level || msg != c.msg {
			t.Errorf("%q: got %v %q, want %v %q", c.line, level, msg, c.level, c.msg)
		}
	}
}

// captureHandler keeps every record it is given.
type captureHandler struct {
	mu    sync.Mutex
	recs  []slog.Record
	attrs []slog.Attr
}

func (h *captureHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *captureHandler) Handle(_ context.Context, r slog.Record) error {
	r = r.Clone()
	r.AddAttrs(h.attrs...)
	h.mu.Lock()
	h.recs = append(h.recs, r)
	h.mu.Unlock()
	return nil
}

func (h *captureHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return &captureView{h, as}
}

func (h *captureHandler) WithGroup(string) slog.Handler { return h }

// captureView is captureHandler with attributes added, sharing its records.
type captureView struct {
	h     *captureHandler
	attrs []slog.Attr
}

func (v *captureView) Enabled(context.Context, slog.Level) bool { return true }
func (v *captureView) Handle(ctx context.Context, r slog.Record) error {
	r = r.Clone()
	r.AddAttrs(v.attrs...)
	return v.h.Handle(ctx, r)
}
func (v *captureView) WithAttrs(as []slog.Attr) slog.Handler {
	return &captureView{v.h, append(append([]slog.Attr{}, v.attrs...), as...)}
}
func (v *captureView) WithGroup(string) slog.Handler { return v }

// TestMemberlistLogRouted checks that memberlist's own lines reach the
// configured logger at the right level: with BindPort 0 memberlist logs the
// port it picked at [DEBUG].
func TestMemberlistLogRouted(t *testing.T) {
	h := &captureHandler{}
	cfg := DefaultConfig()
	cfg.Name = "logger"
	cfg.BindAddr = netip.MustParseAddr("127.0.0.1")
	cfg.BindPort = 0
	cfg.Profile = "local"
	cfg.Meta = testMeta(1)
	cfg.Logger = slog.New(h)
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Shutdown() })

	h.mu.Lock()
	defer h.mu.Unlock()
	for _, r := range h.recs {
		if !strings.Contains(r.Message, "Using dynamic bind port") {
			continue
		}
		if r.Level != slog.LevelDebug {
			t.Errorf("level %v, want Debug", r.Level)
		}
		comp := ""
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == "component" {
				comp = a.Value.String()
			}
			return true
		})
		if comp != "memberlist" {
			t.Errorf("component %q, want memberlist", comp)
		}
		return
	}
	t.Fatalf("memberlist's bind line not logged; got %d records", len(h.recs))
}
