package main

import (
	"bytes"
	"strings"
	"testing"

	"github.com/vmroam/vmroam/wgagent/control"
)

// TestPrintStatusOverCap: status names, by owner, what the table's caps
// refused, the most first, and says nothing when they refused nothing.
func TestPrintStatusOverCap(t *testing.T) {
	st := control.Status{Name: "h1", Gossip: control.Gossip{Encrypted: true, Records: 150000, MaxRecords: 200000,
		OverCap: map[string]uint64{"h9": 3, "evil": 1200, "(others)": 3}}}
	var b bytes.Buffer
	printStatus(&b, st)
	want := "OVER CAP  150000 of at most 200000 records held; refused beyond the caps: evil 1200, (others) 3, h9 3\n"
	if !strings.Contains(b.String(), want) {
		t.Errorf("status lacks %q:\n%s", want, b.String())
	}
	st.Gossip.OverCap = nil
	b.Reset()
	printStatus(&b, st)
	if strings.Contains(b.String(), "OVER CAP") {
		t.Errorf("status with nothing refused:\n%s", b.String())
	}
}
