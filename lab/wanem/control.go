package wanem

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// The control protocol lets a test change a running emulator's loss and read
// its counters without restarting it (a restart would lose the packets it
// holds). It is line-based text over a stream socket, one reply line per
// request line:
//
//	loss 0.01   ->  ok                 (or "error: ...")
//	stats       ->  {"Received":...}   (Stats as JSON)

// ServeControl answers control requests on ln until ln is closed, then
// returns nil. Each connection is served by its own goroutine; they end when
// their client hangs up or when ServeControl returns.
func (e *Emulator) ServeControl(ln net.Listener) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns = map[net.Conn]struct{}{}
	)
	defer func() {
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("wanem: control accept: %w", err)
		}
		mu.Lock()
		conns[c] = struct{}{}
		mu.Unlock()
		wg.Add(1)
		go func() {
			defer wg.Done()
			e.serveConn(c)
			mu.Lock()
			delete(conns, c)
			mu.Unlock()
			c.Close()
		}()
	}
}

func (e *Emulator) serveConn(c net.Conn) {
	sc := bufio.NewScanner(c)
	for sc.Scan() {
		reply := e.control(sc.Text())
		if _, err := c.Write([]byte(reply + "\n")); err != nil {
			return
		}
	}
}

// control executes one request line and returns the reply line.
func (e *Emulator) control(line string) string {
	f := strings.Fields(line)
	switch {
	case len(f) == 2 && f[0] == "loss":
		p, err := strconv.ParseFloat(f[1], 64)
		if err != nil {
			return "error: loss: " + err.Error()
		}
		if err := e.SetLoss(p); err != nil {
			return "error: " + err.Error()
		}
		return "ok"
	case len(f) == 1 && f[0] == "stats":
		b, err := json.Marshal(e.Stats())
		if err != nil {
			return "error: " + err.Error()
		}
		return string(b)
	default:
		return fmt.Sprintf("error: unknown request %q (want \"loss P\" or \"stats\")", line)
	}
}

// ControlSetLoss asks the emulator serving the Unix socket at path to use
// loss probability p from now on.
func ControlSetLoss(ctx context.Context, path string, p float64) error {
	if err := validLoss(p); err != nil {
		return err
	}
	reply, err := request(ctx, path, "loss "+strconv.FormatFloat(p, 'g', -1, 64))
	if err != nil {
		return err
	}
	if reply != "ok" {
		return fmt.Errorf("wanem: control %s: %s", path, reply)
	}
	return nil
}

// ControlStats returns the counters of the emulator serving the Unix socket
// at path.
func ControlStats(ctx context.Context, path string) (Stats, error) {
	reply, err := request(ctx, path, "stats")
	if err != nil {
		return Stats{}, err
	}
	var st Stats
	if err := json.Unmarshal([]byte(reply), &st); err != nil {
		return Stats{}, fmt.Errorf("wanem: control %s: stats reply %q: %w", path, reply, err)
	}
	return st, nil
}

// request sends one line and reads one line back.
func request(ctx context.Context, path, line string) (string, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return "", fmt.Errorf("wanem: control: %w", err)
	}
	defer c.Close()
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(5 * time.Second)
	}
	if err := c.SetDeadline(deadline); err != nil {
		return "", fmt.Errorf("wanem: control %s: %w", path, err)
	}
	if _, err := c.Write([]byte(line + "\n")); err != nil {
		return "", fmt.Errorf("wanem: control %s: %w", path, err)
	}
	reply, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("wanem: control %s: reply to %q: %w", path, line, err)
	}
	return strings.TrimSpace(reply), nil
}
