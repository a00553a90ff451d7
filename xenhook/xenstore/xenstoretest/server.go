// Package xenstoretest runs an in-memory xenstored on a Unix socket for
// tests: the same wire protocol (xs_wire.h), a tree of nodes and watches that
// fire the way Xen's C xenstored fires them.
//
// It implements what vmroam's client uses: XS_READ, XS_DIRECTORY, XS_WRITE,
// XS_WATCH and XS_UNWATCH, over absolute paths. Anything else (transactions,
// permissions, relative paths) is answered ENOSYS or EINVAL. Every
// connection is privileged, like dom0's socket. It is written from Xen's
// tools/xenstored sources and shares no code with package xenstore, so the
// client's tests do not test the client against itself.
package xenstoretest

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Message types from xs_wire.h.
const (
	xsDirectory  = 1
	xsRead       = 2
	xsWatch      = 4
	xsUnwatch    = 5
	xsWrite      = 11
	xsWatchEvent = 15
	xsError      = 16

	headerSize = 16
	payloadMax = 4096 // XENSTORE_PAYLOAD_MAX
	absPathMax = 3072 // XENSTORE_ABS_PATH_MAX
)

// Server is an in-memory xenstored.
type Server struct {
	t    testing.TB
	path string
	ln   net.Listener
	wg   sync.WaitGroup

	mu     sync.Mutex
	root   *node
	conns  map[*conn]struct{}
	closed bool
}

type node struct {
	value    string
	children map[string]*node
	order    []string // children in creation order, as xenstored lists them
}

type watch struct{ path, token string }

type conn struct {
	s       *Server
	nc      net.Conn
	watches []watch // guarded by s.mu

	qmu   sync.Mutex
	queue [][]byte // messages waiting for the writer
	wake  chan struct{}

	closeOnce sync.Once
	done      chan struct{}
}

// NewServer starts a server on a socket in t.TempDir(). It is closed, and
// all its goroutines have ended, when the test's cleanup runs.
func NewServer(t testing.TB) *Server {
	t.Helper()
	path := filepath.Join(t.TempDir(), "xs.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatalf("xenstoretest: listen on %s: %v", path, err)
	}
	s := &Server{
		t:     t,
		path:  path,
		ln:    ln,
		root:  newNode(),
		conns: make(map[*conn]struct{}),
	}
	// The nodes xenstored creates at start (setup_structure).
	s.set("/tool/xenstored", "")
	s.wg.Add(1)
	go s.accept()
	t.Cleanup(s.close)
	return s
}

// Path is the socket's path, for xenstore.Dial.
func (s *Server) Path() string { return s.path }

