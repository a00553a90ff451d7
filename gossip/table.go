package gossip

import (
	"math"
	"net/netip"
	"slices"
	"sync"
)

// Table holds the winning location record of every known VIP, and the
// conflicts seen at the current epoch of a VIP. It is safe for concurrent
// use.
type Table struct {
	mu        sync.Mutex
	recs      map[netip.Addr]Record
	conflicts map[netip.Addr]*conflictSet
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

// NewTable returns an empty table.
func NewTable() *Table {
	return &Table{
		recs:      make(map[netip.Addr]Record),
		conflicts: make(map[netip.Addr]*conflictSet),
	}
}

// Merge keeps r if it supersedes the current record for r.VIP (or there is
// none) and reports whether the table changed. An IPv4-mapped VIP is
// unmapped first; an invalid record (see ValidVIP, MaxOwnerLen) is ignored.
//
// If r has the current record's epoch but a different owner, and neither is
// a tombstone, the table remembers the conflict until a higher epoch for the
// VIP arrives. The conflict then names every non-empty owner seen at the
// highest epoch, whatever the order of arrival.
func (t *Table) Merge(r Record) bool {
	changed, _ := t.merge(r)
	return changed
}

// merge is Merge that also reports whether a conflict was recorded or grew.
func (t *Table) merge(r Record) (changed, conflict bool) {
	r.VIP = r.VIP.Unmap()
	if r.validate() != nil {
		return false, false
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.mergeLocked(r)
}

func (t *Table) mergeLocked(r Record) (changed, conflict bool) {
	cur, ok := t.recs[r.VIP]
	if ok {
		switch {
		case r.Epoch > cur.Epoch:
			delete(t.conflicts, r.VIP)
		case r.Epoch == cur.Epoch && r.Owner != cur.Owner && r.Owner != "" && cur.Owner != "":
			conflict = t.noteConflictLocked(r.VIP, r.Epoch, cur.Owner, r.Owner)
		}
		if !r.Supersedes(cur) {
			return false, conflict
		}
	}
	t.recs[r.VIP] = r
	return true, conflict
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
// current record is returned unchanged.
func (t *Table) claim(vip netip.Addr, owner string) (Record, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	cur, ok := t.recs[vip]
	if ok && cur.Epoch == math.MaxUint64 {
		return cur, false
	}
	// With no record yet cur.Epoch is 0, so the first claim has epoch 1.
	r := Record{VIP: vip, Owner: owner, Epoch: cur.Epoch + 1}
	changed, _ := t.mergeLocked(r)
	return r, changed
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
	changed, _ := t.mergeLocked(r)
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
	t.mu.Lock()
	rs := make([]Record, 0, len(t.recs))
	for _, r := range t.recs {
		rs = append(rs, r)
	}
	t.mu.Unlock()
	slices.SortFunc(rs, func(a, b Record) int { return a.VIP.Compare(b.VIP) })
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
