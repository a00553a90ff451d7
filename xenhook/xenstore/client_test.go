package xenstore_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmroam/vmroam/xenhook/xenstore"
	"github.com/vmroam/vmroam/xenhook/xenstore/xenstoretest"
)

func dial(t *testing.T) (*xenstoretest.Server, *xenstore.Client) {
	t.Helper()
	srv := xenstoretest.NewServer(t)
	c, err := xenstore.Dial(srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return srv, c
}

// nextEvent waits for one event; a closed channel or a timeout fails.
func nextEvent(t *testing.T, c *xenstore.Client) xenstore.Event {
	t.Helper()
	select {
	case ev, ok := <-c.Events():
		if !ok {
			t.Fatal("Events closed")
		}
		return ev
	case <-time.After(5 * time.Second):
		t.Fatal("no watch event within 5s")
	}
	return xenstore.Event{}
}

func TestReadWriteDirectory(t *testing.T) {
	_, c := dial(t)
	if err := c.Write("/local/domain/5/name", "vm1"); err != nil {
		t.Fatal(err)
	}
	if err := c.Write("/local/domain/5/control/shutdown", ""); err != nil {
		t.Fatal(err)
	}
	if err := c.Write("/local/domain/7/name", "vm2"); err != nil {
		t.Fatal(err)
	}
	got, err := c.Read("/local/domain/5/name")
	if err != nil || got != "vm1" {
		t.Fatalf("Read = %q, %v; want vm1", got, err)
	}
	// A parent created on the way has an empty value.
	if got, err := c.Read("/local/domain/5"); err != nil || got != "" {
		t.Fatalf("Read of an implicit parent = %q, %v", got, err)
	}
	dir, err := c.Directory("/local/domain")
	if err != nil || !slices.Equal(dir, []string{"5", "7"}) {
		t.Fatalf("Directory = %q, %v; want [5 7]", dir, err)
	}
	dir, err = c.Directory("/local/domain/5/control/shutdown")
	if err != nil || len(dir) != 0 {
		t.Fatalf("Directory of a leaf = %q, %v; want empty", dir, err)
	}
	// Values are bytes, not C strings.
	if err := c.Write("/bin", "a\x00b"); err != nil {
		t.Fatal(err)
	}
	if got, _ := c.Read("/bin"); got != "a\x00b" {
		t.Fatalf("binary value read back as %q", got)
	}
}

func TestErrors(t *testing.T) {
	_, c := dial(t)
	_, err := c.Read("/local/domain/9/name")
	if !errors.Is(err, xenstore.ErrNotFound) {
		t.Fatalf("Read of a missing node: %v, want ErrNotFound", err)
	}
	var xe *xenstore.Error
	if !errors.As(err, &xe) || xe.Errno != "ENOENT" || xe.Op != "read" || xe.Path != "/local/domain/9/name" {
		t.Fatalf("error %#v, want read /local/domain/9/name ENOENT", err)
	}
	if _, err := c.Directory("/nope"); !errors.Is(err, xenstore.ErrNotFound) {
		t.Fatalf("Directory of a missing node: %v", err)
	}
	err = c.Write("/a//b", "x")
	if !errors.As(err, &xe) || xe.Errno != "EINVAL" || errors.Is(err, xenstore.ErrNotFound) {
		t.Fatalf("Write to a bad path: %v, want EINVAL", err)
	}
	if !strings.Contains(err.Error(), "EINVAL") {
		t.Fatalf("error text %q does not name the errno", err)
	}
	// Refused before sending: xenstored would drop the whole connection.
	if err := c.Write("/big", strings.Repeat("x", 5000)); err == nil {
		t.Fatal("Write of 5000 bytes succeeded")
	}
	if err := c.Write("/a\x00b", "x"); err == nil {
		t.Fatal("Write to a path with a NUL succeeded")
	}
	// The connection survived all of that.
	if err := c.Write("/ok", "1"); err != nil {
		t.Fatalf("Write after refusals: %v", err)
	}
}

func TestConcurrentRequests(t *testing.T) {
	_, c := dial(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				p := fmt.Sprintf("/t/%d/%d", g, i)
				v := fmt.Sprintf("g%d-i%d", g, i)
				if err := c.Write(p, v); err != nil {
					errs <- err
					return
				}
				got, err := c.Read(p)
				if err != nil || got != v {
					errs <- fmt.Errorf("Read %s = %q, %v; want %q", p, got, err, v)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	dir, err := c.Directory("/t")
	if err != nil || len(dir) != 8 {
		t.Fatalf("Directory /t = %q, %v", dir, err)
	}
}

func TestWatch(t *testing.T) {
	srv, c := dial(t)
	if err := c.Watch("/local/domain/5", "tok"); err != nil {
		t.Fatal(err)
	}
	// The event xenstored fires at registration, for a path that does not
	// even exist yet.
	if ev := nextEvent(t, c); ev != (xenstore.Event{Path: "/local/domain/5", Token: "tok"}) {
		t.Fatalf("first event %+v, want the registration event", ev)
	}
	if err := c.Write("/local/domain/5/control/shutdown", "suspend"); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, c); ev != (xenstore.Event{Path: "/local/domain/5/control/shutdown", Token: "tok"}) {
		t.Fatalf("event %+v after a client write", ev)
	}
	srv.Write("/local/domain/5/name", "vm1")
	if ev := nextEvent(t, c); ev.Path != "/local/domain/5/name" {
		t.Fatalf("event %+v after a server write", ev)
	}
	srv.Write("/local/domain/6/name", "other") // not below the watch
	srv.Remove("/local/domain/5")
	if ev := nextEvent(t, c); ev.Path != "/local/domain/5" {
		t.Fatalf("event %+v after removing the watched node", ev)
	}

	if err := c.Watch("/local/domain/5", "tok"); !isErrno(err, "EEXIST") {
		t.Fatalf("second Watch with the same token: %v, want EEXIST", err)
	}
	if err := c.Unwatch("/local/domain/5", "tok"); err != nil {
		t.Fatal(err)
	}
	if err := c.Unwatch("/local/domain/5", "tok"); !isErrno(err, "ENOENT") {
		t.Fatalf("second Unwatch: %v, want ENOENT", err)
	}
	srv.Write("/local/domain/5/name", "vm1")
	// One connection delivers in order: the sentinel's registration event
	// comes after anything the old watch could still have fired.
	if err := c.Watch("/sentinel", "s"); err != nil {
		t.Fatal(err)
	}
	if ev := nextEvent(t, c); ev.Token != "s" {
		t.Fatalf("event %+v after Unwatch", ev)
	}

	if err := c.Watch("@introduceDomain", "intro"); err != nil {
		t.Fatal(err)
	}
	nextEvent(t, c)
	srv.Write("@introduceDomain", "")
	if ev := nextEvent(t, c); ev != (xenstore.Event{Path: "@introduceDomain", Token: "intro"}) {
		t.Fatalf("special watch event %+v", ev)
	}
	if c.Dropped() != 0 {
		t.Fatalf("Dropped = %d", c.Dropped())
	}
}

func isErrno(err error, name string) bool {
	var xe *xenstore.Error
	return errors.As(err, &xe) && xe.Errno == name
}

func TestClose(t *testing.T) {
	_, c := dial(t)
	if err := c.Watch("/x", "t"); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	drain(t, c)
	if _, err := c.Read("/x"); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read after Close: %v, want net.ErrClosed", err)
	}
}

// drain reads Events until it is closed.
func drain(t *testing.T, c *xenstore.Client) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case _, ok := <-c.Events():
			if !ok {
				return
			}
		case <-timeout:
			t.Fatal("Events not closed")
		}
	}
}

