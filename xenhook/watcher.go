package xenhook

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"strconv"
	"strings"
	"sync"

	"github.com/vmroam/vmroam/xenhook/xenstore"
)

// Handler receives the domain events the agent acts on.
type Handler interface {
	// Suspending: the domain was asked to suspend (control/shutdown =
	// "suspend"): the source side of a migration starts now. Must not block.
	Suspending(domid int, name string)
	// Incoming: a domain named "<name>--incoming" exists: a migration to
	// this host is being prepared. Must not block.
	Incoming(domid int, name string)
	// IncomingVIPs: a vif of that incoming domain carries these addresses
	// (the "ip" of its backend in xenstore, as vif-route reads it), so
	// they are about to arrive here. Reported once per vif, again only if
	// its addresses change, and only while the domain is "--incoming".
	// Must not block.
	IncomingVIPs(domid int, name string, vips []netip.Addr)
}

const (
	domainRoot     = "/local/domain"
	suffixIncoming = "--incoming"
	suffixAway     = "--migratedaway"

	// Watch tokens. The domid follows the per-domain prefixes, so an event
	// says which domain it is about without parsing its path.
	tokIntroduce = "vmroam:introduce"
	tokDomains   = "vmroam:domains"
	tokShutdown  = "vmroam:shutdown:"
	tokName      = "vmroam:name:"
)

// errEventsEnded says the client's event channel closed: the connection to
// xenstored is gone (closed or failed; requests now return the cause).
var errEventsEnded = errors.New("xenstore event stream ended")

// Watcher follows domains in xenstore and reports, through a Handler, when
// a followed domain is asked to suspend, when an incoming migration
// creates a domain here, and which addresses that domain's vifs carry.
type Watcher struct {
	c    *xenstore.Client
	h    Handler
	log  *slog.Logger
	kick chan struct{} // Follow or Unfollow changed the set

	mu sync.Mutex
	// follow holds the followed domids, each with the number of the
	// Follow that began its current following: an Unfollow and a Follow
	// that reach Run together (one kick) still make it start afresh.
	follow  map[int]uint64
	follows uint64
}

// NewWatcher returns a watcher that uses c for its watches and reports to
// h. A nil log discards.
func NewWatcher(c *xenstore.Client, h Handler, log *slog.Logger) *Watcher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Watcher{c: c, h: h, log: log, kick: make(chan struct{}, 1), follow: make(map[int]uint64)}
}

// Follow starts watching domid (the agent calls it for every domain whose
// vif carries an attached VIP); Unfollow stops. Idempotent. Either may be
// called before or while Run runs; Unfollow takes effect at once, even for
// events already queued.
func (w *Watcher) Follow(domid int) {
	if domid < 0 || domid >= domidMax {
		w.log.Warn("xenhook: not following an invalid domid", "domid", domid)
		return
	}
	w.mu.Lock()
	changed := w.follow[domid] == 0
	if changed {
		w.follows++
		w.follow[domid] = w.follows
	}
	w.mu.Unlock()
	if changed {
		w.poke()
	}
}

// Unfollow stops watching domid.
func (w *Watcher) Unfollow(domid int) {
	w.mu.Lock()
	changed := w.follow[domid] != 0
	delete(w.follow, domid)
	w.mu.Unlock()
	if changed {
		w.poke()
	}
}

func (w *Watcher) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// following returns the number of the Follow that domid is followed by,
// 0 if it is not.
func (w *Watcher) following(domid int) uint64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.follow[domid]
}

// Run watches "@introduceDomain" and "/local/domain" to see incoming
// domains, and the followed domains' control/shutdown and name. It returns
// nil when ctx ends (after removing its watches) and an error when the
// client fails. It starts no goroutine; call it once at a time per Watcher.
//
// Watching all of /local/domain means an event for every write below it;
// they are filtered by path here. It is the only early sign of an incoming
// domain: "@introduceDomain" fires only after the memory stream (see the
// package comment), so it serves as a second chance, with a full rescan.
func (w *Watcher) Run(ctx context.Context) error {
	r := &run{w: w, domains: make(map[int]*domain), incoming: make(map[int]string), vifIPs: make(map[int]map[int]string)}
	defer r.unwatchAll()
	r.dropped = w.c.Dropped()
	for _, x := range []struct{ path, token string }{
		{"@introduceDomain", tokIntroduce},
		{domainRoot, tokDomains},
	} {
		if err := r.watch(x.path, x.token); err != nil {
			return err
		}
	}
	if err := r.reconcile(); err != nil {
		return err
	}
	events := w.c.Events()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-w.kick:
			if err := r.reconcile(); err != nil {
				return err
			}
		case ev, ok := <-events:
			if !ok {
				r.dead = true
				return fmt.Errorf("xenhook: %w", errEventsEnded)
			}
			if err := r.handle(ev); err != nil {
				return err
			}
			if d := w.c.Dropped(); d != r.dropped {
				w.log.Warn("xenhook: xenstore events were dropped; re-reading every watched node", "dropped", d-r.dropped)
				r.dropped = d
				if err := r.resync(); err != nil {
					return err
				}
			}
		}
	}
}

