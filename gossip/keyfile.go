package gossip

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
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

// KeyFingerprint names a gossip key without giving it away: the first 8
// bytes of its SHA-256, in hex. Members report fingerprints, never keys.
func KeyFingerprint(key []byte) string {
	sum := sha256.Sum256(key)
	return hex.EncodeToString(sum[:8])
}

// WriteKeyFile replaces the keys in the key file at path with keys (the
// first is primary) and keeps everything else: comments and blank lines
// stay where they were, key lines take the new keys in order, further keys
// are appended. The file is replaced atomically (a temporary file in the
// same directory, synced, renamed over it) with the old file's mode and
// owner, so a crash leaves either the old file or the new one. A missing
// file is created with mode 0600.
func WriteKeyFile(path string, keys [][]byte) error {
	if len(keys) == 0 {
		return errors.New("gossip key file: refusing to write no key")
	}
	mode, uid, gid := os.FileMode(0o600), -1, -1
	old, err := os.ReadFile(path)
	switch {
	case err == nil:
		fi, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("gossip key file: %w", err)
		}
		mode = fi.Mode().Perm()
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			uid, gid = int(st.Uid), int(st.Gid)
		}
	case errors.Is(err, os.ErrNotExist):
	default:
		return fmt.Errorf("gossip key file: %w", err)
	}
	data := replaceKeyLines(old, keys)

	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	tmp, err := os.CreateTemp(dir, "."+base+".tmp*")
	if err != nil {
		return fmt.Errorf("gossip key file: %w", err)
	}
	done := false
	defer func() {
		if !done {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	// The mode first, before any key is in the file.
	if err := tmp.Chmod(mode); err != nil {
		return fmt.Errorf("gossip key file: %w", err)
	}
	if uid >= 0 && (uid != os.Getuid() || gid != os.Getgid()) {
		if err := tmp.Chown(uid, gid); err != nil {
			return fmt.Errorf("gossip key file: keep owner %d:%d: %w", uid, gid, err)
		}
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("gossip key file: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		return fmt.Errorf("gossip key file: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("gossip key file: %w", err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("gossip key file: %w", err)
	}
	done = true
	if d, err := os.Open(dir); err == nil {
		d.Sync() // the rename itself survives a crash
		d.Close()
	}
	return nil
}

// replaceKeyLines is WriteKeyFile's text edit.
func replaceKeyLines(old []byte, keys [][]byte) []byte {
	var out bytes.Buffer
	next := 0
	if len(old) > 0 {
		lines := strings.Split(strings.TrimSuffix(string(old), "\n"), "\n")
		for _, l := range lines {
			s := strings.TrimSpace(l)
			if s != "" && !strings.HasPrefix(s, "#") {
				if next >= len(keys) {
					continue
				}
				l = base64.StdEncoding.EncodeToString(keys[next])
				next++
			}
			out.WriteString(l)
			out.WriteByte('\n')
		}
	}
	for ; next < len(keys); next++ {
		out.WriteString(base64.StdEncoding.EncodeToString(keys[next]))
		out.WriteByte('\n')
	}
	return out.Bytes()
}
