package gossip

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// Events receives what changes in the cluster. Its methods are called from
// memberlist's goroutines (and from the callers of Claim, Release, Assert,
// DeclareNetwork and RemoveNetwork), possibly before New returns, and must
// not block: the agent only signals a reconcile loop from them.
type Events interface {
	MembersChanged() // a member joined, left, failed or changed metadata
	// RecordsChanged says the location table or the networks changed:
	// the agent reconciles both from the Table in one pass.
	RecordsChanged()
}

// Config configures a Cluster. Start from DefaultConfig.
type Config struct {
	// Name is this member's name, unique in the cluster. It is the Owner of
	// the records this member claims, so it is at most MaxOwnerLen bytes.
	// Required.
	Name string

	// BindAddr is the address gossip listens on, UDP and TCP. Required.
	BindAddr netip.Addr

	// BindPort is the gossip port, UDP and TCP; DefaultConfig sets 7946.
	// 0 picks a free port (for tests): LocalPort reports the one chosen.
	BindPort int

	// AdvertiseAddr is the address other members reach this one at, for a
	// host behind NAT or bound to a wildcard address. The zero value means
	// BindAddr, or for a wildcard BindAddr the address memberlist picks.
	AdvertiseAddr netip.Addr

	// Keys are the AES keys (16, 24 or 32 bytes) gossip is encrypted and
	// authenticated with; Keys[0] encrypts, all of them decrypt, which lets
	// keys rotate. Empty means no encryption: the caller warns about it.
	Keys [][]byte

	// Meta is this agent's metadata, as the other members see it.
	Meta Meta

	// Profile picks memberlist's timing; "" is ProfileLAN.
	Profile Profile

	// Logger receives this package's log and memberlist's, whose "[DEBUG]",
	// "[INFO]", "[WARN]" and "[ERR]" lines become slog levels. nil means
	// slog.Default().
	Logger *slog.Logger

	// Events is told about membership and table changes. May be nil.
	Events Events

	// KeyFile is the file Keys came from. Key operations (InstallKey,
	// UseKey, RemoveKey) rewrite it before they change the keyring, so a
	// restart uses the keys the cluster uses. Empty: changes are not
	// persisted.
	KeyFile string

	// Admit, if set, says whether the records a member owns, the network
	// versions it wrote and the key operations it asks for are taken when
	// they come from other members; m is the member as known now, nil if
	// it is not known. Records and networks refused are neither merged nor
	// passed on, and counted in Stats.Refused. It is called from
	// memberlist's goroutines with this package's locks held: it must not
	// block nor call back into the Cluster. nil admits everyone.
	Admit func(name string, m *Member) bool

	// MaxRecords bounds the location records the table holds, tombstones
	// included; <= 0: DefaultMaxRecords (200,000, see Limits.Records).
	// A record for a new VIP beyond it is refused, remote or local.
	MaxRecords int

	// MaxRecordsPerOwner bounds the live records one member owns;
	// <= 0: DefaultMaxRecordsPerOwner (20,000, see
	// Limits.RecordsPerOwner).
	MaxRecordsPerOwner int

	// MaxNetworks bounds the network versions the table holds,
	// removals included; <= 0: DefaultMaxNetworks (1024, see
	// Limits.Networks).
	MaxNetworks int

	// MaxNetworksPerOrigin bounds the network versions one member
	// wrote; <= 0: DefaultMaxNetworksPerOrigin (256, see
	// Limits.NetworksPerOrigin).
	//
	// Beyond any of the four caps a remote record or network version is
	// refused, never merged nor passed on, and counted in Table.OverCap
	// by its owner (Stats.OverCap in all); nothing held is evicted for
	// it. A local Claim or DeclareNetwork beyond them fails with an error
	// wrapping ErrOverCap. Members that learnt an over-cap owner's
	// records in different orders may disagree about which of them they
	// hold; members under their caps are not affected.
	MaxNetworksPerOrigin int
}

// DefaultConfig returns the defaults: BindPort 7946, Profile "lan".
func DefaultConfig() Config {
	return Config{BindPort: 7946, Profile: ProfileLAN}
}

// Profile is a set of memberlist timings.
type Profile string

const (
	ProfileLAN   Profile = "lan"   // memberlist.DefaultLANConfig
	ProfileWAN   Profile = "wan"   // memberlist.DefaultWANConfig
	ProfileLocal Profile = "local" // memberlist.DefaultLocalConfig, for tests on loopback
)

// Valid says whether p names a profile ("" does not).
func (p Profile) Valid() bool { return p == ProfileLAN || p == ProfileWAN || p == ProfileLocal }

// MemberState is a member's state as this member sees it.
//
// memberlist tells its delegates about joins, updates and deaths but not
// about suspicion, so a member memberlist suspects stays MemberAlive here
// until it is declared dead; MemberSuspect is reserved for that case.
type MemberState string

// Member states.
const (
	MemberAlive   MemberState = "alive"
	MemberSuspect MemberState = "suspect"
	MemberDead    MemberState = "dead"
	MemberLeft    MemberState = "left"
)

