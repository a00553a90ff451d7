package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
	"unsafe"
)

// proc is a long-running process the lab owns and reaps itself (agents,
// baseline wireguard-go): it runs in its own process group and a goroutine
// waits for it.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when cmd.Wait returned
	err  error         // cmd.Wait's result, valid after done
}

// startProc starts `ip netns exec ns args...` with output appended to
// logPath. env entries are added to the lab's environment.
func (l *Lab) startProc(name, ns, logPath string, env []string, args ...string) (*proc, error) {
	l.mu.Lock()
	closed := l.closed
	l.mu.Unlock()
	if closed {
		return nil, errors.New("lab: start after Close")
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	f, err := openLog(logPath, cmd)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	err = cmd.Start()
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("lab: start %s: %w", cmd, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	l.mu.Lock()
	l.daemons = append(l.daemons, p)
	l.mu.Unlock()
	return p, nil
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// killGroup SIGKILLs the process group while its leader is not reaped yet
// (so the group id cannot have been reused).
func (p *proc) killGroup() {
	if !p.exited() {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	}
}

// stop sends SIGTERM, waits up to grace, then SIGKILLs the process group.
// It returns an error when the process had to be killed or exited with a
// failure status other than death by SIGTERM.
func (p *proc) stop(grace time.Duration) error {
	if p.exited() {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		if err := exitProblem(p.err); err != nil {
			return fmt.Errorf("%s: after SIGTERM: %w", p.name, err)
		}
		return nil
	case <-time.After(grace):
	}
	p.kill()
	return fmt.Errorf("%s: still running %v after SIGTERM, killed", p.name, grace)
}

// kill SIGKILLs the process group and waits for the leader.
func (p *proc) kill() {
	p.killGroup()
	select {
	case <-p.done:
	case <-time.After(10 * time.Second): // only if stuck in the kernel
	}
}

// exitProblem filters a Wait error: nil for a clean exit or death by
// SIGTERM/SIGINT.
func exitProblem(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() &&
			(ws.Signal() == syscall.SIGTERM || ws.Signal() == syscall.SIGINT) {
			return nil
		}
	}
	return err
}

// waitExit polls, without reaping, until child pid has exited (or is gone),
// up to timeout. It reports whether the process is dead.
func waitExit(pid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		if !alive(pid) {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// alive reports whether pid is a running (not zombie) process: a child that
// exited but was not reaped yet counts as dead.
func alive(pid int) bool {
	const (
		pPID    = 1
		wExited = 4
		wNoHang = 1
		wNoWait = 0x1000000
	)
	// siginfo_t on 64-bit Linux: si_pid of SIGCHLD info is at offset 16.
	var info struct {
		signo, errno, code, _ int32
		pid                   int32
		_                     [108]byte
	}
	_, _, e := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid),
		uintptr(unsafe.Pointer(&info)), wExited|wNoHang|wNoWait, 0, 0)
	switch e {
	case 0:
		// si_pid != 0: it has exited (a zombie waiting for its reaper).
		return info.pid == 0
	case syscall.ECHILD:
		// Not our child (or already reaped): ask the kernel whether it exists.
		if err := syscall.Kill(pid, 0); err != nil {
			return false
		}
		return !isZombie(pid)
	default:
		return syscall.Kill(pid, 0) == nil
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true // gone
	}
	// pid (comm) S ...: comm may contain spaces and parens, the state follows the last ')'.
	for i := len(b) - 1; i >= 0; i-- {
		if b[i] == ')' {
			return i+2 < len(b) && (b[i+2] == 'Z' || b[i+2] == 'X')
		}
	}
	return false
}
