package wgagent

import (
	"context"
	"crypto/rand"
	"math/big"
	"net/netip"
	"time"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
)

// allocAttempts bounds how often an allocation that lost a race tries a
// new address before giving up.
const allocAttempts = 6

// Allocate picks a free address in a virtual network, claims it for this
// host and waits until no other host's claim of the same address can still
// be on its way (Config.AllocSettle); a host that loses such a race picks
// another address. With dev, the VIP is attached to it; without, it is
// reserved here until attached or detached.
func (b backend) Allocate(ctx context.Context, network, dev string) (control.VIP, error) {
	a := b.a
	n, ok := a.cluster.Table().Network(network)
	if !ok || n.Removed() {
		return control.VIP{}, badRequest("no virtual network %q", network)
	}
	if _, active := a.cluster.Table().NetworkOf(n.Prefix.Addr()); !active {
		return control.VIP{}, badRequest("network %q is inactive: it overlaps another network", network)
	}
	if dev != "" {
		if err := a.checkDev(dev); err != nil {
			return control.VIP{}, err
		}
	}
	for range allocAttempts {
		// Pick and claim under the lock: two allocations on this host
		// must not pick the same address before either claimed it.
		a.mu.Lock()
		vip, ok := a.pickFree(n.Prefix)
		if !ok {
			a.mu.Unlock()
			return control.VIP{}, badRequest("network %s (%s) has no free address (addresses released in the last %v are not reused yet)", n.Name, n.Prefix, a.live().AllocQuarantine)
		}
		r, err := a.cluster.TryClaim(vip)
		if err != nil {
			a.mu.Unlock()
			return control.VIP{}, badRequest("%v", err)
		}
		a.attached[vip] = attachment{VIP: vip, Epoch: r.Epoch}
		a.dirty = true
		a.mu.Unlock()
		won, err := a.settleClaim(ctx, vip)
		if err != nil {
			a.mu.Lock()
			if at, ok := a.attached[vip]; ok && at.Dev == "" {
				a.disownLocked(vip, gossip.Record{})
			}
			a.mu.Unlock()
			return control.VIP{}, err
		}
		if !won {
			a.log.Info("allocation lost a race: another host claimed the same address; trying another", "vip", vip, "network", n.Name)
			continue
		}
		a.log.Info("VIP allocated", "vip", vip, "network", n.Name, "epoch", r.Epoch)
		if dev != "" {
			return b.Attach(ctx, vip, dev)
		}
		a.reconcile()
		return a.vipStatus(vip), nil
	}
	return control.VIP{}, badRequest("network %s: lost %d allocation races in a row; try again", n.Name, allocAttempts)
}

// settleClaim waits AllocSettle and reports whether this host still owns
// vip: a concurrent claim of the same address by another host reaches
// everyone within that time, and the (epoch, owner) order decides.
func (a *Agent) settleClaim(ctx context.Context, vip netip.Addr) (bool, error) {
	t := time.NewTimer(a.live().AllocSettle)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false, ctx.Err()
	case <-t.C:
	}
	r, ok := a.cluster.Table().Get(vip)
	return ok && r.Owner == a.cfg.Name, nil
}

// pickFree returns, with a.mu held, a random address of p that no host owns, that was not
// released within the quarantine, and that is not a host's address. Random,
// not lowest-first: hosts allocating at once then rarely pick the same one.
func (a *Agent) pickFree(p netip.Prefix) (netip.Addr, bool) {
	t := a.cluster.Table()
	hosts := map[netip.Addr]bool{a.cfg.Address.Addr(): true}
	for _, m := range a.cluster.Members() {
		if m.MetaErr == nil {
			hosts[m.Meta.Address] = true
		}
	}
	free := func(addr netip.Addr) bool {
		if hosts[addr] || !usableInPrefix(p, addr) {
			return false
		}
		r, known := t.Get(addr)
		if !known {
			return true
		}
		if r.Owner != "" {
			return false
		}
		at, ok := t.ReleasedAt(addr)
		return ok && time.Since(at) >= a.live().AllocQuarantine
	}
	size := prefixSize(p)
	// A few random tries, then a scan from a random start so a nearly
	// full network is still found free where it is.
	for range 64 {
		if addr := nthAddr(p, randBelow(size)); free(addr) {
			return addr, true
		}
	}
	start := randBelow(size)
	for i := new(big.Int); i.Cmp(size) < 0; i.Add(i, big.NewInt(1)) {
		off := new(big.Int).Add(start, i)
		off.Mod(off, size)
		if addr := nthAddr(p, off); free(addr) {
			return addr, true
		}
		if i.Cmp(big.NewInt(1<<16)) > 0 {
			break // a huge IPv6 network this full: give up rather than spin
		}
	}
	return netip.Addr{}, false
}

// usableInPrefix: not the prefix's own (network) address, nor, in IPv4,
// its broadcast address.
func usableInPrefix(p netip.Prefix, addr netip.Addr) bool {
	if addr == p.Masked().Addr() {
		return false
	}
	if addr.Is4() && p.Bits() < 31 {
		last := nthAddr(p, new(big.Int).Sub(prefixSize(p), big.NewInt(1)))
		return addr != last
	}
	return true
}

func prefixSize(p netip.Prefix) *big.Int {
	return new(big.Int).Lsh(big.NewInt(1), uint(p.Addr().BitLen()-p.Bits()))
}

func nthAddr(p netip.Prefix, n *big.Int) netip.Addr {
	base := new(big.Int).SetBytes(p.Masked().Addr().AsSlice())
	b := new(big.Int).Add(base, n).Bytes()
	buf := make([]byte, p.Addr().BitLen()/8)
	copy(buf[len(buf)-len(b):], b)
	addr, _ := netip.AddrFromSlice(buf)
	return addr
}

func randBelow(n *big.Int) *big.Int {
	v, err := rand.Int(rand.Reader, n)
	if err != nil {
		return big.NewInt(0)
	}
	return v
}
