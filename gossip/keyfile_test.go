package gossip

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

func TestParseKeys(t *testing.T) {
	k32 := base64.StdEncoding.EncodeToString(make([]byte, 32))
	k16 := base64.StdEncoding.EncodeToString(make([]byte, 16))
	keys, err := ParseKeys([]byte("# primary\n" + k32 + "\n\n  " + k16 + "  \n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(keys) != 2 || len(keys[0]) != 32 || len(keys[1]) != 16 {
		t.Fatalf("keys = %d, lens %d", len(keys), len(keys[0]))
	}
	for _, bad := range []string{"", "# only a comment\n", "not base64!\n", base64.StdEncoding.EncodeToString(make([]byte, 20))} {
		if _, err := ParseKeys([]byte(bad)); err == nil {
			t.Errorf("ParseKeys(%q) accepted", bad)
		}
	}
}

func TestLoadKeyFileRefusesOpenModes(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gossip.key")
	if err := os.WriteFile(path, []byte(base64.StdEncoding.EncodeToString(make([]byte, 32))), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadKeyFile(path); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("mode 0644 accepted or unclear: %v", err)
	}
	os.Chmod(path, 0o600)
	if _, err := LoadKeyFile(path); err != nil {
		t.Fatal(err)
	}
}

func TestWriteKeyFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "gossip.key")
	enc := base64.StdEncoding.EncodeToString
	k1, k2, k3 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 16), bytes.Repeat([]byte{3}, 32)
	orig := "# cluster key, rotated yearly\n" + enc(k1) + "\n\n# old\n" + enc(k2) + "\n"
	if err := os.WriteFile(path, []byte(orig), 0o400); err != nil {
		t.Fatal(err)
	}
	check := func(want ...[]byte) {
		t.Helper()
		got, err := LoadKeyFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("keys %x, want %x", got, want)
		}
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o400 {
			t.Fatalf("mode %v, want 0400 kept", fi.Mode().Perm())
		}
		b, _ := os.ReadFile(path)
		if !strings.HasPrefix(string(b), "# cluster key, rotated yearly\n") || !strings.Contains(string(b), "# old\n") {
			t.Fatalf("comments lost:\n%s", b)
		}
		ents, _ := os.ReadDir(dir)
		if len(ents) != 1 {
			t.Fatalf("left behind: %v", ents)
		}
	}
	// Add, use (reorder), remove: what a rotation does.
	for _, keys := range [][][]byte{{k1, k2, k3}, {k3, k1, k2}, {k3, k1}} {
		if err := WriteKeyFile(path, keys); err != nil {
			t.Fatal(err)
		}
		check(keys...)
	}
	if err := WriteKeyFile(path, nil); err == nil {
		t.Fatal("an empty key list was written")
	}
	check(k3, k1)

	fresh := filepath.Join(t.TempDir(), "new.key")
	if err := WriteKeyFile(fresh, [][]byte{k1}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(fresh); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("new file: %v %v", fi.Mode(), err)
	}
}

func TestKeyFingerprint(t *testing.T) {
	a, b := KeyFingerprint(bytes.Repeat([]byte{1}, 32)), KeyFingerprint(bytes.Repeat([]byte{2}, 32))
	if len(a) != 16 || a == b || a != KeyFingerprint(bytes.Repeat([]byte{1}, 32)) {
		t.Fatalf("fingerprints %q %q", a, b)
	}
	if strings.Contains(a, hex.EncodeToString(bytes.Repeat([]byte{1}, 8))) {
		t.Fatal("the fingerprint shows the key")
	}
}
