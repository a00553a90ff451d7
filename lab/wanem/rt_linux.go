package wanem

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

// SetRealtime moves every thread of this process to the real-time policy
// SCHED_FIFO at priority (1..99), or back to the normal policy with 0.
// Threads started later inherit the policy of the thread that starts them,
// so the whole process keeps it.
//
// Why: on a machine busy with other work the kernel may let a normal thread
// wait several milliseconds for a CPU after its timer fired, which is more
// than the emulator's whole error budget; a real-time thread runs as soon
// as it wakes. The kernel's real-time throttling (by default 95 % of each
// second) keeps a busy emulator from locking up the machine. It needs root
// (CAP_SYS_NICE).
func SetRealtime(priority int) error {
	if priority < 0 || priority > 99 {
		return fmt.Errorf("wanem: real-time priority %d outside 0..99", priority)
	}
	attr := unix.SchedAttr{Policy: unix.SCHED_FIFO, Priority: uint32(priority)}
	if priority == 0 {
		attr = unix.SchedAttr{Policy: 0} // SCHED_OTHER (SCHED_NORMAL)
	}
	// A thread may start while the list is read: read it again until a
	// pass finds nothing new.
	done := map[int]bool{}
	for {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return fmt.Errorf("wanem: list threads: %w", err)
		}
		fresh := 0
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil || done[tid] {
				continue
			}
			fresh++
			done[tid] = true
			if err := unix.SchedSetAttr(tid, &attr, 0); err != nil && err != unix.ESRCH {
				return fmt.Errorf("wanem: sched_setattr thread %d: %w", tid, err)
			}
		}
		if fresh == 0 {
			return nil
		}
	}
}