// Member is one member of the cluster.
type Member struct {
	Name    string
	Addr    netip.AddrPort // gossip address
	Meta    Meta           // zero Meta + MetaErr set if it did not decode
	MetaErr error
	State   MemberState
	Local   bool
}

// Stats are counters for the agent's status output.
type Stats struct {
	Members         int    // alive members, self included
	DroppedMessages uint64 // malformed user messages / remote states dropped
	DroppedMeta     uint64 // members whose metadata did not decode (they are ignored as peers)
	Refused         uint64 // records and networks Config.Admit refused
	OverCap         uint64 // records and networks the table's caps refused (by owner: Table.OverCap)
	Broadcasts      uint64 // records and networks queued for broadcast
}

const (
	// updateTimeout bounds how long UpdateMeta waits for the new metadata
	// to go out; it is in effect locally at once either way.
	updateTimeout = 5 * time.Second
	// leaveWait bounds the wait for the leave intent when Leave has no
	// timeout of its own.
	leaveWait = 5 * time.Second

	joinBackoffMin = time.Second
	joinBackoffMax = 10 * time.Second
)

// ErrClosed is returned by operations on a cluster that was shut down.
var ErrClosed = errors.New("cluster is shut down")

// Cluster is this agent's membership in the gossip cluster and its copy of
// the location table.
type Cluster struct {
	name   string
	log    *slog.Logger
	events Events
	mc     *memberlist.Config
	ml     *memberlist.Memberlist
	table  *Table
	queue  *memberlist.TransmitLimitedQueue

	// mergeMu makes merging a record or network and queueing its
	// broadcast one step, so that the queue sees a VIP's records (a
	// network's versions) in table order and a newer one is never
	// replaced there by an older one.
	mergeMu sync.Mutex

	metaMu sync.Mutex
	meta   []byte

	memMu     sync.Mutex
	members   map[string]*memberEntry
	leaveSeen map[string]uint64 // leave intents already relayed: name -> nonce
	alive     atomic.Int64

	// life guards the memberlist lifecycle: memberlist panics on Leave
	// after Shutdown.
	life   sync.RWMutex
	closed bool
	done   chan struct{}
	wg     sync.WaitGroup

	droppedMsgs atomic.Uint64
	droppedMeta atomic.Uint64
	broadcasts  atomic.Uint64

	admit        func(string, *Member) bool
	refused      atomic.Uint64
	refusedNames sync.Map // owners whose refusal was logged

	overCap      atomic.Uint64
	overCapMu    sync.Mutex
	overCapNames map[string]bool // owners whose over-cap refusal was logged, at most 64

	keyFile    string
	keyApplyMu sync.Mutex // one key change at a time on this member
	keyMu      sync.Mutex
	keyWait    map[uint64]chan KeyReport // key rounds waiting for answers, by id

	// aloneAfter and aloneCheck drive KeepJoined; tests shorten them.
	aloneAfter time.Duration
	aloneCheck time.Duration
}

type memberEntry struct {
	name    string
	addr    netip.AddrPort
	raw     []byte // metadata as received, to decode only when it changes
	decoded bool
	meta    Meta
	metaErr error
	state   MemberState
	since   time.Time
	leaving bool // a leave intent arrived: its death is a leave
}

