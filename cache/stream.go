package cache

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"strconv"
	"time"
)

// The handover stream runs agent to agent over TCP inside WireGuard. Each
// frame is a type byte, the payload length as a minimal uvarint (at most 3
// bytes) and the payload. Integers in payloads are big-endian; an address
// is its length (4 or 16) and its bytes. Every field has exactly one
// encoding, so a decoded frame re-encodes to the bytes it came from.

// MaxFramePayload bounds every frame's payload, and so what a reader ever
// buffers for a hostile length: 64 bytes over the largest IPv4 packet, so
// that an IPv6 packet with a full 65535-byte payload fits.
const MaxFramePayload = 65535 + 64

// Field bounds.
const (
	MaxClaimer = 255
	MaxReason  = 1024
)

// FrameType is a frame's first byte.
type FrameType uint8

// Frame types.
const (
	FrameRequest FrameType = 1 // destination -> source: hand VIP over to me
	FrameHeader  FrameType = 2 // source -> destination: what follows
	FramePacket  FrameType = 3 // one IP packet
	FrameEnd     FrameType = 4 // end of the flushed queue; stragglers may follow as FramePacket
	FrameClose   FrameType = 5 // no more packets: linger over
	FrameRefuse  FrameType = 6 // the source refuses (reason)
	FrameTick    FrameType = 7 // source -> destination after the end marker: the stream's clock (see Tick)
	// A prepared connection (see Preview): the destination says which VIP
	// it prepares for, and the source sends copies of that VIP's cache
	// while it fills, before any request.
	FramePrepare  FrameType = 8  // destination -> source, first on the connection
	FrameOffer    FrameType = 9  // source -> destination: copies of the cache follow as FramePacket
	FrameWithdraw FrameType = 10 // source -> destination: the copies since the offer are void
)

func (t FrameType) String() string {
	switch t {
	case FrameRequest:
		return "request"
	case FrameHeader:
		return "header"
	case FramePacket:
		return "packet"
	case FrameEnd:
		return "end"
	case FrameClose:
		return "close"
	case FrameRefuse:
		return "refuse"
	case FrameTick:
		return "tick"
	case FramePrepare:
		return "prepare"
	case FrameOffer:
		return "offer"
	case FrameWithdraw:
		return "withdraw"
	}
	return "type-" + strconv.Itoa(int(t))
}

// Request asks the VIP's old owner to hand it over.
type Request struct {
	VIP     netip.Addr
	Epoch   uint64
	Claimer string // <= MaxClaimer bytes
	// Ticks asks for FrameTick frames while the source lingers. It is a
	// trailing flags byte, present only when a flag is set, so a request
	// that asks for none is what an older agent sends and reads.
	Ticks bool
	// Resume, if its Cache is not 0, says the claimer holds the packets of
	// that cache numbered below Seq, offered ahead (Offer); the source
	// sends from there. A flag and 16 bytes after the flags byte.
	Resume Resume
}

// Resume names a source's cache (Queue.ID) and a packet in it (Queue.Head).
type Resume struct {
	Cache uint64
	Seq   uint64
}

// Request flags (the trailing flags byte).
const (
	requestTicks  = 1
	requestResume = 2
)

// Prepare opens a prepared connection: the claimer will ask for VIP.
type Prepare struct {
	VIP     netip.Addr
	Claimer string // <= MaxClaimer bytes
}

// Offer says that copies of the source's cache for VIP follow, from the
// packet numbered Seq of cache Cache (not 0), while the source holds the
// VIP at Epoch. MAC is as in Header.
type Offer struct {
	Cache uint64
	Seq   uint64
	VIP   netip.Addr
	Epoch uint64
	MAC   net.HardwareAddr
}

// Header opens a flush.
type Header struct {
	VIP   netip.Addr
	Epoch uint64
	// MAC is the VM's MAC as the source knew it (len 0 or 6), so the
	// destination can deliver a burst before its neighbour entry resolves.
	MAC         net.HardwareAddr
	Queued      uint32
	QueuedBytes uint64
}

// End closes the flushed queue: what the flush carried, what the source
// dropped.
type End struct {
	Packets uint64
	Bytes   uint64
	Dropped uint64
}