// rawServer accepts one connection and hands it to serve: a xenstored that
// misbehaves on purpose.
func rawServer(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "raw.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conn net.Conn
	wg.Go(func() {
		nc, err := ln.Accept()
		if err != nil {
			return
		}
		mu.Lock()
		conn = nc
		mu.Unlock()
		serve(nc)
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		if conn != nil {
			conn.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return path
}

type hdr struct{ typ, id, tx, n uint32 }

func frame(h hdr, payload string) []byte {
	b := make([]byte, 16+len(payload))
	binary.LittleEndian.PutUint32(b[0:], h.typ)
	binary.LittleEndian.PutUint32(b[4:], h.id)
	binary.LittleEndian.PutUint32(b[8:], h.tx)
	binary.LittleEndian.PutUint32(b[12:], h.n)
	copy(b[16:], payload)
	return b
}

// readRequest reads one request and returns its header.
func readRequest(nc net.Conn) (hdr, error) {
	var b [16]byte
	if _, err := io.ReadFull(nc, b[:]); err != nil {
		return hdr{}, err
	}
	h := hdr{
		typ: binary.LittleEndian.Uint32(b[0:]),
		id:  binary.LittleEndian.Uint32(b[4:]),
		tx:  binary.LittleEndian.Uint32(b[8:]),
		n:   binary.LittleEndian.Uint32(b[12:]),
	}
	_, err := io.CopyN(io.Discard, nc, int64(h.n))
	return h, err
}

func TestMalformedReplyEndsConnection(t *testing.T) {
	const read, event, xsError = 2, 15, 16
	for _, tc := range []struct {
		name  string
		reply func(req hdr) []byte
		want  string
	}{
		{"payload over 4096", func(req hdr) []byte { return frame(hdr{read, req.id, 0, 4097}, "") }, "more than 4096"},
		{"unknown type", func(req hdr) []byte { return frame(hdr{99, req.id, 0, 0}, "") }, "unknown type"},
		{"no such request", func(req hdr) []byte { return frame(hdr{read, req.id + 1, 0, 1}, "x") }, "not pending"},
		{"wrong reply type", func(req hdr) []byte { return frame(hdr{11, req.id, 0, 3}, "OK\x00") }, "answers"},
		{"transaction id", func(req hdr) []byte { return frame(hdr{read, req.id, 7, 1}, "x") }, "transaction"},
		{"event without token", func(req hdr) []byte { return frame(hdr{event, 0, 0, 3}, "/a\x00") }, "watch event"},
		{"error name garbage", func(req hdr) []byte { return frame(hdr{xsError, req.id, 0, 3}, "e!\x00") }, "error"},
		{"truncated payload", func(req hdr) []byte { return frame(hdr{read, req.id, 0, 10}, "abc") }, "unexpected EOF"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := rawServer(t, func(nc net.Conn) {
				req, err := readRequest(nc)
				if err != nil {
					return
				}
				nc.Write(tc.reply(req))
				if tc.name == "truncated payload" {
					nc.Close()
					return
				}
				io.Copy(io.Discard, nc)
			})
			c, err := xenstore.Dial(path)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_, err = c.Read("/x")
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Read: %v, want an error with %q", err, tc.want)
			}
			if tc.name == "error name garbage" {
				// A bad payload in a well-framed reply fails the request
				// only; the connection is still in step.
				return
			}
			drain(t, c)
			if _, err := c.Read("/x"); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Read after the failure: %v, want the cause %q", err, tc.want)
			}
		})
	}
}

