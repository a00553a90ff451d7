// Package control is the agent's local control API: JSON over HTTP on a Unix
// socket that only root may use. The CLI and the hypervisor hooks are its
// clients; they never touch the agent's state any other way.
package control

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
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
	// CacheUnclaimed counts packets the cache device read for a VIP that
	// no migration here was taking: lost.
	CacheUnclaimed uint64 `json:"cache_unclaimed"`
	// Migrations are this host's side of recent migrations, oldest first,
	// then those under way.
	Migrations []Migration `json:"migrations"`
	// Networks are the virtual networks declared in the cluster.
	Networks []Network `json:"networks"`
	// Problems are conditions the operator should know about (a VIP's
	// interface missing, a reconcile that failed), newest state only.
	Problems []string `json:"problems"`
	// RefusedRecords are other hosts' location records this host does
	// not follow: their VIP cannot be one (a host's address, loopback,
	// link-local, outside --vip-prefixes). Each is a problem too.
	RefusedRecords []RefusedRecord `json:"refused_records"`
	// HandoverRefused counts connections to the handover port that did
	// not come from a WireGuard peer's overlay address (refused unread).
	HandoverRefused uint64 `json:"handover_refused"`
	// Config holds the settings a reload (SIGHUP) can change, as in
	// effect now; nil from agents that predate it.
	Config *Config `json:"config,omitempty"`
}

// RefusedRecord is a record of another host that this host refuses to
// follow: it changes no route and no WireGuard peer here.
type RefusedRecord struct {
	VIP    string `json:"vip"`
	Owner  string `json:"owner"`
	Epoch  uint64 `json:"epoch"`
	Reason string `json:"reason"` // what the VIP is instead: "the overlay address of host h2"
}

// Problem is r as a line of Status.Problems.
func (r RefusedRecord) Problem() string {
	return fmt.Sprintf("host %s claims %s (epoch %d), which cannot be a VIP: %s; refused, nothing routed", r.Owner, r.VIP, r.Epoch, r.Reason)
}

// Config is the effective value of every setting the agent applies on a
// reload, named after its config key. Durations are Go durations ("2s").
type Config struct {
	LogLevel            string   `json:"log_level"`
	Join                []string `json:"join"`
	Networks            []string `json:"networks"` // NAME=CIDR
	ReconcileInterval   string   `json:"reconcile_interval"`
	Keepalive           string   `json:"keepalive"`
	CacheMaxBytes       int64    `json:"cache_max_bytes"`
	CacheMaxPackets     int      `json:"cache_max_packets"`
	CacheMaxAge         string   `json:"cache_max_age"`
	CacheGlobalMaxBytes int64    `json:"cache_global_max_bytes"`
	CacheLinger         string   `json:"cache_linger"`
	CacheSettle         string   `json:"cache_settle"`
	Activation          string   `json:"activation"`
	AllocSettle         string   `json:"alloc_settle"`
	AllocQuarantine     string   `json:"alloc_quarantine"`
	// Reloaded is when a reload last changed a setting; nil: never.
	Reloaded *time.Time `json:"reloaded,omitempty"`
	// RestartNeeded lists the keys the last reload found changed but
	// cannot apply while the agent runs: they keep their old value.
	RestartNeeded []string `json:"restart_needed"`
}

// Peer is another agent and the tunnel to it.
type Peer struct {
	Name      string `json:"name"`
	PublicKey string `json:"public_key"`
	Endpoint  string `json:"endpoint"`
	Address   string `json:"address"`
	Site      string `json:"site,omitempty"`
	// Path is how this host reaches the peer's VIPs: "tunnel"
	// (WireGuard) or "lan" (same trusted site, unencrypted).
	Path          string     `json:"path"`
	VIPs          []string   `json:"vips"`
	LastHandshake *time.Time `json:"last_handshake"` // nil: never
	RxBytes       int64      `json:"rx_bytes"`
	TxBytes       int64      `json:"tx_bytes"`
	// SessionCheck is how the last check of a new WireGuard session
	// went: a connect to the peer's handover port through the tunnel,
	// which needs both directions. "passed"; "failing" (new handshakes
	// started, checks go on); "gave up" (after 4 failures); empty
	// before the first check ends.
	SessionCheck string `json:"session_check,omitempty"`
	// State is the member's gossip state: alive, suspect, dead or left.
	// Only alive and suspect members are WireGuard peers.
	State string `json:"state"`
	// Refused says why the peer allowlist keeps this member out: no
	// tunnel, its VIP claims ignored. Empty when it is not refused.
	Refused string `json:"refused,omitempty"`
}

// VIP is one location record as this agent sees it.
type VIP struct {
	VIP   string   `json:"vip"`
	Owner string   `json:"owner"` // "" when released
	Epoch uint64   `json:"epoch"`
	Local bool     `json:"local"`
	Dev   string   `json:"dev,omitempty"` // the VM's interface, for local VIPs
	State VIPState `json:"state"`
}

