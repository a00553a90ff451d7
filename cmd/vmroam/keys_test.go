package main

import (
	"encoding/base64"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestKeysCLI(t *testing.T) {
	b := &recordingBackend{}
	fakeAgent(t, b)
	key := make([]byte, 32)
	key[0] = 7
	enc := base64.StdEncoding.EncodeToString(key)

	code, out, errOut := runCLI(t, "keys", "list")
	if code != 0 || !strings.Contains(out, "0011223344556677  2/2") || !strings.Contains(out, "ERROR: no answer") {
		t.Fatalf("list: %d\n%s%s", code, out, errOut)
	}
	if code, out, errOut = runCLI(t, "keys", "add", enc); code != 0 || !strings.Contains(out, "installed on 1 members") {
		t.Fatalf("add: %d\n%s%s", code, out, errOut)
	}
	keysInput = strings.NewReader(enc + "\n")
	t.Cleanup(func() { keysInput = nil })
	if code, _, errOut = runCLI(t, "keys", "remove", "-", "--force"); code != 0 {
		t.Fatalf("remove from stdin: %d %s", code, errOut)
	}
	want := []string{"keys list", fmt.Sprintf("keys install %x force=false", key), fmt.Sprintf("keys remove %x force=true", key)}
	if got := b.Calls(); !slices.Equal(got, want) {
		t.Fatalf("calls %q, want %q", got, want)
	}

	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"keys"}, "subcommand"},
		{[]string{"keys", "rotate"}, "unknown subcommand"},
		{[]string{"keys", "use"}, "usage: vmroam keys use"},
		{[]string{"keys", "use", "not-base64!"}, "not base64"},
		{[]string{"keys", "use", base64.StdEncoding.EncodeToString(make([]byte, 20))}, "20 bytes"},
		{[]string{"keys", "use", enc, "--force"}, "flag provided but not defined"},
		{[]string{"keys", "list", "extra"}, "no arguments"},
	} {
		code, _, errOut := runCLI(t, tc.args...)
		if code != 2 || !strings.Contains(errOut, tc.want) {
			t.Errorf("%q: exit %d, stderr %q, want 2 and %q", tc.args, code, errOut, tc.want)
		}
	}
	if code, out, _ := runCLI(t, "keys", "--help"); code != 0 || !strings.Contains(out, "without a partition") {
		t.Errorf("keys --help: %d %q", code, out)
	}
	if code, out, _ := runCLI(t, "keys", "remove", "--help"); code != 0 || !strings.Contains(out, "--force") {
		t.Errorf("keys remove --help: %d %q", code, out)
	}
}
