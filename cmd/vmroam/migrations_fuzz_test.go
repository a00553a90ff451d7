package main

import (
	"bytes"
	"encoding/json"
	"runtime"
	"strings"
	"testing"

	"github.com/vmroam/vmroam/internal/timeline"
	"github.com/vmroam/vmroam/wgagent/control"
)

// FuzzWithFile: whatever file --with names, parseMigration and the drawing
// of it, alone and next to this host's side, do not panic, and what they
// allocate and write is bounded by a constant plus a multiple of the
// file's size, however long a span or many series it claims.
func FuzzWithFile(f *testing.F) {
	src, dst := twoSides()
	for _, m := range []control.Migration{src, dst, {VIP: "100.100.20.1", Role: "source"}} {
		b, err := json.Marshal(m)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"vip":"v","role":"source","suspend":"0001-01-01T00:00:00Z","done":"9999-12-31T23:59:59Z"}`))
	f.Add([]byte(`{"vip":"v","role":"destination","timeline":{"start":"2026-01-01T00:00:00Z","series":[{"name":"held","first":-9000000000000000000,"counts":[1]},{"name":"held","first":9000000000000000000,"counts":[4294967295]}]}}`))
	f.Add([]byte(`{"vip":"v"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		other, err := parseMigration(b)
		if err != nil {
			if other != nil {
				t.Fatal("a rejected file gave a migration")
			}
			return
		}
		if other.VIP == "" || other.Role == "" {
			t.Fatalf("accepted %+v", other)
		}
		here := src
		if other.Role == "source" {
			here = dst
		}
		here.VIP = other.VIP
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		before := ms.TotalAlloc
		var out bytes.Buffer
		for _, sides := range [][]control.Migration{{*other}, {here, *other}} {
			out.Reset()
			if err := timeline.Render(&out, sides...); err != nil {
				continue
			}
			if !strings.HasPrefix(out.String(), "<svg") || !strings.HasSuffix(strings.TrimSpace(out.String()), "</svg>") {
				t.Fatalf("not a whole SVG picture: %.100q ... %.100q", out.String(), out.String()[max(out.Len()-100, 0):])
			}
			if limit := 1<<20 + 64*len(b); out.Len() > limit {
				t.Fatalf("a %d-byte file drew %d bytes", len(b), out.Len())
			}
		}
		runtime.ReadMemStats(&ms)
		if used, limit := ms.TotalAlloc-before, uint64(64<<20+256*len(b)); used > limit {
			t.Fatalf("a %d-byte file took %d bytes to draw", len(b), used)
		}
	})
}