// Refuse is the source's no.
type Refuse struct {
	Reason string // <= MaxReason bytes
}

// ErrMalformed is wrapped by every Reader error caused by the bytes on the
// stream rather than by the transport. A stream cut inside a frame wraps
// io.ErrUnexpectedEOF instead.
var ErrMalformed = errors.New("cache: malformed stream frame")

// ErrFrameField is wrapped by Writer errors for a field that cannot be
// encoded (a caller bug: nothing is written).
var ErrFrameField = errors.New("cache: frame field out of range")

const (
	endLen     = 24
	maxAddrLen = 1 + 16
	// Request and Header payloads fit in this much; Refuse is the largest.
	scratchLen = MaxReason
)

// Writer buffers frames; Flush sends. Not safe for concurrent use.
type Writer struct {
	bw *bufio.Writer
	// hdr lives here rather than on the stack: handed to bufio, which may
	// pass it on to an io.Writer, a local array would escape and cost an
	// allocation per packet.
	hdr     [4]byte
	scratch [scratchLen]byte
}

// NewWriter returns a Writer on w. Its buffer is large enough to batch a
// few hundred small packets into one TCP write.
func NewWriter(w io.Writer) *Writer {
	return &Writer{bw: bufio.NewWriterSize(w, 64<<10)}
}

func (w *Writer) frame(t FrameType, payload []byte) error {
	if len(payload) > MaxFramePayload {
		return fmt.Errorf("cache: write %v frame: %d bytes over %d: %w", t, len(payload), MaxFramePayload, ErrFrameField)
	}
	w.hdr[0] = byte(t)
	n := binary.PutUvarint(w.hdr[1:], uint64(len(payload)))
	if _, err := w.bw.Write(w.hdr[:1+n]); err != nil {
		return fmt.Errorf("cache: write %v frame: %w", t, err)
	}
	if _, err := w.bw.Write(payload); err != nil {
		return fmt.Errorf("cache: write %v frame: %w", t, err)
	}
	return nil
}

func appendAddr(b []byte, a netip.Addr, t FrameType) ([]byte, error) {
	switch {
	case !a.IsValid():
		return nil, fmt.Errorf("cache: write %v frame: no VIP: %w", t, ErrFrameField)
	case a.Zone() != "":
		return nil, fmt.Errorf("cache: write %v frame: VIP %v has a zone: %w", t, a, ErrFrameField)
	case a.Is4():
		v := a.As4()
		return append(append(b, 4), v[:]...), nil
	default:
		v := a.As16()
		return append(append(b, 16), v[:]...), nil
	}
}

// Request writes a handover request.
func (w *Writer) Request(r Request) error {
	if len(r.Claimer) > MaxClaimer {
		return fmt.Errorf("cache: write request frame: claimer of %d bytes over %d: %w", len(r.Claimer), MaxClaimer, ErrFrameField)
	}
	b, err := appendAddr(w.scratch[:0], r.VIP, FrameRequest)
	if err != nil {
		return err
	}
	b = binary.BigEndian.AppendUint64(b, r.Epoch)
	b = append(b, byte(len(r.Claimer)))
	b = append(b, r.Claimer...)
	// The flags byte only when a flag is set: one encoding per request,
	// and an older source still reads a request that asks for nothing new.
	var flags byte
	if r.Ticks {
		flags |= requestTicks
	}
	if r.Resume.Cache != 0 {
		flags |= requestResume
	}
	if flags != 0 {
		b = append(b, flags)
	}
	if r.Resume.Cache != 0 {
		b = binary.BigEndian.AppendUint64(b, r.Resume.Cache)
		b = binary.BigEndian.AppendUint64(b, r.Resume.Seq)
	}
	return w.frame(FrameRequest, b)
}

// Prepare writes the frame that opens a prepared connection.
func (w *Writer) Prepare(p Prepare) error {
	if len(p.Claimer) > MaxClaimer {
		return fmt.Errorf("cache: write prepare frame: claimer of %d bytes over %d: %w", len(p.Claimer), MaxClaimer, ErrFrameField)
	}
	b, err := appendAddr(w.scratch[:0], p.VIP, FramePrepare)
	if err != nil {
		return err
	}
	b = append(b, byte(len(p.Claimer)))
	b = append(b, p.Claimer...)
	return w.frame(FramePrepare, b)
}

