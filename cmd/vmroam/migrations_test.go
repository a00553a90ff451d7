package main

import (
	"encoding/json"
	"encoding/xml"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/wgagent/control"
)

// twoSides is one migration as its source (h1) and destination (h2) report it.
func twoSides() (src, dst control.Migration) {
	t0 := time.Date(2026, 11, 26, 14, 3, 7, 0, time.UTC)
	at := func(ms float64) *time.Time {
		t := t0.Add(time.Duration(ms * float64(time.Millisecond)))
		return &t
	}
	counts := func(n int, v uint32) []uint32 {
		c := make([]uint32, n)
		for i := range c {
			c[i] = v
		}
		return c
	}
	src = control.Migration{
		ID: "100.100.20.1@4", VIP: "100.100.20.1", From: "h1", To: "h2", Epoch: 5, Role: "source",
		Suspend: at(0), Claim: at(12.5), FlushStart: at(13), FlushEnd: at(14.25), Done: at(2014),
		Cached: 600, Flushed: 150, Ahead: 120, Forwarded: 450, Dropped: map[string]uint64{"max-age": 2},
		Timeline: &control.Timeline{Start: *at(0), Series: []control.TimelineSeries{
			{Name: control.SeriesCached, Counts: counts(50, 12)},
			{Name: control.SeriesFlushed, First: 13, Counts: counts(37, 16)},
		}},
	}
	dst = control.Migration{
		ID: "100.100.20.1@4", VIP: "100.100.20.1", From: "h1", To: "h2", Epoch: 5, Role: "destination",
		Claim: at(12), FlushStart: at(13.5), FlushEnd: at(14.5), CarrierUp: at(500), FirstDelivery: at(500.75), Done: at(2300),
		Held: 5000, Delivered: 5600, Late: 1,
		Timeline: &control.Timeline{Start: *at(11), Series: []control.TimelineSeries{
			{Name: control.SeriesHeld, First: 40, Counts: counts(400, 12)},
			{Name: control.SeriesReceived, First: 2, Counts: counts(40, 15)},
			{Name: control.SeriesDelivered, First: 489, Counts: counts(300, 18)},
		}},
	}
	return src, dst
}

func TestMigrationsList(t *testing.T) {
	src, _ := twoSides()
	under := control.Migration{ID: "100.100.20.7@2", VIP: "100.100.20.7", From: "h1", Role: "source", State: "caching", Suspend: src.Suspend}
	fakeAgent(t, &recordingBackend{migrations: []control.Migration{src, under}})
	code, stdout, stderr := runCLI(t, "migrations")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	lines := strings.Split(stdout, "\n")
	if len(lines) < 3 || !strings.HasPrefix(lines[0], "ID ") {
		t.Fatalf("table:\n%s", stdout)
	}
	// Suspend to claim 12.5 ms, flush 1.25 ms, total 2.014 s; no handover at
	// a source; 2 dropped.
	for _, want := range []string{"100.100.20.1@4", "source", "done", "12.5ms", "500µs", "1.25ms", "2.014s", "600"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("row %q lacks %q", lines[1], want)
		}
	}
	if f := strings.Fields(lines[1]); f[len(f)-1] != "2" {
		t.Errorf("row %q: dropped is not last and 2", lines[1])
	}
	if !strings.Contains(lines[2], "caching") {
		t.Errorf("the migration under way: %q", lines[2])
	}

	code, stdout, _ = runCLI(t, "migrations", "--json")
	var ms []control.Migration
	if code != 0 || json.Unmarshal([]byte(stdout), &ms) != nil || len(ms) != 2 || ms[0].Timeline != nil {
		t.Fatalf("--json: exit %d, %d migrations: %s", code, len(ms), stdout)
	}
}