// Write sets a node's value as a client's XS_WRITE would: missing parents
// are created and watches on the path and its ancestors fire. A path
// starting with "@" stores nothing and fires the watches on that special
// node, as xenstored does for "@introduceDomain" when a domain is introduced
// and "@releaseDomain" when one goes away.
func (s *Server) Write(path, value string) {
	s.t.Helper()
	if !validPath(path, true) {
		s.t.Errorf("xenstoretest: Write: invalid path %q", path)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if strings.HasPrefix(path, "@") {
		s.fire(path, true)
		return
	}
	s.set(path, value)
	s.fire(path, false)
}

// Remove deletes a node and everything below it, firing watches as
// xenstored's XS_RM does: watches on the node and its ancestors once for the
// node, watches placed exactly on a removed descendant for that descendant.
// Removing a missing node does nothing.
func (s *Server) Remove(path string) {
	s.t.Helper()
	if !validPath(path, false) || path == "/" {
		s.t.Errorf("xenstoretest: Remove: invalid path %q", path)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	parent, name := s.lookup(parentOf(path)), path[strings.LastIndexByte(path, '/')+1:]
	if parent == nil || parent.children[name] == nil {
		return
	}
	s.fireRemoved(path, parent.children[name], path)
	delete(parent.children, name)
	for i, n := range parent.order {
		if n == name {
			parent.order = append(parent.order[:i], parent.order[i+1:]...)
			break
		}
	}
}

// fireRemoved fires for n's subtree children first, as xenstored's tree walk
// calls its exit function.
func (s *Server) fireRemoved(path string, n *node, root string) {
	for _, c := range n.order {
		s.fireRemoved(path+"/"+c, n.children[c], root)
	}
	s.fire(path, path != root)
}

func newNode() *node { return &node{children: make(map[string]*node)} }

// lookup finds the node at an absolute path, or nil. Called with s.mu held.
func (s *Server) lookup(path string) *node {
	n := s.root
	if path == "/" {
		return n
	}
	for _, part := range strings.Split(path[1:], "/") {
		if n = n.children[part]; n == nil {
			return nil
		}
	}
	return n
}

// set creates the node and missing parents and sets its value. Called with
// s.mu held.
func (s *Server) set(path, value string) {
	n := s.root
	for _, part := range strings.Split(path[1:], "/") {
		c := n.children[part]
		if c == nil {
			c = newNode()
			n.children[part] = c
			n.order = append(n.order, part)
		}
		n = c
	}
	n.value = value
}

// fire queues an event for every watch that a change of path triggers: with
// exact, watches on path itself; otherwise also watches on its ancestors
// (xenstored's is_child; a watch on "/" sees everything). Called with s.mu
// held.
func (s *Server) fire(path string, exact bool) {
	for c := range s.conns {
		for _, w := range c.watches {
			if w.path == path || (!exact && isChild(path, w.path)) {
				c.send(xsWatchEvent, 0, path+"\x00"+w.token+"\x00")
			}
		}
	}
}

func isChild(child, parent string) bool {
	if parent == "/" {
		return true
	}
	return strings.HasPrefix(child, parent) && (len(child) == len(parent) || child[len(parent)] == '/')
}

func parentOf(path string) string {
	i := strings.LastIndexByte(path, '/')
	if i <= 0 {
		return "/"
	}
	return path[:i]
}

// validPath applies xenstored's canonicalize rules to an absolute path: the
// characters [A-Za-z0-9-/_@], no trailing or double slash, at most
// XENSTORE_ABS_PATH_MAX long. Special paths start with "@".
func validPath(p string, allowSpecial bool) bool {
	if p == "" || len(p) > absPathMax {
		return false
	}
	for _, c := range []byte(p) {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '-' || c == '/' || c == '_' || c == '@'
		if !ok {
			return false
		}
	}
	if p[0] == '@' {
		return allowSpecial
	}
	if p[0] != '/' {
		return false
	}
	return p == "/" || (!strings.HasSuffix(p, "/") && !strings.Contains(p, "//"))
}

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		nc, err := s.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.t.Errorf("xenstoretest: accept: %v", err)
			}
			return
		}
		c := &conn{s: s, nc: nc, wake: make(chan struct{}, 1), done: make(chan struct{})}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			nc.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(2)
		go c.serve()
		go c.write()
	}
}

func (s *Server) close() {
	s.mu.Lock()
	s.closed = true
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	s.ln.Close()
	for _, c := range conns {
		c.close()
	}
	s.wg.Wait()
}

// close drops the connection and its watches.
func (c *conn) close() {
	c.closeOnce.Do(func() {
		c.s.mu.Lock()
		delete(c.s.conns, c)
		c.s.mu.Unlock()
		c.nc.Close()
		close(c.done)
	})
}

// send queues a message. The writer goroutine sends it, so firing a watch
// never waits on a client that does not read.
func (c *conn) send(typ, reqID uint32, payload string) {
	b := make([]byte, headerSize+len(payload))
	binary.LittleEndian.PutUint32(b[0:], typ)
	binary.LittleEndian.PutUint32(b[4:], reqID)
	binary.LittleEndian.PutUint32(b[12:], uint32(len(payload)))
	copy(b[headerSize:], payload)
	c.qmu.Lock()
	c.queue = append(c.queue, b)
	c.qmu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *conn) write() {
	defer c.s.wg.Done()
	for {
		select {
		case <-c.done:
			return
		case <-c.wake:
		}
		c.qmu.Lock()
		q := c.queue
		c.queue = nil
		c.qmu.Unlock()
		for _, b := range q {
			if _, err := c.nc.Write(b); err != nil {
				c.close()
				return
			}
		}
	}
}

