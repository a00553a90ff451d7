package control

import (
	"bytes"
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
)

// callRecorder is a Backend that says yes to everything and remembers the
// last call.
type callRecorder struct {
	op   string
	args []any
}

func (c *callRecorder) record(op string, args ...any) { c.op, c.args = op, args }

func (c *callRecorder) Status(context.Context) (Status, error) {
	c.record("status")
	return Status{Name: "h1"}, nil
}

func (c *callRecorder) Attach(_ context.Context, vip netip.Addr, dev string) (VIP, error) {
	c.record("attach", AttachRequest{VIP: vip, Dev: dev})
	return VIP{VIP: vip.String(), Dev: dev}, nil
}

func (c *callRecorder) AttachWhenAnnounced(_ context.Context, vip netip.Addr, dev string) (VIP, error) {
	c.record("attach", AttachRequest{VIP: vip, Dev: dev, When: WhenAnnounced})
	return VIP{VIP: vip.String(), Dev: dev}, nil
}

func (c *callRecorder) Detach(_ context.Context, vip netip.Addr) (VIP, error) {
	c.record("detach", vip)
	return VIP{VIP: vip.String()}, nil
}

func (c *callRecorder) Suspend(_ context.Context, vip netip.Addr) (VIP, error) {
	c.record("suspend", VIPRequest{VIP: vip})
	return VIP{VIP: vip.String()}, nil
}

func (c *callRecorder) Abort(_ context.Context, vip netip.Addr) (VIP, error) {
	c.record("abort", VIPRequest{VIP: vip})
	return VIP{VIP: vip.String()}, nil
}

func (c *callRecorder) AddNetwork(_ context.Context, name string, prefix netip.Prefix) (Network, error) {
	c.record("add-network", NetworkRequest{Name: name, Prefix: prefix})
	return Network{Name: name, Prefix: prefix}, nil
}

func (c *callRecorder) RemoveNetwork(_ context.Context, name string) (Network, error) {
	c.record("remove-network", name)
	return Network{Name: name}, nil
}

func (c *callRecorder) Allocate(_ context.Context, network, dev string) (VIP, error) {
	c.record("allocate", AllocateRequest{Network: network, Dev: dev})
	return VIP{Dev: dev}, nil
}

func (c *callRecorder) Prepare(_ context.Context, vip netip.Addr) (VIP, error) {
	c.record("prepare", vip)
	return VIP{}, nil
}

func (c *callRecorder) Keys(context.Context) (Keys, error) {
	c.record("keys")
	return Keys{}, nil
}

func (c *callRecorder) ChangeKeys(_ context.Context, op string, key []byte, force bool) (Keys, error) {
	c.record("change keys", op, key, force)
	return Keys{}, nil
}

func (c *callRecorder) Migrations(context.Context) ([]Migration, error) {
	c.record("migrations")
	return nil, nil
}

func (c *callRecorder) Migration(_ context.Context, id string) (Migration, error) {
	c.record("migration", id)
	return Migration{}, nil
}

// reencodes reports whether v survives encoding as the client sends it
// and decoding as the server reads it.
func reencodes[T comparable](t *testing.T, v T) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatalf("%+v reached the backend but does not encode: %v", v, err)
	}
	var again T
	if err := json.Unmarshal(b, &again); err != nil || again != v {
		t.Fatalf("%+v reached the backend but reads back as %+v, %v", v, again, err)
	}
}

var fuzzMethods = []string{http.MethodGet, http.MethodPost, http.MethodDelete, http.MethodPut}

// FuzzHandler feeds the control API arbitrary requests. It answers each
// with a JSON body and a status that says who is at fault; it reaches the
// backend only with what a client can send (one JSON value of at most
// 4096 bytes, no unknown field), and a 400 never reaches it.
func FuzzHandler(f *testing.F) {
	f.Add(uint8(0), "/v1/status", []byte(nil))
	f.Add(uint8(1), "/v1/vips", []byte(`{"vip":"100.64.0.1","dev":"vif1.0"}`))
	f.Add(uint8(1), "/v1/vips", []byte(`{"vip":"100.64.0.1","dev":"vif1.0"} {}`))
	f.Add(uint8(1), "/v1/vips", []byte(`{"vip":"100.64.0.1","extra":1}`))
	f.Add(uint8(1), "/v1/vips/allocate", []byte(`{"network":"blue"}`))
	f.Add(uint8(1), "/v1/migrate/suspend", []byte(`{"vip":"fd00::1"}`))
	f.Add(uint8(1), "/v1/migrate/abort", []byte(`{"vip":"::ffff:1.2.3.4"}`))
	f.Add(uint8(1), "/v1/networks", []byte(`{"name":"blue","prefix":"100.64.1.0/24"}`))
	f.Add(uint8(2), "/v1/vips/100.64.0.1", []byte(nil))
	f.Add(uint8(2), "/v1/networks/a%2Fb%20c", []byte(nil))
	f.Add(uint8(3), "/v1/vips", []byte(`{}`))
	f.Add(uint8(1), "/v1/vips", bytes.Repeat([]byte(" "), 4097))
	f.Fuzz(func(t *testing.T, m uint8, path string, body []byte) {
		req, err := http.NewRequest(fuzzMethods[int(m)%len(fuzzMethods)], "http://vmroam"+path, bytes.NewReader(body))
		if err != nil {
			return // no client can send it
		}
		b := &callRecorder{}
		w := httptest.NewRecorder()
		handler(b).ServeHTTP(w, req)

		switch code := w.Code; {
		case code == http.StatusOK:
			if b.op == "" {
				t.Fatalf("200 without a call to the backend")
			}
			if !json.Valid(w.Body.Bytes()) {
				t.Fatalf("200 with body %q", w.Body.Bytes())
			}
		case code == http.StatusBadRequest:
			if b.op != "" {
				t.Fatalf("400, but the backend was asked to %s %v", b.op, b.args)
			}
			var eb errorBody
			if err := json.Unmarshal(w.Body.Bytes(), &eb); err != nil || eb.Error == "" {
				t.Fatalf("400 with body %q", w.Body.Bytes())
			}
		case code == http.StatusNotFound, code == http.StatusMethodNotAllowed,
			code == http.StatusMovedPermanently, code == http.StatusTemporaryRedirect, code == http.StatusPermanentRedirect:
			// The mux's own answers, for paths and methods it does not serve.
			if b.op != "" {
				t.Fatalf("%d, but the backend was asked to %s %v", code, b.op, b.args)
			}
		default:
			t.Fatalf("status %d for a backend that never fails", code)
		}
		if b.op == "" || req.Method == http.MethodGet || req.Method == http.MethodDelete {
			return
		}
		if len(body) > 4096 {
			t.Fatalf("a %d-byte body reached the backend", len(body))
		}
		dec := json.NewDecoder(bytes.NewReader(body))
		var v any
		if dec.Decode(&v) != nil || dec.Decode(&v) == nil || dec.More() {
			t.Fatalf("body %q is not one JSON value, yet it reached the backend", body)
		}
		switch a := b.args[0].(type) {
		case AttachRequest:
			reencodes(t, a)
		case VIPRequest:
			reencodes(t, a)
		case NetworkRequest:
			reencodes(t, a)
		case AllocateRequest:
			reencodes(t, a)
		}
	})
}
