package xenhook

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"

	"github.com/vmroam/vmroam/internal/netnstest"
)

// TestUnbridge: a tap in the routed bridge comes out of it; one in
// another bridge, one in none and one that does not exist are left alone.
func TestUnbridge(t *testing.T) {
	netnstest.Run(t, func() {
		for _, args := range [][]string{
			{"link", "add", DefaultRoutedBridge, "type", "bridge"},
			{"link", "add", "vmbr0", "type", "bridge"},
			{"link", "add", "tap100i0", "type", "veth", "peer", "name", "g100"},
			{"link", "add", "tap101i0", "type", "veth", "peer", "name", "g101"},
			{"link", "add", "tap102i0", "type", "veth", "peer", "name", "g102"},
			{"link", "set", "tap100i0", "master", DefaultRoutedBridge},
			{"link", "set", "tap101i0", "master", "vmbr0"},
		} {
			if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
				t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
		masterOf := func(dev string) int {
			l, err := netlink.LinkByName(dev)
			if err != nil {
				t.Fatal(err)
			}
			return l.Attrs().MasterIndex
		}
		for _, tc := range []struct {
			dev  string
			did  bool
			kept bool // still in a bridge after
		}{
			{"tap100i0", true, false},
			{"tap100i0", false, false}, // again: nothing to do
			{"tap101i0", false, true},
			{"tap102i0", false, false},
			{"tap999i0", false, false},
		} {
			did, err := Unbridge(tc.dev, DefaultRoutedBridge)
			if err != nil || did != tc.did {
				t.Errorf("Unbridge(%s) = %v, %v; want %v", tc.dev, did, err, tc.did)
			}
			if tc.dev != "tap999i0" && (masterOf(tc.dev) != 0) != tc.kept {
				t.Errorf("%s in a bridge after: %v, want %v", tc.dev, masterOf(tc.dev) != 0, tc.kept)
			}
		}
	})
}
