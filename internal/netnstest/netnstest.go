// Package netnstest runs test code inside a fresh, anonymous network
// namespace, so tests can create interfaces and routes without touching
// the machine's own. The namespace disappears when the test function
// returns.
package netnstest

import (
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
)

// Run calls f on a locked OS thread switched into a new network namespace
// and switches the thread back afterwards. It skips the test when not root
// or with -short. f must not start goroutines that use netlink: they would
// run in the test's original namespace.
func Run(t testing.TB, f func()) {
	t.Helper()
	if testing.Short() {
		t.Skip("network namespace test: skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a network namespace")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	ns, err := netns.New()
	if err != nil {
		t.Skipf("cannot create a network namespace: %v", err)
	}
	defer func() {
		if err := netns.Set(orig); err != nil {
			t.Errorf("return to the original namespace: %v", err)
		}
		ns.Close()
	}()
	f()
}
