package metrics

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Path is where the server answers scrapes.
const Path = "/metrics"

// Server serves the metrics over HTTP on a listener of its own.
type Server struct {
	ln   net.Listener
	srv  *http.Server
	log  *slog.Logger
	once sync.Once
	done chan struct{} // closed when Serve's goroutine returned
}

// Listen opens addr (HOST:PORT) for the metrics; nothing is served before
// Serve. The agent listens first, so that an address in use stops it
// before it changes anything on the host.
func Listen(addr string, log *slog.Logger) (*Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: %w", err)
	}
	return &Server{ln: ln, log: log, done: make(chan struct{})}, nil
}

// Addr is the address the server listens on (with the port chosen when
// the address asked for port 0).
func (s *Server) Addr() net.Addr { return s.ln.Addr() }

// Serve answers scrapes of m at Path in a goroutine of its own until Close.
func (s *Server) Serve(m *Metrics) {
	mux := http.NewServeMux()
	mux.Handle(Path, promhttp.HandlerFor(m.Gatherer(), promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
		ErrorHandling:       promhttp.ContinueOnError,
		MaxRequestsInFlight: 4,
		Timeout:             10 * time.Second,
	}))
	s.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       60 * time.Second,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	s.log.Info("serving Prometheus metrics", "addr", "http://"+s.ln.Addr().String()+Path)
	go func() {
		defer close(s.done)
		if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("metrics server stopped", "err", err)
		}
	}()
}

// Close stops serving: it waits up to 2 s for scrapes under way, then
// cuts them off. Safe to call without Serve, and more than once.
func (s *Server) Close() {
	s.once.Do(func() {
		if s.srv == nil {
			s.ln.Close()
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := s.srv.Shutdown(ctx); err != nil {
			s.srv.Close()
		}
		<-s.done
	})
}
