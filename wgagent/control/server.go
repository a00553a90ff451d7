package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Backend is what the server exposes. Its methods are called from HTTP
// handler goroutines, concurrently.
type Backend interface {
	Status(ctx context.Context) (Status, error)
	Attach(ctx context.Context, vip netip.Addr, dev string) (VIP, error)
	// AttachWhenAnnounced attaches vip behind dev once the VM announces
	// itself there, if another live host owns it (see WhenAnnounced);
	// otherwise at once, as Attach. It does not wait for the VM.
	AttachWhenAnnounced(ctx context.Context, vip netip.Addr, dev string) (VIP, error)
	Detach(ctx context.Context, vip netip.Addr) (VIP, error)
	Suspend(ctx context.Context, vip netip.Addr) (VIP, error)
	Abort(ctx context.Context, vip netip.Addr) (VIP, error)
	// Prepare readies this host for a VIP about to arrive (a hypervisor
	// is preparing an incoming migration): it connects to the current
	// owner ahead of the claim. It may wait for one connect.
	Prepare(ctx context.Context, vip netip.Addr) (VIP, error)
	AddNetwork(ctx context.Context, name string, prefix netip.Prefix) (Network, error)
	RemoveNetwork(ctx context.Context, name string) (Network, error)
	Allocate(ctx context.Context, network, dev string) (VIP, error)
	// Keys asks every member for its gossip keys; ChangeKeys installs,
	// uses or removes one cluster-wide (op is a KeyOp constant). Both
	// wait for the members' answers, a few seconds at most.
	Keys(ctx context.Context) (Keys, error)
	ChangeKeys(ctx context.Context, op string, key []byte, force bool) (Keys, error)
	// Migrations lists this host's side of recent migrations, as
	// Status.Migrations does, without timelines.
	Migrations(ctx context.Context) ([]Migration, error)
	// Migration returns one migration by ID with its timeline, or an
	// error wrapping ErrNotFound.
	Migration(ctx context.Context, id string) (Migration, error)
}

// ErrBadRequest marks errors caused by the client's input; the server
// answers them with 400 instead of 500.
var ErrBadRequest = errors.New("bad request")

// ErrNotFound marks errors for a thing the agent does not have; the
// server answers them with 404.
var ErrNotFound = errors.New("not found")

// Server serves a Backend on a Unix socket.
type Server struct {
	path string
	ln   net.Listener
	srv  *http.Server
	done chan struct{}
}

// Listen creates the socket (mode 0600, its directory 0755 if missing). It
// refuses to take over a socket another agent is still answering on, and
// removes a stale one.
func Listen(path string, b Backend, log *slog.Logger) (*Server, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("control socket directory: %w", err)
	}
	if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
		c.Close()
		return nil, fmt.Errorf("control socket %s: another agent is answering on it", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("remove stale control socket: %w", err)
	}
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	s := &Server{path: path, ln: &rootOnly{Listener: ln, log: log}, done: make(chan struct{})}
	s.srv = &http.Server{
		Handler:           handler(b),
		ReadHeaderTimeout: 5 * time.Second,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	go func() {
		defer close(s.done)
		s.srv.Serve(s.ln)
	}()
	return s, nil
}

// Close stops serving and removes the socket.
func (s *Server) Close() error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err := s.srv.Shutdown(ctx)
	<-s.done
	os.Remove(s.path)
	return err
}

// rootOnly drops connections from any user but root and the agent's own,
// whatever the socket's file mode says.
type rootOnly struct {
	net.Listener
	log *slog.Logger
}

func (l *rootOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uid, err := peerUID(c)
		if err == nil && (uid == 0 || uid == uint32(os.Geteuid())) {
			return c, nil
		}
		l.log.Warn("control socket: refused a connection", "uid", uid, "err", err)
		c.Close()
	}
}

func peerUID(c net.Conn) (uint32, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, errors.New("not a unix connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, credErr
	}
	return cred.Uid, nil
}

