package gossip

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"os"
	"strings"
)

// LoadKeyFile reads gossip encryption keys: one base64 key (16, 24 or 32
// bytes) per line, blank lines and #-comments ignored. The first key is the
// primary one, used to encrypt; the others are only accepted, which is how
// keys are rotated without a partition. The file must not be readable by
// group or others: the key lets anyone join the cluster.
func LoadKeyFile(path string) ([][]byte, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("gossip key file: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return nil, fmt.Errorf("gossip key file %s has mode %#o: it must not be readable by group or others (chmod 600 %s)", path, perm, path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("gossip key file: %w", err)
	}
	return ParseKeys(data)
}

// ParseKeys parses the contents of a gossip key file.
func ParseKeys(data []byte) ([][]byte, error) {
	var keys [][]byte
	sc := bufio.NewScanner(bytes.NewReader(data))
	line := 0
	for sc.Scan() {
		line++
		s := strings.TrimSpace(sc.Text())
		if s == "" || strings.HasPrefix(s, "#") {
			continue
		}
		k, err := base64.StdEncoding.DecodeString(s)
		if err != nil {
			return nil, fmt.Errorf("gossip key on line %d: not base64: %w", line, err)
		}
		switch len(k) {
		case 16, 24, 32:
		default:
			return nil, fmt.Errorf("gossip key on line %d: %d bytes, want 16, 24 or 32", line, len(k))
		}
		keys = append(keys, k)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("gossip key file: %w", err)
	}
	if len(keys) == 0 {
		return nil, fmt.Errorf("gossip key file holds no key (make one with `vmroam keygen --gossip`)")
	}
	return keys, nil
}