// New creates the memberlist and starts listening. It does not join anyone:
// see Join and KeepJoined.
func New(cfg Config) (*Cluster, error) {
	switch {
	case cfg.Name == "":
		return nil, errors.New("gossip: config: Name is required")
	case len(cfg.Name) > MaxOwnerLen:
		return nil, fmt.Errorf("gossip: config: Name is %d bytes, limit is %d", len(cfg.Name), MaxOwnerLen)
	case !cfg.BindAddr.IsValid():
		return nil, errors.New("gossip: config: BindAddr is required")
	case cfg.BindPort < 0 || cfg.BindPort > 65535:
		return nil, fmt.Errorf("gossip: config: BindPort %d out of range", cfg.BindPort)
	}
	meta, err := cfg.Meta.MarshalBinary()
	if err != nil {
		return nil, fmt.Errorf("gossip: config: %w", err)
	}

	var mc *memberlist.Config
	switch cfg.Profile {
	case "", ProfileLAN:
		mc = memberlist.DefaultLANConfig()
	case ProfileWAN:
		mc = memberlist.DefaultWANConfig()
	case ProfileLocal:
		mc = memberlist.DefaultLocalConfig()
	default:
		return nil, fmt.Errorf("gossip: config: unknown Profile %q (want lan, wan or local)", cfg.Profile)
	}

	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}

	c := &Cluster{
		name:   cfg.Name,
		log:    logger.With("component", "gossip"),
		events: cfg.Events,
		mc:     mc,
		table: NewTableLimits(Limits{Records: cfg.MaxRecords, RecordsPerOwner: cfg.MaxRecordsPerOwner,
			Networks: cfg.MaxNetworks, NetworksPerOrigin: cfg.MaxNetworksPerOrigin}),
		meta:       meta,
		members:    make(map[string]*memberEntry),
		leaveSeen:  make(map[string]uint64),
		done:       make(chan struct{}),
		aloneAfter: 5 * time.Second,
		aloneCheck: time.Second,
		admit:      cfg.Admit,
		keyFile:    cfg.KeyFile,
		keyWait:    make(map[uint64]chan KeyReport),
	}
	c.alive.Store(1)
	c.queue = &memberlist.TransmitLimitedQueue{
		// The count is kept from memberlist's events rather than asked
		// of NumMembers, which takes memberlist's node lock from inside
		// its gossip path.
		NumNodes:       func() int { return int(max(1, c.alive.Load())) },
		RetransmitMult: mc.RetransmitMult,
	}

	mc.Name = cfg.Name
	bind := cfg.BindAddr.Unmap()
	mc.BindAddr = bind.String()
	mc.BindPort = cfg.BindPort
	mc.AdvertisePort = cfg.BindPort
	switch {
	case cfg.AdvertiseAddr.IsValid():
		mc.AdvertiseAddr = cfg.AdvertiseAddr.Unmap().String()
	case !bind.IsUnspecified():
		mc.AdvertiseAddr = bind.String()
	default:
		mc.AdvertiseAddr = ""
	}
	if len(cfg.Keys) > 0 {
		for i, k := range cfg.Keys {
			if err := memberlist.ValidateKey(k); err != nil {
				return nil, fmt.Errorf("gossip: config: key %d: %w", i, err)
			}
		}
		kr, err := memberlist.NewKeyring(cfg.Keys, cfg.Keys[0])
		if err != nil {
			return nil, fmt.Errorf("gossip: config: keyring: %w", err)
		}
		mc.Keyring = kr
	}
	mc.GossipVerifyIncoming = len(cfg.Keys) > 0
	mc.GossipVerifyOutgoing = len(cfg.Keys) > 0
	mc.Delegate = delegate{c}
	mc.Events = eventDelegate{c}
	mc.Logger = log.New(mlLogWriter{logger.With("component", "memberlist")}, "", 0)

	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("gossip: start memberlist on %s: %w",
			netip.AddrPortFrom(bind, uint16(cfg.BindPort)), err)
	}
	c.ml = ml
	c.log.Info("gossip listening", "name", c.name, "addr", netip.AddrPortFrom(bind, uint16(mc.BindPort)),
		"profile", orDefault(cfg.Profile, ProfileLAN), "encrypted", len(cfg.Keys) > 0)
	return c, nil
}

func orDefault[T ~string](s, def T) T {
	if s == "" {
		return def
	}
	return s
}

// Name returns this member's name.
func (c *Cluster) Name() string { return c.name }

// LocalPort returns the gossip port this member listens on; with BindPort 0
// it is the port that was picked.
func (c *Cluster) LocalPort() int { return c.mc.BindPort }

// Table returns the location table and the networks. Change it through
// Claim, Release, Assert, DeclareNetwork and RemoveNetwork, which also
// broadcast; merging into it directly spreads nothing.
func (c *Cluster) Table() *Table { return c.table }

// Join blocks until one of addrs ("host" or "host:port") answered and this
// member synchronized state with it, or until ctx is done or the cluster is
// shut down. Failed attempts are logged and retried with a backoff from 1 s
// to 10 s. An attempt in flight is not interrupted by ctx: it ends within
// memberlist's TCP timeout. Empty addrs returns at once.
func (c *Cluster) Join(ctx context.Context, addrs []string) {
	if len(addrs) == 0 {
		return
	}
	backoff := joinBackoffMin
	for attempt := 1; ; attempt++ {
		if ctx.Err() != nil || c.isClosed() {
			return
		}
		n, err := c.ml.Join(addrs)
		if n > 0 {
			c.log.Info("joined cluster", "contacted", n, "members", c.ml.NumMembers())
			return
		}
		c.log.Warn("join failed", "attempt", attempt, "seeds", addrs, "retry_in", backoff, "err", err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
		case <-c.done:
		case <-t.C:
		}
		t.Stop()
		backoff = min(2*backoff, joinBackoffMax)
	}
}

// KeepJoined starts a goroutine and returns at once. Until ctx is done or
// the cluster is shut down, whenever this member has been alone for more
// than 5 s it tries addrs again: that heals the cluster after every peer
// restarted and forgot it. Empty addrs starts nothing.
func (c *Cluster) KeepJoined(ctx context.Context, addrs []string) {
	if len(addrs) == 0 {
		return
	}
	addrs = slices.Clone(addrs)
	c.life.RLock()
	defer c.life.RUnlock()
	if c.closed {
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.keepJoined(ctx, addrs)
	}()
}

