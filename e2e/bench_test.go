package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
)

// BenchmarkThroughput measures iperf3 TCP throughput VM to VM through
// vmroam and through plain wireguard-go configured with `wg` on the same
// topology, alternating runs so that both see the same machine load. The
// ratio is vmroam's median over the baseline's; vmroam is not in the packet
// path outside a migration, so it should be about 1.
//
//	make bench   (go test -run '^$' -bench BenchmarkThroughput -benchtime 1x ./e2e/)
func BenchmarkThroughput(b *testing.B) {
	const rounds = 5
	const dur = 5 * time.Second
	if err := lab.RequireRoot(); err != nil {
		b.Skipf("needs root and network namespaces: %v", err)
	}
	dir := b.TempDir()
	wgGo, err := lab.BuildWireguardGo(context.Background(), dir)
	if err != nil {
		b.Fatal(err)
	}

	// fastBinary: a race-instrumented agent would measure the race detector.
	vl, err := lab.New(lab.Config{Hosts: 2, Binary: fastBinary, Logf: b.Logf})
	if err != nil {
		b.Fatal(err)
	}
	defer vl.Close()
	h1, h2 := vl.Hosts[0], vl.Hosts[1]
	for _, h := range vl.Hosts {
		if _, err := vl.StartAgent(h); err != nil {
			b.Fatal(err)
		}
	}
	va, err := vl.AddVM("a", h1, lab.BaselineVIP1)
	if err != nil {
		b.Fatal(err)
	}
	vb, err := vl.AddVM("b", h2, lab.BaselineVIP2)
	if err != nil {
		b.Fatal(err)
	}
	cli(b, vl, h1, "vip", "attach", va.VIPs[0].String(), "--dev", va.Vif)
	cli(b, vl, h2, "vip", "attach", vb.VIPs[0].String(), "--dev", vb.Vif)
	if err := vl.WaitPing(va, vb.VIPs[0], 30*time.Second); err != nil {
		b.Fatal(err)
	}

	bl, ba, bb, err := lab.NewBaseline(lab.Config{Logf: b.Logf}, wgGo)
	if err != nil {
		b.Fatal(err)
	}
	defer bl.Close()
	if err := bl.WaitPing(ba, bb.VIPs[0], 30*time.Second); err != nil {
		b.Fatal(err)
	}

	// One short warm-up each, then alternate.
	if _, err := vl.IperfTCP(va, vb, time.Second); err != nil {
		b.Fatal(err)
	}
	if _, err := bl.IperfTCP(ba, bb, time.Second); err != nil {
		b.Fatal(err)
	}
	var vm, base []float64
	b.ResetTimer()
	for range b.N {
		for i := range rounds {
			v, err := vl.IperfTCP(va, vb, dur)
			if err != nil {
				b.Fatal(err)
			}
			w, err := bl.IperfTCP(ba, bb, dur)
			if err != nil {
				b.Fatal(err)
			}
			b.Logf("round %d: vmroam %.0f Mbit/s, plain wireguard-go %.0f Mbit/s", i+1, v/1e6, w/1e6)
			vm, base = append(vm, v), append(base, w)
		}
	}
	b.StopTimer()
	mv, mb := median(vm), median(base)
	b.ReportMetric(mv/1e6, "vmroam-Mbit/s")
	b.ReportMetric(mb/1e6, "wggo-Mbit/s")
	b.ReportMetric(mv/mb, "ratio")
	b.Logf("median of %d runs of %v: vmroam %.0f Mbit/s, plain wireguard-go %.0f Mbit/s, ratio %.3f (goal >= 0.95)", len(vm), dur, mv/1e6, mb/1e6, mv/mb)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}
