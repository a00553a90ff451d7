package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/wgagent/control"
)

func TestStatusWatch(t *testing.T) {
	b := &recordingBackend{}
	fakeAgent(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), 550*time.Millisecond)
	defer cancel()
	var out, errb bytes.Buffer
	if code := run(ctx, []string{"status", "--watch", "--interval", "100ms"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d at the end of the context; stderr %q", code, errb.String())
	}
	frames := strings.Split(out.String(), "\n\nvmroam status every 100ms")
	if len(frames) < 3 {
		t.Fatalf("%d frames in 550 ms at 100 ms, want at least 3:\n%s", len(frames), out.String())
	}
	for i, f := range frames {
		if !strings.Contains(f, "PEER") || !strings.Contains(f, "VIP") {
			t.Errorf("frame %d is not a status:\n%s", i, f)
		}
	}
	if strings.Contains(out.String(), "\x1b") {
		t.Errorf("terminal escapes written to a buffer: %q", out.String())
	}
	// The context may end during the last call: that one prints nothing.
	if n := len(b.Calls()); n != len(frames) && n != len(frames)+1 {
		t.Errorf("%d status calls for %d frames", n, len(frames))
	}
}

func TestStatusWatchJSON(t *testing.T) {
	fakeAgent(t, &recordingBackend{})
	ctx, cancel := context.WithTimeout(context.Background(), 350*time.Millisecond)
	defer cancel()
	var out, errb bytes.Buffer
	if code := run(ctx, []string{"status", "--watch", "--json", "--interval", "100ms"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d; stderr %q", code, errb.String())
	}
	dec := json.NewDecoder(&out)
	n := 0
	for {
		var st control.Status
		err := dec.Decode(&st)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("frame %d is not JSON: %v", n, err)
		}
		n++
	}
	if n < 2 {
		t.Errorf("%d JSON frames, want at least 2", n)
	}
}

// An agent that does not answer (restarting) ends nothing: the frame says
// so, and the next one asks again.
func TestStatusWatchWithoutAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "none.sock")
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	var out, errb bytes.Buffer
	if code := run(ctx, []string{"status", "--watch", "--interval", "100ms", "--socket", sock}, &out, &errb); code != 0 {
		t.Fatalf("exit %d; stderr %q", code, errb.String())
	}
	if n := strings.Count(out.String(), "asking again in 100ms"); n < 2 {
		t.Errorf("%d frames say the agent does not answer, want at least 2:\n%s", n, out.String())
	}
}

func TestRenderFrame(t *testing.T) {
	frame := []byte("host h1\npeers 2\n")
	if got, want := string(renderFrame(frame, true, false)), "\x1b[Hhost h1\x1b[K\npeers 2\x1b[K\n\x1b[J"; got != want {
		t.Errorf("terminal frame %q, want %q", got, want)
	}
	if got := string(renderFrame(frame, false, true)); got != string(frame) {
		t.Errorf("first plain frame %q", got)
	}
	if got := string(renderFrame(frame, false, false)); got != "\n"+string(frame) {
		t.Errorf("later plain frame %q: want a blank line before it", got)
	}
}

func TestStatusWatchUsage(t *testing.T) {
	for _, args := range [][]string{
		{"status", "--watch", "--interval", "0s"},
		{"status", "--interval", "1s"},
		{"status", "--watch", "extra"},
	} {
		if code, _, stderr := runCLI(t, args...); code != 2 {
			t.Errorf("%q: exit %d, want 2; stderr %q", args, code, stderr)
		}
	}
}