// run is the state of one Run, touched only by its goroutine.
type run struct {
	w        *Watcher
	watches  []watchKey
	domains  map[int]*domain        // followed domains with watches registered
	incoming map[int]string         // domid -> the "--incoming" name reported
	vifIPs   map[int]map[int]string // incoming domid -> devid -> the "ip" reported
	dropped  uint64
	dead     bool // the client is gone: no unwatching
}

type watchKey struct{ path, token string }

// domain is what a followed domain last looked like.
type domain struct {
	follow   uint64 // Watcher.follow's number for it
	shutdown string // control/shutdown, "" when absent
	name     string
	// reported: Suspending was reported for the current migration attempt.
	// A new "suspend" request always reports; the rename to
	// "--migratedaway" reports only if nothing did before.
	reported bool
}

func shutdownPath(domid int) string { return fmt.Sprintf("%s/%d/control/shutdown", domainRoot, domid) }
func namePath(domid int) string     { return fmt.Sprintf("%s/%d/name", domainRoot, domid) }

// fatal tells a broken connection from xenstored refusing one request.
func fatal(err error) bool {
	var xe *xenstore.Error
	return err != nil && !errors.As(err, &xe)
}

// read returns a node's value, "" for a missing node. Errors xenstored
// answers other than ENOENT are logged and read as ""; only a failing
// connection is returned.
func (r *run) read(path string) (string, error) {
	v, err := r.w.c.Read(path)
	switch {
	case err == nil:
		return v, nil
	case errors.Is(err, xenstore.ErrNotFound):
		return "", nil
	case fatal(err):
		return "", fmt.Errorf("xenhook: %w", err)
	}
	r.w.log.Warn("xenhook: xenstore read refused", "path", path, "err", err)
	return "", nil
}

func (r *run) watch(path, token string) error {
	err := r.w.c.Watch(path, token)
	var xe *xenstore.Error
	switch {
	case err == nil:
		r.watches = append(r.watches, watchKey{path, token})
		return nil
	case errors.As(err, &xe) && xe.Errno == "EEXIST":
		// Left by an earlier Run on this client. xenstored sends no
		// registration event then, so read the state as if it had.
		r.watches = append(r.watches, watchKey{path, token})
		return r.handle(xenstore.Event{Path: path, Token: token})
	case fatal(err):
		return fmt.Errorf("xenhook: %w", err)
	}
	r.w.log.Error("xenhook: xenstore refused a watch", "path", path, "token", token, "err", err)
	return nil
}

func (r *run) unwatch(path, token string) error {
	for i, k := range r.watches {
		if k == (watchKey{path, token}) {
			r.watches = append(r.watches[:i], r.watches[i+1:]...)
			break
		}
	}
	err := r.w.c.Unwatch(path, token)
	if fatal(err) {
		return fmt.Errorf("xenhook: %w", err)
	}
	return nil
}

// unwatchAll removes Run's watches so the client can go on being used.
func (r *run) unwatchAll() {
	if r.dead {
		return
	}
	for _, k := range r.watches {
		if err := r.w.c.Unwatch(k.path, k.token); err != nil {
			r.w.log.Debug("xenhook: unwatch on exit", "path", k.path, "err", err)
			if fatal(err) {
				return
			}
		}
	}
	r.watches = nil
}

// reconcile registers watches for newly followed domains and removes those
// of unfollowed ones.
func (r *run) reconcile() error {
	r.w.mu.Lock()
	want := maps.Clone(r.w.follow)
	r.w.mu.Unlock()
	for id, d := range r.domains {
		if want[id] == d.follow {
			continue
		}
		delete(r.domains, id)
		if err := r.unwatch(shutdownPath(id), tokShutdown+strconv.Itoa(id)); err != nil {
			return err
		}
		if err := r.unwatch(namePath(id), tokName+strconv.Itoa(id)); err != nil {
			return err
		}
		r.w.log.Debug("xenhook: unfollowed domain", "domid", id)
	}
	for id, n := range want {
		if r.domains[id] != nil {
			continue
		}
		r.domains[id] = &domain{follow: n}
		// The registration events read the current values.
		if err := r.watch(shutdownPath(id), tokShutdown+strconv.Itoa(id)); err != nil {
			return err
		}
		if err := r.watch(namePath(id), tokName+strconv.Itoa(id)); err != nil {
			return err
		}
		r.w.log.Debug("xenhook: following domain", "domid", id)
	}
	return nil
}

