package xenhook

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/vmroam/vmroam/xenhook/xenstore"
	"github.com/vmroam/vmroam/xenhook/xenstore/xenstoretest"
)

// recorder is a Handler that lists what it was told.
type recorder struct{ ch chan string }

func (r *recorder) Suspending(domid int, name string) {
	r.ch <- fmt.Sprintf("suspending %d %s", domid, name)
}

func (r *recorder) Incoming(domid int, name string) {
	r.ch <- fmt.Sprintf("incoming %d %s", domid, name)
}

func (r *recorder) IncomingVIPs(domid int, name string, vips []netip.Addr) {
	r.ch <- fmt.Sprintf("vips %d %s %v", domid, name, vips)
}

// until returns the calls before want, failing if want does not come.
func (r *recorder) until(t *testing.T, want string) []string {
	t.Helper()
	var before []string
	for {
		select {
		case got := <-r.ch:
			if got == want {
				return before
			}
			before = append(before, got)
		case <-time.After(5 * time.Second):
			t.Fatalf("no %q within 5s; got %q", want, before)
		}
	}
}

// env is a xenstored, a client and a running Watcher.
type env struct {
	srv  *xenstoretest.Server
	c    *xenstore.Client
	w    *Watcher
	rec  *recorder
	stop func() error // cancels Run and returns its result
	n    int          // barriers so far
}

func newEnv(t *testing.T, follow ...int) *env {
	t.Helper()
	e := &env{srv: xenstoretest.NewServer(t), rec: &recorder{ch: make(chan string, 100)}}
	var err error
	if e.c, err = xenstore.Dial(e.srv.Path()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.c.Close() })
	e.srv.Write("/local/domain/0/name", "Domain-0")
	e.srv.Write("/local/domain/5/name", "vm1")
	e.w = NewWatcher(e.c, e.rec, nil)
	for _, id := range follow {
		e.w.Follow(id)
	}
	return e
}

func (e *env) start(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- e.w.Run(ctx) }()
	stop := sync.OnceValue(func() error {
		cancel()
		select {
		case err := <-done:
			return err
		case <-time.After(5 * time.Second):
			t.Error("Run did not return within 5s of cancel")
			return nil
		}
	})
	e.stop = stop
	t.Cleanup(func() { stop() })
}

// barrier creates an incoming domain and waits for it: the watcher handles
// events in the order xenstored sent them, so everything written before has
// been handled. It returns the calls seen meanwhile.
func (e *env) barrier(t *testing.T) []string {
	t.Helper()
	e.n++
	id := 900 + e.n
	e.srv.Write(fmt.Sprintf("/local/domain/%d/name", id), fmt.Sprintf("barrier%d--incoming", e.n))
	return e.rec.until(t, fmt.Sprintf("incoming %d barrier%d", id, e.n))
}

func expectNone(t *testing.T, got []string, what string) {
	t.Helper()
	if len(got) != 0 {
		t.Fatalf("%s: unexpected calls %q", what, got)
	}
}

func TestSuspendReportedOncePerRequest(t *testing.T) {
	e := newEnv(t, 5)
	e.start(t)
	shutdown := "/local/domain/5/control/shutdown"

	e.srv.Write(shutdown, "suspend")
	expectNone(t, e.rec.until(t, "suspending 5 vm1"), "before the first Suspending")

	// The guest acknowledges by clearing the node; other writes come and go.
	e.srv.Write(shutdown, "")
	e.srv.Write("/local/domain/5/control/feature-suspend", "1")
	e.srv.Write("/local/domain/5/data/updated", "now")
	e.srv.Write("@introduceDomain", "")
	expectNone(t, e.barrier(t), "after the acknowledgement")

	// A second request (say, a retried migration) is a new suspend.
	e.srv.Write(shutdown, "suspend")
	expectNone(t, e.rec.until(t, "suspending 5 vm1"), "before the second Suspending")
	e.srv.Write(shutdown, "suspend") // the same request written again
	e.srv.Write(shutdown, "")

	// The migration succeeds: renamed away, then destroyed.
	e.srv.Write("/local/domain/5/name", "vm1--migratedaway")
	e.srv.Remove("/local/domain/5")
	e.srv.Write("@releaseDomain", "")
	expectNone(t, e.barrier(t), "after the rename and the destruction")
}