func TestMigrationsOne(t *testing.T) {
	src, _ := twoSides()
	fakeAgent(t, &recordingBackend{migrations: []control.Migration{src}})
	code, stdout, _ := runCLI(t, "migrations", "100.100.20.1@4")
	if code != 0 || !strings.Contains(stdout, "flush end") || !strings.Contains(stdout, "+14.25ms") || !strings.Contains(stdout, "cached 600, flushed 150 (120 of them ahead") {
		t.Errorf("exit %d:\n%s", code, stdout)
	}
	code, stdout, _ = runCLI(t, "migrations", "--json", "100.100.20.1@4")
	var m control.Migration
	if code != 0 || json.Unmarshal([]byte(stdout), &m) != nil || m.Timeline == nil || m.Timeline.Series[0].Total() != 600 {
		t.Errorf("--json ID: exit %d: %.300s", code, stdout)
	}
	code, _, stderr := runCLI(t, "migrations", "100.100.20.1@9")
	if code != 1 || !strings.Contains(stderr, `no migration "100.100.20.1@9" on this host`) {
		t.Errorf("unknown ID: exit %d, %q", code, stderr)
	}
}

func TestMigrationsSVG(t *testing.T) {
	src, dst := twoSides()
	fakeAgent(t, &recordingBackend{migrations: []control.Migration{dst}})
	dir := t.TempDir()
	other := filepath.Join(dir, "h1.json")
	b, _ := json.Marshal(src)
	if err := os.WriteFile(other, b, 0o644); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "m.svg")
	code, stdout, stderr := runCLI(t, "migrations", "--svg", out, "--with", other, "100.100.20.1@4")
	if code != 0 || !strings.Contains(stdout, out) || stderr != "" {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	svg, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		XMLName xml.Name
		Groups  []struct {
			Class string `xml:"class,attr"`
			Role  string `xml:"data-role,attr"`
		} `xml:"g"`
	}
	if err := xml.Unmarshal(svg, &doc); err != nil || doc.XMLName.Local != "svg" {
		t.Fatalf("not an SVG document: %v", err)
	}
	var roles []string
	for _, g := range doc.Groups {
		if g.Class == "panel" {
			roles = append(roles, g.Role)
		}
	}
	if strings.Join(roles, ",") != "source,destination" {
		t.Errorf("panels %v, want both sides", roles)
	}

	// The other side of another migration: drawn, with a warning.
	src.ID, src.Epoch = "100.100.20.1@3", 4
	b, _ = json.Marshal(src)
	os.WriteFile(other, b, 0o644)
	if code, _, stderr := runCLI(t, "migrations", "--svg", out, "--with", other, "100.100.20.1@4"); code != 0 || !strings.Contains(stderr, "warning") {
		t.Errorf("mismatched --with: exit %d, stderr %q", code, stderr)
	}
	// Not a migration: refused before anything is written.
	os.WriteFile(other, []byte(`{"peers": []}`), 0o644)
	os.Remove(out)
	if code, _, stderr := runCLI(t, "migrations", "--svg", out, "--with", other, "100.100.20.1@4"); code != 1 || !strings.Contains(stderr, "not the output of") {
		t.Errorf("--with a status dump: exit %d, %q", code, stderr)
	}
	if _, err := os.Stat(out); err == nil {
		t.Error("a picture was written anyway")
	}
}

func TestMigrationsUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"migrations", "a", "b"}, "at most one"},
		{[]string{"migrations", "--svg", "x.svg"}, "which migration"},
		{[]string{"migrations", "--with", "x.json", "id"}, "--with is for --svg"},
		{[]string{"migrations", "--svg", "x.svg", "--json", "id"}, "choose one"},
	} {
		code, _, stderr := runCLI(t, c.args...)
		if code != 2 || !strings.Contains(stderr, c.want) {
			t.Errorf("%q: exit %d, stderr %q, want 2 and %q", c.args, code, stderr, c.want)
		}
	}
	if code, stdout, _ := runCLI(t, "migrations", "--help"); code != 0 || !strings.Contains(stdout, "--with") {
		t.Errorf("--help: exit %d\n%s", code, stdout)
	}
}