func TestCloseUnblocksPending(t *testing.T) {
	got := make(chan struct{})
	path := rawServer(t, func(nc net.Conn) {
		if _, err := readRequest(nc); err == nil {
			close(got)
		}
		io.Copy(io.Discard, nc) // never answers
	})
	c, err := xenstore.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := c.Read("/x")
		errc <- err
	}()
	<-got
	c.Close()
	select {
	case err := <-errc:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("pending Read: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("pending Read still blocked after Close")
	}
}

func TestEventsNeverBlockReplies(t *testing.T) {
	const events = 1100
	path := rawServer(t, func(nc net.Conn) {
		req, err := readRequest(nc)
		if err != nil {
			return
		}
		var b []byte
		for i := range events {
			b = append(b, frame(hdr{15, 0, 0, 0}, "")...)
			p := fmt.Sprintf("/e/%d\x00tok\x00", i)
			binary.LittleEndian.PutUint32(b[len(b)-4:], uint32(len(p)))
			b = append(b, p...)
		}
		b = append(b, frame(hdr{2, req.id, 0, 5}, "value")...)
		nc.Write(b)
		io.Copy(io.Discard, nc)
	})
	c, err := xenstore.Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Nobody reads Events: the reply must arrive all the same.
	v, err := c.Read("/x")
	if err != nil || v != "value" {
		t.Fatalf("Read = %q, %v", v, err)
	}
	if d := c.Dropped(); d != events-1024 {
		t.Fatalf("Dropped = %d, want %d", d, events-1024)
	}
	if ev := nextEvent(t, c); ev.Path != "/e/0" || ev.Token != "tok" {
		t.Fatalf("first queued event %+v", ev)
	}
}
