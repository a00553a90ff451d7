package wgagent

import (
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

func persistAgent(dir string) *Agent {
	return &Agent{
		cfg:      Config{DataDir: dir},
		log:      slog.New(slog.NewTextHandler(io.Discard, nil)),
		attached: map[netip.Addr]attachment{},
	}
}

// attachAndPersist is what Attach does: change the state under a.mu, then
// persist outside it.
func attachAndPersist(a *Agent, vip netip.Addr) {
	a.mu.Lock()
	a.attached[vip] = attachment{VIP: vip, Dev: "vif1.0", Epoch: 1}
	a.dirty = true
	a.mu.Unlock()
	a.persist()
}

// TestPersistBeforeReturn: when persist returns, every change made before
// it was called is in the file, also when other callers save at the same
// time (one of them may have written the file with this caller's change).
func TestPersistBeforeReturn(t *testing.T) {
	dir := t.TempDir()
	a := persistAgent(dir)
	var wg sync.WaitGroup
	for i := range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			vip := netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)})
			attachAndPersist(a, vip)
			st, err := loadState(dir)
			if err != nil {
				t.Error(err)
				return
			}
			for _, at := range st.Attachments {
				if at.VIP == vip {
					return
				}
			}
			t.Errorf("persist returned before %s was saved: file has %d attachments", vip, len(st.Attachments))
		}()
	}
	wg.Wait()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.dirty {
		t.Error("still dirty after every persist returned")
	}
}

// TestPersistFailureRetried: a save that fails leaves the state dirty, so
// that the next reconcile tries again, and does not hold a.mu.
func TestPersistFailureRetried(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "gone")
	a := persistAgent(dir)
	attachAndPersist(a, netip.MustParseAddr("100.64.0.1"))
	if !a.mu.TryLock() {
		t.Fatal("a.mu held after a failed save")
	}
	dirty := a.dirty
	a.mu.Unlock()
	if !dirty {
		t.Fatal("a failed save cleared dirty: the change would never be saved")
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	a.persist()
	st, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Attachments) != 1 {
		t.Fatalf("after the retry the file has %d attachments, want 1", len(st.Attachments))
	}
}

// TestPersistKeepsAwaiting: a wait for a VM's announcement is in the file
// (the hook that asked does not ask again after a restart) until forgotten.
func TestPersistKeepsAwaiting(t *testing.T) {
	dir := t.TempDir()
	a := persistAgent(dir)
	vip := netip.MustParseAddr("100.64.0.9")
	a.mu.Lock()
	a.awaitKeep = map[netip.Addr]string{vip: "vnet3"}
	a.dirty = true
	a.mu.Unlock()
	a.persist()
	st, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Awaiting) != 1 || st.Awaiting[0] != (awaitingVIP{VIP: vip, Dev: "vnet3"}) {
		t.Fatalf("saved awaiting %+v, want %s on vnet3", st.Awaiting, vip)
	}
	if !a.forgetAwaiting(vip) {
		t.Fatal("forgetAwaiting did not find the wait")
	}
	a.persist()
	if st, _ = loadState(dir); len(st.Awaiting) != 0 {
		t.Fatalf("saved awaiting %+v after forgetting it", st.Awaiting)
	}
}