func (c *Cluster) keepJoined(ctx context.Context, addrs []string) {
	t := time.NewTicker(c.aloneCheck)
	defer t.Stop()
	var aloneSince time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.done:
			return
		case now := <-t.C:
			if c.ml.NumMembers() > 1 {
				aloneSince = time.Time{}
				continue
			}
			if aloneSince.IsZero() {
				aloneSince = now
				continue
			}
			if now.Sub(aloneSince) <= c.aloneAfter {
				continue
			}
			aloneSince = now // next try one more aloneAfter later
			n, err := c.ml.Join(addrs)
			if n > 0 {
				c.log.Info("rejoined cluster after being alone", "contacted", n)
			} else {
				c.log.Warn("rejoin failed", "seeds", addrs, "err", err)
			}
		}
	}
}

// Members returns every member memberlist knows, alive or not, self
// included, sorted by name. Dead and left members are forgotten when
// memberlist forgets them.
func (c *Cluster) Members() []Member {
	now := time.Now()
	c.memMu.Lock()
	c.reapLocked(now)
	ms := make([]Member, 0, len(c.members))
	for _, e := range c.members {
		ms = append(ms, Member{
			Name:    e.name,
			Addr:    e.addr,
			Meta:    e.meta,
			MetaErr: e.metaErr,
			State:   e.state,
			Local:   e.name == c.name,
		})
	}
	c.memMu.Unlock()
	slices.SortFunc(ms, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return ms
}

// reapLocked forgets members that memberlist has forgotten too: it drops
// dead and left nodes after GossipToTheDeadTime.
func (c *Cluster) reapLocked(now time.Time) {
	for name, e := range c.members {
		if (e.state == MemberDead || e.state == MemberLeft) && now.Sub(e.since) > c.mc.GossipToTheDeadTime {
			delete(c.members, name)
			delete(c.leaveSeen, name)
		}
	}
}

// UpdateMeta replaces this member's metadata and broadcasts it. It is in
// effect locally (and in push/pull) at once, even if the error reports that
// the broadcast did not go out within a few seconds.
func (c *Cluster) UpdateMeta(m Meta) error {
	b, err := m.MarshalBinary()
	if err != nil {
		return fmt.Errorf("gossip: update meta: %w", err)
	}
	c.life.RLock()
	defer c.life.RUnlock()
	if c.closed {
		return fmt.Errorf("gossip: update meta: %w", ErrClosed)
	}
	c.metaMu.Lock()
	c.meta = b
	c.metaMu.Unlock()
	if err := c.ml.UpdateNode(updateTimeout); err != nil {
		return fmt.Errorf("gossip: update meta: %w", err)
	}
	return nil
}

// Claim records vip as owned by this member at an epoch one above any seen
// for it, merges it locally and broadcasts it; it returns the record. An
// invalid VIP (see ValidVIP) or a claim over the table's caps claims
// nothing, logs why and returns the zero Record: see TryClaim for the
// error.
func (c *Cluster) Claim(vip netip.Addr) Record {
	r, err := c.TryClaim(vip)
	if err != nil {
		c.log.Error("claim refused", "vip", vip.Unmap(), "err", err)
	}
	return r
}

// TryClaim is Claim that returns why a claim was refused: an invalid VIP,
// or a table at one of its caps (the error wraps ErrOverCap: this member
// owns MaxRecordsPerOwner VIPs, or the table holds MaxRecords records).
// At the highest epoch it returns the current record, unchanged, and no
// error, as Claim does.
func (c *Cluster) TryClaim(vip netip.Addr) (Record, error) {
	vip = vip.Unmap()
	if err := ValidVIP(vip); err != nil {
		return Record{}, fmt.Errorf("gossip: claim: %w", err)
	}
	c.mergeMu.Lock()
	r, changed, err := c.table.claim(vip, c.name)
	if changed {
		c.enqueueLocked(r)
	}
	c.mergeMu.Unlock()
	if err != nil {
		return Record{}, fmt.Errorf("gossip: claim: %w", err)
	}
	if !changed {
		c.log.Error("claim refused: epoch exhausted", "vip", vip, "record", r)
		return r, nil
	}
	c.log.Info("claimed VIP", "vip", vip, "epoch", r.Epoch)
	c.notifyRecords()
	return r, nil
}

// Tell sends r straight to the member called name, best effort, besides
// the broadcast that carries it to everyone: a claim reaches the VIP's old
// owner within one one-way delay instead of at the next gossip round. The
// old owner hands its cache over only to the owner its table names
// (DESIGN.md, "Migration"), so the claim must be there by the time the
// claimer's request is. The receiver merges r as any gossiped record.
func (c *Cluster) Tell(name string, r Record) error {
	if err := r.validate(); err != nil {
		return fmt.Errorf("gossip: tell %s: %w", name, err)
	}
	for _, n := range c.ml.Members() {
		if n.Name == name {
			if err := c.ml.SendBestEffort(n, EncodeRecords([]Record{r})); err != nil {
				return fmt.Errorf("gossip: tell %s: %w", name, err)
			}
			return nil
		}
	}
	return fmt.Errorf("gossip: tell %s: no such member", name)
}

// Release writes a tombstone (Owner "") at the next epoch if this member is
// the current owner of vip, broadcasts it and returns it and true; it
// returns false if this member did not own vip.
func (c *Cluster) Release(vip netip.Addr) (Record, bool) {
	vip = vip.Unmap()
	c.mergeMu.Lock()
	r, ok := c.table.release(vip, c.name)
	if ok {
		c.enqueueLocked(r)
	}
	c.mergeMu.Unlock()
	if !ok {
		return Record{}, false
	}
	c.log.Info("released VIP", "vip", vip, "epoch", r.Epoch)
	c.notifyRecords()
	return r, true
}

// Assert merges a record as given and broadcasts it if it is then the
// current record for its VIP: on restart the agent re-announces its
// persisted claims at their persisted epoch this way. It reports whether
// the table changed.
func (c *Cluster) Assert(r Record) bool {
	r.VIP = r.VIP.Unmap()
	if err := r.validate(); err != nil {
		c.log.Warn("assert refused", "record", r, "err", err)
		return false
	}
	c.mergeMu.Lock()
	changed, conflict, err := c.table.merge(r)
	if err != nil {
		c.log.Error("assert refused", "record", r, "err", err)
	}
	cur, _ := c.table.Get(r.VIP)
	if cur == r {
		c.enqueueLocked(r)
	}
	if conflict {
		c.logConflict(r.VIP)
	}
	c.mergeMu.Unlock()
	if changed {
		c.notifyRecords()
	}
	return changed
}

// mergeRemote merges records and networks that came from another member.
// With rebroadcast, each one that changed the table is queued again,
// because memberlist does not relay user broadcasts.
func (c *Cluster) mergeRemote(rs []Record, ns []Network, rebroadcast bool) {
	changedAny := false
	var changedNets []string
	admitted := c.admitter()
	c.mergeMu.Lock()
	for _, r := range rs {
		if r.Owner != "" && !admitted(r.Owner) {
			continue
		}
		changed, conflict, err := c.table.merge(r)
		if err != nil {
			c.noteOverCap(r.Owner, err)
		}
		if conflict {
			c.logConflict(r.VIP)
		}
		if !changed {
			continue
		}
		changedAny = true
		c.log.Debug("record learned", "vip", r.VIP, "owner", r.Owner, "epoch", r.Epoch)
		if rebroadcast {
			c.enqueueLocked(r)
		}
	}
	for _, n := range ns {
		if !admitted(n.Origin) {
			continue
		}
		changed, err := c.table.mergeNetwork(n)
		if err != nil {
			c.noteOverCap(n.Origin, err)
		}
		if !changed {
			continue
		}
		changedAny = true
		changedNets = append(changedNets, n.Name)
		c.log.Debug("network learned", "network", n.Name, "prefix", n.Prefix,
			"removed", n.Removed(), "epoch", n.Epoch, "origin", n.Origin)
		if rebroadcast {
			c.enqueueNetworkLocked(n)
		}
	}
	c.mergeMu.Unlock()
	if len(changedNets) > 0 {
		c.logOverlaps(changedNets)
	}
	if changedAny {
		c.notifyRecords()
	}
}

// admitter returns Config.Admit for one batch of records, asking it once
// per name, counting refusals and logging the first for each name.
func (c *Cluster) admitter() func(string) bool {
	if c.admit == nil {
		return func(string) bool { return true }
	}
	seen := map[string]bool{}
	return func(name string) bool {
		ok, asked := seen[name]
		if !asked {
			m, known := c.member(name)
			var mp *Member
			if known {
				mp = &m
			}
			ok = c.admit(name, mp)
			seen[name] = ok
		}
		if !ok {
			c.refused.Add(1)
			if _, logged := c.refusedNames.LoadOrStore(name, true); !logged {
				c.log.Warn("ignoring VIP claims and network changes of a member this host does not admit (--peer-allowlist)", "member", name)
			}
		}
		return ok
	}
}

// noteOverCap counts a remote record or network version the table's caps
// refused, and logs the first for each owner (the table names at most 64).
func (c *Cluster) noteOverCap(owner string, err error) {
	c.overCap.Add(1)
	c.overCapMu.Lock()
	first := !c.overCapNames[owner] && len(c.overCapNames) < maxOverCapOwners
	if first {
		if c.overCapNames == nil {
			c.overCapNames = make(map[string]bool)
		}
		c.overCapNames[owner] = true
	}
	c.overCapMu.Unlock()
	if first {
		c.log.Warn("refusing records and networks beyond the table's caps (--max-vips); nothing held is evicted for them", "owner", owner, "err", err)
	}
}

// member returns what is known of the member called name.
func (c *Cluster) member(name string) (Member, bool) {
	c.memMu.Lock()
	defer c.memMu.Unlock()
	e := c.members[name]
	if e == nil {
		return Member{}, false
	}
	return Member{Name: e.name, Addr: e.addr, Meta: e.meta, MetaErr: e.metaErr, State: e.state, Local: e.name == c.name}, true
}

// logOverlaps warns about the overlaps that involve the named networks,
// which just changed: an operator has to remove one network of each pair.
func (c *Cluster) logOverlaps(names []string) {
	for _, o := range c.table.NetworkOverlaps() {
		if slices.Contains(names, o.Winner.Name) || slices.Contains(names, o.Loser.Name) {
			c.log.Warn("virtual networks overlap; the loser is inactive until one of them is removed",
				"winner", o.Winner.Name, "winner_prefix", o.Winner.Prefix,
				"loser", o.Loser.Name, "loser_prefix", o.Loser.Prefix)
		}
	}
}

// DeclareNetwork writes name -> prefix at an epoch one above any seen for
// name (removed or not), merges it and broadcasts it. It refuses, with an
// error that names the clash, an invalid name or prefix (see
// ValidNetworkName, ValidNetworkPrefix) and a prefix that overlaps another
// live network as far as this member knows. Declaring the same name with
// the same prefix again is a no-op that returns the current version, so an
// agent can re-apply its configuration on every start. Changing a live
// network's prefix is refused: VMs already use addresses in it, so it must
// be removed first.
func (c *Cluster) DeclareNetwork(name string, prefix netip.Prefix) (Network, error) {
	c.mergeMu.Lock()
	n, changed, err := c.table.declareNetwork(name, prefix, c.name)
	if changed {
		c.enqueueNetworkLocked(n)
	}
	c.mergeMu.Unlock()
	if err != nil {
		return Network{}, fmt.Errorf("gossip: declare network: %w", err)
	}
	if changed {
		c.log.Info("declared network", "network", n.Name, "prefix", n.Prefix, "epoch", n.Epoch)
		c.notifyRecords()
	}
	return n, nil
}

// RemoveNetwork writes a tombstone for name at the next epoch, merges it
// and broadcasts it; ok is false if name is not live. Any member may remove
// any network: declarations belong to the cluster, not to their origin.
func (c *Cluster) RemoveNetwork(name string) (Network, bool) {
	c.mergeMu.Lock()
	n, ok := c.table.removeNetwork(name, c.name)
	if ok {
		c.enqueueNetworkLocked(n)
	}
	c.mergeMu.Unlock()
	if !ok {
		return Network{}, false
	}
	c.log.Info("removed network", "network", name, "epoch", n.Epoch)
	c.notifyRecords()
	return n, true
}

func (c *Cluster) logConflict(vip netip.Addr) {
	if cf, ok := c.table.conflict(vip); ok {
		c.log.Error("VIP claimed twice at one epoch", "vip", vip, "epoch", cf.Epoch, "owners", cf.Owners)
	}
}

// enqueueLocked queues r for broadcast; mergeMu is held.
func (c *Cluster) enqueueLocked(r Record) {
	c.queue.QueueBroadcast(recordBroadcast(r))
	c.broadcasts.Add(1)
}

// enqueueNetworkLocked queues n for broadcast; mergeMu is held.
func (c *Cluster) enqueueNetworkLocked(n Network) {
	c.queue.QueueBroadcast(networkBroadcast(n))
	c.broadcasts.Add(1)
}

func (c *Cluster) notifyRecords() {
	if c.events != nil {
		c.events.RecordsChanged()
	}
}

func (c *Cluster) notifyMembers() {
	if c.events != nil {
		c.events.MembersChanged()
	}
}

// Stats returns the counters.
func (c *Cluster) Stats() Stats {
	return Stats{
		Members:         c.ml.NumMembers(),
		DroppedMessages: c.droppedMsgs.Load(),
		DroppedMeta:     c.droppedMeta.Load(),
		Refused:         c.refused.Load(),
		OverCap:         c.overCap.Load(),
		Broadcasts:      c.broadcasts.Load(),
	}
}

// Leave tells the cluster this member is leaving, so that the others list
// it as left rather than dead, waits up to timeout for that to go out, then
// shuts down. timeout <= 0 waits as long as memberlist needs.
func (c *Cluster) Leave(timeout time.Duration) error {
	c.life.Lock()
	if c.closed {
		c.life.Unlock()
		return nil
	}
	deadline := time.Now().Add(timeout)
	wait := leaveWait
	if timeout > 0 {
		wait = timeout / 2
	}
	c.announceLeave(wait)
	remaining := time.Duration(0)
	if timeout > 0 {
		remaining = max(time.Until(deadline), time.Millisecond)
	}
	err := c.ml.Leave(remaining)
	c.life.Unlock()
	if err != nil {
		err = fmt.Errorf("gossip: leave: %w", err)
	}
	return errors.Join(err, c.Shutdown())
}

// announceLeave broadcasts a leave intent, as Serf does: memberlist reports a
// leave and a failure the same way to its delegates, and the intent is how
// the others tell them apart.
func (c *Cluster) announceLeave(wait time.Duration) {
	c.memMu.Lock()
	if e := c.members[c.name]; e != nil {
		e.leaving = true
	}
	c.memMu.Unlock()
	if c.ml.NumMembers() <= 1 {
		return
	}
	msg := encodeLeave(c.name, rand.Uint64())
	// A broadcast reaches only a few members before relays take over, and
	// some of those may be dead already; a leave is rare, so tell every
	// member directly as well.
	for _, n := range c.ml.Members() {
		if n.Name == c.name {
			continue
		}
		if err := c.ml.SendBestEffort(n, msg); err != nil {
			c.log.Debug("leave intent not sent", "member", n.Name, "err", err)
		}
	}
	done := make(chan struct{})
	c.queue.QueueBroadcast(leaveBroadcast(c.name, msg, done))
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		c.log.Debug("leave intent not fully sent before timeout")
	}
}

