package xenstoretest_test

import (
	"encoding/binary"
	"io"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/vmroam/vmroam/xenhook/xenstore"
	"github.com/vmroam/vmroam/xenhook/xenstore/xenstoretest"
)

// events collects events until one with the sentinel token arrives.
func eventsUntil(t *testing.T, c *xenstore.Client, sentinel string) []xenstore.Event {
	t.Helper()
	var got []xenstore.Event
	for {
		select {
		case ev, ok := <-c.Events():
			if !ok {
				t.Fatal("Events closed")
			}
			if ev.Token == sentinel {
				return got
			}
			got = append(got, ev)
		case <-time.After(5 * time.Second):
			t.Fatalf("no sentinel event; got %v", got)
		}
	}
}

func TestRemoveFiresLikeXenstored(t *testing.T) {
	srv := xenstoretest.NewServer(t)
	c, err := xenstore.Dial(srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	srv.Write("/a/b/c", "1")
	srv.Write("/a/d", "2")
	for _, w := range []string{"/", "/a", "/a/b", "/a/b/c", "/x"} {
		if err := c.Watch(w, w); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Watch("/s1", "s1"); err != nil {
		t.Fatal(err)
	}
	if got := eventsUntil(t, c, "s1"); len(got) != 5 {
		t.Fatalf("registration events %v, want one per watch", got)
	}

	srv.Remove("/a")
	srv.Remove("/nothing/here")
	if err := c.Watch("/s2", "s2"); err != nil {
		t.Fatal(err)
	}
	got := eventsUntil(t, c, "s2")
	// Descendants fire exact, children first; the removed node itself fires
	// for watches on it and above.
	want := []xenstore.Event{
		{Path: "/a/b/c", Token: "/a/b/c"},
		{Path: "/a/b", Token: "/a/b"},
		{Path: "/a", Token: "/"},
		{Path: "/a", Token: "/a"},
	}
	if !sameEvents(got, want) {
		t.Fatalf("events on Remove:\n got %v\nwant %v", got, want)
	}
	if _, err := c.Read("/a/b"); err == nil {
		t.Fatal("removed node still readable")
	}
	if dir, err := c.Directory("/"); err != nil || !slices.Equal(dir, []string{"tool"}) {
		t.Fatalf("Directory / = %q, %v", dir, err)
	}
}

// sameEvents compares ignoring the order between events of one path, which
// depends on the order of watches.
func sameEvents(got, want []xenstore.Event) bool {
	key := func(a, b xenstore.Event) int {
		if a.Path != b.Path {
			return len(b.Path) - len(a.Path)
		}
		if a.Token < b.Token {
			return -1
		}
		if a.Token > b.Token {
			return 1
		}
		return 0
	}
	g, w := slices.Clone(got), slices.Clone(want)
	slices.SortStableFunc(g, key)
	slices.SortStableFunc(w, key)
	return slices.Equal(g, w)
}

func TestOversizedRequestDropsConnection(t *testing.T) {
	srv := xenstoretest.NewServer(t)
	nc, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	var h [16]byte
	binary.LittleEndian.PutUint32(h[0:], 2)
	binary.LittleEndian.PutUint32(h[12:], 4097)
	if _, err := nc.Write(h[:]); err != nil {
		t.Fatal(err)
	}
	nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.ReadFull(nc, h[:]); err != io.EOF {
		t.Fatalf("read after an oversized request: %d bytes, %v; want EOF", n, err)
	}
}

func TestUnsupportedRequests(t *testing.T) {
	srv := xenstoretest.NewServer(t)
	nc, err := net.Dial("unix", srv.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	ask := func(typ, tx uint32, payload string) string {
		t.Helper()
		b := make([]byte, 16+len(payload))
		binary.LittleEndian.PutUint32(b[0:], typ)
		binary.LittleEndian.PutUint32(b[4:], 42)
		binary.LittleEndian.PutUint32(b[8:], tx)
		binary.LittleEndian.PutUint32(b[12:], uint32(len(payload)))
		copy(b[16:], payload)
		if _, err := nc.Write(b); err != nil {
			t.Fatal(err)
		}
		nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		var h [16]byte
		if _, err := io.ReadFull(nc, h[:]); err != nil {
			t.Fatal(err)
		}
		if id := binary.LittleEndian.Uint32(h[4:]); id != 42 {
			t.Fatalf("reply to request %d, want 42", id)
		}
		p := make([]byte, binary.LittleEndian.Uint32(h[12:]))
		if _, err := io.ReadFull(nc, p); err != nil {
			t.Fatal(err)
		}
		return string(p)
	}
	if got := ask(6, 0, "\x00"); got != "ENOSYS\x00" { // XS_TRANSACTION_START
		t.Errorf("transaction start: %q", got)
	}
	if got := ask(2, 3, "/tool\x00"); got != "ENOENT\x00" { // a read in transaction 3
		t.Errorf("read in an unknown transaction: %q", got)
	}
	if got := ask(2, 0, "/tool\x00x\x00"); got != "EINVAL\x00" { // two arguments
		t.Errorf("read with two arguments: %q", got)
	}
	if got := ask(4, 0, "relative\x00t\x00"); got != "EINVAL\x00" {
		t.Errorf("watch on a relative path: %q", got)
	}
}
