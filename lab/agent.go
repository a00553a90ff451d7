package lab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// Agent is a vmroam agent process running inside a host namespace. The lab
// reaps it: do not call Cmd.Wait, use Wait, Done, Stop or Kill.
type Agent struct {
	Host    *Host
	Cmd     *exec.Cmd
	LogPath string // stdout and stderr, appended across restarts

	p *proc
}

// AgentArgs returns the default argv (without the binary) for h's agent,
// followed by extra:
//
//	agent --name h1 --bind 198.18.0.1 --address 100.100.0.1/16 --interface vr1a2bw1
//	      --wg-impl userspace --data-dir DIR/h1 --socket DIR/h1.sock
//	      --encrypt-key-file DIR/gossip.key --vip-prefixes 100.100.0.0/16,fd76:6d72::/64
//	      --join 198.18.0.2:7946 --join ...
//
// Every other host's underlay address appears in its own --join flag.
func (l *Lab) AgentArgs(h *Host, extra ...string) []string {
	args := []string{
		"agent",
		"--name", h.Name,
		"--bind", h.Underlay.String(),
		"--address", h.Overlay.String(),
		"--interface", h.Iface,
		"--wg-impl", "userspace",
		"--data-dir", h.DataDir,
		"--socket", h.Socket,
		"--encrypt-key-file", l.KeyFile,
		"--vip-prefixes", OverlayPrefix.String() + "," + VIPPrefix6.String(),
	}
	for _, o := range l.Hosts {
		if o != h {
			args = append(args, "--join", netip.AddrPortFrom(o.Underlay, GossipPort).String())
		}
	}
	return append(args, extra...)
}

// StartAgent starts h's agent with AgentArgs(h, extra...), output appended to
// Dir/<host>.log, and sets h.Agent. It then polls `vmroam status --json` in
// the host namespace every 100 ms until it succeeds (up to 20 s). If the
// agent exits first, or the timeout passes, the error includes the log's tail;
// on error the agent is not running (it is killed on timeout), and the
// returned Agent, if not nil, still tells its LogPath and exit status.
func (l *Lab) StartAgent(h *Host, extra ...string) (*Agent, error) {
	if l.binary == "" {
		return nil, errors.New("lab: StartAgent: Config.Binary is empty")
	}
	if err := l.ownHost(h); err != nil {
		return nil, err
	}
	if h.Agent != nil && !h.Agent.Exited() {
		return nil, fmt.Errorf("lab: agent of %s already running (pid %d)", h.Name, h.Agent.Cmd.Process.Pid)
	}
	a := &Agent{Host: h, LogPath: filepath.Join(l.Dir, h.Name+".log")}
	args := append([]string{l.binary}, l.AgentArgs(h, extra...)...)
	p, err := l.startProc("agent "+h.Name, h.NS, a.LogPath, nil, args...)
	if err != nil {
		return nil, err
	}
	a.p, a.Cmd = p, p.cmd
	h.Agent = a
	l.logf("lab %s: agent %s started (pid %d)", l.ID, h.Name, p.cmd.Process.Pid)

	deadline := time.Now().Add(20 * time.Second)
	var lastErr error
	for {
		if a.Exited() {
			return a, fmt.Errorf("lab: agent %s exited during start-up (%v); log tail:\n%s",
				h.Name, p.err, logTail(a.LogPath, 30))
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, lastErr = l.cli(ctx, h, "status", "--json")
		cancel()
		if lastErr == nil {
			l.logf("lab %s: agent %s ready", l.ID, h.Name)
			return a, nil
		}
		if time.Now().After(deadline) {
			a.p.kill()
			return a, fmt.Errorf("lab: agent %s not ready after 20s, killed it (last status: %v); log tail:\n%s",
				h.Name, lastErr, logTail(a.LogPath, 30))
		}
		select {
		case <-a.p.done:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// Stop sends SIGTERM and waits up to 10 s, then SIGKILLs. It returns an
// error if the agent had to be killed or exited with a failure status; nil if
// it had already exited.
func (a *Agent) Stop() error { return a.p.stop(10 * time.Second) }

// Kill SIGKILLs the agent (its whole process group) and waits for it.
func (a *Agent) Kill() error {
	a.p.kill()
	if !a.Exited() {
		return fmt.Errorf("lab: agent %s (pid %d) did not die", a.Host.Name, a.Cmd.Process.Pid)
	}
	return nil
}

// Done is closed when the agent process has exited.
func (a *Agent) Done() <-chan struct{} { return a.p.done }

// Exited reports whether the agent process has exited.
func (a *Agent) Exited() bool { return a.p.exited() }

// Wait blocks until the agent exits and returns cmd.Wait's result.
func (a *Agent) Wait() error {
	<-a.p.done
	return a.p.err
}

// Pid is the agent's process id.
func (a *Agent) Pid() int { return a.Cmd.Process.Pid }

// CLI runs `ip netns exec h.NS <binary> args... --socket h.Socket` and
// returns the combined output; the error includes the output. When args
// already contain "--socket" nothing is appended, so callers that need the
// flag elsewhere can place it themselves.
func (l *Lab) CLI(h *Host, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return l.cli(ctx, h, args...)
}

// CLIContext is CLI with a context.
func (l *Lab) CLIContext(ctx context.Context, h *Host, args ...string) ([]byte, error) {
	return l.cli(ctx, h, args...)
}

func (l *Lab) cli(ctx context.Context, h *Host, args ...string) ([]byte, error) {
	if l.binary == "" {
		return nil, errors.New("lab: CLI: Config.Binary is empty")
	}
	argv := append([]string{l.binary}, args...)
	hasSocket := false
	for _, a := range args {
		if a == "--socket" || a == "-socket" || strings.HasPrefix(a, "--socket=") || strings.HasPrefix(a, "-socket=") {
			hasSocket = true
		}
	}
	if !hasSocket {
		argv = append(argv, "--socket", h.Socket)
	}
	return l.ExecContext(ctx, h.NS, argv...)
}

func (l *Lab) ownHost(h *Host) error {
	if h == nil || h.lab != l {
		return errors.New("lab: host is nil or belongs to another lab")
	}
	return nil
}

// HostByName returns the host named name ("h2"), or nil.
func (l *Lab) HostByName(name string) *Host {
	for _, h := range l.Hosts {
		if h.Name == name {
			return h
		}
	}
	return nil
}

// String returns "h1".
func (h *Host) String() string { return h.Name }
