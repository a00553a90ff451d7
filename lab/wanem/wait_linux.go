package wanem

import (
	"encoding/binary"
	"fmt"
	"time"
	"unsafe"

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
	if n, _ := rawPpoll(w.fds[:], &ts); n > 0 {
		var buf [8]byte
		_, _ = unix.Read(w.fd, buf[:])
	}
}

func (w *waker) close() { _ = unix.Close(w.fd) }

// setTimerSlack asks the kernel to wake this thread within 1 ns of its
// timeouts instead of the default 50 µs. Best effort: only precision is lost.
func setTimerSlack() { _ = unix.Prctl(unix.PR_SET_TIMERSLACK, 1, 0, 0, 0) }

// rawPpoll is ppoll(2) without telling the runtime that the thread blocks;
// rawRead and rawWrite are read(2) and write(2) likewise. The emulator's
// two threads are locked and make these calls for every packet; through
// the runtime's system call path, each sleep or slow write longer than
// 20 µs made its monitor thread hand the thread's P to another thread and
// wake threads to take it back, which at 8,000 packets/s cost more than a
// CPU (kernel entries and exits are dear on this VM). The price: the
// sleeping thread keeps its P, and the runtime interrupts it with a signal
// (EINTR) when it wants the P or a stop for the garbage collector; callers
// just loop.
func rawPpoll(fds []unix.PollFd, ts *unix.Timespec) (int, error) {
	n, _, e := unix.RawSyscall6(unix.SYS_PPOLL, uintptr(unsafe.Pointer(&fds[0])), uintptr(len(fds)),
		uintptr(unsafe.Pointer(ts)), 0, 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

func rawRead(fd int, p []byte) (int, error) {
	n, _, e := unix.RawSyscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// rawWrite writes one packet; a TUN takes it whole or not at all.
func rawWrite(fd int, p []byte) error {
	for {
		_, _, e := unix.RawSyscall(unix.SYS_WRITE, uintptr(fd), uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		if e != unix.EINTR {
			if e != 0 {
				return e
			}
			return nil
		}
	}
}
