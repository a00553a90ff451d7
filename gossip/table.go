package gossip

import (
	"errors"
	"fmt"
	"math"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"
)

// Table holds the winning location record of every known VIP, the
// conflicts seen at the current epoch of a VIP, and the current version of
// every virtual network. It is safe for concurrent use.
//
// What other members can make it hold is bounded (see Limits): a record or
// network version beyond a cap is refused, counted against its owner (see
// OverCap) and not passed on; nothing already held is ever evicted to make
// room, so a flood from one owner cannot push out another's records.
type Table struct {
	mu        sync.Mutex
	lim       Limits
	recs      map[netip.Addr]Record
	owned     map[string]int // live records by owner
	conflicts map[netip.Addr]*conflictSet
	nets      map[string]Network
	origins   map[string]int // network versions by origin
	overCap   map[string]uint64
	// released is when this member learnt that a VIP was released (the
	// tombstone's arrival here): allocations keep such addresses unused
	// for a while. Records carry no clock, so each member counts from
	// its own first sight, which errs on the safe side.
	released map[netip.Addr]time.Time
}

// Conflict says that several members claimed one VIP at one epoch, which
// happens when a VM was started twice. The record with the greatest owner
// still wins everywhere; the conflict is only reported.
type Conflict struct {
	VIP    netip.Addr
	Epoch  uint64
	Owners []string // sorted, deduped
}

type conflictSet struct {
	epoch  uint64
	owners map[string]struct{}
}

// Limits bound a Table. A field <= 0 takes its default.
//
// The defaults are sized for a cluster of 100,000 VIPs in all. A record
// costs about 120 bytes of heap here (TestTableLimitsMemory logs it), so
// a full table of 200,000 takes about 23 MiB.
type Limits struct {
	// Records bounds the records held, tombstones included: released
	// VIPs are never forgotten (a tombstone keeps an older claim from
	// coming back), so the default, 200,000, is the 100,000 live VIPs
	// the table is sized for plus as many tombstones.
	Records int
	// RecordsPerOwner bounds the live records of one owner: 20,000 by
	// default, a hundred times what one host runs, and a tenth of
	// Records, so one owner's flood leaves nine tenths to the others.
	RecordsPerOwner int
	// Networks bounds the network versions held, tombstones included:
	// 1024 by default (100 VMs each make 100,000 VIPs). Deciding which
	// networks are active compares every pair, so this stays small.
	Networks int
	// NetworksPerOrigin bounds the versions one member wrote: 256 by
	// default, a quarter of Networks.
	NetworksPerOrigin int
}

// Defaults of Limits.
const (
	DefaultMaxRecords           = 200_000
	DefaultMaxRecordsPerOwner   = 20_000
	DefaultMaxNetworks          = 1024
	DefaultMaxNetworksPerOrigin = 256
)

func (l Limits) withDefaults() Limits {
	def := func(v, d int) int {
		if v <= 0 {
			return d
		}
		return v
	}
	return Limits{
		Records:           def(l.Records, DefaultMaxRecords),
		RecordsPerOwner:   def(l.RecordsPerOwner, DefaultMaxRecordsPerOwner),
		Networks:          def(l.Networks, DefaultMaxNetworks),
		NetworksPerOrigin: def(l.NetworksPerOrigin, DefaultMaxNetworksPerOrigin),
	}
}

// ErrOverCap is wrapped by the errors of a record or network version that
// a Limits cap refused.
var ErrOverCap = errors.New("the location table is at its cap")

// maxOverCapOwners bounds the owners OverCap names: owner names are the
// sender's to invent, so beyond these the rest are counted together under
// OverCapOthers.
const maxOverCapOwners = 64

// OverCap's keys that are no owner's name (names are at most MaxOwnerLen
// bytes of anything, so these could be; a member calling itself so only
// hides among them).
const (
	OverCapOthers   = "(others)"   // owners beyond the first 64 named
	OverCapReleased = "(released)" // tombstones, which have no owner
)

// NewTable returns an empty table with the default Limits.
func NewTable() *Table { return NewTableLimits(Limits{}) }