// Shutdown stops gossip without telling anyone (they will see this member
// fail; see Leave) and waits for this package's goroutines. It is
// idempotent.
func (c *Cluster) Shutdown() error {
	c.life.Lock()
	if c.closed {
		c.life.Unlock()
		c.wg.Wait()
		return nil
	}
	c.closed = true
	close(c.done)
	err := c.ml.Shutdown()
	c.life.Unlock()
	c.wg.Wait()
	if err != nil {
		return fmt.Errorf("gossip: shutdown: %w", err)
	}
	c.log.Info("gossip stopped")
	return nil
}

func (c *Cluster) isClosed() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// handleMsg handles one user message from another member.
func (c *Cluster) handleMsg(b []byte) {
	if len(b) == 0 {
		c.drop("empty message", nil)
		return
	}
	switch b[0] {
	case msgRecords:
		rs, err := DecodeRecords(b)
		if err != nil {
			c.drop("malformed records message", err)
			return
		}
		c.mergeRemote(rs, nil, true)
	case msgNetworks:
		ns, err := DecodeNetworks(b)
		if err != nil {
			c.drop("malformed networks message", err)
			return
		}
		c.mergeRemote(nil, ns, true)
	case msgKeyOp:
		id, op, from, key, err := decodeKeyOp(b)
		if err != nil {
			c.drop("malformed key operation", err)
			return
		}
		c.spawn(func() { c.handleKeyOp(id, op, from, key) })
	case msgKeyReply:
		id, rep, err := decodeKeyReply(b)
		if err != nil {
			c.drop("malformed key reply", err)
			return
		}
		c.handleKeyReply(id, rep)
	case msgLeave:
		name, nonce, err := decodeLeave(b)
		if err != nil {
			c.drop("malformed leave message", err)
			return
		}
		c.handleLeave(name, nonce, b)
	default:
		c.drop("unknown message type", fmt.Errorf("type %#x", b[0]))
	}
}

