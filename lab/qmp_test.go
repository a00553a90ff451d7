package lab

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// fakeQMP serves one QMP connection on a unix socket: a greeting, then an
// answer to each command, echoing its id. It holds back the answer to
// "slow" and sends it just before the answer to the next command, as a
// QEMU that answers late would.
func fakeQMP(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmp") // t.TempDir can exceed a socket path's 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "qmp.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-served })
	go func() {
		defer close(served)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		w := func(m map[string]any) {
			b, _ := json.Marshal(m)
			_, _ = c.Write(append(b, '\n'))
		}
		w(map[string]any{"QMP": map[string]any{"version": map[string]any{}, "capabilities": []string{}}})
		var late map[string]any
		sc := bufio.NewScanner(c)
		for sc.Scan() {
			var req struct {
				Execute string          `json:"execute"`
				ID      json.RawMessage `json:"id"`
			}
			if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
				return
			}
			reply := map[string]any{"return": map[string]any{"cmd": req.Execute}}
			if req.ID != nil {
				reply["id"] = req.ID
			}
			if req.Execute == "slow" {
				late = reply
				continue
			}
			if late != nil {
				w(late)
				late = nil
			}
			w(map[string]any{"event": "STOP", "timestamp": map[string]int64{"seconds": 1, "microseconds": 0}})
			w(reply)
		}
	}()
	return sock
}

// TestQMPLateReply: a command that gave up on its context must not leave
// its late answer to the next command.
func TestQMPLateReply(t *testing.T) {
	sock := fakeQMP(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, err := dialQMP(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer q.close()
	sctx, scancel := context.WithTimeout(ctx, 50*time.Millisecond)
	_, err = q.cmd(sctx, "slow", nil)
	scancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("slow: %v, want a deadline error", err)
	}
	for i := range 3 {
		name := fmt.Sprintf("fast%d", i)
		b, err := q.cmd(ctx, name, nil)
		if err != nil {
			t.Fatal(err)
		}
		var r struct{ Cmd string }
		if err := json.Unmarshal(b, &r); err != nil {
			t.Fatal(err)
		}
		if r.Cmd != name {
			t.Errorf("%s got the answer to %q", name, r.Cmd)
		}
	}
	if _, err := q.waitEvent(ctx, "STOP", time.Unix(0, 0)); err != nil {
		t.Errorf("events not kept beside replies: %v", err)
	}
}
