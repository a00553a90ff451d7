package wgagent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"time"

	"github.com/vmroam/vmroam/xenhook"
	"github.com/vmroam/vmroam/xenhook/xenstore"
)

// xenRedial is how long the agent waits before it reconnects to a
// xenstored that went away (restarted, upgraded).
const xenRedial = 5 * time.Second

// xenstorePath resolves Config.Xenstore: "" means off, else the socket.
// "auto" is the default socket when it exists, so the same config serves
// Xen and KVM hosts.
func xenstorePath(setting string) (string, error) {
	switch setting {
	case "off", "":
		return "", nil
	case "auto":
		if _, err := os.Stat(xenstore.DefaultSocket); errors.Is(err, fs.ErrNotExist) {
			return "", nil
		}
		return xenstore.DefaultSocket, nil
	}
	if _, err := os.Stat(setting); err != nil {
		return "", fmt.Errorf("--xenstore %s: %w", setting, err)
	}
	return setting, nil
}

// xenEvents turns xenstore's domain events into migration steps. ctx ends
// when the agent stops following xenstore.
type xenEvents struct {
	a   *Agent
	ctx context.Context
}

// Suspending starts caching every VIP of the domain's vifs: this is the
// moment the source VM stops, before its interface goes, so nothing is in
// flight to a VM that no longer reads.
func (x xenEvents) Suspending(domid int, name string) {
	a := x.a
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		a.mu.Lock()
		vips := a.domainVIPsLocked()[domid]
		for _, vip := range vips {
			if err := a.engine.SuspendLocked(vip, "xenstore: domain "+name+" asked to suspend"); err != nil {
				a.log.Warn("xenstore suspend", "vip", vip, "domid", domid, "err", err)
			}
		}
		a.mu.Unlock()
		if len(vips) > 0 {
			a.reconcile()
		}
	}()
}

// Incoming is logged only: the domain's vifs, and so its VIPs, come later
// (IncomingVIPs).
func (x xenEvents) Incoming(domid int, name string) {
	x.a.log.Info("xenstore: incoming migration", "domid", domid, "name", name)
}

// xenPrepareTimeout bounds the preparation of one arriving VIP.
const xenPrepareTimeout = 5 * time.Second

// IncomingVIPs pre-provisions the VIPs of an arriving domain's vif, as
// `vmroam migrate prepare` does: it connects to each VIP's current owner,
// so that the claim at the vif's hotplug hook (`vip attach`) sends its
// handover request at once. In its own goroutine: the watcher must not
// wait for a dial.
func (x xenEvents) IncomingVIPs(domid int, name string, vips []netip.Addr) {
	a := x.a
	if a.intercept == nil {
		a.log.Debug("xenstore: incoming VIPs not prepared: the migration cache is off", "domid", domid, "vips", vips)
		return
	}
	a.bg.Add(1)
	go func() {
		defer a.bg.Done()
		for _, vip := range vips {
			ctx, cancel := context.WithTimeout(x.ctx, xenPrepareTimeout)
			v, err := backend{a}.Prepare(ctx, vip)
			cancel()
			if err != nil {
				a.log.Warn("xenstore: could not prepare an arriving VIP; the claim connects then", "vip", vip, "domid", domid, "name", name, "err", err)
				continue
			}
			a.log.Info("xenstore: prepared an arriving VIP", "vip", vip, "domid", domid, "name", name, "owner", v.Owner)
		}
	}()
}

// runXenstore follows xenstore until ctx ends, reconnecting when the
// connection fails.
func (a *Agent) runXenstore(ctx context.Context, path string) {
	defer a.bg.Done()
	for {
		c, err := xenstore.Dial(path)
		if err == nil {
			w := xenhook.NewWatcher(c, xenEvents{a, ctx}, a.log.With("component", "xenstore"))
			a.xenMu.Lock()
			a.xen = w
			a.xenFollowed = map[int]bool{}
			a.xenMu.Unlock()
			a.kick() // the next reconcile follows the attached domains
			a.log.Info("following domains in xenstore", "socket", path)
			err = w.Run(ctx)
			a.xenMu.Lock()
			a.xen = nil
			a.xenMu.Unlock()
			c.Close()
		}
		if ctx.Err() != nil {
			return
		}
		a.log.Error("xenstore: lost; suspends are seen only when a VM's interface goes, until it is back", "socket", path, "err", err, "retry_in", xenRedial)
		select {
		case <-ctx.Done():
			return
		case <-time.After(xenRedial):
		}
	}
}

// followXenDomainsLocked has the watcher follow exactly the domains whose
// vifs carry attached VIPs. a.mu held.
func (a *Agent) followXenDomainsLocked() {
	a.xenMu.Lock()
	defer a.xenMu.Unlock()
	if a.xen == nil {
		return
	}
	want := a.domainVIPsLocked()
	for id := range want {
		if !a.xenFollowed[id] {
			a.xen.Follow(id)
		}
	}
	for id := range a.xenFollowed {
		if _, ok := want[id]; !ok {
			a.xen.Unfollow(id)
		}
	}
	a.xenFollowed = map[int]bool{}
	for id := range want {
		a.xenFollowed[id] = true
	}
}

// domainVIPsLocked maps each Xen domain whose vifs carry attached VIPs to
// those VIPs, from the vifs' names. a.mu held.
func (a *Agent) domainVIPsLocked() map[int][]netip.Addr {
	out := map[int][]netip.Addr{}
	for vip, at := range a.attached {
		if id, ok := xenhook.DomidOfVif(at.Dev); ok {
			out[id] = append(out[id], vip)
		}
	}
	return out
}
