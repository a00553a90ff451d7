package main

import (
	"bufio"
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
)

const keysUsage = `Usage: vmroam keys list [--json]
       vmroam keys add KEY      install KEY on every member (they accept it, do not use it yet)
       vmroam keys use KEY      every member encrypts with KEY (refused unless all have it)
       vmroam keys remove KEY   uninstall KEY everywhere (refused while a member uses it)

KEY is a base64 gossip key ('vmroam keygen --gossip'), or - to read it from
stdin (keeps it out of the shell history and the process list). Each member
writes its --encrypt-key-file before it changes its keys. Keys are shown by
fingerprint, never themselves. Rotation without a partition:

  OLD=$(grep -v '^#' /etc/vmroam/gossip.key | head -1)
  NEW=$(vmroam keygen --gossip)
  echo "$NEW" | vmroam keys add -      # 'keys list' shows it on N/N members
  echo "$NEW" | vmroam keys use -
  echo "$OLD" | vmroam keys remove -

See docs/security.md.
`

// keysInput is where "-" reads a key from; tests replace it.
var keysInput io.Reader = os.Stdin

func runKeys(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, keysUsage)
		return usagef("keys: want a subcommand: list, add, use or remove")
	}
	sub, args := args[0], args[1:]
	if sub == "help" || sub == "-h" || sub == "--help" || sub == "-help" {
		fmt.Fprint(stdout, keysUsage)
		return nil
	}
	op := map[string]string{"add": control.KeyOpInstall, "use": control.KeyOpUse, "remove": control.KeyOpRemove}[sub]
	if sub != "list" && op == "" {
		return usagef("keys: unknown subcommand %q (want list, add, use or remove)", sub)
	}
	synopsis := "keys " + sub + " KEY|- [--socket PATH]"
	switch sub {
	case "list":
		synopsis = "keys list [--json] [--socket PATH]"
	case "remove":
		synopsis = "keys remove KEY|- [--force] [--socket PATH]"
	}
	fs := newFlagSet("keys "+sub, synopsis, stdout, stderr)
	var socket string
	socketFlag(fs, &socket)
	asJSON := fs.Bool("json", false, "print JSON")
	force := false
	if sub == "remove" {
		fs.BoolVar(&force, "force", false, "remove the key even while members still encrypt with it or did not answer: they are cut off")
	}
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(ctx, clientTimeout)
	defer cancel()
	c := client(socket)
	if sub == "list" {
		if len(pos) > 0 {
			return usagef("keys list takes no arguments, got %q", pos)
		}
		k, err := c.Keys(ctx)
		if err != nil {
			return clientErr(err)
		}
		if *asJSON {
			return writeJSON(stdout, k)
		}
		printKeys(stdout, k)
		return nil
	}
	if len(pos) != 1 {
		return usagef("usage: vmroam %s", synopsis)
	}
	key, err := parseGossipKey(pos[0])
	if err != nil {
		return err
	}
	k, err := c.ChangeKeys(ctx, op, key, force)
	if err != nil {
		return clientErr(err)
	}
	if *asJSON {
		return writeJSON(stdout, k)
	}
	done := map[string]string{"add": "installed on", "use": "in use on", "remove": "removed from"}[sub]
	fmt.Fprintf(stdout, "key %s %s %d members\n\n", gossip.KeyFingerprint(key), done, len(k.Members))
	printKeys(stdout, k)
	return nil
}

// parseGossipKey decodes a key argument, "-" reading it from keysInput.
func parseGossipKey(arg string) ([]byte, error) {
	if arg == "-" {
		line, err := bufio.NewReader(io.LimitReader(keysInput, 4096)).ReadString('\n')
		if err != nil && line == "" {
			return nil, usagef("keys: no key on stdin: %v", err)
		}
		arg = line
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(arg))
	if err != nil {
		return nil, usagef("keys: the key is not base64 (make one with 'vmroam keygen --gossip')")
	}
	switch len(key) {
	case 16, 24, 32:
		return key, nil
	}
	return nil, usagef("keys: the key is %d bytes, want 16, 24 or 32", len(key))
}

func printKeys(w io.Writer, k control.Keys) {
	n := len(k.Members)
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tMEMBERS\tPRIMARY ON")
	for _, u := range k.Keys {
		fmt.Fprintf(tw, "%s\t%d/%d\t%d\n", u.Fingerprint, u.Members, n, u.Primary)
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "MEMBER\tKEYS (primary first)")
	for _, m := range k.Members {
		keys := strings.Join(m.Keys, " ")
		if m.Error != "" {
			keys = strings.TrimSpace(keys + " ERROR: " + m.Error)
		}
		fmt.Fprintf(tw, "%s\t%s\n", m.Member, orDash(keys))
	}
	tw.Flush()
}