// serve reads and answers requests one at a time, as xenstored does for
// each connection.
func (c *conn) serve() {
	defer c.s.wg.Done()
	defer c.close()
	var hb [headerSize]byte
	for {
		if _, err := io.ReadFull(c.nc, hb[:]); err != nil {
			return
		}
		typ := binary.LittleEndian.Uint32(hb[0:])
		reqID := binary.LittleEndian.Uint32(hb[4:])
		txID := binary.LittleEndian.Uint32(hb[8:])
		n := binary.LittleEndian.Uint32(hb[12:])
		// xenstored ignores a client that announces more: the stream can no
		// longer be trusted.
		if n > payloadMax {
			return
		}
		p := make([]byte, n)
		if _, err := io.ReadFull(c.nc, p); err != nil {
			return
		}
		c.handle(typ, reqID, txID, p)
	}
}

func (c *conn) handle(typ, reqID, txID uint32, p []byte) {
	s := c.s
	s.mu.Lock()
	defer s.mu.Unlock()
	reply := func(payload string) { c.send(typ, reqID, payload) }
	fail := func(errno string) { c.send(xsError, reqID, errno+"\x00") }

	// Watches ignore the transaction id (XS_FLAG_NOTID); for the rest an id
	// names a transaction, and this server has none.
	if txID != 0 && typ != xsWatch && typ != xsUnwatch {
		fail("ENOENT")
		return
	}
	switch typ {
	case xsRead, xsDirectory:
		path, ok := oneArg(p)
		if !ok || !validPath(path, false) {
			fail("EINVAL")
			return
		}
		n := s.lookup(path)
		if n == nil {
			fail("ENOENT")
			return
		}
		if typ == xsRead {
			reply(n.value)
			return
		}
		var b strings.Builder
		for _, name := range n.order {
			b.WriteString(name)
			b.WriteByte(0)
		}
		reply(b.String())
	case xsWrite:
		i := strings.IndexByte(string(p), 0)
		if i < 0 {
			fail("EINVAL")
			return
		}
		path, value := string(p[:i]), string(p[i+1:])
		if !validPath(path, false) {
			fail("EINVAL")
			return
		}
		s.set(path, value)
		// xenstored fires before it acknowledges.
		s.fire(path, false)
		reply("OK\x00")
	case xsWatch, xsUnwatch:
		args := strs(p)
		if len(args) != 2 || !validPath(args[0], true) {
			fail("EINVAL")
			return
		}
		w := watch{path: args[0], token: args[1]}
		i := c.find(w)
		if typ == xsUnwatch {
			if i < 0 {
				fail("ENOENT")
				return
			}
			c.watches = append(c.watches[:i], c.watches[i+1:]...)
			reply("OK\x00")
			return
		}
		if i >= 0 {
			fail("EEXIST")
			return
		}
		c.watches = append(c.watches, w)
		reply("OK\x00")
		// "We fire once up front: simplifies clients and restart."
		c.send(xsWatchEvent, 0, w.path+"\x00"+w.token+"\x00")
	default:
		fail("ENOSYS")
	}
}

func (c *conn) find(w watch) int {
	for i, x := range c.watches {
		if x == w {
			return i
		}
	}
	return -1
}

// oneArg is xenstored's onearg: exactly one NUL, at the end.
func oneArg(p []byte) (string, bool) {
	if len(p) == 0 || strings.IndexByte(string(p), 0) != len(p)-1 {
		return "", false
	}
	return string(p[:len(p)-1]), true
}

// strs is xenstored's get_strings: the NUL-terminated strings, ignoring
// bytes after the last NUL.
func strs(p []byte) []string {
	s := string(p)
	var out []string
	for {
		i := strings.IndexByte(s, 0)
		if i < 0 {
			return out
		}
		out = append(out, s[:i])
		s = s[i+1:]
	}
}
