package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"
)

// QMPEvent is an asynchronous event from QEMU's monitor (STOP, RESUME,
// MIGRATION, ...), with the time QEMU stamped on it.
type QMPEvent struct {
	Name string
	Time time.Time
	Data json.RawMessage
}

// qmpMsg is any message QEMU sends on its QMP socket: the greeting, a
// command's return or error, or an event.
type qmpMsg struct {
	QMP    json.RawMessage `json:"QMP"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
	ID        *uint64 `json:"id"` // the command's id, echoed in its reply
	Event     string  `json:"event"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
	Data json.RawMessage `json:"data"`
}

// qmp is a QMP client on a unix socket. Commands run one at a time; each
// carries an id that QEMU echoes in its reply, so a reply reaches only the
// command that asked for it: one that gave up on its context leaves no late
// answer for the next. A reader goroutine splits replies from events, which
// it keeps, so a caller can look for an event after it happened.
type qmp struct {
	conn  net.Conn
	cmdMu sync.Mutex    // one command in flight
	done  chan struct{} // closed when the reader stops (QEMU closed the socket)

	mu      sync.Mutex
	lastID  uint64
	pending map[uint64]chan qmpMsg // by id, each buffered 1; removed when cmd returns
	events  []QMPEvent
	notify  chan struct{} // closed and replaced on every event
	err     error         // why the reader stopped
}

// dialQMP connects to QEMU's QMP socket, retrying until QEMU has made it
// (or ctx ends), reads the greeting and leaves negotiation mode.
func dialQMP(ctx context.Context, path string) (*qmp, error) {
	var conn net.Conn
	for {
		var err error
		conn, err = (&net.Dialer{}).DialContext(ctx, "unix", path)
		if err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("lab: QMP %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	r := bufio.NewReader(conn)
	dec := json.NewDecoder(r)
	var greet qmpMsg
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetReadDeadline(dl)
	}
	if err := dec.Decode(&greet); err != nil || greet.QMP == nil {
		conn.Close()
		return nil, fmt.Errorf("lab: QMP %s: no greeting: %v", path, err)
	}
	_ = conn.SetReadDeadline(time.Time{})
	q := &qmp{
		conn:    conn,
		pending: map[uint64]chan qmpMsg{},
		done:    make(chan struct{}),
		notify:  make(chan struct{}),
	}
	go q.read(dec)
	if _, err := q.cmd(ctx, "qmp_capabilities", nil); err != nil {
		q.close()
		return nil, err
	}
	return q, nil
}

func (q *qmp) read(dec *json.Decoder) {
	defer close(q.done)
	for {
		var m qmpMsg
		if err := dec.Decode(&m); err != nil {
			q.mu.Lock()
			q.err = err
			q.mu.Unlock()
			return
		}
		if m.Event != "" {
			ev := QMPEvent{Name: m.Event, Data: m.Data,
				Time: time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*1000)}
			q.mu.Lock()
			q.events = append(q.events, ev)
			close(q.notify)
			q.notify = make(chan struct{})
			q.mu.Unlock()
			continue
		}
		if m.ID == nil {
			continue // not an answer to one of ours (we always send an id)
		}
		q.mu.Lock()
		if ch, ok := q.pending[*m.ID]; ok {
			delete(q.pending, *m.ID)
			ch <- m // buffered 1, one reply per id: never blocks
		} // else its command gave up: drop the late reply
		q.mu.Unlock()
	}
}

// cmd runs a QMP command with arguments args (nil for none) and returns
// what it returned.
func (q *qmp) cmd(ctx context.Context, name string, args any) (json.RawMessage, error) {
	q.cmdMu.Lock()
	defer q.cmdMu.Unlock()
	ch := make(chan qmpMsg, 1)
	q.mu.Lock()
	q.lastID++
	id := q.lastID
	q.pending[id] = ch
	q.mu.Unlock()
	defer func() {
		q.mu.Lock()
		delete(q.pending, id)
		q.mu.Unlock()
	}()
	req := map[string]any{"execute": name, "id": id}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("lab: QMP %s: %w", name, err)
	}
	if _, err := q.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("lab: QMP %s: %w", name, err)
	}
	select {
	case m := <-ch:
		if m.Error != nil {
			return nil, fmt.Errorf("lab: QMP %s: %s: %s", name, m.Error.Class, m.Error.Desc)
		}
		return m.Return, nil
	case <-q.done:
		return nil, fmt.Errorf("lab: QMP %s: connection closed: %v", name, q.readErr())
	case <-ctx.Done():
		return nil, fmt.Errorf("lab: QMP %s: %w", name, ctx.Err())
	}
}

func (q *qmp) readErr() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.err
}

// waitEvent returns the first event called name received at or after
// since (by QEMU's timestamp), waiting for it until ctx ends.
func (q *qmp) waitEvent(ctx context.Context, name string, since time.Time) (QMPEvent, error) {
	for {
		q.mu.Lock()
		for _, ev := range q.events {
			if ev.Name == name && !ev.Time.Before(since) {
				q.mu.Unlock()
				return ev, nil
			}
		}
		notify := q.notify
		q.mu.Unlock()
		select {
		case <-notify:
		case <-q.done:
			return QMPEvent{}, fmt.Errorf("lab: QMP: no %s event before the connection closed", name)
		case <-ctx.Done():
			return QMPEvent{}, fmt.Errorf("lab: QMP: waiting for %s: %w", name, ctx.Err())
		}
	}
}

// close closes the socket and waits for the reader to stop.
func (q *qmp) close() {
	q.conn.Close()
	<-q.done
}
