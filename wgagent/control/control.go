// Package control is the agent's local control API: JSON over HTTP on a Unix
// socket that only root may use. The CLI and the hypervisor hooks are its
// clients; they never touch the agent's state any other way.
package control

import (
	"net/netip"
	"time"
)

// DefaultSocket is where the agent listens and clients look by default.
const DefaultSocket = "/run/vmroam/vmroam.sock"

// SocketEnv names the environment variable clients read the socket from
// when no --socket flag is given.
const SocketEnv = "VMROAM_SOCKET"

// Status is the agent's answer to `vmroam status`.
type Status struct {
	Name      string     `json:"name"`
	Address   string     `json:"address"` // overlay address with the overlay prefix length
	PublicKey string     `json:"public_key"`
	Endpoint  string     `json:"endpoint"`
	Site      string     `json:"site,omitempty"`
	Interface string     `json:"interface"`
	Impl      string     `json:"wg_impl"`
	Started   time.Time  `json:"started"`
	Peers     []Peer     `json:"peers"`
	VIPs      []VIP      `json:"vips"`
	Conflicts []Conflict `json:"conflicts"`
	Gossip    Gossip     `json:"gossip"`
	// Problems are conditions the operator should know about (a VIP's
	// interface missing, a reconcile that failed), newest state only.
	Problems []string `json:"problems"`
}

// Peer is another agent and the tunnel to it.
type Peer struct {
	Name          string     `json:"name"`
	PublicKey     string     `json:"public_key"`
	Endpoint      string     `json:"endpoint"`
	Address       string     `json:"address"`
	Site          string     `json:"site,omitempty"`
	VIPs          []string   `json:"vips"`
	LastHandshake *time.Time `json:"last_handshake"` // nil: never
	RxBytes       int64      `json:"rx_bytes"`
	TxBytes       int64      `json:"tx_bytes"`
	// State is the member's gossip state: alive, suspect, dead or left.
	// Only alive and suspect members are WireGuard peers.
	State string `json:"state"`
}

// VIP is one location record as this agent sees it.
type VIP struct {
	VIP   string `json:"vip"`
	Owner string `json:"owner"` // "" when released
	Epoch uint64 `json:"epoch"`
	Local bool   `json:"local"`
	Dev   string `json:"dev,omitempty"` // the VM's interface, for local VIPs
	// State is local, remote or released.
	State string `json:"state"`
}

// Conflict is a VIP that two hosts claimed at the same epoch.
type Conflict struct {
	VIP    string   `json:"vip"`
	Epoch  uint64   `json:"epoch"`
	Owners []string `json:"owners"`
	Winner string   `json:"winner"`
}

// Gossip is the health of the gossip layer.
type Gossip struct {
	Members         int    `json:"members"`
	Encrypted       bool   `json:"encrypted"`
	DroppedMessages uint64 `json:"dropped_messages"`
	DroppedMeta     uint64 `json:"dropped_meta"`
}

// AttachRequest asks the agent to own a VIP behind a local interface.
type AttachRequest struct {
	VIP netip.Addr `json:"vip"`
	Dev string     `json:"dev"`
}

// errorBody is what the server sends with a non-2xx status.
type errorBody struct {
	Error string `json:"error"`
}
