package gossip

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"
)

var key3 = bytes.Repeat([]byte{3}, 32)

// newKeyNode starts a member whose keys live in a key file of its own.
func newKeyNode(t *testing.T, i int, keys ...[]byte) (*node, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "gossip.key")
	if err := WriteKeyFile(path, keys); err != nil {
		t.Fatal(err)
	}
	return newNodeWith(t, i, func(c *Config) { c.Keys, c.KeyFile = keys, path }), path
}

func keyCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// checkReports fails unless every one of n members answered without an
// error and holds exactly keys (primary first).
func checkReports(t *testing.T, rs []KeyReport, n int, keys ...[]byte) {
	t.Helper()
	var want []string
	for _, k := range keys {
		want = append(want, KeyFingerprint(k))
	}
	if len(rs) != n {
		t.Fatalf("%d reports, want %d: %+v", len(rs), n, rs)
	}
	for _, r := range rs {
		if r.Err != "" || !reflect.DeepEqual(r.Keys, want) {
			t.Fatalf("%s: keys %v err %q, want %v", r.Member, r.Keys, r.Err, want)
		}
	}
}

func checkKeyFile(t *testing.T, path string, keys ...[]byte) {
	t.Helper()
	got, err := LoadKeyFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, keys) {
		t.Fatalf("%s holds %d keys %x, want %x", path, len(got), got, keys)
	}
}