func TestSuspendSeenAtRename(t *testing.T) {
	// A guest asked through its suspend event channel leaves
	// control/shutdown alone: the rename is the first sign.
	e := newEnv(t, 5)
	e.start(t)
	e.srv.Write("/local/domain/5/name", "vm1--migratedaway")
	e.rec.until(t, "suspending 5 vm1")
	// The destination fails: xl renames the domain back and resumes it.
	e.srv.Write("/local/domain/5/name", "vm1")
	expectNone(t, e.barrier(t), "after the rename back")
	// The next attempt is reported again.
	e.srv.Write("/local/domain/5/name", "vm1--migratedaway")
	expectNone(t, e.rec.until(t, "suspending 5 vm1"), "second attempt")
}

func TestSuspendBeforeFollow(t *testing.T) {
	// A request already pending when the domain is followed (an agent
	// restarted mid-migration) is reported: the registration event reads it.
	e := newEnv(t)
	e.srv.Write("/local/domain/5/control/shutdown", "suspend")
	e.start(t)
	expectNone(t, e.barrier(t), "before Follow")
	e.w.Follow(5)
	e.w.Follow(5)
	e.rec.until(t, "suspending 5 vm1")
	expectNone(t, e.barrier(t), "after following twice")
}

func TestIncoming(t *testing.T) {
	e := newEnv(t)
	// Already there when Run starts.
	e.srv.Write("/local/domain/8/name", "vm3--incoming")
	e.start(t)
	e.rec.until(t, "incoming 8 vm3")

	// libxl__domain_make writes the domain's nodes; the name says it all.
	e.srv.Write("/local/domain/7/vm", "/vm/0b1c")
	e.srv.Write("/local/domain/7/name", "vm1--incoming")
	expectNone(t, e.rec.until(t, "incoming 7 vm1"), "before Incoming")

	// Devices, the introduction, unrelated writes: nothing new.
	e.srv.Write("/local/domain/7/device/vif/0/state", "1")
	e.srv.Write("/local/domain/7/name", "vm1--incoming")
	e.srv.Write("@introduceDomain", "")
	e.srv.Write("/local/domain/5/name", "vm1--migratedaway") // a source here, not followed
	// Migration done: renamed to its own name.
	e.srv.Write("/local/domain/7/name", "vm1")
	expectNone(t, e.barrier(t), "after the incoming domain settled")

	// The domid is reused by another incoming domain.
	e.srv.Remove("/local/domain/7")
	e.srv.Write("/local/domain/7/name", "vm4--incoming")
	expectNone(t, e.rec.until(t, "incoming 7 vm4"), "domid reuse")
	// A name that is only the suffix is no migration.
	e.srv.Write("/local/domain/9/name", "--incoming")
	expectNone(t, e.barrier(t), "empty name")
}