// Offer writes the frame that the cache's copies follow.
func (w *Writer) Offer(o Offer) error {
	if o.Cache == 0 {
		return fmt.Errorf("cache: write offer frame: cache 0: %w", ErrFrameField)
	}
	if len(o.MAC) != 0 && len(o.MAC) != 6 {
		return fmt.Errorf("cache: write offer frame: MAC of %d bytes: %w", len(o.MAC), ErrFrameField)
	}
	b := binary.BigEndian.AppendUint64(w.scratch[:0], o.Cache)
	b = binary.BigEndian.AppendUint64(b, o.Seq)
	b, err := appendAddr(b, o.VIP, FrameOffer)
	if err != nil {
		return err
	}
	b = binary.BigEndian.AppendUint64(b, o.Epoch)
	b = append(b, byte(len(o.MAC)))
	b = append(b, o.MAC...)
	return w.frame(FrameOffer, b)
}

// Withdraw writes the frame that voids the copies since the last offer.
func (w *Writer) Withdraw() error { return w.frame(FrameWithdraw, nil) }

// Header writes the flush header.
func (w *Writer) Header(h Header) error {
	if len(h.MAC) != 0 && len(h.MAC) != 6 {
		return fmt.Errorf("cache: write header frame: MAC of %d bytes: %w", len(h.MAC), ErrFrameField)
	}
	b, err := appendAddr(w.scratch[:0], h.VIP, FrameHeader)
	if err != nil {
		return err
	}
	b = binary.BigEndian.AppendUint64(b, h.Epoch)
	b = append(b, byte(len(h.MAC)))
	b = append(b, h.MAC...)
	b = binary.BigEndian.AppendUint32(b, h.Queued)
	b = binary.BigEndian.AppendUint64(b, h.QueuedBytes)
	return w.frame(FrameHeader, b)
}

// Packet writes one IP packet (copied into the buffer).
func (w *Writer) Packet(pkt []byte) error { return w.frame(FramePacket, pkt) }

// End writes the end-of-flush marker.
func (w *Writer) End(e End) error {
	b := binary.BigEndian.AppendUint64(w.scratch[:0], e.Packets)
	b = binary.BigEndian.AppendUint64(b, e.Bytes)
	b = binary.BigEndian.AppendUint64(b, e.Dropped)
	return w.frame(FrameEnd, b)
}

// Tick writes FrameTick: sent is the source's clock (time since its flush
// began) when it wrote the frame. Every packet the source took before then
// is ahead of it in the stream.
func (w *Writer) Tick(sent time.Duration) error {
	return w.frame(FrameTick, binary.BigEndian.AppendUint64(w.scratch[:0], uint64(sent)))
}

// Close writes FrameClose; it does not close the underlying io.Writer.
func (w *Writer) Close() error { return w.frame(FrameClose, nil) }

// Refuse writes the source's refusal.
func (w *Writer) Refuse(r Refuse) error {
	if len(r.Reason) > MaxReason {
		return fmt.Errorf("cache: write refuse frame: reason of %d bytes over %d: %w", len(r.Reason), MaxReason, ErrFrameField)
	}
	return w.frame(FrameRefuse, append(w.scratch[:0], r.Reason...))
}

// Flush sends what is buffered.
func (w *Writer) Flush() error {
	if err := w.bw.Flush(); err != nil {
		return fmt.Errorf("cache: flush stream: %w", err)
	}
	return nil
}

// Buffered returns how many bytes wait for Flush.
func (w *Writer) Buffered() int { return w.bw.Buffered() }

// Frame is one decoded frame; only the field named by Type is set.
type Frame struct {
	Type    FrameType
	Request Request
	Prepare Prepare
	Offer   Offer
	Header  Header
	Packet  []byte
	End     End
	Refuse  Refuse
	Tick    time.Duration
}

// Reader reads frames. Packet payloads returned by Next are valid until the
// next call: they point into the read buffer, which is why that buffer
// holds a whole maximal frame and a hostile length costs nothing more.
type Reader struct {
	br  *bufio.Reader
	err error // sticky: after a bad frame the stream is out of step
}

