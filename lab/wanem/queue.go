package wanem

// packet is one held packet. seq is the arrival order: it breaks ties
// between equal due times, so that a flow's packets leave in arrival order.
type packet struct {
	buf *[]byte
	n   int
	due int64
	seq uint64
}

func (p *packet) before(q *packet) bool {
	return p.due < q.due || p.due == q.due && p.seq < q.seq
}

// queue holds packets in due order. The reader pushes; the writer peeks and
// pops; the runner's mutex guards it.
type queue interface {
	push(packet)
	peek() *packet // nil when empty; valid until the next push or pop
	pop() packet   // only after peek returned non-nil
	len() int
}

// fifo is the queue without jitter: due times then grow with arrival, so
// arrival order is due order. A ring that doubles when full.
type fifo struct {
	ring       []packet
	head, size int
}

func (f *fifo) len() int { return f.size }

func (f *fifo) push(p packet) {
	if f.size == len(f.ring) {
		grown := make([]packet, max(64, 2*len(f.ring)))
		for i := 0; i < f.size; i++ {
			grown[i] = f.ring[(f.head+i)%len(f.ring)]
		}
		f.ring, f.head = grown, 0
	}
	f.ring[(f.head+f.size)%len(f.ring)] = p
	f.size++
}

func (f *fifo) peek() *packet {
	if f.size == 0 {
		return nil
	}
	return &f.ring[f.head]
}

func (f *fifo) pop() packet {
	p := f.ring[f.head]
	f.ring[f.head] = packet{}
	f.head = (f.head + 1) % len(f.ring)
	f.size--
	return p
}

// heapQueue is a binary min-heap on (due, seq), for jitter. Hand-written
// rather than container/heap, whose interface boxes every packet.
type heapQueue struct{ h []packet }

func (q *heapQueue) len() int { return len(q.h) }

func (q *heapQueue) push(p packet) {
	q.h = append(q.h, p)
	i := len(q.h) - 1
	for i > 0 {
		parent := (i - 1) / 2
		if !q.h[i].before(&q.h[parent]) {
			break
		}
		q.h[i], q.h[parent] = q.h[parent], q.h[i]
		i = parent
	}
}

func (q *heapQueue) peek() *packet {
	if len(q.h) == 0 {
		return nil
	}
	return &q.h[0]
}

func (q *heapQueue) pop() packet {
	top := q.h[0]
	last := len(q.h) - 1
	q.h[0] = q.h[last]
	q.h[last] = packet{}
	q.h = q.h[:last]
	i := 0
	for {
		l, small := 2*i+1, i
		if l < last && q.h[l].before(&q.h[small]) {
			small = l
		}
		if r := l + 1; r < last && q.h[r].before(&q.h[small]) {
			small = r
		}
		if small == i {
			break
		}
		q.h[i], q.h[small] = q.h[small], q.h[i]
		i = small
	}
	return top
}
