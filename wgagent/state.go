package wgagent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/gossip"
)

const (
	privateKeyFile = "private.key"
	stateFile      = "state.json"
)

// attachment is a VIP this host owns, behind a local interface.
type attachment struct {
	VIP   netip.Addr `json:"vip"`
	Dev   string     `json:"dev"`
	Epoch uint64     `json:"epoch"`
	// MAC is the VM's, as last seen in the neighbour table; a handover
	// carries it so the new host can deliver before it learns it.
	MAC net.HardwareAddr `json:"mac,omitempty"`
}

// persisted is what survives a restart, besides the private key.
type persisted struct {
	Attachments []attachment `json:"attachments"`
	// Peers are gossip addresses of members seen, tried on start in
	// addition to --join, so a restart finds the cluster even when the
	// configured join hosts are down.
	Peers []string `json:"peers"`
	// Awaiting are the VIPs attached "when announced" still waiting for
	// their VM (announced.go): a restart goes on waiting, because the
	// hook that asked will not run again.
	Awaiting []awaitingVIP `json:"awaiting,omitempty"`
}

// awaitingVIP is a persisted attach "when announced".
type awaitingVIP struct {
	VIP netip.Addr `json:"vip"`
	Dev string     `json:"dev"`
}

// loadOrCreateKey reads the WireGuard private key from the data dir, or
// makes one on first start. A key readable by others is refused rather
// than used: whoever holds it can impersonate this host.
func loadOrCreateKey(dir string) (wgtypes.Key, bool, error) {
	path := filepath.Join(dir, privateKeyFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return wgtypes.Key{}, false, fmt.Errorf("generate private key: %w", err)
		}
		if err := writeFileAtomic(path, []byte(k.String()+"\n"), 0o600); err != nil {
			return wgtypes.Key{}, false, fmt.Errorf("save private key: %w", err)
		}
		return k, true, nil
	}
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("read private key: %w", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return wgtypes.Key{}, false, err
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		return wgtypes.Key{}, false, fmt.Errorf("private key %s has mode %#o: it must not be readable by group or others (chmod 600 %s)", path, perm, path)
	}
	k, err := wgtypes.ParseKey(strings.TrimSpace(string(data)))
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("private key %s: %w", path, err)
	}
	return k, false, nil
}

func loadState(dir string) (persisted, error) {
	path := filepath.Join(dir, stateFile)
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return persisted{}, nil
	}
	if err != nil {
		return persisted{}, fmt.Errorf("read state: %w", err)
	}
	st, err := decodeState(data)
	if err != nil {
		return persisted{}, fmt.Errorf("state file %s is corrupt (move it away to start fresh): %w", path, err)
	}
	return st, nil
}

// decodeState parses a state file. A VIP that could not be attached (see
// gossip.ValidVIP) or one listed twice makes the whole file corrupt: a
// restart re-announces every attachment, so it must not guess. A rejected
// file gives nothing, not the part before the fault. Empty lists and MACs
// come back nil, as encodeState writes them.
func decodeState(data []byte) (persisted, error) {
	var st persisted
	if err := json.Unmarshal(data, &st); err != nil {
		return persisted{}, err
	}
	seen := map[netip.Addr]bool{}
	for i, at := range st.Attachments {
		if err := gossip.ValidVIP(at.VIP); err != nil {
			return persisted{}, fmt.Errorf("attachment %d: %w", i, err)
		}
		if seen[at.VIP] {
			return persisted{}, fmt.Errorf("VIP %s attached twice", at.VIP)
		}
		seen[at.VIP] = true
		if len(at.MAC) == 0 {
			st.Attachments[i].MAC = nil
		}
	}
	waits := map[netip.Addr]bool{}
	for i, w := range st.Awaiting {
		if err := gossip.ValidVIP(w.VIP); err != nil {
			return persisted{}, fmt.Errorf("awaited VIP %d: %w", i, err)
		}
		if waits[w.VIP] {
			return persisted{}, fmt.Errorf("VIP %s awaited twice", w.VIP)
		}
		waits[w.VIP] = true
	}
	if len(st.Attachments) == 0 {
		st.Attachments = nil
	}
	if len(st.Peers) == 0 {
		st.Peers = nil
	}
	if len(st.Awaiting) == 0 {
		st.Awaiting = nil
	}
	return st, nil
}

func saveState(dir string, st persisted) error {
	data, err := encodeState(st)
	if err != nil {
		return err
	}
	return writeFileAtomic(filepath.Join(dir, stateFile), data, 0o600)
}

// encodeState is the state file's text, its lists sorted (in place).
func encodeState(st persisted) ([]byte, error) {
	slices.SortFunc(st.Attachments, func(a, b attachment) int { return a.VIP.Compare(b.VIP) })
	slices.SortFunc(st.Awaiting, func(a, b awaitingVIP) int { return a.VIP.Compare(b.VIP) })
	slices.Sort(st.Peers)
	data, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// writeFileAtomic replaces path so that a crash leaves the old or the new
// content, never a torn file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