// NewReader returns a Reader on r.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, MaxFramePayload+16)}
}

func malformed(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrMalformed}, args...)...)
}

// cut turns an end of input inside a frame into io.ErrUnexpectedEOF.
func cut(what string, err error) error {
	if errors.Is(err, io.EOF) {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("cache: read %s: %w", what, err)
}

// Next returns the next frame: io.EOF itself at a clean end (between
// frames); an error wrapping io.ErrUnexpectedEOF when the input ends inside
// a frame; one wrapping ErrMalformed for bad input. After an error every
// call returns the same error.
func (r *Reader) Next() (Frame, error) {
	if r.err != nil {
		return Frame{}, r.err
	}
	f, err := r.next()
	if err != nil {
		r.err = err
	}
	return f, err
}

func (r *Reader) next() (Frame, error) {
	tb, err := r.br.ReadByte()
	if err == io.EOF {
		return Frame{}, io.EOF
	}
	if err != nil {
		return Frame{}, fmt.Errorf("cache: read frame type: %w", err)
	}
	t := FrameType(tb)
	if t < FrameRequest || t > FrameWithdraw {
		return Frame{}, malformed("unknown frame type %d", tb)
	}
	n, err := r.length(t)
	if err != nil {
		return Frame{}, err
	}
	p, err := r.br.Peek(n)
	if err != nil {
		return Frame{}, cut(t.String()+" frame payload", err)
	}
	// Discard cannot fail for bytes Peek already buffered.
	_, _ = r.br.Discard(n)
	f := Frame{Type: t}
	switch t {
	case FramePacket:
		f.Packet = p
	case FrameRequest:
		f.Request, err = decodeRequest(p)
	case FrameHeader:
		f.Header, err = decodeHeader(p)
	case FrameEnd:
		if len(p) != endLen {
			return Frame{}, malformed("end frame of %d bytes, want %d", len(p), endLen)
		}
		f.End = End{
			Packets: binary.BigEndian.Uint64(p),
			Bytes:   binary.BigEndian.Uint64(p[8:]),
			Dropped: binary.BigEndian.Uint64(p[16:]),
		}
	case FrameClose, FrameWithdraw:
		if len(p) != 0 {
			return Frame{}, malformed("%v frame with %d payload bytes", t, len(p))
		}
	case FramePrepare:
		f.Prepare, err = decodePrepare(p)
	case FrameOffer:
		f.Offer, err = decodeOffer(p)
	case FrameRefuse:
		if len(p) > MaxReason {
			return Frame{}, malformed("refuse reason of %d bytes over %d", len(p), MaxReason)
		}
		f.Refuse.Reason = string(p)
	case FrameTick:
		if len(p) != 8 {
			return Frame{}, malformed("tick frame of %d bytes, want 8", len(p))
		}
		sent := binary.BigEndian.Uint64(p)
		if sent > math.MaxInt64 {
			return Frame{}, malformed("tick time %d out of range", sent)
		}
		f.Tick = time.Duration(sent)
	}
	if err != nil {
		return Frame{}, err
	}
	return f, nil
}

// length reads the payload length: a minimal uvarint, so at most 3 bytes
// for MaxFramePayload, and never above it.
func (r *Reader) length(t FrameType) (int, error) {
	n := 0
	for i := 0; i < 3; i++ {
		b, err := r.br.ReadByte()
		if err != nil {
			return 0, cut(t.String()+" frame length", err)
		}
		if i > 0 && b == 0 {
			return 0, malformed("%v frame length not minimally encoded", t)
		}
		n |= int(b&0x7f) << (7 * i)
		if b < 0x80 {
			if n > MaxFramePayload {
				return 0, malformed("%v frame length %d over %d", t, n, MaxFramePayload)
			}
			return n, nil
		}
	}
	return 0, malformed("%v frame length over %d", t, MaxFramePayload)
}

// decoder walks a payload; the first shortfall sticks, so a decode
// function checks once at the end.
type decoder struct {
	p   []byte
	bad bool
}

func (d *decoder) bytes(n int) []byte {
	if d.bad || len(d.p) < n {
		d.bad = true
		return nil
	}
	b := d.p[:n]
	d.p = d.p[n:]
	return b
}

func (d *decoder) u8() uint8 {
	if b := d.bytes(1); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) u32() uint32 {
	if b := d.bytes(4); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

func (d *decoder) u64() uint64 {
	if b := d.bytes(8); b != nil {
		return binary.BigEndian.Uint64(b)
	}
	return 0
}

func (d *decoder) addr(t FrameType) (netip.Addr, error) {
	switch l := d.u8(); {
	case d.bad:
		return netip.Addr{}, malformed("%v frame cut in its VIP", t)
	case l == 4:
		if b := d.bytes(4); b != nil {
			return netip.AddrFrom4([4]byte(b)), nil
		}
	case l == 16:
		if b := d.bytes(16); b != nil {
			return netip.AddrFrom16([16]byte(b)), nil
		}
	default:
		return netip.Addr{}, malformed("%v frame VIP of length %d", t, l)
	}
	return netip.Addr{}, malformed("%v frame cut in its VIP", t)
}

// done checks the payload was consumed exactly.
func (d *decoder) done(t FrameType) error {
	if d.bad {
		return malformed("%v frame too short", t)
	}
	if len(d.p) != 0 {
		return malformed("%v frame has %d trailing bytes", t, len(d.p))
	}
	return nil
}

func decodeRequest(p []byte) (Request, error) {
	d := decoder{p: p}
	vip, err := d.addr(FrameRequest)
	if err != nil {
		return Request{}, err
	}
	r := Request{VIP: vip, Epoch: d.u64()}
	r.Claimer = string(d.bytes(int(d.u8())))
	if len(d.p) > 0 && !d.bad {
		flags := d.u8()
		if flags == 0 || flags&^(requestTicks|requestResume) != 0 {
			return Request{}, malformed("request flags %#x", flags)
		}
		r.Ticks = flags&requestTicks != 0
		if flags&requestResume != 0 {
			r.Resume = Resume{Cache: d.u64(), Seq: d.u64()}
			if r.Resume.Cache == 0 && !d.bad {
				return Request{}, malformed("request resumes cache 0")
			}
		}
	}
	if err := d.done(FrameRequest); err != nil {
		return Request{}, err
	}
	return r, nil
}

func decodePrepare(p []byte) (Prepare, error) {
	d := decoder{p: p}
	vip, err := d.addr(FramePrepare)
	if err != nil {
		return Prepare{}, err
	}
	r := Prepare{VIP: vip}
	r.Claimer = string(d.bytes(int(d.u8())))
	if err := d.done(FramePrepare); err != nil {
		return Prepare{}, err
	}
	return r, nil
}

func decodeOffer(p []byte) (Offer, error) {
	d := decoder{p: p}
	o := Offer{Cache: d.u64(), Seq: d.u64()}
	vip, err := d.addr(FrameOffer)
	if err != nil {
		return Offer{}, err
	}
	if o.Cache == 0 {
		return Offer{}, malformed("offer of cache 0")
	}
	o.VIP, o.Epoch = vip, d.u64()
	mac, err := d.mac(FrameOffer)
	if err != nil {
		return Offer{}, err
	}
	o.MAC = mac
	if err := d.done(FrameOffer); err != nil {
		return Offer{}, err
	}
	return o, nil
}

// mac reads a length byte (0 or 6) and the MAC, copied: a frame outlives
// the read buffer.
func (d *decoder) mac(t FrameType) (net.HardwareAddr, error) {
	switch ml := d.u8(); ml {
	case 0:
	case 6:
		return net.HardwareAddr(append([]byte(nil), d.bytes(6)...)), nil
	default:
		if !d.bad {
			return nil, malformed("%v frame MAC of length %d", t, ml)
		}
	}
	return nil, nil
}

func decodeHeader(p []byte) (Header, error) {
	d := decoder{p: p}
	vip, err := d.addr(FrameHeader)
	if err != nil {
		return Header{}, err
	}
	h := Header{VIP: vip, Epoch: d.u64()}
	mac, err := d.mac(FrameHeader)
	if err != nil {
		return Header{}, err
	}
	h.MAC = mac
	h.Queued = d.u32()
	h.QueuedBytes = d.u64()
	if err := d.done(FrameHeader); err != nil {
		return Header{}, err
	}
	return h, nil
}
