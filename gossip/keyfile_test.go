package gossip

import (
	"encoding/base64"
	"os"
	"path/filepath"
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
