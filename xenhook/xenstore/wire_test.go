package xenstore

import (
	"bytes"
	"errors"
	"net"
	"slices"
	"testing"
	"time"
)

func TestEncodeDecode(t *testing.T) {
	b, err := encodeMessage(typeWrite, 7, []byte("suspend"), "/local/domain/5/control/shutdown")
	if err != nil {
		t.Fatal(err)
	}
	want := "\x0b\x00\x00\x00" + "\x07\x00\x00\x00" + "\x00\x00\x00\x00" + "\x28\x00\x00\x00" +
		"/local/domain/5/control/shutdown\x00suspend"
	if string(b) != want {
		t.Fatalf("encoded\n%q\nwant\n%q", b, want)
	}
	m, err := readMessage(bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	if m.Type != typeWrite || m.ReqID != 7 || m.TxID != 0 || int(m.Len) != len(m.Payload) || len(m.Payload) != 40 {
		t.Fatalf("decoded %+v", m.header)
	}
	if _, err := encodeMessage(typeWrite, 1, make([]byte, payloadMax), "/p"); err == nil {
		t.Fatal("a request over XENSTORE_PAYLOAD_MAX was encoded")
	}
	if _, err := encodeMessage(typeRead, 1, nil, "/a\x00b"); err == nil {
		t.Fatal("a path with a NUL was encoded")
	}
}

func TestParsePayloads(t *testing.T) {
	if ev, err := parseEvent([]byte("/local/domain/5\x00tok\x00")); err != nil || ev != (Event{"/local/domain/5", "tok"}) {
		t.Fatalf("parseEvent = %+v, %v", ev, err)
	}
	for _, bad := range []string{"", "/a\x00", "/a\x00t", "/a\x00t\x00x\x00", "\x00t\x00"} {
		if _, err := parseEvent([]byte(bad)); !errors.Is(err, errMalformed) {
			t.Errorf("parseEvent(%q) = %v, want errMalformed", bad, err)
		}
	}
	if s, err := parseStrings([]byte("1\x0022\x00")); err != nil || !slices.Equal(s, []string{"1", "22"}) {
		t.Fatalf("parseStrings = %q, %v", s, err)
	}
	if s, err := parseStrings(nil); err != nil || len(s) != 0 {
		t.Fatalf("parseStrings(empty) = %q, %v", s, err)
	}
	if name, err := parseErrno([]byte("EQUOTA\x00")); err != nil || name != "EQUOTA" {
		t.Fatalf("parseErrno = %q, %v", name, err)
	}
	for _, bad := range []string{"", "ENOENT", "enoent\x00", "A\x00B\x00"} {
		if _, err := parseErrno([]byte(bad)); err == nil {
			t.Errorf("parseErrno(%q) accepted", bad)
		}
	}
	if parseAck([]byte("OK\x00")) != nil || parseAck([]byte("OK")) == nil {
		t.Fatal("parseAck")
	}
}

func TestDecodeHeaderRejects(t *testing.T) {
	for _, tc := range []struct {
		name string
		h    header
	}{
		{"payload over the limit", header{Type: typeRead, Len: payloadMax + 1}},
		{"huge length", header{Type: typeRead, Len: 0xffffffff}},
		{"unknown type", header{Type: typeCount}},
		{"XS_INVALID", header{Type: 0xffff}},
	} {
		var b [headerSize]byte
		tc.h.put(b[:])
		if _, err := decodeHeader(b[:]); !errors.Is(err, errMalformed) {
			t.Errorf("%s: %v, want errMalformed", tc.name, err)
		}
	}
	var b [headerSize]byte
	header{Type: typeRead, Len: payloadMax}.put(b[:])
	if _, err := decodeHeader(b[:]); err != nil {
		t.Errorf("a payload of exactly XENSTORE_PAYLOAD_MAX: %v", err)
	}
}

// FuzzDecode feeds arbitrary bytes to the decoder and to a client reading
// them as xenstored's side of the connection: nothing may panic, nothing may
// exceed the limits, and the client must end cleanly.
func FuzzDecode(f *testing.F) {
	event, _ := encodeMessage(typeWatchEvent, 0, nil, "/local/domain/5/control/shutdown", "vmroam:shutdown:5")
	errReply, _ := encodeMessage(typeError, 1, nil, "ENOENT")
	dir, _ := encodeMessage(typeDirectory, 1, nil, "0", "5", "7")
	f.Add(event)
	f.Add(errReply)
	f.Add(append(dir, event...))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := bytes.NewReader(b)
		for {
			m, err := readMessage(r)
			if err != nil {
				break
			}
			if len(m.Payload) > payloadMax || int(m.Len) != len(m.Payload) || m.Type >= typeCount {
				t.Fatalf("accepted %+v with %d payload bytes", m.header, len(m.Payload))
			}
			switch m.Type {
			case typeWatchEvent:
				if ev, err := parseEvent(m.Payload); err == nil {
					again, err := encodeMessage(typeWatchEvent, m.ReqID, nil, ev.Path, ev.Token)
					if err != nil || !bytes.Equal(again[headerSize:], m.Payload) {
						t.Fatalf("event %+v does not encode back to %q", ev, m.Payload)
					}
				}
			case typeError:
				if name, err := parseErrno(m.Payload); err == nil {
					again, err := encodeMessage(typeError, m.ReqID, nil, name)
					if err != nil || !bytes.Equal(again[headerSize:], m.Payload) {
						t.Fatalf("error %q does not encode back to %q", name, m.Payload)
					}
				}
			case typeDirectory:
				if names, err := parseStrings(m.Payload); err == nil {
					again, err := encodeMessage(typeDirectory, m.ReqID, nil, names...)
					if err != nil || !bytes.Equal(again[headerSize:], m.Payload) {
						t.Fatalf("directory %q does not encode back to %q", names, m.Payload)
					}
				}
			default:
				parseAck(m.Payload)
			}
		}

		server, client := net.Pipe()
		c := newClient(client)
		go func() {
			server.Write(b)
			server.Close()
		}()
		deadline := time.After(5 * time.Second)
		for {
			select {
			case _, ok := <-c.Events():
				if ok {
					continue
				}
			case <-deadline:
				t.Fatal("client did not end after the stream ended")
			}
			break
		}
		if _, err := c.Read("/x"); err == nil {
			t.Fatal("request succeeded on an ended connection")
		}
		c.Close()
	})
}
