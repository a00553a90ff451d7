// Package sdnotify tells systemd how a service started with Type=notify is
// doing: the sd_notify protocol, one datagram of KEY=VALUE lines to the Unix
// socket named by $NOTIFY_SOCKET. Without that variable (not started by
// systemd) every call does nothing, so a program runs the same either way.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// SocketEnv names the variable systemd passes the socket's address in.
const SocketEnv = "NOTIFY_SOCKET"

// Messages without arguments.
const (
	// Ready says start-up (or a reload) is complete and the service serves.
	Ready = "READY=1"
	// Stopping says the service is shutting down.
	Stopping = "STOPPING=1"
)

// Reloading says a reload begins. systemd wants the CLOCK_MONOTONIC time of
// it with it (MONOTONIC_USEC, since systemd 253) and waits for Ready after.
func Reloading() string {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return "RELOADING=1"
	}
	usec := ts.Nano() / 1000
	return "RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatInt(usec, 10)
}

// Status is a one-line description of the service's state that
// `systemctl status` shows. Line breaks in s become spaces.
func Status(s string) string {
	return "STATUS=" + strings.NewReplacer("\r", " ", "\n", " ").Replace(s)
}

// Notify sends the messages (Ready, Status("..."), ...) in one datagram to
// $NOTIFY_SOCKET. It reports whether it sent anything: false with a nil
// error when the variable is unset. The address is a path, or starts with
// '@' for an abstract socket (which Go's net package maps to the leading
// NUL byte); other kinds (vsock) are errors.
func Notify(msgs ...string) (bool, error) {
	addr := os.Getenv(SocketEnv)
	if addr == "" {
		return false, nil
	}
	if len(msgs) == 0 {
		return false, errors.New("sdnotify: no message")
	}
	if !strings.HasPrefix(addr, "/") && !strings.HasPrefix(addr, "@") {
		return false, fmt.Errorf("sdnotify: $%s=%q: only Unix socket paths and @abstract names are supported", SocketEnv, addr)
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(strings.Join(msgs, "\n"))); err != nil {
		return false, fmt.Errorf("sdnotify: send to %s: %w", addr, err)
	}
	return true, nil
}