// VIPState is what a VIP is to this agent, as status shows it.
type VIPState string

const (
	VIPLocal    VIPState = "local"    // its VM runs here
	VIPReserved VIPState = "reserved" // allocated here; no VM uses it yet
	VIPRemote   VIPState = "remote"   // owned by another host
	VIPReleased VIPState = "released" // owned by nobody
	// VIPAwaiting: new host, attached WhenAnnounced, the VM not yet heard
	// from.
	VIPAwaiting VIPState = "awaiting"
	// During a migration: the old host caches (the VM is suspended), then
	// forwards stragglers after the flush; the new host holds packets
	// until it delivers them.
	VIPCaching    VIPState = "caching"
	VIPForwarding VIPState = "forwarding"
	VIPHolding    VIPState = "holding"
	// VIPRefused: another host's claim this host does not follow, since
	// the address cannot be a VIP (see RefusedRecord).
	VIPRefused VIPState = "refused"
)

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
	// Refused counts VIP claims and network changes ignored because the
	// peer allowlist refuses the member they came from.
	Refused uint64 `json:"refused"`
	// PeerAllowlist says whether --peer-allowlist is set.
	PeerAllowlist bool `json:"peer_allowlist"`
	// Records is how many location records the table holds, tombstones
	// included, and MaxRecords its cap (--max-vips).
	Records    int `json:"records"`
	MaxRecords int `json:"max_records"`
	// OverCap counts, by owner, the records and network versions the
	// table's caps refused (at most 64 owners named; the rest under
	// "(others)").
	OverCap map[string]uint64 `json:"over_cap,omitempty"`
}