func (c *Cluster) drop(what string, err error) {
	c.droppedMsgs.Add(1)
	c.log.Warn("dropped gossip message", "reason", what, "err", err)
}

func (c *Cluster) handleLeave(name string, nonce uint64, msg []byte) {
	if name == c.name {
		return // we know whether we are leaving
	}
	c.memMu.Lock()
	e := c.members[name]
	if seen, ok := c.leaveSeen[name]; e == nil || ok && seen == nonce {
		c.memMu.Unlock()
		return
	}
	c.leaveSeen[name] = nonce
	e.leaving = true
	changed := false
	if e.state == MemberDead { // the intent came after the death
		e.state = MemberLeft
		changed = true
	}
	c.memMu.Unlock()
	c.queue.QueueBroadcast(leaveBroadcast(name, bytes.Clone(msg), nil))
	if changed {
		c.notifyMembers()
	}
}

// memberEvent records what memberlist said about n. It runs under
// memberlist's node lock, so it must not call into memberlist.
func (c *Cluster) memberEvent(n *memberlist.Node, st MemberState, join bool) {
	now := time.Now()
	var metaErr error
	c.memMu.Lock()
	e := c.members[n.Name]
	if e == nil {
		e = &memberEntry{name: n.Name}
		c.members[n.Name] = e
	}
	if a, ok := netip.AddrFromSlice(n.Addr); ok {
		e.addr = netip.AddrPortFrom(a.Unmap(), n.Port)
	}
	if !e.decoded || !bytes.Equal(e.raw, n.Meta) {
		e.raw, e.decoded = bytes.Clone(n.Meta), true
		var m Meta
		if err := m.UnmarshalBinary(n.Meta); err != nil {
			e.meta, e.metaErr, metaErr = Meta{}, err, err
		} else {
			e.meta, e.metaErr = m, nil
		}
	}
	if join {
		e.leaving = false
	}
	if st == MemberDead && e.leaving {
		st = MemberLeft
	}
	if e.state != st {
		e.state, e.since = st, now
	}
	c.reapLocked(now)
	alive := 0
	for _, m := range c.members {
		if m.state == MemberAlive {
			alive++
		}
	}
	c.alive.Store(int64(alive))
	c.memMu.Unlock()

	if metaErr != nil {
		c.droppedMeta.Add(1)
		c.log.Warn("member metadata does not decode; not a peer", "member", n.Name, "err", metaErr)
	}
	c.log.Debug("member event", "member", n.Name, "state", st)
	c.notifyMembers()
}