// NewTableLimits returns an empty table bounded by l.
func NewTableLimits(l Limits) *Table {
	return &Table{
		lim:       l.withDefaults(),
		recs:      make(map[netip.Addr]Record),
		owned:     make(map[string]int),
		conflicts: make(map[netip.Addr]*conflictSet),
		nets:      make(map[string]Network),
		origins:   make(map[string]int),
		overCap:   make(map[string]uint64),
		released:  make(map[netip.Addr]time.Time),
	}
}

// Limits returns the table's limits, defaults filled in.
func (t *Table) Limits() Limits { return t.lim }

// Size returns how many records and network versions the table holds,
// tombstones included.
func (t *Table) Size() (records, networks int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.recs), len(t.nets)
}

// OverCap returns, by owner (a record's owner, a network version's
// origin), how many records and network versions the caps refused since
// the table was made; at most 64 owners are named, the rest are summed
// under OverCapOthers, and tombstones under OverCapReleased. A member's push/pull state repeats what was refused
// at every exchange, so the counts grow while a member stays over its cap.
func (t *Table) OverCap() map[string]uint64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]uint64, len(t.overCap))
	for o, n := range t.overCap {
		out[o] = n
	}
	return out
}

func (t *Table) noteOverCapLocked(owner string) {
	if owner == "" {
		owner = OverCapReleased
	}
	if _, ok := t.overCap[owner]; !ok && len(t.overCap) >= maxOverCapOwners {
		owner = OverCapOthers
	}
	t.overCap[owner]++
}

// roomLocked says whether r may replace cur (held if ok): a new VIP needs
// room under Records, and an owner taking a VIP it did not hold needs room
// under RecordsPerOwner. Replacing a record never needs room in all, and a
// tombstone needs none of its owner's.
func (t *Table) roomLocked(r, cur Record, ok bool) error {
	if !ok && len(t.recs) >= t.lim.Records {
		return fmt.Errorf("VIP %s: %w: it holds %d records, tombstones included (--max-vips)", r.VIP, ErrOverCap, len(t.recs))
	}
	if r.Owner != "" && (!ok || cur.Owner != r.Owner) && t.owned[r.Owner] >= t.lim.RecordsPerOwner {
		return fmt.Errorf("VIP %s: %w: %q owns %d VIPs, the most one member may", r.VIP, ErrOverCap, r.Owner, t.owned[r.Owner])
	}
	return nil
}

// Merge keeps r if it supersedes the current record for r.VIP (or there is
// none) and reports whether the table changed. An IPv4-mapped VIP is
// unmapped first; an invalid record (see ValidVIP, MaxOwnerLen) is ignored.
//
// If r has the current record's epoch but a different owner, and neither is
// a tombstone, the table remembers the conflict until a higher epoch for the
// VIP arrives. The conflict then names every non-empty owner seen at the
// highest epoch, whatever the order of arrival.
//
// A record that would exceed a cap (see Limits) is refused and counted
// against its owner in OverCap; the table is left as it was.
func (t *Table) Merge(r Record) bool {
	changed, _, _ := t.merge(r)
	return changed
}

