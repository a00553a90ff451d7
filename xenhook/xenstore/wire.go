package xenstore

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Message types, as numbered by enum xsd_sockmsg_type in Xen's
// xen/include/public/io/xs_wire.h. Only the ones this client sends or
// receives are named.
const (
	typeDirectory  uint32 = 1
	typeRead       uint32 = 2
	typeWatch      uint32 = 4
	typeUnwatch    uint32 = 5
	typeWrite      uint32 = 11
	typeWatchEvent uint32 = 15
	typeError      uint32 = 16
	// typeCount is one past the last type xs_wire.h defines
	// (XS_DIRECTORY_PART = 22); anything at or above it is not xenstore.
	typeCount uint32 = 23
)

const (
	// headerSize is sizeof(struct xsd_sockmsg): type, req_id, tx_id, len,
	// four uint32 in host byte order.
	headerSize = 16
	// payloadMax is XENSTORE_PAYLOAD_MAX. xenstored drops a client that
	// sends more, so this client refuses to send or accept more.
	payloadMax = 4096
)

// errMalformed marks a message that breaks the framing or the payload rules.
var errMalformed = errors.New("malformed xenstore message")

// header is struct xsd_sockmsg. The daemon echoes req_id in its reply; a
// watch event carries req_id 0.
type header struct {
	Type, ReqID, TxID, Len uint32
}

// message is one framed message: a header and its payload.
type message struct {
	header
	Payload []byte
}

// Host byte order: this package talks to a daemon on the same machine, and
// every platform vmroam supports is little-endian.
var order = binary.LittleEndian

func (h header) put(b []byte) {
	order.PutUint32(b[0:], h.Type)
	order.PutUint32(b[4:], h.ReqID)
	order.PutUint32(b[8:], h.TxID)
	order.PutUint32(b[12:], h.Len)
}

// decodeHeader parses and checks a header: the type must be one xs_wire.h
// defines and the payload no longer than payloadMax.
func decodeHeader(b []byte) (header, error) {
	if len(b) < headerSize {
		return header{}, fmt.Errorf("%w: header of %d bytes", errMalformed, len(b))
	}
	h := header{
		Type:  order.Uint32(b[0:]),
		ReqID: order.Uint32(b[4:]),
		TxID:  order.Uint32(b[8:]),
		Len:   order.Uint32(b[12:]),
	}
	if h.Type >= typeCount {
		return header{}, fmt.Errorf("%w: unknown type %d", errMalformed, h.Type)
	}
	if h.Len > payloadMax {
		return header{}, fmt.Errorf("%w: payload of %d bytes, more than %d", errMalformed, h.Len, payloadMax)
	}
	return h, nil
}

// readMessage reads one message from r. The payload is freshly allocated,
// so it may be kept.
func readMessage(r io.Reader) (message, error) {
	var hb [headerSize]byte
	if _, err := io.ReadFull(r, hb[:]); err != nil {
		return message{}, err
	}
	h, err := decodeHeader(hb[:])
	if err != nil {
		return message{}, err
	}
	m := message{header: h, Payload: make([]byte, h.Len)}
	if _, err := io.ReadFull(r, m.Payload); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return message{}, fmt.Errorf("payload of type %d: %w", h.Type, err)
	}
	return m, nil
}

// encodeMessage frames a request. Each string in nulTerminated is followed
// by a NUL; raw (a written value) is appended as is, as xs_write sends it.
func encodeMessage(typ, reqID uint32, raw []byte, nulTerminated ...string) ([]byte, error) {
	n := len(raw)
	for _, s := range nulTerminated {
		if strings.IndexByte(s, 0) >= 0 {
			return nil, fmt.Errorf("%q contains a NUL byte", s)
		}
		n += len(s) + 1
	}
	if n > payloadMax {
		return nil, fmt.Errorf("request of %d bytes is longer than xenstore's limit of %d", n, payloadMax)
	}
	b := make([]byte, headerSize, headerSize+n)
	header{Type: typ, ReqID: reqID, Len: uint32(n)}.put(b)
	for _, s := range nulTerminated {
		b = append(b, s...)
		b = append(b, 0)
	}
	return append(b, raw...), nil
}

// parseEvent splits a watch event's payload, "path\0token\0".
func parseEvent(p []byte) (Event, error) {
	s, err := parseStrings(p)
	if err != nil {
		return Event{}, err
	}
	if len(s) != 2 {
		return Event{}, fmt.Errorf("%w: watch event with %d strings, want path and token", errMalformed, len(s))
	}
	return Event{Path: s[0], Token: s[1]}, nil
}

// parseStrings splits a payload of NUL-terminated strings, as XS_DIRECTORY
// answers. An empty payload (C xenstored and oxenstored both send it for a
// node without children) is an empty list. An empty string inside is
// malformed: no node name, path or token is empty.
func parseStrings(p []byte) ([]string, error) {
	if len(p) == 0 {
		return nil, nil
	}
	if p[len(p)-1] != 0 {
		return nil, fmt.Errorf("%w: strings not NUL-terminated", errMalformed)
	}
	parts := bytes.Split(p[:len(p)-1], []byte{0})
	out := make([]string, len(parts))
	for i, s := range parts {
		if len(s) == 0 {
			return nil, fmt.Errorf("%w: empty string at %d", errMalformed, i)
		}
		out[i] = string(s)
	}
	return out, nil
}

// parseErrno reads an XS_ERROR payload: an errno name such as "ENOENT",
// NUL-terminated. oxenstored also sends names outside xs_wire.h's table
// ("EQUOTA"), so any upper-case name is taken.
func parseErrno(p []byte) (string, error) {
	s, err := parseStrings(p)
	if err != nil || len(s) != 1 {
		return "", fmt.Errorf("%w: error reply %q", errMalformed, p)
	}
	for _, c := range []byte(s[0]) {
		if (c < 'A' || c > 'Z') && (c < '0' || c > '9') {
			return "", fmt.Errorf("%w: error name %q", errMalformed, s[0])
		}
	}
	return s[0], nil
}

// parseAck checks the "OK\0" both daemons send for a request without data.
func parseAck(p []byte) error {
	if string(p) != "OK\x00" {
		return fmt.Errorf("%w: acknowledgement %q, want \"OK\\x00\"", errMalformed, p)
	}
	return nil
}