// TestIncomingVIPs: the addresses of an incoming domain's vifs are
// reported as libxl writes them (after the memory stream, before the
// hotplug script), once per vif, and never for a domain that is not
// arriving.
func TestIncomingVIPs(t *testing.T) {
	e := newEnv(t)
	// An incoming domain whose vif exists already when Run starts (the
	// agent restarted during a migration), in dom0's backend.
	e.srv.Write("/local/domain/8/name", "vm3--incoming")
	e.srv.Write("/local/domain/0/backend/vif/8/0/ip", "100.64.0.8")
	e.start(t)
	e.rec.until(t, "incoming 8 vm3")
	e.rec.until(t, "vips 8 vm3 [100.64.0.8]")

	e.srv.Write("/local/domain/7/name", "vm1--incoming")
	e.rec.until(t, "incoming 7 vm1")
	// libxl adds the vif: frontend, then backend, in one transaction.
	e.srv.Write("/local/domain/7/device/vif/0/backend", "/local/domain/0/backend/vif/7/0")
	e.srv.Write("/local/domain/7/device/vif/0/state", "1")
	e.srv.Write("/local/domain/0/backend/vif/7/0/mac", "00:16:3e:00:00:07")
	e.srv.Write("/local/domain/0/backend/vif/7/0/ip", "100.64.0.7 fd00::7/128 10.0.0.0/24 nonsense")
	expectNone(t, e.rec.until(t, "vips 7 vm1 [100.64.0.7 fd00::7]"), "before the vif's addresses")
	// The same again, other nodes of the vif: nothing new.
	e.srv.Write("/local/domain/0/backend/vif/7/0/ip", "100.64.0.7 fd00::7/128 10.0.0.0/24 nonsense")
	e.srv.Write("/local/domain/0/backend/vif/7/0/state", "2")
	e.srv.Write("/local/domain/0/backend/vif/7/0/hotplug-status", "connected")
	// A second vif served by a driver domain (backend 3), named by the
	// frontend's link.
	e.srv.Write("/local/domain/3/backend/vif/7/1/ip", "100.64.0.17")
	e.srv.Write("/local/domain/7/device/vif/1/backend", "/local/domain/3/backend/vif/7/1")
	expectNone(t, e.rec.until(t, "vips 7 vm1 [100.64.0.17]"), "second vif")
	// A vif of a domain that is not arriving (here already, or a source).
	e.srv.Write("/local/domain/0/backend/vif/5/0/ip", "100.64.0.5")
	// Arrived: renamed to its own name; later writes are no arrival.
	e.srv.Write("/local/domain/7/name", "vm1")
	e.srv.Write("/local/domain/0/backend/vif/7/0/ip", "100.64.0.77")
	expectNone(t, e.barrier(t), "after the arrival")
}

func TestUnfollow(t *testing.T) {
	e := newEnv(t, 5)
	e.start(t)
	shutdown := "/local/domain/5/control/shutdown"
	e.srv.Write(shutdown, "suspend")
	e.rec.until(t, "suspending 5 vm1")
	e.srv.Write(shutdown, "")
	e.w.Unfollow(5)
	e.w.Unfollow(5)
	e.srv.Write(shutdown, "suspend")
	e.srv.Write("/local/domain/5/name", "vm1--migratedaway")
	expectNone(t, e.barrier(t), "after Unfollow")

	// Following again starts afresh and reads the pending request.
	e.w.Follow(5)
	e.rec.until(t, "suspending 5 vm1")
}

// TestRefollowAtOnce: an Unfollow and a Follow that reach Run as one (CI
// saw it under load) still start afresh: the pending request is reported
// again, as after any Follow.
func TestRefollowAtOnce(t *testing.T) {
	e := newEnv(t, 5)
	e.start(t)
	e.srv.Write("/local/domain/5/control/shutdown", "suspend")
	e.rec.until(t, "suspending 5 vm1")
	e.w.Unfollow(5)
	e.w.Follow(5)
	e.rec.until(t, "suspending 5 vm1")
}

func TestRunStopsAndLeavesNothing(t *testing.T) {
	e := newEnv(t, 5)
	// Settle the client's and server's goroutines before counting.
	if _, err := e.c.Read("/local/domain/5/name"); err != nil {
		t.Fatal(err)
	}
	base := runtime.NumGoroutine()
	e.start(t)
	e.srv.Write("/local/domain/5/control/shutdown", "suspend")
	e.rec.until(t, "suspending 5 vm1")
	if err := e.stop(); err != nil {
		t.Fatalf("Run after cancel: %v, want nil", err)
	}
	deadline := time.Now().Add(2 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines, %d before Run:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Run removed its watches: the client is quiet and usable.
	for len(e.c.Events()) > 0 {
		<-e.c.Events()
	}
	e.srv.Write("/local/domain/5/control/shutdown", "")
	e.srv.Write("/local/domain/12/name", "x--incoming")
	if err := e.c.Watch("/sentinel", "s"); err != nil {
		t.Fatal(err)
	}
	if ev := <-e.c.Events(); ev.Token != "s" {
		t.Fatalf("event %+v after Run returned", ev)
	}
	// And a new Run on the same client works.
	e.start(t)
	e.srv.Write("/local/domain/13/name", "y--incoming")
	e.rec.until(t, "incoming 13 y")
}

func TestRunEndsWhenClientFails(t *testing.T) {
	e := newEnv(t, 5)
	ctx := t.Context()
	done := make(chan error, 1)
	go func() { done <- e.w.Run(ctx) }()
	e.srv.Write("/local/domain/5/control/shutdown", "suspend")
	e.rec.until(t, "suspending 5 vm1")
	e.c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, errEventsEnded) && !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Run = %v, want the closed client's error", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run still running after the client closed")
	}
}

