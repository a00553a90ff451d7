package lab

import (
	"encoding/json"
	"testing"
)

// TestIperfCount: iperf3 writes an interval's negative lost_packets (a
// datagram counted lost arrived late) as its unsigned 64-bit pattern.
func TestIperfCount(t *testing.T) {
	for in, want := range map[string]iperfCount{"0": 0, "12": 12, "18446744073709551614": -2, "-3": -3} {
		var c iperfCount
		if err := json.Unmarshal([]byte(in), &c); err != nil || c != want {
			t.Errorf("%s: %d, %v; want %d", in, c, err, want)
		}
	}
	var c iperfCount
	if err := json.Unmarshal([]byte(`"x"`), &c); err == nil {
		t.Errorf(`"x" decoded as %d`, c)
	}
}
