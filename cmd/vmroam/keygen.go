package main

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func runKeygen(args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("keygen", "keygen --gossip | --wireguard", stdout, stderr)
	gossipKey := fs.Bool("gossip", false, "print a new base64 32-byte gossip encryption key (for --encrypt-key-file)")
	wgKey := fs.Bool("wireguard", false, "print a new WireGuard private key")
	pos, err := parse(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("keygen takes no arguments, got %q", pos)
	}
	switch {
	case *gossipKey == *wgKey:
		return usagef("keygen: give exactly one of --gossip or --wireguard")
	case *gossipKey:
		k := make([]byte, 32)
		if _, err := rand.Read(k); err != nil {
			return fmt.Errorf("read random bytes: %w", err)
		}
		fmt.Fprintln(stdout, base64.StdEncoding.EncodeToString(k))
	default:
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, k.String())
	}
	return nil
}