func TestDomidOfVif(t *testing.T) {
	for _, tc := range []struct {
		name  string
		domid int
		ok    bool
	}{
		{"vif5.0", 5, true},
		{"vif12.3", 12, true},
		{"vif0.0", 0, true},
		{"vif5.0-emu", 5, true},
		{"vif32751.1", 32751, true},
		{"vif32752.0", 0, false}, // DOMID_FIRST_RESERVED
		{"vif5", 0, false},
		{"vif.0", 0, false},
		{"vif5.", 0, false},
		{"vif05.0", 0, false},
		{"vif-5.0", 0, false},
		{"vif+5.0", 0, false},
		{"vif5.0.1", 0, false},
		{"vif5.0-emu-emu", 0, false},
		{"vif5.x", 0, false},
		{"tap5.0", 0, false},
		{"eth0", 0, false},
		{"vif99999999999999999999.0", 0, false},
		{"", 0, false},
	} {
		domid, ok := DomidOfVif(tc.name)
		if domid != tc.domid || ok != tc.ok {
			t.Errorf("DomidOfVif(%q) = %d, %v; want %d, %v", tc.name, domid, ok, tc.domid, tc.ok)
		}
	}
}

// gated is a recorder that stalls on the incoming domain "stall" until the
// gate opens, so that events pile up in the client.
type gated struct {
	recorder
	gate chan struct{}
}

func (g *gated) Incoming(domid int, name string) {
	if name == "stall" {
		<-g.gate
	}
	g.recorder.Incoming(domid, name)
}

func TestResyncAfterDroppedEvents(t *testing.T) {
	e := newEnv(t, 5)
	g := &gated{recorder: *e.rec, gate: make(chan struct{})}
	e.w = NewWatcher(e.c, g, nil)
	e.w.Follow(5)
	// Seeing this request proves the registration events were handled:
	// they read the state, and would hide a missing resync.
	e.srv.Write("/local/domain/5/control/shutdown", "suspend")
	e.start(t)
	e.rec.until(t, "suspending 5 vm1")
	e.srv.Write("/local/domain/5/control/shutdown", "")
	expectNone(t, e.barrier(t), "after the acknowledgement")
	e.srv.Write("/local/domain/3/name", "stall--incoming")
	// Wait until Run is stuck in the handler, then flood it.
	deadline := time.Now().Add(5 * time.Second)
	for e.c.Dropped() == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no event was dropped")
		}
		for i := range 200 {
			e.srv.Write(fmt.Sprintf("/local/domain/3/data/k%d", i), "v")
		}
	}
	// A reply comes after every event sent before it: once Read returns,
	// the client has queued or dropped them all, and its buffer is full.
	sync := func() {
		t.Helper()
		if _, err := e.c.Read("/local/domain/5/name"); err != nil {
			t.Fatal(err)
		}
	}
	sync()
	dropped := e.c.Dropped()
	// The request comes while the buffer is full: its events are lost.
	e.srv.Write("/local/domain/5/control/shutdown", "suspend")
	e.srv.Write("/local/domain/5/name", "vm1--migratedaway")
	sync()
	if d := e.c.Dropped() - dropped; d < 4 {
		t.Fatalf("%d more events dropped, want the 4 of the suspend and rename", d)
	}
	close(g.gate)
	e.rec.until(t, "incoming 3 stall")
	e.rec.until(t, "suspending 5 vm1")
	expectNone(t, e.barrier(t), "after the resync")
}