func (r *run) handle(ev xenstore.Event) error {
	switch {
	case ev.Token == tokIntroduce:
		return r.scan()
	case ev.Token == tokDomains:
		return r.domainEvent(ev.Path)
	case strings.HasPrefix(ev.Token, tokShutdown):
		if id, ok := decimal(ev.Token[len(tokShutdown):]); ok {
			return r.checkShutdown(id)
		}
	case strings.HasPrefix(ev.Token, tokName):
		if id, ok := decimal(ev.Token[len(tokName):]); ok {
			return r.checkName(id)
		}
	}
	// Someone else's watch on the same client.
	return nil
}

// resync re-reads everything after events were lost.
func (r *run) resync() error {
	if err := r.scan(); err != nil {
		return err
	}
	for id := range r.incoming {
		if err := r.scanVifs(id); err != nil {
			return err
		}
	}
	for id := range r.domains {
		if err := r.checkShutdown(id); err != nil {
			return err
		}
		if err := r.checkName(id); err != nil {
			return err
		}
	}
	return nil
}

// domainEvent filters the events of the /local/domain watch: only a
// domain's directory and its name matter.
func (r *run) domainEvent(path string) error {
	if path == domainRoot {
		return r.scan()
	}
	rest, ok := strings.CutPrefix(path, domainRoot+"/")
	if !ok {
		return nil
	}
	dom, sub, _ := strings.Cut(rest, "/")
	id, ok := decimal(dom)
	if !ok {
		return nil
	}
	if sub == "" || sub == "name" {
		return r.checkIncoming(id)
	}
	if guest, devid, ok := vifNode(id, sub); ok && r.incoming[guest] != "" {
		return r.checkVif(guest, devid)
	}
	return nil
}

// vifNode says whether sub, a path below /local/domain/<dom>, is one of
// the nodes that tell a vif's addresses: the frontend's directory or its
// "backend" link (device/vif/<devid>[/backend], dom is the guest), or the
// backend's directory or its "ip" (backend/vif/<guest>/<devid>[/ip], dom
// is the backend's, 0 unless a driver domain serves the vif). libxl
// writes both ends in one transaction when it adds the vif, which during
// an incoming migration is after the memory stream and before the vif's
// hotplug script runs (libxl_create.c, domcreate_attach_devices).
func vifNode(dom int, sub string) (guest, devid int, ok bool) {
	parts := strings.Split(sub, "/")
	switch {
	case len(parts) >= 3 && len(parts) <= 4 && parts[0] == "device" && parts[1] == "vif" &&
		(len(parts) == 3 || parts[3] == "backend"):
		devid, ok = decimal(parts[2])
		return dom, devid, ok
	case len(parts) >= 4 && len(parts) <= 5 && parts[0] == "backend" && parts[1] == "vif" &&
		(len(parts) == 4 || parts[4] == "ip"):
		if guest, ok = decimal(parts[2]); !ok {
			return 0, 0, false
		}
		devid, ok = decimal(parts[3])
		return guest, devid, ok
	}
	return 0, 0, false
}

// checkVif reads the addresses of an incoming domain's vif and reports
// them when they are new: from the backend the frontend names, else from
// dom0's backend.
func (r *run) checkVif(id, devid int) error {
	backend, err := r.read(fmt.Sprintf("%s/%d/device/vif/%d/backend", domainRoot, id, devid))
	if err != nil {
		return err
	}
	if !strings.HasPrefix(backend, domainRoot+"/") {
		backend = fmt.Sprintf("%s/0/backend/vif/%d/%d", domainRoot, id, devid)
	}
	ip, err := r.read(backend + "/ip")
	if err != nil {
		return err
	}
	seen := r.vifIPs[id]
	if seen == nil {
		seen = make(map[int]string)
		r.vifIPs[id] = seen
	}
	if prev, ok := seen[devid]; ok && prev == ip {
		return nil
	}
	seen[devid] = ip
	vips := r.vifAddrs(backend, ip)
	if len(vips) == 0 {
		return nil
	}
	name := strings.TrimSuffix(r.incoming[id], suffixIncoming)
	r.w.log.Info("xenhook: incoming domain's vif", "domid", id, "name", name, "devid", devid, "ip", ip)
	r.w.h.IncomingVIPs(id, name, vips)
	return nil
}

// vifAddrs parses a vif's "ip" as vif-route and vmroam.hook read it:
// space-separated addresses, each maybe with /32 or /128. A network is no
// VIP and is skipped, as the hook skips it.
func (r *run) vifAddrs(backend, ip string) []netip.Addr {
	var out []netip.Addr
	for _, f := range strings.Fields(ip) {
		a, err := netip.ParseAddr(f)
		if p, perr := netip.ParsePrefix(f); perr == nil && p.Bits() == p.Addr().BitLen() {
			a, err = p.Addr(), nil
		}
		if err != nil || a.Zone() != "" {
			r.w.log.Warn("xenhook: not a VIP in a vif's ip", "path", backend+"/ip", "value", f)
			continue
		}
		out = append(out, a.Unmap())
	}
	return out
}

