package wanem

import (
	"encoding/binary"
	"fmt"
	"time"

	"golang.org/x/sys/unix"
)

// waker lets the writer sleep with nanosecond timeouts (ppoll) and lets the
// reader or stop wake it early (an eventfd), without the runtime's
// millisecond timer resolution.
type waker struct {
	fd  int
	fds [1]unix.PollFd // the writer's only, kept here so wait does not allocate
}

func newWaker() (*waker, error) {
	fd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("wanem: eventfd: %w", err)
	}
	return &waker{fd: fd}, nil
}

// wake makes the current or next wait return.
func (w *waker) wake() {
	var one [8]byte
	binary.NativeEndian.PutUint64(one[:], 1)
	// EAGAIN means the counter is saturated: a wake-up is pending anyway.
	_, _ = unix.Write(w.fd, one[:])
}

// wait blocks for d or until wake, and consumes pending wake-ups. A signal
// (the runtime preempts with SIGURG) may end it early: callers recompute
// what is left.
func (w *waker) wait(d time.Duration) {
	ts := unix.NsecToTimespec(int64(d))
	w.fds[0] = unix.PollFd{Fd: int32(w.fd), Events: unix.POLLIN}
	if n, _ := unix.Ppoll(w.fds[:], &ts, nil); n > 0 {
		var buf [8]byte
		_, _ = unix.Read(w.fd, buf[:])
	}
}

func (w *waker) close() { _ = unix.Close(w.fd) }

// setTimerSlack asks the kernel to wake this thread within 1 ns of its
// timeouts instead of the default 50 µs. Best effort: only precision is lost.
func setTimerSlack() { _ = unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0) }
