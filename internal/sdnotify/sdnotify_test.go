package sdnotify

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// listen opens a datagram socket as systemd does and points $NOTIFY_SOCKET
// at it.
func listen(t *testing.T, addr string) *net.UnixConn {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv(SocketEnv, addr)
	return c
}

func receive(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("no datagram: %v", err)
	}
	return string(buf[:n])
}

func TestNotifyPathSocket(t *testing.T) {
	c := listen(t, filepath.Join(t.TempDir(), "notify"))
	sent, err := Notify(Ready, Status("serving\non the socket"))
	if err != nil || !sent {
		t.Fatalf("Notify: sent %v, %v", sent, err)
	}
	if got, want := receive(t, c), "READY=1\nSTATUS=serving on the socket"; got != want {
		t.Errorf("datagram %q, want %q", got, want)
	}
	if _, err := Notify(Stopping); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, c); got != "STOPPING=1" {
		t.Errorf("datagram %q, want STOPPING=1", got)
	}
}

func TestNotifyAbstractSocket(t *testing.T) {
	c := listen(t, fmt.Sprintf("@vmroam-sdnotify-test-%d-%d", os.Getpid(), time.Now().UnixNano()))
	if sent, err := Notify(Ready); err != nil || !sent {
		t.Fatalf("Notify: sent %v, %v", sent, err)
	}
	if got := receive(t, c); got != "READY=1" {
		t.Errorf("datagram %q, want READY=1", got)
	}
}

func TestReloadingCarriesMonotonicTime(t *testing.T) {
	c := listen(t, filepath.Join(t.TempDir(), "notify"))
	var before unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &before)
	if _, err := Notify(Reloading()); err != nil {
		t.Fatal(err)
	}
	var after unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &after)
	lines := strings.Split(receive(t, c), "\n")
	if len(lines) != 2 || lines[0] != "RELOADING=1" || !strings.HasPrefix(lines[1], "MONOTONIC_USEC=") {
		t.Fatalf("datagram %q, want RELOADING=1 and MONOTONIC_USEC", lines)
	}
	usec, err := strconv.ParseInt(strings.TrimPrefix(lines[1], "MONOTONIC_USEC="), 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	if usec < before.Nano()/1000 || usec > after.Nano()/1000 {
		t.Errorf("MONOTONIC_USEC %d outside [%d, %d]", usec, before.Nano()/1000, after.Nano()/1000)
	}
}

func TestNotifyWithoutSystemd(t *testing.T) {
	t.Setenv(SocketEnv, "")
	if sent, err := Notify(Ready); sent || err != nil {
		t.Errorf("without $NOTIFY_SOCKET: sent %v, err %v; want nothing", sent, err)
	}
}

func TestNotifyErrors(t *testing.T) {
	t.Setenv(SocketEnv, "vsock:2:1234")
	if _, err := Notify(Ready); err == nil || !strings.Contains(err.Error(), "supported") {
		t.Errorf("vsock address: err %v", err)
	}
	t.Setenv(SocketEnv, filepath.Join(t.TempDir(), "nobody-listens"))
	if sent, err := Notify(Ready); sent || err == nil {
		t.Errorf("socket without listener: sent %v, err %v", sent, err)
	}
}