// encodeLeave encodes a leave intent: type(1) name-len(1) name nonce(8).
// The nonce lets relays dedupe one leave without hiding a later one.
func encodeLeave(name string, nonce uint64) []byte {
	b := make([]byte, 0, 2+len(name)+8)
	b = append(b, msgLeave, byte(len(name)))
	b = append(b, name...)
	return binary.BigEndian.AppendUint64(b, nonce)
}

func decodeLeave(b []byte) (string, uint64, error) {
	if len(b) < 2 || b[0] != msgLeave {
		return "", 0, fmt.Errorf("decode leave: %w", errTruncated)
	}
	n := int(b[1])
	if n == 0 {
		return "", 0, errors.New("decode leave: empty name")
	}
	if len(b) != 2+n+8 {
		return "", 0, fmt.Errorf("decode leave: %d bytes for a %d-byte name", len(b), n)
	}
	return string(b[2 : 2+n]), binary.BigEndian.Uint64(b[2+n:]), nil
}

// delegate is memberlist's view of the Cluster; a separate type keeps
// memberlist's methods out of the Cluster's API.
type delegate struct{ c *Cluster }

func (d delegate) NodeMeta(limit int) []byte {
	d.c.metaMu.Lock()
	defer d.c.metaMu.Unlock()
	if len(d.c.meta) > limit {
		// memberlist panics on more; MarshalBinary already keeps under
		// MetaMaxSize, so only a smaller limit gets here.
		d.c.log.Error("metadata larger than memberlist allows", "size", len(d.c.meta), "limit", limit)
		return nil
	}
	return d.c.meta
}

