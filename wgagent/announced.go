package wgagent

import (
	"context"
	"errors"
	"maps"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/xenhook"
)

// An attach "when announced" is for libvirt: its last hook on a
// migration's destination ("started") runs when QEMU starts there, paused,
// before the memory copy. Claiming then would take the VM's traffic away
// from the host where it still runs, for the whole copy. So the
// destination waits for the first sign that the VM runs here: QEMU's RARP
// after the incoming migration, or the guest's gratuitous ARP or
// unsolicited neighbour advertisement. A paused VM sends nothing.

// awaitedVIP is a VIP attached when announced, not yet claimed.
type awaitedVIP struct {
	dev    string
	owner  string // the owner when the wait began, for status and logs
	since  time.Time
	cancel context.CancelFunc
}

// awaitRetry is how often the wait looks again for a VM interface that
// is missing (deleted and created again while waiting) or whose packet
// socket failed.
const awaitRetry = 100 * time.Millisecond

// AttachWhenAnnounced attaches vip behind dev once the VM announces itself
// on dev, if another live host owns vip; otherwise at once.
func (b backend) AttachWhenAnnounced(ctx context.Context, vip netip.Addr, dev string) (control.VIP, error) {
	a := b.a
	vip = vip.Unmap()
	if err := a.checkAttach(vip, dev); err != nil {
		return control.VIP{}, err
	}
	a.mu.Lock()
	_, here := a.attached[vip]
	a.mu.Unlock()
	r, _ := a.cluster.Table().Get(vip)
	_, alive := a.memberOverlay(r.Owner)
	if here || r.Owner == "" || r.Owner == a.cfg.Name || !alive {
		// Nobody else runs the VM: a new VM, a restart after its host
		// died, or a repeated hook. It runs here already.
		a.stopAwaiting(vip)
		return b.Attach(ctx, vip, dev)
	}
	a.awaitMu.Lock()
	if a.awaitClosed {
		a.awaitMu.Unlock()
		return control.VIP{}, errors.New("the agent is stopping")
	}
	if w := a.awaited[vip]; w != nil {
		if w.dev == dev {
			a.awaitMu.Unlock()
			return a.vipStatus(vip), nil
		}
		w.cancel()
	}
	wctx, cancel := context.WithCancel(context.Background())
	w := &awaitedVIP{dev: dev, owner: r.Owner, since: time.Now(), cancel: cancel}
	if a.awaited == nil {
		a.awaited = map[netip.Addr]*awaitedVIP{}
	}
	a.awaited[vip] = w
	a.awaitWG.Add(1)
	a.awaitMu.Unlock()
	// Kept before the wait starts, so that a claim forgets it after.
	a.mu.Lock()
	if a.awaitKeep == nil {
		a.awaitKeep = map[netip.Addr]string{}
	}
	a.awaitKeep[vip] = dev
	a.dirty = true
	a.mu.Unlock()
	go a.awaitAnnouncement(wctx, vip, w)
	a.persist() // the hook that asked does not ask again after a restart
	a.log.Info("VIP attached when the VM announces itself: its traffic stays with the VM's current host until then",
		"vip", vip, "dev", dev, "owner", r.Owner)
	return a.vipStatus(vip), nil
}

// awaitAnnouncement claims vip for w once the VM announces itself on
// w.dev, unless the wait is cancelled first.
func (a *Agent) awaitAnnouncement(ctx context.Context, vip netip.Addr, w *awaitedVIP) {
	defer a.awaitWG.Done()
	var (
		heard   xenhook.Announcement
		lastErr string
	)
	for ctx.Err() == nil && heard.Kind == "" {
		wctx, stop := context.WithCancel(ctx)
		err := xenhook.WatchAnnouncements(wctx, w.dev, func(an xenhook.Announcement) {
			heard = an
			stop()
		})
		stop()
		if heard.Kind != "" || ctx.Err() != nil {
			break
		}
		if err != nil && err.Error() != lastErr {
			lastErr = err.Error()
			lv := a.log.Warn
			if errors.Is(err, unix.ENODEV) {
				lv = a.log.Info // QEMU may create its tap again
			}
			lv("waiting for the VM's announcement: watching its interface; trying again", "vip", vip, "dev", w.dev, "err", err)
		}
		select {
		case <-ctx.Done():
		case <-time.After(awaitRetry):
		}
	}
	a.awaitMu.Lock()
	mine := a.awaited[vip] == w
	if mine {
		delete(a.awaited, vip)
	}
	a.awaitMu.Unlock()
	if !mine || heard.Kind == "" {
		return
	}
	a.forgetAwaiting(vip) // Attach saves the state
	a.log.Info("the VM announced itself: claiming its VIP", "vip", vip, "dev", w.dev, "kind", heard.Kind, "mac", heard.MAC.String(),
		"waited", time.Since(w.since).Round(time.Millisecond))
	if _, err := (backend{a}).Attach(context.Background(), vip, w.dev); err != nil {
		a.log.Error("attaching the VIP of a VM that announced itself: its traffic still goes to its old host",
			"vip", vip, "dev", w.dev, "owner", w.owner, "err", err)
		return
	}
	// The announcement that made the claim is the arrival's activation
	// too: the delivery's own watch opened after it and would wait for
	// another (with --activation announce, maybe forever).
	a.engine.Activate(vip, heard)
}

// stopAwaiting cancels a wait for vip's announcement and says whether
// there was one.
func (a *Agent) stopAwaiting(vip netip.Addr) bool {
	a.awaitMu.Lock()
	w := a.awaited[vip]
	if w != nil {
		w.cancel()
		delete(a.awaited, vip)
	}
	a.awaitMu.Unlock()
	if a.forgetAwaiting(vip) {
		a.persist()
	}
	return w != nil
}

// forgetAwaiting takes vip out of the waits the state file keeps and says
// whether it was there. a.mu must not be held.
func (a *Agent) forgetAwaiting(vip netip.Addr) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.awaitKeep[vip]; !ok {
		return false
	}
	delete(a.awaitKeep, vip)
	a.dirty = true
	return true
}

// restoreAwaiting waits again, after a restart, for the VMs that were
// awaited when the agent stopped, as if their hook asked again: a VM that
// nobody else runs any more is attached at once.
func (a *Agent) restoreAwaiting() {
	a.mu.Lock()
	keep := maps.Clone(a.awaitKeep)
	a.mu.Unlock()
	for vip, dev := range keep {
		v, err := (backend{a}).AttachWhenAnnounced(context.Background(), vip, dev)
		if err != nil {
			a.log.Error("a VIP awaited its VM when the agent stopped: cannot wait again; attach it again",
				"vip", vip, "dev", dev, "err", err)
			if a.forgetAwaiting(vip) {
				a.persist()
			}
			continue
		}
		a.log.Info("a VIP awaited its VM when the agent stopped: waiting again", "vip", vip, "dev", dev, "state", v.State)
	}
}

// closeAwaiting cancels every wait and waits for the waits to end, so that
// none claims while the agent stops.
func (a *Agent) closeAwaiting() {
	a.awaitMu.Lock()
	a.awaitClosed = true
	for vip, w := range a.awaited {
		w.cancel()
		delete(a.awaited, vip)
	}
	a.awaitMu.Unlock()
	a.awaitWG.Wait()
}

// awaitingOn returns the interface vip waits on for its VM's announcement.
func (a *Agent) awaitingOn(vip netip.Addr) (dev string, ok bool) {
	a.awaitMu.Lock()
	defer a.awaitMu.Unlock()
	if w := a.awaited[vip]; w != nil {
		return w.dev, true
	}
	return "", false
}
