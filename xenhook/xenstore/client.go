// Package xenstore is a client for xenstored over its Unix socket: it reads,
// lists, writes and watches nodes of the Xen store, speaking the wire
// protocol of Xen's xs_wire.h.
//
// One connection carries every request. Requests from several goroutines are
// in flight together, told apart by req_id; one reader goroutine hands each
// reply to its caller and queues watch events, so a slow consumer of events
// never delays a reply. The client is strict: a message that breaks the
// framing (an unknown type, a payload over XENSTORE_PAYLOAD_MAX, a reply to
// no request) ends the connection with an error rather than guessing.
package xenstore

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
)

// DefaultSocket is where xenstored listens: XEN_RUN_STORED
// (/var/run/xenstored, /run on current systems) plus "/socket", as
// libxenstore's xs_daemon_socket builds it.
const DefaultSocket = "/run/xenstored/socket"

// eventBuffer is how many watch events wait for the consumer before new
// ones are dropped (and counted).
const eventBuffer = 1024

// ErrNotFound matches (with errors.Is) the error of a request on a node that
// does not exist: xenstored's ENOENT.
var ErrNotFound = errors.New("xenstore: no such node")

// Error is xenstored's refusal of a request (an XS_ERROR reply).
type Error struct {
	Op    string // "read", "directory", "write", "watch", "unwatch"
	Path  string
	Errno string // the errno name xenstored sent: "ENOENT", "EACCES", "EINVAL", ...
}

// Error says which request on which path xenstored refused, and why.
func (e *Error) Error() string {
	return fmt.Sprintf("xenstore %s %s: %s", e.Op, e.Path, e.Errno)
}

// Is makes errors.Is(err, ErrNotFound) true for ENOENT.
func (e *Error) Is(target error) bool {
	return target == ErrNotFound && e.Errno == "ENOENT"
}

// Event is one watch event: Path is the node that changed (or, for the
// event xenstored sends when a watch is registered, the watched path
// itself), Token the token given to Watch.
type Event struct {
	Path, Token string
}

// Client is one connection to xenstored. Its methods may be called from
// several goroutines at once.
type Client struct {
	conn    net.Conn
	events  chan Event
	dropped atomic.Uint64
	done    chan struct{} // closed when the reader goroutine has ended

	wmu sync.Mutex // one request written at a time

	mu      sync.Mutex
	nextID  uint32
	pending map[uint32]*call
	err     error // why the connection ended; requests fail with it from then on
}

// call is a request waiting for its reply.
type call struct {
	typ  uint32
	done chan result // buffered: the reader never waits for the caller
}

type result struct {
	m   message
	err error
}

// Dial connects to xenstored's socket at path (DefaultSocket on a Xen dom0)
// and starts the reader goroutine; Close ends it.
func Dial(path string) (*Client, error) {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return nil, fmt.Errorf("xenstore: connect to %s: %w", path, err)
	}
	return newClient(conn), nil
}

func newClient(conn net.Conn) *Client {
	c := &Client{
		conn:    conn,
		events:  make(chan Event, eventBuffer),
		done:    make(chan struct{}),
		pending: make(map[uint32]*call),
	}
	go c.read()
	return c
}

// Events returns the channel of watch events. It is closed when the
// connection ends (Close, or a failure: later requests return the cause).
// xenstored sends one event for each watch as soon as it is registered;
// that event is delivered like any other.
func (c *Client) Events() <-chan Event { return c.events }

// Dropped counts the watch events thrown away because the Events buffer was
// full. A consumer that sees it grow has missed changes and should re-read
// what it watches.
func (c *Client) Dropped() uint64 { return c.dropped.Load() }

// Close ends the connection and waits for the reader goroutine to end.
// Requests in flight fail with an error matching net.ErrClosed; the Events
// channel is closed. Calling Close again does nothing.
func (c *Client) Close() error {
	c.fail(fmt.Errorf("xenstore: client closed: %w", net.ErrClosed))
	<-c.done
	return nil
}

// Read returns the value of the node at path. A missing node is an error
// matching ErrNotFound.
func (c *Client) Read(path string) (string, error) {
	m, err := c.request("read", path, typeRead, nil, path)
	if err != nil {
		return "", err
	}
	// The value is the node's raw data, not NUL-terminated.
	return string(m.Payload), nil
}

// Directory lists the names of the children of the node at path.
func (c *Client) Directory(path string) ([]string, error) {
	m, err := c.request("directory", path, typeDirectory, nil, path)
	if err != nil {
		return nil, err
	}
	names, err := parseStrings(m.Payload)
	if err != nil {
		return nil, fmt.Errorf("xenstore directory %s: %w", path, err)
	}
	return names, nil
}

