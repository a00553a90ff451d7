package cache

import (
	"encoding/binary"
	"runtime"
	"testing"
	"time"
)

// floodPacket is a UDP packet of flow i (a source address and port of its
// own) carrying seq i, built from tmpl (a udpFrom packet) in place.
func floodPacket(tmpl []byte, i uint32) []byte {
	p := append([]byte(nil), tmpl...)
	binary.BigEndian.PutUint32(p[12:16], 0x0a000000|i>>16) // 10.0.x.y
	binary.BigEndian.PutUint16(p[20:22], uint16(i))
	binary.BigEndian.PutUint32(p[28:32], i)
	return p
}

// TestOrdererFlowsBounded sends a million direct packets of a million
// flows through an orderer: the flows it remembers stay within MaxFlows,
// the heap does not grow with the flows, and every packet goes out in
// arrival order.
func TestOrdererFlowsBounded(t *testing.T) {
	const flows, chunk = 1_000_000, 10_000
	stream, direct := NewQueue(DefaultLimits(), nil), NewQueue(DefaultLimits(), nil)
	var next uint32
	var bad int
	o := &Orderer{Stream: stream, Direct: direct, MinRate: 1e12, Write: func(p []byte) error {
		if binary.BigEndian.Uint32(p[28:32]) != next {
			bad++
		}
		next++
		return nil
	}}
	o.SetCarrier(true)
	o.Ended()
	tmpl := udpFrom(t, 1, 0)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	start := time.Now()
	for i := uint32(0); i < flows; i += chunk {
		now := time.Now()
		for j := i; j < i+chunk; j++ {
			if r := direct.Push(floodPacket(tmpl, j), now); r != "" {
				t.Fatalf("push %d: dropped (%v)", j, r)
			}
		}
		for direct.Len() > 0 || o.hasPend {
			if _, _, err := o.step(); err != nil {
				t.Fatal(err)
			}
		}
		if n := o.first.len(); n > DefaultMaxFlows {
			t.Fatalf("after %d flows the orderer remembers %d first packets, cap %d", i+chunk, n, DefaultMaxFlows)
		}
		if n := o.released.len(); n > DefaultMaxFlows {
			t.Fatalf("after %d flows the orderer remembers %d released flows, cap %d", i+chunk, n, DefaultMaxFlows)
		}
	}
	took := time.Since(start)
	runtime.GC()
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	runtime.KeepAlive(o)
	kept := o.first.len() + o.released.len()
	t.Logf("%d flows in %v; heap grew %.1f MiB; remembered %d first, %d released: %d bytes each",
		flows, took, float64(grew)/(1<<20), o.first.len(), o.released.len(), grew/int64(max(kept, 1)))
	if next != flows || bad != 0 {
		t.Fatalf("delivered %d of %d, %d out of arrival order", next, flows, bad)
	}
	// Unbounded, the two maps held a million flows each: over 150 MiB.
	if grew > 16<<20 {
		t.Errorf("heap grew %d MiB over a million flows; the flow maps are not bounded", grew>>20)
	}
}

// TestOrdererForgetsSafely checks both sides of the cap: a flow among the
// MaxFlows/2 most recent is remembered, so its next direct packet goes at
// once; a flow pushed out by a flood of others is forgotten, and its next
// direct packet waits Settle again, behind a straggler the stream brings
// meanwhile, rather than go early.
func TestOrdererForgetsSafely(t *testing.T) {
	const settle, maxFlows = 80 * time.Millisecond, 64
	stream, direct := NewQueue(DefaultLimits(), nil), NewQueue(DefaultLimits(), nil)
	rec := &recorder{}
	o := &Orderer{Stream: stream, Direct: direct, Settle: settle, MaxFlows: maxFlows, MinRate: 1e6, Write: rec.write}
	runOrderer(t, o)
	o.SetCarrier(true)
	o.Ended()

	// Flows 1 and 2 settle once.
	direct.Push(udpFrom(t, 1, 0), time.Now())
	direct.Push(udpFrom(t, 2, 0), time.Now())
	waitCount(t, rec, 2)

	// Fewer new flows than MaxFlows/2 (20 of them): flow 1 is
	// remembered and its next packet goes without settling again.
	for i := range uint16(20) {
		direct.Push(udpFrom(t, 100+i, 0), time.Now())
	}
	waitCount(t, rec, 22)
	sent := time.Now()
	direct.Push(udpFrom(t, 1, 1), sent)
	waitCount(t, rec, 23)
	rec.mu.Lock()
	waited := rec.at[22].Sub(sent)
	rec.mu.Unlock()
	if waited >= settle {
		t.Errorf("flow 1, remembered, waited %v to go (settle %v)", waited, settle)
	}

	// A flood of 200 new flows, over the cap: flow 2 is forgotten.
	for i := range uint16(200) {
		direct.Push(udpFrom(t, 1000+i, 0), time.Now())
	}
	waitCount(t, rec, 223)
	if n := o.first.len(); n > maxFlows {
		t.Fatalf("remembers %d flows, cap %d", n, maxFlows)
	}
	// Flow 2's next direct packet counts as its first: a straggler the
	// stream brings within Settle still goes ahead of it.
	sent = time.Now()
	direct.Push(udpFrom(t, 2, 2), sent)
	time.Sleep(settle / 4)
	stream.Push(udpFrom(t, 2, 1), time.Now())
	waitCount(t, rec, 225)
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if got := rec.got[223:]; got[0] != [2]uint32{2, 1} || got[1] != [2]uint32{2, 2} {
		t.Errorf("flow 2 after the flood delivered as %v, want the straggler (2 1) first", got)
	}
	if waited := rec.at[224].Sub(sent); waited < settle {
		t.Errorf("flow 2, forgotten, went after %v, before settling again (%v)", waited, settle)
	}
}