func (d delegate) NotifyMsg(b []byte) { d.c.handleMsg(b) }

func (d delegate) GetBroadcasts(overhead, limit int) [][]byte {
	return d.c.queue.GetBroadcasts(overhead, limit)
}

// LocalState is the whole table, records and networks with their
// tombstones, the records in no particular order. Its size grows with the
// table and is not bounded here: memberlist sends push/pull state over
// TCP, up to 20 MiB (TestPushPullStateSize).
func (d delegate) LocalState(join bool) []byte {
	return encodeState(d.c.table.unsortedRecords(), d.c.table.NetworkVersions())
}

// MergeRemoteState merges a peer's whole table. Changes learned in the
// periodic exchange are broadcast again: they mean a broadcast was missed
// (a partition, a lost packet) and the rest of the cluster likely missed it
// too. Changes learned while joining are not: there the joiner is simply
// behind, and rebroadcasting the whole table would crowd out real news.
//
// A bare records message is still taken as a state: that is what agents
// from before virtual networks send.
func (d delegate) MergeRemoteState(buf []byte, join bool) {
	if len(buf) == 0 {
		return
	}
	var (
		rs  []Record
		ns  []Network
		err error
	)
	switch buf[0] {
	case msgState:
		rs, ns, err = decodeState(buf)
	case msgRecords:
		rs, err = DecodeRecords(buf)
	default:
		err = fmt.Errorf("unknown state type %#x", buf[0])
	}
	if err != nil {
		d.c.drop("malformed remote state", err)
		return
	}
	d.c.mergeRemote(rs, ns, !join)
}

type eventDelegate struct{ c *Cluster }

func (e eventDelegate) NotifyJoin(n *memberlist.Node)   { e.c.memberEvent(n, MemberAlive, true) }
func (e eventDelegate) NotifyUpdate(n *memberlist.Node) { e.c.memberEvent(n, MemberAlive, false) }
func (e eventDelegate) NotifyLeave(n *memberlist.Node)  { e.c.memberEvent(n, MemberDead, false) }

// broadcast is one message in memberlist's queue: a record (named
// vip/VIP), a network version (net/NAME) or a leave intent (leave/MEMBER).
// The name says what it is about, so that a newer message about the same
// thing replaces an older one still in the queue. done, if set, is closed
// once the queue is finished with it.
type broadcast struct {
	name string
	msg  []byte
	done chan struct{}
	once sync.Once
}

func recordBroadcast(r Record) *broadcast {
	return &broadcast{name: "vip/" + r.VIP.String(), msg: EncodeRecords([]Record{r})}
}

func networkBroadcast(n Network) *broadcast {
	return &broadcast{name: "net/" + n.Name, msg: EncodeNetworks([]Network{n})}
}

func leaveBroadcast(member string, msg []byte, done chan struct{}) *broadcast {
	return &broadcast{name: "leave/" + member, msg: msg, done: done}
}

func (b *broadcast) Name() string    { return b.name }
func (b *broadcast) Message() []byte { return b.msg }

func (b *broadcast) Finished() {
	if b.done != nil {
		b.once.Do(func() { close(b.done) })
	}
}

func (b *broadcast) Invalidates(o memberlist.Broadcast) bool {
	ob, ok := o.(*broadcast)
	return ok && ob.name == b.name
}