// Write sets the value of the node at path; xenstored creates missing
// parents.
func (c *Client) Write(path, value string) error {
	return c.ack("write", path, typeWrite, []byte(value), path)
}

// Watch registers a watch on path (and, for an ordinary path, every node
// below it) under token. Events arrive on Events. xenstored fires every new
// watch once right away, so the first event for it says "read the current
// state", not "something changed".
func (c *Client) Watch(path, token string) error {
	return c.ack("watch", path, typeWatch, nil, path, token)
}

// Unwatch removes the watch registered with the same path and token.
// Events it fired before may still be queued.
func (c *Client) Unwatch(path, token string) error {
	return c.ack("unwatch", path, typeUnwatch, nil, path, token)
}

func (c *Client) ack(op, path string, typ uint32, raw []byte, strs ...string) error {
	m, err := c.request(op, path, typ, raw, strs...)
	if err != nil {
		return err
	}
	if err := parseAck(m.Payload); err != nil {
		return fmt.Errorf("xenstore %s %s: %w", op, path, err)
	}
	return nil
}

// request sends one request and waits for its reply. An XS_ERROR reply
// becomes an *Error.
func (c *Client) request(op, path string, typ uint32, raw []byte, strs ...string) (message, error) {
	if path == "" {
		return message{}, fmt.Errorf("xenstore %s: empty path", op)
	}
	cl := &call{typ: typ, done: make(chan result, 1)}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return message{}, fmt.Errorf("xenstore %s %s: %w", op, path, err)
	}
	c.nextID++
	id := c.nextID
	c.pending[id] = cl
	c.mu.Unlock()

	b, err := encodeMessage(typ, id, raw, strs...)
	if err != nil {
		c.forget(id)
		return message{}, fmt.Errorf("xenstore %s %s: %w", op, path, err)
	}
	c.wmu.Lock()
	_, err = c.conn.Write(b)
	c.wmu.Unlock()
	if err != nil {
		// Part of the message may be out: the stream is no longer in step.
		// The reader then fails every pending call, this one too.
		c.fail(fmt.Errorf("xenstore: send: %w", err))
	}

	r := <-cl.done
	if r.err != nil {
		return message{}, fmt.Errorf("xenstore %s %s: %w", op, path, r.err)
	}
	if r.m.Type == typeError {
		name, err := parseErrno(r.m.Payload)
		if err != nil {
			return message{}, fmt.Errorf("xenstore %s %s: %w", op, path, err)
		}
		return message{}, &Error{Op: op, Path: path, Errno: name}
	}
	return r.m, nil
}

func (c *Client) forget(id uint32) {
	c.mu.Lock()
	delete(c.pending, id)
	c.mu.Unlock()
}

// fail records why the connection ends (the first reason wins) and closes
// it, which ends the reader.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	c.conn.Close()
}

// read is the reader goroutine: it dispatches replies and queues events
// until the connection fails, then fails every pending call.
func (c *Client) read() {
	err := c.dispatch()
	c.fail(err)
	c.mu.Lock()
	pending := c.pending
	c.pending = nil
	err = c.err
	c.mu.Unlock()
	for _, cl := range pending {
		cl.done <- result{err: err}
	}
	close(c.events)
	close(c.done)
}

func (c *Client) dispatch() error {
	for {
		m, err := readMessage(c.conn)
		if err != nil {
			return fmt.Errorf("xenstore: receive: %w", err)
		}
		// This client never opens a transaction, so nothing may carry one.
		if m.TxID != 0 {
			return fmt.Errorf("xenstore: %w: type %d with transaction %d", errMalformed, m.Type, m.TxID)
		}
		if m.Type == typeWatchEvent {
			ev, err := parseEvent(m.Payload)
			if err != nil {
				return fmt.Errorf("xenstore: %w", err)
			}
			select {
			case c.events <- ev:
			default:
				c.dropped.Add(1)
			}
			continue
		}
		c.mu.Lock()
		cl := c.pending[m.ReqID]
		delete(c.pending, m.ReqID)
		c.mu.Unlock()
		if cl == nil {
			return fmt.Errorf("xenstore: %w: type %d answers request %d, which is not pending", errMalformed, m.Type, m.ReqID)
		}
		if m.Type != cl.typ && m.Type != typeError {
			cl.done <- result{err: fmt.Errorf("%w: type %d answers a request of type %d", errMalformed, m.Type, cl.typ)}
			return fmt.Errorf("xenstore: %w: type %d answers request %d of type %d", errMalformed, m.Type, m.ReqID, cl.typ)
		}
		cl.done <- result{m: m}
	}
}
