package wgagent

import (
	"net"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/gossip"
)

// FuzzParsePeerAllowlist: a list that parses says one thing about each key
// and each name, admits exactly the pairs it lists, and its own text (one
// "KEY [NAME]" line each) parses back to the same list.
func FuzzParsePeerAllowlist(f *testing.F) {
	k1 := wgtypes.Key{1, 2, 3}
	k2 := wgtypes.Key{4, 5, 6}
	f.Add([]byte("# hosts\n" + k1.String() + " h1  # the first\n\n" + k2.String() + "\n"))
	f.Add([]byte(k1.String() + "\t" + strings.Repeat("n", gossip.MaxOwnerLen) + "\r\n"))
	f.Add([]byte(k1.String() + " h1\n" + k2.String() + " h1\n"))
	f.Add([]byte(k1.String() + " h1 extra\n"))
	f.Add([]byte("nokey\n"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		l, err := parsePeerAllowlist(data)
		if err != nil {
			if l != nil {
				t.Fatal("a rejected file gave a list")
			}
			return
		}
		var text strings.Builder
		for k, name := range l.keys {
			if len(name) > gossip.MaxOwnerLen || strings.ContainsAny(name, "# \t\r\n") {
				t.Fatalf("name %q", name)
			}
			if name != "" && l.names[name] != k {
				t.Fatalf("key %s bound to %q, which is listed with %s", k, name, l.names[name])
			}
			if why := l.refuses(name, k); why != "" {
				t.Fatalf("refuses its own entry %s %q: %s", k, name, why)
			}
			text.WriteString(k.String() + " " + name + "\n")
		}
		for name, k := range l.names {
			if l.keys[k] != name {
				t.Fatalf("name %q listed with %s, bound to %q", name, k, l.keys[k])
			}
		}
		again, err := parsePeerAllowlist([]byte(text.String()))
		if err != nil || !reflect.DeepEqual(again, l) {
			t.Fatalf("own text %q: %+v %v, want %+v", text.String(), again, err, l)
		}
	})
}

// FuzzStateFile: a state file that decodes holds only VIPs a restart can
// re-announce, each once, and encodeState's text of it decodes to the same
// state; a rejected file gives nothing.
func FuzzStateFile(f *testing.F) {
	mac, _ := net.ParseMAC("52:54:00:12:34:56")
	for _, st := range []persisted{
		{},
		{Attachments: []attachment{
			{VIP: netip.MustParseAddr("fd76:6d72::a1"), Dev: "vif2", Epoch: 7, MAC: mac},
			{VIP: netip.MustParseAddr("100.100.10.1"), Dev: "vif1", Epoch: 3},
		}, Peers: []string{"198.18.0.3:7946"}, Awaiting: []awaitingVIP{{VIP: netip.MustParseAddr("100.100.10.2"), Dev: "tap0"}}},
	} {
		b, err := encodeState(st)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte(`{"attachments":[{"vip":"100.100.0.1"},{"vip":"100.100.0.1"}]}`))
	f.Add([]byte(`{"attachments":[{"vip":""}],"awaiting":[]}`))
	f.Add([]byte(`{"attachments":[{"vip":"100.100.0.1","mac":""}],"peers":[]}`))
	f.Add([]byte(`{"attachments":[{"vip":"fe80::1%eth0"}]}`))
	f.Add([]byte(`{"attachments":[{"vip":"100.100.0.1","epoch":-1}]}`))
	f.Add([]byte(`{`))
	f.Fuzz(func(t *testing.T, data []byte) {
		st, err := decodeState(data)
		if err != nil {
			if !reflect.DeepEqual(st, persisted{}) {
				t.Fatalf("rejected file gave %+v", st)
			}
			return
		}
		seen := map[netip.Addr]bool{}
		for _, at := range st.Attachments {
			if err := gossip.ValidVIP(at.VIP); err != nil || seen[at.VIP] {
				t.Fatalf("attachment %+v (%v, seen before %v)", at, err, seen[at.VIP])
			}
			seen[at.VIP] = true
		}
		want := persisted{
			Attachments: slices.Clone(st.Attachments),
			Peers:       slices.Clone(st.Peers),
			Awaiting:    slices.Clone(st.Awaiting),
		}
		enc, err := encodeState(want) // sorts want's lists
		if err != nil {
			t.Fatalf("decoded %+v does not encode: %v", st, err)
		}
		again, err := decodeState(enc)
		if err != nil {
			t.Fatalf("encoded state %s does not decode: %v", enc, err)
		}
		if !reflect.DeepEqual(again, want) {
			t.Fatalf("re-decoded %+v, want %+v", again, want)
		}
	})
}
