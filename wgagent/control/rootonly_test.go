package control

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// clientSocketEnv tells the test binary, run again as another user, to act
// as TestHelperClient.
const clientSocketEnv = "VMROAM_TEST_CONTROL_SOCKET"

// TestRootOnly: a process of another user that reaches the socket (its mode
// opened up here, to test the check behind it) is refused by the server,
// which logs it; root's process, run the same way, is answered.
func TestRootOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs a client as uid 65534 (nobody)")
	}
	dir := t.TempDir() // TMP/TestRootOnlyNNN/001, both made 0700
	for _, d := range []string{filepath.Dir(dir), dir} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	// The test binary lives in a directory only root can enter.
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "control.test")
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}

	path := filepath.Join(dir, "ctl.sock")
	logs := &syncBuffer{}
	srv, err := Listen(path, &fakeBackend{attached: nil}, slog.New(slog.NewTextHandler(logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}

	client := func(uid uint32) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, "-test.run=^TestHelperClient$", "-test.v")
		cmd.Env = append(os.Environ(), clientSocketEnv+"="+path)
		cmd.Dir = dir
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("client as uid %d: %v\n%s", uid, err, out)
		}
		return string(out)
	}
	if out := client(0); !strings.Contains(out, "CLIENT: answered") {
		t.Fatalf("root's client was not answered:\n%s", out)
	}
	if out := client(65534); !strings.Contains(out, "CLIENT: refused") {
		t.Fatalf("nobody's client was not refused:\n%s", out)
	}
	if l := logs.String(); !strings.Contains(l, "refused a connection") || !strings.Contains(l, "uid=65534") {
		t.Fatalf("the refusal was not logged:\n%s", l)
	}
}

// TestHelperClient is TestRootOnly's client, run as another process.
func TestHelperClient(t *testing.T) {
	path := os.Getenv(clientSocketEnv)
	if path == "" {
		t.Skip("TestRootOnly runs this as another user")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := NewClient(path).Status(ctx)
	if err != nil {
		fmt.Printf("CLIENT: refused: %v\n", err)
		return
	}
	fmt.Printf("CLIENT: answered: %s\n", st.Name)
}