// scanVifs checks every vif an incoming domain already has: the agent may
// start, or reconnect, after libxl added them.
func (r *run) scanVifs(id int) error {
	for _, dir := range []string{
		fmt.Sprintf("%s/%d/device/vif", domainRoot, id),
		fmt.Sprintf("%s/0/backend/vif/%d", domainRoot, id),
	} {
		devids, err := r.w.c.Directory(dir)
		switch {
		case errors.Is(err, xenstore.ErrNotFound):
			continue
		case fatal(err):
			return fmt.Errorf("xenhook: %w", err)
		case err != nil:
			r.w.log.Warn("xenhook: cannot list vifs", "path", dir, "err", err)
			continue
		}
		for _, s := range devids {
			if devid, ok := decimal(s); ok {
				if err := r.checkVif(id, devid); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// scan looks at every domain's name, as after "@introduceDomain".
func (r *run) scan() error {
	ids, err := r.w.c.Directory(domainRoot)
	switch {
	case errors.Is(err, xenstore.ErrNotFound):
		ids = nil
	case fatal(err):
		return fmt.Errorf("xenhook: %w", err)
	case err != nil:
		r.w.log.Warn("xenhook: cannot list domains", "err", err)
		return nil
	}
	present := make(map[int]bool, len(ids))
	for _, s := range ids {
		id, ok := decimal(s)
		if !ok {
			continue
		}
		present[id] = true
		if err := r.checkIncoming(id); err != nil {
			return err
		}
	}
	for id := range r.incoming {
		if !present[id] {
			delete(r.incoming, id)
			delete(r.vifIPs, id)
		}
	}
	return nil
}

// checkIncoming reports a domain whose name ends in "--incoming", once per
// domain: a later domain reusing the domid is reported again.
func (r *run) checkIncoming(id int) error {
	name, err := r.read(namePath(id))
	if err != nil {
		return err
	}
	base, ok := strings.CutSuffix(name, suffixIncoming)
	if !ok || base == "" {
		delete(r.incoming, id)
		delete(r.vifIPs, id)
		return nil
	}
	if r.incoming[id] == name {
		return nil
	}
	r.incoming[id] = name
	delete(r.vifIPs, id)
	r.w.log.Info("xenhook: incoming migration", "domid", id, "name", base)
	r.w.h.Incoming(id, base)
	return r.scanVifs(id)
}

func (r *run) checkShutdown(id int) error {
	d := r.domains[id]
	if d == nil || r.w.following(id) != d.follow {
		return nil // unfollowed, maybe followed anew: reconcile starts afresh
	}
	v, err := r.read(shutdownPath(id))
	if err != nil {
		return err
	}
	prev := d.shutdown
	d.shutdown = v
	if v != "suspend" || prev == "suspend" {
		return nil
	}
	return r.suspending(id, d, "control/shutdown")
}

func (r *run) checkName(id int) error {
	d := r.domains[id]
	if d == nil || r.w.following(id) != d.follow {
		return nil // unfollowed, maybe followed anew: reconcile starts afresh
	}
	name, err := r.read(namePath(id))
	if err != nil {
		return err
	}
	prev := d.name
	d.name = name
	wasAway, away := strings.HasSuffix(prev, suffixAway), strings.HasSuffix(name, suffixAway)
	switch {
	case away && !wasAway && !d.reported:
		// No suspend request was seen: libxl asked the guest through its
		// suspend event channel, or xc_domain_shutdown for an HVM guest
		// without PV drivers, neither of which touches xenstore. The
		// rename comes late (the image is already across) but before the
		// destination may start.
		r.w.log.Warn("xenhook: suspend seen only at the rename to --migratedaway", "domid", id, "name", name)
		return r.suspending(id, d, "rename")
	case wasAway && !away && name != "":
		// Renamed back: xl resumes the domain here after a failed
		// migration. A next attempt is a new one.
		d.reported = false
	}
	return nil
}

func (r *run) suspending(id int, d *domain, via string) error {
	name := d.name
	if name == "" {
		// The shutdown watch's event can come before the name's.
		var err error
		if name, err = r.read(namePath(id)); err != nil {
			return err
		}
	}
	name = strings.TrimSuffix(name, suffixAway)
	d.reported = true
	r.w.log.Info("xenhook: domain asked to suspend", "domid", id, "name", name, "via", via)
	r.w.h.Suspending(id, name)
	return nil
}
