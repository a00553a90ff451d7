package e2e

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/vmroam/vmroam/internal/promtest"
	"github.com/vmroam/vmroam/lab"
	"github.com/vmroam/vmroam/wgagent/control"
)

// metricsAddr is where every lab agent serves its metrics, inside its own
// host namespace.
const metricsAddr = "127.0.0.1:9474"

// scrape fetches h's agent's metrics from inside h's namespace and parses
// the exposition.
func scrape(t testing.TB, l *lab.Lab, h *lab.Host) promtest.Families {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	body, err := l.HTTPGet(ctx, h.NS, "http://"+metricsAddr+"/metrics")
	if err != nil {
		t.Fatalf("%s: scrape: %v", h.Name, err)
	}
	fams, err := promtest.Parse(bytes.NewReader(body))
	if err != nil {
		t.Fatalf("%s: %v", h.Name, err)
	}
	return fams
}

// lastMigration is h's most recent finished migration of vip in role.
func lastMigration(t testing.TB, l *lab.Lab, h *lab.Host, vip, role string) control.Migration {
	t.Helper()
	ms := status(t, l, h).Migrations
	for i := len(ms) - 1; i >= 0; i-- {
		if ms[i].VIP == vip && ms[i].Role == role && ms[i].Done != nil {
			return ms[i]
		}
	}
	t.Fatalf("%s: no finished %s migration of %s in status", h.Name, role, vip)
	return control.Migration{}
}

