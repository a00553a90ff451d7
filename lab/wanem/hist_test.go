package wanem

import (
	"math"
	"testing"
	"time"
)

func TestHistogram(t *testing.T) {
	for _, v := range []int64{0, 1, 7, 8, 9, 15, 16, 17, 1000, 123456, 1 << 40, math.MaxInt64} {
		i := histIndex(v)
		if i < 0 || i >= histBuckets {
			t.Fatalf("%d: bucket %d out of range", v, i)
		}
		if up := histUpper(i); up < v || (v >= 8 && float64(up) > float64(v)*1.125) {
			t.Fatalf("%d: bucket %d has upper bound %d", v, i, up)
		}
		if i > 0 && histUpper(i-1) >= v {
			t.Fatalf("%d: also fits bucket %d", v, i-1)
		}
	}
	var h histogram
	if h.quantile(0.5) != 0 {
		t.Fatal("empty histogram")
	}
	for v := int64(1); v <= 1000; v++ {
		h.add(v * 1000) // 1 µs .. 1 ms
	}
	h.add(-5)
	for _, c := range []struct {
		q    float64
		want time.Duration
	}{{0.5, 500 * time.Microsecond}, {0.99, 990 * time.Microsecond}, {1, time.Millisecond}} {
		if got := h.quantile(c.q); got < c.want || float64(got) > float64(c.want)*1.13 {
			t.Errorf("quantile %v = %v, want about %v", c.q, got, c.want)
		}
	}
}
