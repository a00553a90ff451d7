package wanem

import (
	"math/bits"
	"sync/atomic"
	"time"
)

// histogram counts durations in buckets a power of two wide split in 8,
// so a percentile read from it is at most 12.5 % above the true one.
// Values 0..7 ns have a bucket each; negative ones count as 0.
type histogram struct {
	counts [histBuckets]atomic.Uint64
}

const histBuckets = 8 * 62

func histIndex(ns int64) int {
	if ns < 8 {
		return int(max(ns, 0))
	}
	exp := bits.Len64(uint64(ns)) - 1 // >= 3
	sub := int(ns>>(exp-3)) & 7
	return (exp-2)*8 + sub
}

// histUpper is the largest value that lands in bucket i.
func histUpper(i int) int64 {
	if i < 8 {
		return int64(i)
	}
	exp, sub := i/8+2, i%8
	return int64(8+sub+1)<<(exp-3) - 1
}

func (h *histogram) add(ns int64) { h.counts[histIndex(ns)].Add(1) }

// quantile returns the upper bound of the bucket holding the q-quantile,
// 0 when empty.
func (h *histogram) quantile(q float64) time.Duration {
	var total uint64
	var snap [histBuckets]uint64
	for i := range h.counts {
		snap[i] = h.counts[i].Load()
		total += snap[i]
	}
	if total == 0 {
		return 0
	}
	rank := uint64(q*float64(total-1)) + 1
	var seen uint64
	for i, c := range snap {
		seen += c
		if seen >= rank {
			return time.Duration(histUpper(i))
		}
	}
	return time.Duration(histUpper(histBuckets - 1))
}