// TestKeyRotation rotates the key of a running three-member cluster, add,
// use, remove, while a watcher checks that no member ever sees fewer than
// three members, and after each step every member's broadcast still reaches
// every other (a member that cannot decrypt another's messages would not
// see its claim). A member with only the new key can join afterwards; one
// with only the old key cannot.
func TestKeyRotation(t *testing.T) {
	a, pa := newKeyNode(t, 1, key1)
	b, pb := newKeyNode(t, 2, key1)
	c, pc := newKeyNode(t, 3, key1)
	b.join(t, a)
	c.join(t, a)
	nodes, files := []*node{a, b, c}, []string{pa, pb, pc}
	for _, n := range nodes {
		waitFor(t, n.Name()+" to see 3 members", func() bool { return n.Stats().Members == 3 })
	}

	stop := make(chan struct{})
	var watch sync.WaitGroup
	var fewest = 3
	var fewestWho string
	watch.Add(1)
	go func() {
		defer watch.Done()
		for {
			for _, n := range nodes {
				if m := n.Stats().Members; m < fewest {
					fewest, fewestWho = m, n.Name()
				}
			}
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}()
	stopWatch := func() {
		t.Helper()
		select {
		case <-stop:
		default:
			close(stop)
		}
		watch.Wait()
		if fewest < 3 {
			t.Fatalf("%s saw only %d members during the rotation: a partition", fewestWho, fewest)
		}
	}
	defer stopWatch()

	vip := 0
	gossipFlows := func(step string) {
		t.Helper()
		for _, n := range nodes {
			vip++
			r := n.Claim(netip.AddrFrom4([4]byte{100, 100, 1, byte(vip)}))
			for _, o := range nodes {
				waitFor(t, fmt.Sprintf("after %s: %s's claim to reach %s", step, n.Name(), o.Name()), hasRecord(o, r))
			}
		}
	}

	rs, err := a.ListKeys(keyCtx(t))
	if err != nil {
		t.Fatal(err)
	}
	checkReports(t, rs, 3, key1)

	// Add.
	rs, err = b.InstallKey(keyCtx(t), key2)
	if err != nil {
		t.Fatal(err)
	}
	checkReports(t, rs, 3, key1, key2)
	for _, f := range files {
		checkKeyFile(t, f, key1, key2)
	}
	gossipFlows("add")

	// Use: refused while one member lacks the key.
	if rep := c.applyKeyOp(keyOpInstall, key3); rep.Err != "" {
		t.Fatal(rep.Err)
	}
	_, err = a.UseKey(keyCtx(t), key3)
	var ke *KeyError
	if !errors.As(err, &ke) || !strings.Contains(err.Error(), "host-1 does not have it") || !strings.Contains(err.Error(), "host-2 does not have it") || strings.Contains(err.Error(), "host-3") {
		t.Fatalf("use of a key two members lack: %v", err)
	}
	if rs, err = a.RemoveKey(keyCtx(t), key3, false); err != nil {
		t.Fatal(err)
	}
	checkReports(t, rs, 3, key1, key2)
	rs, err = a.UseKey(keyCtx(t), key2)
	if err != nil {
		t.Fatal(err)
	}
	checkReports(t, rs, 3, key2, key1)
	for _, f := range files {
		checkKeyFile(t, f, key2, key1)
	}
	gossipFlows("use")

	// Remove: refused while a member still encrypts with the old key, and
	// always refused for the asking member's own primary key.
	if rep := a.applyKeyOp(keyOpUse, key1); rep.Err != "" {
		t.Fatal(rep.Err)
	}
	if _, err := b.RemoveKey(keyCtx(t), key1, false); err == nil || !strings.Contains(err.Error(), "host-1 encrypts with it") {
		t.Fatalf("removing a key host-1 still uses: %v", err)
	}
	if _, err := a.RemoveKey(keyCtx(t), key1, true); err == nil || !strings.Contains(err.Error(), "primary key of this member") {
		t.Fatalf("removing the asking member's primary key: %v", err)
	}
	if rep := a.applyKeyOp(keyOpUse, key2); rep.Err != "" {
		t.Fatal(rep.Err)
	}
	rs, err = c.RemoveKey(keyCtx(t), key1, false)
	if err != nil {
		t.Fatal(err)
	}
	checkReports(t, rs, 3, key2)
	for _, f := range files {
		checkKeyFile(t, f, key2)
	}
	gossipFlows("remove")
	// A partition shows as members turning suspect, then dead: give the
	// failure detector time to notice one.
	time.Sleep(3 * time.Second)
	gossipFlows("a while after remove")
	stopWatch()

	// Only the new key gets in now.
	old := newNode(t, 5, key1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	old.Join(ctx, []string{a.addr()})
	cancel()
	if old.Stats().Members != 1 {
		t.Fatalf("a member with only the removed key joined: it sees %d members", old.Stats().Members)
	}
	d := newNode(t, 4, key2)
	d.join(t, b)
	for _, n := range append(nodes, d) {
		waitFor(t, n.Name()+" to see 4 members", func() bool { return n.Stats().Members == 4 })
	}
}

func TestKeyOpsWithoutEncryption(t *testing.T) {
	n := newNode(t, 1)
	if _, err := n.ListKeys(context.Background()); err == nil || !strings.Contains(err.Error(), "encryption is off") {
		t.Fatalf("list: %v", err)
	}
	if _, err := n.InstallKey(context.Background(), key2); err == nil {
		t.Fatal("install without encryption worked")
	}
}

func TestKeyOpBadKey(t *testing.T) {
	n := newNode(t, 1, key1)
	for _, k := range [][]byte{nil, make([]byte, 15)} {
		if _, err := n.InstallKey(context.Background(), k); err == nil {
			t.Errorf("install of a %d-byte key worked", len(k))
		}
	}
}

func TestKeyMessagesRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		op  byte
		key []byte
	}{{keyOpList, nil}, {keyOpInstall, key1}, {keyOpUse, make([]byte, 16)}, {keyOpRemove, make([]byte, 24)}} {
		b := encodeKeyOp(42, tc.op, "host-1", tc.key)
		id, op, from, key, err := decodeKeyOp(b)
		if err != nil || id != 42 || op != tc.op || from != "host-1" || !bytes.Equal(key, tc.key) {
			t.Fatalf("op %d: %d %d %q %x %v", tc.op, id, op, from, key, err)
		}
		for i := range b {
			if _, _, _, _, err := decodeKeyOp(b[:i]); err == nil {
				t.Fatalf("op %d: %d of %d bytes decoded", tc.op, i, len(b))
			}
		}
		if _, _, _, _, err := decodeKeyOp(append(b, 0)); err == nil {
			t.Fatalf("op %d: trailing byte accepted", tc.op)
		}
	}
	if _, _, _, _, err := decodeKeyOp(encodeKeyOp(1, keyOpList, "h", key1)); err == nil {
		t.Fatal("a list carrying a key decoded")
	}
	if _, _, _, _, err := decodeKeyOp(encodeKeyOp(1, keyOpUse, "h", make([]byte, 20))); err == nil {
		t.Fatal("a 20-byte key decoded")
	}
	rep := KeyReport{Member: "host-2", Keys: []string{KeyFingerprint(key1), KeyFingerprint(key2)}, Err: "no"}
	b := encodeKeyReply(7, rep)
	id, got, err := decodeKeyReply(b)
	if err != nil || id != 7 || !reflect.DeepEqual(got, rep) {
		t.Fatalf("reply: %d %+v %v", id, got, err)
	}
	for i := range b {
		if _, _, err := decodeKeyReply(b[:i]); err == nil {
			t.Fatalf("reply: %d of %d bytes decoded", i, len(b))
		}
	}
}