// merge is Merge that also reports whether a conflict was recorded or grew,
// and why a record was refused (an invalid record is not: it never counts).
func (t *Table) merge(r Record) (changed, conflict bool, err error) {
	r.VIP = r.VIP.Unmap()
	if r.validate() != nil {
		return false, false, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	changed, conflict, err = t.mergeLocked(r)
	if err != nil {
		t.noteOverCapLocked(r.Owner)
	}
	return changed, conflict, err
}

func (t *Table) mergeLocked(r Record) (changed, conflict bool, err error) {
	cur, ok := t.recs[r.VIP]
	if ok {
		if !r.Supersedes(cur) {
			if r.Epoch == cur.Epoch && r.Owner != cur.Owner && r.Owner != "" && cur.Owner != "" {
				conflict = t.noteConflictLocked(r.VIP, r.Epoch, cur.Owner, r.Owner)
			}
			return false, conflict, nil
		}
	}
	if err := t.roomLocked(r, cur, ok); err != nil {
		return false, false, err
	}
	if ok {
		switch {
		case r.Epoch > cur.Epoch:
			delete(t.conflicts, r.VIP)
		case r.Owner != cur.Owner && r.Owner != "" && cur.Owner != "":
			conflict = t.noteConflictLocked(r.VIP, r.Epoch, cur.Owner, r.Owner)
		}
		if cur.Owner != "" {
			if t.owned[cur.Owner]--; t.owned[cur.Owner] == 0 {
				delete(t.owned, cur.Owner)
			}
		}
	}
	if r.Owner != "" {
		t.owned[r.Owner]++
	}
	t.recs[r.VIP] = r
	if r.Owner == "" {
		t.released[r.VIP] = time.Now()
	} else {
		delete(t.released, r.VIP)
	}
	return true, conflict, nil
}

// ReleasedAt returns when this member learnt that vip was released; ok is
// false unless vip's current record is a tombstone.
func (t *Table) ReleasedAt(vip netip.Addr) (time.Time, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	at, ok := t.released[vip.Unmap()]
	return at, ok
}

func (t *Table) noteConflictLocked(vip netip.Addr, epoch uint64, owners ...string) bool {
	c := t.conflicts[vip]
	if c == nil || c.epoch != epoch {
		c = &conflictSet{epoch: epoch, owners: make(map[string]struct{})}
		t.conflicts[vip] = c
	}
	grew := false
	for _, o := range owners {
		if _, ok := c.owners[o]; !ok {
			c.owners[o] = struct{}{}
			grew = true
		}
	}
	return grew
}

// claim merges a record giving vip to owner at one epoch above the current
// one. At the highest epoch nothing can supersede the current record, so the
// current record is returned unchanged. A claim over a cap is refused with
// an error wrapping ErrOverCap (and not counted in OverCap: it never left
// this member).
func (t *Table) claim(vip netip.Addr, owner string) (Record, bool, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.recs[vip]
	if ok && cur.Epoch == math.MaxUint64 {
		return cur, false, nil
	}
	// With no record yet cur.Epoch is 0, so the first claim has epoch 1.
	r := Record{VIP: vip, Owner: owner, Epoch: cur.Epoch + 1}
	changed, _, err := t.mergeLocked(r)
	if err != nil {
		return Record{}, false, err
	}
	return r, changed, nil
}

// release merges a tombstone for vip at one epoch above the current record,
// if owner holds that record.
func (t *Table) release(vip netip.Addr, owner string) (Record, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.recs[vip]
	if !ok || cur.Owner != owner || owner == "" || cur.Epoch == math.MaxUint64 {
		return Record{}, false
	}
	r := Record{VIP: vip, Epoch: cur.Epoch + 1}
	changed, _, _ := t.mergeLocked(r) // replaces a record: never over a cap
	return r, changed
}

// Get returns the current record for vip.
func (t *Table) Get(vip netip.Addr) (Record, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	r, ok := t.recs[vip.Unmap()]
	return r, ok
}

// Records returns every record, tombstones included, sorted by VIP.
func (t *Table) Records() []Record {
	rs := t.unsortedRecords()
	slices.SortFunc(rs, func(a, b Record) int { return a.VIP.Compare(b.VIP) })
	return rs
}

// unsortedRecords returns every record, tombstones included, in no
// particular order: the push/pull state needs no order, and sorting
// 100,000 records took 60% of its encoding (BenchmarkPushPull).
func (t *Table) unsortedRecords() []Record {
	t.mu.Lock()
	defer t.mu.Unlock()
	rs := make([]Record, 0, len(t.recs))
	for _, r := range t.recs {
		rs = append(rs, r)
	}
	return rs
}

// Conflicts returns the open conflicts, sorted by VIP.
func (t *Table) Conflicts() []Conflict {
	t.mu.Lock()
	cs := make([]Conflict, 0, len(t.conflicts))
	for vip, c := range t.conflicts {
		cs = append(cs, Conflict{VIP: vip, Epoch: c.epoch, Owners: sortedOwners(c.owners)})
	}
	t.mu.Unlock()
	slices.SortFunc(cs, func(a, b Conflict) int { return a.VIP.Compare(b.VIP) })
	return cs
}

// conflict returns the open conflict for vip, if any.
func (t *Table) conflict(vip netip.Addr) (Conflict, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	c, ok := t.conflicts[vip]
	if !ok {
		return Conflict{}, false
	}
	return Conflict{VIP: vip, Epoch: c.epoch, Owners: sortedOwners(c.owners)}, true
}

func sortedOwners(set map[string]struct{}) []string {
	owners := make([]string, 0, len(set))
	for o := range set {
		owners = append(owners, o)
	}
	slices.Sort(owners)
	return owners
}

// MergeNetwork keeps n if it supersedes the current version of n.Name (or
// there is none) and reports whether the table changed. An invalid version
// (see ValidNetworkName, ValidNetworkPrefix, MaxOwnerLen) is ignored.
//
// Two live networks may overlap after merging: declarations refuse an
// overlap only against what the declaring member knew. NetworkOverlaps and
// ActiveNetworks resolve that the same way everywhere.
//
// A version that would exceed a cap (see Limits) is refused and counted
// against its origin in OverCap.
func (t *Table) MergeNetwork(n Network) bool {
	changed, _ := t.mergeNetwork(n)
	return changed
}

// mergeNetwork is MergeNetwork that also says why a version was refused.
func (t *Table) mergeNetwork(n Network) (bool, error) {
	if n.validate() != nil {
		return false, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	changed, err := t.mergeNetworkLocked(n)
	if err != nil {
		t.noteOverCapLocked(n.Origin)
	}
	return changed, err
}

func (t *Table) mergeNetworkLocked(n Network) (bool, error) {
	cur, ok := t.nets[n.Name]
	if ok && !n.Supersedes(cur) {
		return false, nil
	}
	// A removal of a held network takes no room: it only ever shrinks
	// what is live.
	switch {
	case !ok && len(t.nets) >= t.lim.Networks:
		return false, fmt.Errorf("network %q: %w: it holds %d network versions, removals included", n.Name, ErrOverCap, len(t.nets))
	case (!ok || !n.Removed()) && (!ok || cur.Origin != n.Origin) && t.origins[n.Origin] >= t.lim.NetworksPerOrigin:
		return false, fmt.Errorf("network %q: %w: %q wrote %d network versions, the most one member may", n.Name, ErrOverCap, n.Origin, t.origins[n.Origin])
	}
	if ok {
		if t.origins[cur.Origin]--; t.origins[cur.Origin] == 0 {
			delete(t.origins, cur.Origin)
		}
	}
	t.origins[n.Origin]++
	t.nets[n.Name] = n
	return true, nil
}

// Networks returns every live (not removed) network, sorted by name.
func (t *Table) Networks() []Network {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.liveNetworksLocked()
}

func (t *Table) liveNetworksLocked() []Network {
	ns := make([]Network, 0, len(t.nets))
	for _, n := range t.nets {
		if !n.Removed() {
			ns = append(ns, n)
		}
	}
	slices.SortFunc(ns, compareNetworkNames)
	return ns
}

func compareNetworkNames(a, b Network) int { return strings.Compare(a.Name, b.Name) }

// NetworkVersions returns every network version including tombstones,
// sorted by name: the push/pull state must carry removals, or a member that
// missed one would bring the network back.
func (t *Table) NetworkVersions() []Network {
	t.mu.Lock()
	ns := make([]Network, 0, len(t.nets))
	for _, n := range t.nets {
		ns = append(ns, n)
	}
	t.mu.Unlock()
	slices.SortFunc(ns, compareNetworkNames)
	return ns
}

// Network returns the current version of name, tombstone included; ok is
// false if name was never seen.
func (t *Table) Network(name string) (Network, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	n, ok := t.nets[name]
	return n, ok
}

// NetworkOverlap is one clash between live networks whose prefixes overlap,
// which declarations cannot prevent when two members declare at once or a
// partition heals. Winner keeps its prefix; Loser is inactive until an
// operator removes one of them.
type NetworkOverlap struct{ Winner, Loser Network }

// NetworkOverlaps lists every pair of an active network (see
// ActiveNetworks) and an inactive live network whose prefixes overlap,
// sorted by winner then loser name. The network whose name sorts first
// wins; only in a chain, where b overlaps both a and c but a and c are
// disjoint, does c win over b although b sorts first: b lost to a already,
// so c clashes with no active network. Pairs of two inactive networks are
// left out, as neither holds its prefix. The losers are exactly the live
// networks ActiveNetworks leaves out.
func (t *Table) NetworkOverlaps() []NetworkOverlap {
	t.mu.Lock()
	live := t.liveNetworksLocked()
	t.mu.Unlock()
	_, ov := resolveNetworks(live)
	return ov
}

// ActiveNetworks returns Networks() minus the losers of NetworkOverlaps:
// the live networks, sorted by name, that each overlap no network kept
// before them. It depends only on the set of live networks, so every member
// that has merged the same versions routes the same networks, whatever
// order the merges came in.
func (t *Table) ActiveNetworks() []Network {
	t.mu.Lock()
	live := t.liveNetworksLocked()
	t.mu.Unlock()
	active, _ := resolveNetworks(live)
	return active
}

// NetworkOf returns the active network whose prefix contains addr (active
// networks are disjoint, so there is at most one).
func (t *Table) NetworkOf(addr netip.Addr) (Network, bool) {
	addr = addr.Unmap()
	for _, n := range t.ActiveNetworks() {
		if n.Prefix.Contains(addr) {
			return n, true
		}
	}
	return Network{}, false
}

// resolveNetworks splits live networks, sorted by name, into the active
// ones and the overlaps that make the others inactive.
func resolveNetworks(live []Network) (active []Network, overlaps []NetworkOverlap) {
	active = make([]Network, 0, len(live))
	var losers []Network
	for _, n := range live {
		if slices.ContainsFunc(active, func(a Network) bool { return Overlaps(a.Prefix, n.Prefix) }) {
			losers = append(losers, n)
		} else {
			active = append(active, n)
		}
	}
	overlaps = []NetworkOverlap{}
	for _, l := range losers {
		for _, a := range active {
			if Overlaps(a.Prefix, l.Prefix) {
				overlaps = append(overlaps, NetworkOverlap{Winner: a, Loser: l})
			}
		}
	}
	slices.SortFunc(overlaps, func(x, y NetworkOverlap) int {
		if c := strings.Compare(x.Winner.Name, y.Winner.Name); c != 0 {
			return c
		}
		return strings.Compare(x.Loser.Name, y.Loser.Name)
	})
	return active, overlaps
}

// declareNetwork merges name -> prefix written by origin at one epoch above
// the current version, unless that is refused: an invalid name or prefix, a
// prefix that overlaps another live network, or a new prefix for a live
// network (VMs already use addresses in the old one). Declaring a live
// network's own prefix again changes nothing and returns the current
// version, so that re-applying a configuration is harmless.
func (t *Table) declareNetwork(name string, prefix netip.Prefix, origin string) (n Network, changed bool, err error) {
	if err := ValidNetworkName(name); err != nil {
		return Network{}, false, err
	}
	if err := ValidNetworkPrefix(prefix); err != nil {
		return Network{}, false, fmt.Errorf("network %q: %w", name, err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.nets[name]
	if ok && !cur.Removed() {
		if cur.Prefix == prefix {
			return cur, false, nil
		}
		return Network{}, false, fmt.Errorf("network %q already has prefix %s; remove it first, VMs may use addresses in it", name, cur.Prefix)
	}
	for _, o := range t.liveNetworksLocked() {
		if Overlaps(o.Prefix, prefix) {
			return Network{}, false, fmt.Errorf("network %q (%s) overlaps network %q (%s)", name, prefix, o.Name, o.Prefix)
		}
	}
	if cur.Epoch == math.MaxUint64 {
		return Network{}, false, fmt.Errorf("network %q: epoch exhausted", name)
	}
	// With no version yet cur.Epoch is 0, so the first declaration has epoch 1.
	n = Network{Name: name, Prefix: prefix, Epoch: cur.Epoch + 1, Origin: origin}
	changed, err = t.mergeNetworkLocked(n)
	if err != nil {
		return Network{}, false, err
	}
	return n, changed, nil
}

// removeNetwork merges a tombstone for name, written by origin, at one
// epoch above the current version, if name is live.
func (t *Table) removeNetwork(name, origin string) (Network, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.nets[name]
	if !ok || cur.Removed() || cur.Epoch == math.MaxUint64 {
		return Network{}, false
	}
	n := Network{Name: name, Epoch: cur.Epoch + 1, Origin: origin}
	changed, _ := t.mergeNetworkLocked(n) // removes a held network: never over a cap
	return n, changed
}