func handler(b Backend) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", func(w http.ResponseWriter, r *http.Request) {
		st, err := b.Status(r.Context())
		reply(w, st, err)
	})
	mux.HandleFunc("POST /v1/vips", func(w http.ResponseWriter, r *http.Request) {
		var req AttachRequest
		if err := decode(w, r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		var (
			v   VIP
			err error
		)
		switch req.When {
		case "", WhenNow:
			v, err = b.Attach(r.Context(), req.VIP, req.Dev)
		case WhenAnnounced:
			v, err = b.AttachWhenAnnounced(r.Context(), req.VIP, req.Dev)
		default:
			err = fmt.Errorf("%w: when %q: want %s or %s", ErrBadRequest, req.When, WhenNow, WhenAnnounced)
		}
		reply(w, v, err)
	})
	for path, op := range map[string]func(context.Context, netip.Addr) (VIP, error){
		"POST /v1/migrate/suspend": b.Suspend,
		"POST /v1/migrate/abort":   b.Abort,
		"POST /v1/migrate/prepare": b.Prepare,
	} {
		mux.HandleFunc(path, func(w http.ResponseWriter, r *http.Request) {
			var req VIPRequest
			if err := decode(w, r, &req); err != nil {
				reply(w, nil, err)
				return
			}
			v, err := op(r.Context(), req.VIP)
			reply(w, v, err)
		})
	}
	mux.HandleFunc("DELETE /v1/vips/{vip}", func(w http.ResponseWriter, r *http.Request) {
		vip, err := netip.ParseAddr(r.PathValue("vip"))
		if err != nil {
			reply(w, nil, fmt.Errorf("%w: %v", ErrBadRequest, err))
			return
		}
		v, err := b.Detach(r.Context(), vip)
		reply(w, v, err)
	})
	mux.HandleFunc("POST /v1/vips/allocate", func(w http.ResponseWriter, r *http.Request) {
		var req AllocateRequest
		if err := decode(w, r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		v, err := b.Allocate(r.Context(), req.Network, req.Dev)
		reply(w, v, err)
	})
	mux.HandleFunc("GET /v1/migrations", func(w http.ResponseWriter, r *http.Request) {
		ms, err := b.Migrations(r.Context())
		reply(w, ms, err)
	})
	mux.HandleFunc("GET /v1/migrations/{id}", func(w http.ResponseWriter, r *http.Request) {
		m, err := b.Migration(r.Context(), r.PathValue("id"))
		reply(w, m, err)
	})
	mux.HandleFunc("POST /v1/networks", func(w http.ResponseWriter, r *http.Request) {
		var req NetworkRequest
		if err := decode(w, r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		n, err := b.AddNetwork(r.Context(), req.Name, req.Prefix)
		reply(w, n, err)
	})
	mux.HandleFunc("DELETE /v1/networks/{name}", func(w http.ResponseWriter, r *http.Request) {
		n, err := b.RemoveNetwork(r.Context(), r.PathValue("name"))
		reply(w, n, err)
	})
	mux.HandleFunc("GET /v1/keys", func(w http.ResponseWriter, r *http.Request) {
		k, err := b.Keys(r.Context())
		reply(w, k, err)
	})
	mux.HandleFunc("POST /v1/keys/{op}", func(w http.ResponseWriter, r *http.Request) {
		op := r.PathValue("op")
		switch op {
		case KeyOpInstall, KeyOpUse, KeyOpRemove:
		default:
			reply(w, nil, fmt.Errorf("%w: unknown key operation %q", ErrBadRequest, op))
			return
		}
		var req KeyRequest
		if err := decode(w, r, &req); err != nil {
			reply(w, nil, err)
			return
		}
		k, err := b.ChangeKeys(r.Context(), op, req.Key, req.Force)
		reply(w, k, err)
	})
	return mux
}

func decode(w http.ResponseWriter, r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 4096))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%w: %v", ErrBadRequest, err)
	}
	// One value, as the client sends: whatever follows it would be
	// silently ignored.
	if err := dec.Decode(&struct{}{}); err != io.EOF {
		return fmt.Errorf("%w: more than one JSON value in the request body", ErrBadRequest)
	}
	return nil
}

func reply(w http.ResponseWriter, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, ErrBadRequest):
			code = http.StatusBadRequest
		case errors.Is(err, ErrNotFound):
			code = http.StatusNotFound
		}
		w.WriteHeader(code)
		json.NewEncoder(w).Encode(errorBody{Error: err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}
