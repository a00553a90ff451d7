package wanem

// flowSlots is the size of the per-flow table of last due times. Flows that
// share a slot are kept in order with each other too, which only costs them
// some jitter.
const flowSlots = 1 << 16

// IP protocol numbers whose header starts with 16-bit source and destination
// ports.
const (
	protoTCP     = 6
	protoUDP     = 17
	protoSCTP    = 132
	protoUDPLite = 136
)

// flowHash hashes a packet's flow: source and destination address, protocol
// and, for TCP, UDP, SCTP and UDP-Lite, the ports. Fragments (IPv4, or IPv6
// with a fragment header) and anything unparsable hash without ports: a
// fragmented datagram's pieces then stay together, at the price of being a
// flow apart from the unfragmented packets of the same ports.
func flowHash(b []byte) uint64 {
	const (
		offset = 14695981039346656037
		prime  = 1099511628211
	)
	h := uint64(offset)
	mix := func(p []byte) {
		for _, c := range p {
			h ^= uint64(c)
			h *= prime
		}
	}
	if len(b) < 1 {
		return h
	}
	var proto byte
	var l4 []byte // the transport header, nil when ports must not be used
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return h
		}
		proto = b[9]
		mix(b[12:20])
		ihl := int(b[0]&0x0f) * 4
		fragment := (b[6]&0x3f) != 0 || b[7] != 0 // MF or an offset
		if !fragment && ihl >= 20 && len(b) >= ihl+4 {
			l4 = b[ihl:]
		}
	case 6:
		if len(b) < 40 {
			return h
		}
		mix(b[8:40])
		proto = b[6]
		off := 40
		// Skip the extension headers that may precede the transport header.
	ext:
		for range 8 {
			switch proto {
			case 0, 43, 60: // hop-by-hop, routing, destination options
				if len(b) < off+2 {
					break ext
				}
				proto = b[off]
				off += (int(b[off+1]) + 1) * 8
			default:
				break ext
			}
		}
		if proto != 44 && len(b) >= off+4 { // 44: fragment header
			l4 = b[off:]
		}
	default:
		return h
	}
	h ^= uint64(proto)
	h *= prime
	switch proto {
	case protoTCP, protoUDP, protoSCTP, protoUDPLite:
		if l4 != nil {
			mix(l4[:4])
		}
	}
	return h
}