// TestMetricsAfterMigration runs the agents with --metrics-addr, moves a
// VM under pings from h1 to h2 (h3 runs the client), and checks what each
// agent's /metrics says, against `vmroam status` where both count.
func TestMetricsAfterMigration(t *testing.T) {
	l, m, c := migrationLab(t, 3, "--metrics-addr", metricsAddr)
	h1, h2, h3 := l.Hosts[0], l.Hosts[1], l.Hosts[2]

	// attachPair waited for every tunnel's session: each agent has two
	// alive peers with a recent handshake and traffic both ways.
	for _, h := range l.Hosts {
		fams := scrape(t, l, h)
		if v, _ := fams.Value("vmroam_peers", "state", "alive"); v != 2 {
			t.Errorf("%s: vmroam_peers{state=alive} = %v, want 2", h.Name, v)
		}
		if v, _ := fams.Value("vmroam_gossip_members"); v != 3 {
			t.Errorf("%s: vmroam_gossip_members = %v, want 3", h.Name, v)
		}
		for _, o := range l.Hosts {
			if o == h {
				continue
			}
			age, ok := fams.Value("vmroam_peer_handshake_age_seconds", "peer", o.Name)
			if !ok || math.IsInf(age, 1) || age > 180 {
				t.Errorf("%s: handshake age with %s = %v (present %v), want a recent handshake", h.Name, o.Name, age, ok)
			}
			rx, _ := fams.Value("vmroam_peer_receive_bytes_total", "peer", o.Name)
			tx, _ := fams.Value("vmroam_peer_transmit_bytes_total", "peer", o.Name)
			if rx == 0 || tx == 0 {
				t.Errorf("%s: bytes with %s: received %v, sent %v, want both > 0", h.Name, o.Name, rx, tx)
			}
		}
		if v, _ := fams.Value("vmroam_migrations_started_total", "role", "source"); v != 0 {
			t.Errorf("%s: a migration started before any: %v", h.Name, v)
		}
	}

	p, err := l.StartPinger(c, vipM, 5*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	// Suspended for a while first (as Xen's final copy), so the source
	// surely caches packets; then the VM moves, 500 ms paused.
	cli(t, l, h1, "migrate", "suspend", vipM.String())
	time.Sleep(200 * time.Millisecond)
	migrate(t, l, m, h2, 500*time.Millisecond, false)
	dst := waitMigrated(t, l, h2, vipM)
	ps := p.Stop(2 * time.Second)
	t.Logf("pings (not this test's subject): %v, longest loss run %d", ps, ps.LongestLossRun)

	// The source files the migration once its stragglers' linger is over.
	var fams1 promtest.Families
	eventually(t, 30*time.Second, "h1 counts the migration it handed over", func() error {
		fams1 = scrape(t, l, h1)
		if v, _ := fams1.Value("vmroam_migrations_completed_total", "role", "source"); v != 1 {
			return fmt.Errorf("vmroam_migrations_completed_total{role=source} = %v", v)
		}
		return nil
	})
	src := lastMigration(t, l, h1, vipM.String(), "source")
	fams2 := scrape(t, l, h2)
	fams3 := scrape(t, l, h3)

	type want struct {
		name   string
		labels []string
		value  float64
	}
	check := func(h *lab.Host, fams promtest.Families, ws ...want) {
		t.Helper()
		for _, w := range ws {
			if got, ok := fams.Value(w.name, w.labels...); !ok || got != w.value {
				t.Errorf("%s: %s%v = %v (present %v), want %v", h.Name, w.name, w.labels, got, ok, w.value)
			}
		}
	}
	check(h1, fams1,
		want{"vmroam_migrations_started_total", []string{"role", "source"}, 1},
		want{"vmroam_migrations_started_total", []string{"role", "destination"}, 0},
		want{"vmroam_migrations_completed_total", []string{"role", "destination"}, 0},
		want{"vmroam_migrations_aborted_total", nil, 0},
		want{"vmroam_migrations_timed_out_total", nil, 0},
		want{"vmroam_cache_packets_total", []string{"kind", "cached"}, float64(src.Cached)},
		want{"vmroam_cache_bytes_total", []string{"kind", "cached"}, float64(src.CachedBytes)},
		want{"vmroam_cache_packets_total", []string{"kind", "flushed"}, float64(src.Flushed)},
		want{"vmroam_cache_packets_total", []string{"kind", "forwarded"}, float64(src.Forwarded)},
		want{"vmroam_handover_duration_seconds", nil, 0},
		want{"vmroam_vips", []string{"state", "remote"}, 2},
		want{"vmroam_vips", []string{"state", "local"}, 0},
		want{"vmroam_peers", []string{"state", "alive"}, 2},
	)
	check(h2, fams2,
		want{"vmroam_migrations_started_total", []string{"role", "destination"}, 1},
		want{"vmroam_migrations_completed_total", []string{"role", "destination"}, 1},
		want{"vmroam_migrations_started_total", []string{"role", "source"}, 0},
		want{"vmroam_cache_packets_total", []string{"kind", "cached"}, 0},
		want{"vmroam_cache_packets_total", []string{"kind", "flushed"}, float64(dst.Flushed)},
		want{"vmroam_cache_packets_total", []string{"kind", "forwarded"}, float64(dst.Forwarded)},
		want{"vmroam_handover_duration_seconds", nil, 1},
		want{"vmroam_vips", []string{"state", "local"}, 1},
		want{"vmroam_vips", []string{"state", "remote"}, 1},
		want{"vmroam_peers", []string{"state", "alive"}, 2},
	)
	check(h3, fams3,
		want{"vmroam_migrations_started_total", []string{"role", "source"}, 0},
		want{"vmroam_migrations_started_total", []string{"role", "destination"}, 0},
		want{"vmroam_handover_duration_seconds", nil, 0},
		want{"vmroam_vips", []string{"state", "local"}, 1},
		want{"vmroam_vips", []string{"state", "remote"}, 1},
	)

	cached, _ := fams1.Value("vmroam_cache_packets_total", "kind", "cached")
	if cached == 0 {
		t.Error("h1: no packet cached: the pings did not reach the cache")
	}
	if flushed, _ := fams2.Value("vmroam_cache_bytes_total", "kind", "flushed"); flushed == 0 && dst.Flushed > 0 {
		t.Errorf("h2: %d packets flushed to it and 0 bytes", dst.Flushed)
	}
	// Delivery goes on for packets already on their way when status's
	// record is filed, so the counters may be ahead of it.
	delivered, _ := fams2.Value("vmroam_cache_packets_total", "kind", "delivered")
	if delivered == 0 || delivered < float64(dst.Delivered) {
		t.Errorf("h2: delivered %v, want > 0 and at least status's %d", delivered, dst.Delivered)
	}
	if held, _ := fams2.Value("vmroam_cache_packets_total", "kind", "held"); held < float64(dst.Held) {
		t.Errorf("h2: held %v, want at least status's %d", held, dst.Held)
	}
	if h := fams2["vmroam_handover_duration_seconds"].GetMetric(); len(h) == 1 {
		sum, want := h[0].GetHistogram().GetSampleSum(), handover(dst).Seconds()
		if math.Abs(sum-want) > 1e-6 {
			t.Errorf("h2: handover histogram sum %v s, status says %v s", sum, want)
		}
	}
	for _, h := range []struct {
		host *lab.Host
		fams promtest.Families
	}{{h1, fams1}, {h2, fams2}, {h3, fams3}} {
		if n := h.fams.Sum("vmroam_cache_dropped_packets_total"); n != 0 {
			t.Errorf("%s: the cache dropped %v packets", h.host.Name, n)
		}
		if runs, _ := h.fams.Value("vmroam_reconcile_runs_total"); runs == 0 {
			t.Errorf("%s: no reconcile counted", h.host.Name)
		}
		if n := h.fams.Sum("vmroam_reconcile_errors_total"); n != 0 {
			t.Logf("%s: %v reconcile steps failed (retried)", h.host.Name, n)
		}
	}
	t.Logf("h1: cached %v (%d in status), flushed %d, forwarded %d; h2: held %d, delivered %v, handover %v",
		cached, src.Cached, src.Flushed, src.Forwarded, dst.Held, delivered, handover(dst))
}
