package lab

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestHTTPGetInNamespace(t *testing.T) {
	requireLab(t)
	l := newLab(t, 1)
	h := l.Hosts[0]
	var ln net.Listener
	if err := inNetNS(h.NS, func() error {
		var err error
		ln, err = net.Listen("tcp", "127.0.0.1:0")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/hello" {
			http.NotFound(w, r)
			return
		}
		fmt.Fprint(w, "hello from ", h.Name)
	}), ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	defer srv.Close()
	base := "http://" + ln.Addr().String()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	body, err := l.HTTPGet(ctx, h.NS, base+"/hello")
	if err != nil || string(body) != "hello from h1" {
		t.Fatalf("GET /hello in %s: %q, %v", h.NS, body, err)
	}
	if _, err := l.HTTPGet(ctx, h.NS, base+"/other"); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("GET /other: %v, want a 404 error", err)
	}
	// The server is in h1's namespace only: from the test's own, the same
	// address has nobody behind it.
	if c, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		c.Close()
		t.Errorf("%s answered outside %s", ln.Addr(), h.NS)
	}
}