// OverCapList formats OverCap, the most refused first: "h3 1200, h4 7".
func (g Gossip) OverCapList() string {
	owners := slices.Collect(maps.Keys(g.OverCap))
	slices.SortFunc(owners, func(a, b string) int {
		if c := cmp.Compare(g.OverCap[b], g.OverCap[a]); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	parts := make([]string, len(owners))
	for i, o := range owners {
		parts[i] = fmt.Sprintf("%s %d", o, g.OverCap[o])
	}
	return strings.Join(parts, ", ")
}

// AttachRequest asks the agent to own a VIP behind a local interface.
type AttachRequest struct {
	VIP netip.Addr `json:"vip"`
	Dev string     `json:"dev"`
	// When is WhenNow ("" too) or WhenAnnounced.
	When string `json:"when,omitempty"`
}

// When an attach takes effect (AttachRequest.When).
const (
	// WhenNow claims the VIP at once.
	WhenNow = "now"
	// WhenAnnounced waits, while another live host owns the VIP, until
	// the VM announces itself on its interface here (gratuitous ARP,
	// RARP, unsolicited neighbour advertisement), then claims. For a
	// hypervisor whose only hook on the destination comes before the
	// memory copy (libvirt's "started"): the VM still runs at the old
	// host for the whole copy, and its traffic must stay there.
	WhenAnnounced = "announced"
)

// errorBody is what the server sends with a non-2xx status.
type errorBody struct {
	Error string `json:"error"`
}

// Migration is one host's side of one VIP's move.
type Migration struct {
	// ID names the migration: VIP@EPOCH, where EPOCH is the VIP's epoch
	// at its old host when the move began, so that both hosts give one
	// migration the same ID. A second migration here from the same epoch
	// (a suspend aborted, then another) is VIP@EPOCH#2, and so on.
	ID    string `json:"id"`
	VIP   string `json:"vip"`
	From  string `json:"from"`
	To    string `json:"to,omitempty"`
	Epoch uint64 `json:"epoch"`
	// Role is source (this host is the old one) or destination.
	Role string `json:"role"`
	// State while under way (see VIP.State); empty once done.
	State VIPState `json:"state,omitempty"`

	Suspend       *time.Time `json:"suspend,omitempty"`
	Claim         *time.Time `json:"claim,omitempty"`
	FlushStart    *time.Time `json:"flush_start,omitempty"`
	FlushEnd      *time.Time `json:"flush_end,omitempty"`
	CarrierUp     *time.Time `json:"carrier_up,omitempty"` // the VM was seen running here (see Activation)
	FirstDelivery *time.Time `json:"first_delivery,omitempty"`
	Done          *time.Time `json:"done,omitempty"`
	// Activation is what showed the VM running at its new host: carrier
	// on its interface, or a frame it sent (garp, rarp, na).
	Activation string `json:"activation,omitempty"`

	Cached      uint64 `json:"cached"`
	CachedBytes uint64 `json:"cached_bytes"`
	Flushed     uint64 `json:"flushed"`
	// Ahead (of Flushed) came before the claim: copies of the cache sent
	// on the prepared connection while it filled (destination), or
	// skipped in the flush because the new host had them (source).
	Ahead     uint64 `json:"ahead,omitempty"`
	Held      uint64 `json:"held"`
	Forwarded uint64 `json:"forwarded"`
	Delivered uint64 `json:"delivered"`
	// Late counts packets from the old host that arrived after newer
	// packets of the same flow had been delivered (reordered).
	Late uint64 `json:"late"`
	// Lost counts packets the other side reported dropped.
	Lost uint64 `json:"lost"`
	// CacheLost (destination) says the old host's cache did not come
	// whole: its agent died, refused, or was cut off before the end of the
	// stream. How many packets it held is unknown here; they are lost.
	CacheLost bool              `json:"cache_lost,omitempty"`
	Dropped   map[string]uint64 `json:"dropped"` // by reason, on this host
	Aborted   bool              `json:"aborted,omitempty"`
	TimedOut  bool              `json:"timed_out,omitempty"`

	// Timeline is this host's packets of the migration per millisecond;
	// only the answer for one migration (Client.Migration) carries it,
	// and only for the last MaxTimelines migrations.
	Timeline *Timeline `json:"timeline,omitempty"`
}

// MaxTimelines is how many finished migrations' timelines an agent keeps.
const MaxTimelines = 16

// Timeline is one host's packets of one migration, counted per millisecond.
type Timeline struct {
	Start  time.Time        `json:"start"` // when bin 0 begins, by this host's clock
	Series []TimelineSeries `json:"series"`
}

// Names of timeline series.
const (
	SeriesCached    = "cached"    // source: reached the cache (about when the world sent it)
	SeriesFlushed   = "flushed"   // source: sent to the destination
	SeriesHeld      = "held"      // destination: reached it directly and was held
	SeriesReceived  = "received"  // destination: came from the source
	SeriesDelivered = "delivered" // written to the VM by the cache
)

// TimelineSeries is one count of a Timeline: packets per millisecond,
// from the first millisecond that saw one to the last.
type TimelineSeries struct {
	Name   string   `json:"name"`   // one of the Series... constants
	First  int      `json:"first"`  // the bin of Counts[0], in ms after Start
	Counts []uint32 `json:"counts"` // packets in each millisecond
	// Beyond counts packets after the timeline's window (60 s).
	Beyond uint64 `json:"beyond,omitempty"`
}

// Total is the number of packets the series counted.
func (s TimelineSeries) Total() uint64 {
	n := s.Beyond
	for _, c := range s.Counts {
		n += uint64(c)
	}
	return n
}

// VIPRequest names one VIP.
type VIPRequest struct {
	VIP netip.Addr `json:"vip"`
}

// Network is a virtual network: VMs with addresses in Prefix reach each
// other and no VIP of another network.
type Network struct {
	Name   string       `json:"name"`
	Prefix netip.Prefix `json:"prefix"`
	Epoch  uint64       `json:"epoch"`
	Origin string       `json:"origin"` // the host that declared this version
	// Active is false while the prefix overlaps a network whose name sorts
	// first (declared at once on two hosts, or across a partition): then
	// Overlaps names it and the network isolates nothing until one goes.
	Active   bool   `json:"active"`
	Overlaps string `json:"overlaps,omitempty"`
}

// NetworkRequest declares a virtual network.
type NetworkRequest struct {
	Name   string       `json:"name"`
	Prefix netip.Prefix `json:"prefix"`
}

// AllocateRequest asks for a free address in a virtual network, attached to
// Dev if given, else reserved on the agent's host.
type AllocateRequest struct {
	Network string `json:"network"`
	Dev     string `json:"dev,omitempty"`
}

// Keys are the cluster's gossip keys as each member reported them. Keys
// appear by fingerprint (a short hash), never themselves.
type Keys struct {
	// Keys has one entry per key some member holds, the most used first.
	Keys []KeyUse `json:"keys"`
	// Members has one entry per member asked, sorted by name.
	Members []MemberKeys `json:"members"`
}

// KeyUse is one key and how many members hold it.
type KeyUse struct {
	Fingerprint string `json:"fingerprint"`
	Members     int    `json:"members"` // members that hold it
	Primary     int    `json:"primary"` // members that encrypt with it
}

// MemberKeys is one member's keys.
type MemberKeys struct {
	Member string   `json:"member"`
	Keys   []string `json:"keys"` // fingerprints, the primary key first
	Error  string   `json:"error,omitempty"`
}

// KeyRequest asks for a change of the cluster's gossip keys.
type KeyRequest struct {
	Key []byte `json:"key"` // base64 in JSON
	// Force removes a key even while members still use it.
	Force bool `json:"force,omitempty"`
}

// Key operations, the last element of POST /v1/keys/{op}.
const (
	KeyOpInstall = "install"
	KeyOpUse     = "use"
	KeyOpRemove  = "remove"
)
