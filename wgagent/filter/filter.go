// Package filter keeps vmroam's nftables table: isolation between virtual
// networks, and TCP MSS clamping for traffic through the WireGuard tunnel.
//
// It owns exactly one table (family inet, default name "vmroam") and never
// touches any other. Every Apply replaces that table as a whole in one
// nftables transaction, so the kernel holds either the old table or the new
// one, never a half-built one.
package filter

import (
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"

	"github.com/google/nftables"
)

// defaultName is the table's name when New is given none.
const defaultName = "vmroam"

// maxNameLen is the kernel's NFT_NAME_MAXLEN without the final NUL.
const maxNameLen = 255

// Network is a virtual network: VMs whose addresses are inside Prefix may
// reach each other and no VIP of another network.
type Network struct {
	Name   string
	Prefix netip.Prefix
}

// Ruleset is the desired content of the table.
type Ruleset struct {
	// Networks' prefixes are disjoint (the caller checks); IPv4 and IPv6
	// are both allowed.
	Networks []Network
	// TunnelDev is the WireGuard interface; "" means no MSS clamping.
	TunnelDev string
	// TunnelMTU is TunnelDev's MTU. SYNs through the tunnel get their MSS
	// clamped to TunnelMTU-40 (IPv4) and TunnelMTU-60 (IPv6), because
	// encapsulated packets are larger than what the endpoints' own links
	// let them assume.
	TunnelMTU int
}

// Table is a handle on vmroam's nftables table in one network namespace.
// It is safe for concurrent use.
type Table struct {
	name string
	opts []nftables.ConnOption
	mu   sync.Mutex
	// want is what the last successful Apply wrote; nil before one and
	// after Close.
	want *layout
}

// New returns a handle on the table called name ("" = "vmroam") in the
// current network namespace. It creates nothing yet. Each call on the Table
// talks to the namespace of the thread it runs on, which for the agent is
// the process's own.
func New(name string) (*Table, error) {
	return newTable(name)
}

// NewInNamespace is New for the network namespace nsFd refers to, for
// example a test's router namespace. nsFd must stay open while the Table
// is in use.
func NewInNamespace(name string, nsFd int) (*Table, error) {
	if nsFd <= 0 {
		// nftables reads fd 0 as "the current namespace": refuse it rather
		// than quietly use the wrong one.
		return nil, fmt.Errorf("filter: new: invalid namespace fd %d", nsFd)
	}
	return newTable(name, nftables.WithNetNSFd(nsFd))
}

func newTable(name string, opts ...nftables.ConnOption) (*Table, error) {
	if name == "" {
		name = defaultName
	}
	if len(name) > maxNameLen || slices.Contains([]byte(name), 0) {
		return nil, fmt.Errorf("filter: new: invalid table name %q", name)
	}
	return &Table{name: name, opts: opts}, nil
}

// conn returns a fresh connection for one operation. A Conn queues messages
// until Flush, even after an error while queueing; a fresh one per
// operation means a failed Apply can never leave a partial batch behind for
// the next.
func (t *Table) conn() (*nftables.Conn, error) {
	c, err := nftables.New(t.opts...)
	if err != nil {
		return nil, fmt.Errorf("netlink: %w", err)
	}
	return c, nil
}

// Apply replaces the whole table with r in one atomic nftables transaction,
// so there is never a moment with a half-built table; on error the previous
// table stays. Calling it twice with the same r is fine; the drop counters
// start again from zero with every Apply.
func (t *Table) Apply(r Ruleset) error {
	p, err := build(t.name, r)
	if err != nil {
		return fmt.Errorf("filter: apply: %w", err)
	}
	if err := t.apply(p); err != nil {
		return fmt.Errorf("filter: apply: %w", err)
	}
	return nil
}

// apply sends p as one batch.
func (t *Table) apply(p *plan) error {
	c, err := t.conn()
	if err != nil {
		return err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	// Adding first makes the delete valid whether or not the table exists,
	// all inside the one batch.
	c.AddTable(p.table)
	c.DelTable(p.table)
	c.AddTable(p.table)
	for _, ch := range p.chains {
		c.AddChain(ch)
	}
	for _, s := range p.sets {
		if err := c.AddSet(s.set, s.elems); err != nil {
			return fmt.Errorf("set %s: %w", s.set.Name, err)
		}
	}
	for _, rl := range p.rules {
		c.AddRule(rl)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("table inet %s: %w", t.name, err)
	}
	l := p.layout()
	t.want = &l
	return nil
}

// Check reports whether the table in the kernel still is what the last
// Apply wrote: it exists and has the expected chains, rule counts and set
// sizes. The agent calls it periodically and re-applies when someone
// changed or deleted the table (`nft flush ruleset`, for one). Before the
// first Apply, and after Close, it reports false.
func (t *Table) Check() (ok bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.want == nil {
		return false, nil
	}
	c, err := t.conn()
	if err != nil {
		return false, fmt.Errorf("filter: check: %w", err)
	}
	have, found, err := read(c, t.name)
	if err != nil {
		return false, fmt.Errorf("filter: check: %w", err)
	}
	if !found {
		return false, nil
	}
	return maps.Equal(have.rules, t.want.rules) && maps.Equal(have.elems, t.want.elems), nil
}

// read counts what the kernel holds in the table; found is false when the
// table does not exist.
func read(c *nftables.Conn, name string) (l layout, found bool, err error) {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return l, false, fmt.Errorf("list tables: %w", err)
	}
	if !slices.ContainsFunc(tables, func(x *nftables.Table) bool { return x.Name == name }) {
		return l, false, nil
	}
	tab := &nftables.Table{Family: nftables.TableFamilyINet, Name: name}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return l, false, fmt.Errorf("list chains: %w", err)
	}
	l = layout{rules: map[string]int{}, elems: map[string]int{}}
	for _, ch := range chains {
		if ch.Table.Name != name {
			continue
		}
		rules, err := c.GetRules(tab, ch)
		if err != nil {
			return l, false, fmt.Errorf("list rules of chain %s: %w", ch.Name, err)
		}
		l.rules[ch.Name] = len(rules)
	}
	sets, err := c.GetSets(tab)
	if err != nil {
		return l, false, fmt.Errorf("list sets: %w", err)
	}
	for _, s := range sets {
		elems, err := c.GetSetElements(s)
		if err != nil {
			return l, false, fmt.Errorf("list elements of set %s: %w", s.Name, err)
		}
		l.elems[s.Name] = len(elems)
	}
	return l, true, nil
}

// Close deletes the table (no error if it is already gone).
func (t *Table) Close() error {
	c, err := t.conn()
	if err != nil {
		return fmt.Errorf("filter: close: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	tab := &nftables.Table{Family: nftables.TableFamilyINet, Name: t.name}
	// As in Apply: the add makes the delete valid if the table is gone.
	c.AddTable(tab)
	c.DelTable(tab)
	if err := c.Flush(); err != nil {
		return fmt.Errorf("filter: close: table inet %s: %w", t.name, err)
	}
	t.want = nil
	return nil
}
