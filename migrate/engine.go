package migrate

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/wgagent/metrics"
	"github.com/vmroam/vmroam/wgagent/route"
	"github.com/vmroam/vmroam/xenhook"
)

// Host is the agent as the engine sees it. Its Locker is the agent's lock,
// which also guards the engine's tables (see the package doc). Methods
// marked "agent lock held" are called only with it held, the others only
// without; none may call back into the engine.
type Host interface {
	sync.Locker

	// Attachment returns what the agent keeps of vip attached here.
	// Agent lock held.
	Attachment(vip netip.Addr) (Attachment, bool)
	// Disown gives up this host's claim on vip: to the claimer's record
	// to (a handover: drop the attachment, assert to), or, if to names
	// no owner, to nobody (release it). Agent lock held.
	Disown(vip netip.Addr, to gossip.Record)
	// Claim claims vip for this host at the next epoch and returns the
	// new record. Agent lock held.
	Claim(vip netip.Addr) gossip.Record

	// Tell sends r straight to the member called to, ahead of gossip.
	Tell(to string, r gossip.Record) error
	// Record returns the gossip table's record of vip.
	Record(vip netip.Addr) (gossip.Record, bool)
	// Member returns the overlay address of the member called name, and
	// whether it is alive with readable metadata.
	Member(name string) (overlay netip.Addr, alive bool)
	// Peer returns the name of the WireGuard peer whose overlay address
	// is addr, "" if none.
	Peer(addr netip.Addr) string
	// Dial makes one attempt to connect to member's handover port and
	// returns the connection with its round trip; ErrNotAlive if member
	// is not an alive member.
	Dial(ctx context.Context, member string, timeout time.Duration) (net.Conn, time.Duration, error)
	// TunnelState describes this host's WireGuard peer for member, for a
	// log line.
	TunnelState(member string) string

	// AddRoute adds r to the kernel now, ahead of the next reconcile.
	AddRoute(r route.Route) error
	// Reconcile brings the kernel's routes and peers to what the records
	// and the engine want (RoutesLocked), now.
	Reconcile()
	// ReconcileFor reconciles unless a reconcile that started after t
	// has done so already.
	ReconcileFor(t time.Time)
	// Kick asks for a reconcile soon; it must not block.
	Kick()
	// HoldTunnelWrites holds the tunnel's writes to local interfaces
	// until release is called (embedded wireguard-go only; else a no-op).
	HoldTunnelWrites() (release func())
}

// ErrNotAlive is Host.Dial's error for a member that is not alive.
var ErrNotAlive = errors.New("not an alive member")

// Attachment is what the agent keeps of a VIP attached here.
type Attachment struct {
	Epoch uint64
	MAC   net.HardwareAddr // the VM's, as last learnt; nil if unknown
}

// Device is the cache device (cache.Interceptor): the TUN interface that
// diverted VIPs route to.
type Device interface {
	Name() string
	// Attach gives s the packets the device reads for vip.
	Attach(vip netip.Addr, s cache.Sink)
	// Detach takes them away again, if s still has them.
	Detach(vip netip.Addr, s cache.Sink)
	// Barrier returns once the device has handed its sinks every packet
	// routed to it before the call.
	Barrier(timeout time.Duration) error
}

// Metrics is where a migration's start and end are counted.
type Metrics interface {
	MigrationStarted(role string)
	MigrationEnded(m metrics.Migration)
}

type noMetrics struct{}

func (noMetrics) MigrationStarted(string)          {}
func (noMetrics) MigrationEnded(metrics.Migration) {}

// Activation is what tells the new host that an arriving VM runs.
type Activation string

const (
	ActivationCarrier Activation = "carrier" // carrier on its interface
	// ActivationAnnounce: a gratuitous ARP, RARP or unsolicited neighbour
	// advertisement from the VM; for interfaces with carrier before the
	// VM runs.
	ActivationAnnounce Activation = "announce"
	ActivationAny      Activation = "any" // whichever comes first
)

// Valid says whether a is one of the activations above.
func (a Activation) Valid() bool {
	return a == ActivationCarrier || a == ActivationAnnounce || a == ActivationAny
}

// Tunables are the settings a reload may change while migrations run;
// each use reads them anew.
type Tunables struct {
	Limits     cache.Limits  // of each queue
	Settle     time.Duration // the least a flow waits for the stream
	Linger     time.Duration // how long the old host forwards stragglers
	Activation Activation
}

// DefaultTunables are the tunables of the agent's defaults.
func DefaultTunables() Tunables {
	return Tunables{Limits: cache.DefaultLimits(), Settle: 2 * time.Millisecond, Linger: 2 * time.Second, Activation: ActivationAny}
}

// Config configures an Engine.
type Config struct {
	// Name is this host's member name.
	Name string
	// Host, Device, Links and Metrics are what the engine drives. A nil
	// Device turns the cache off: no VIP is ever cached, held or
	// delivered here.
	Host    Host
	Device  Device
	Links   Links
	Metrics Metrics
	// Budget bounds all queues together; nil: no global bound.
	Budget *cache.Budget
	// Tunables returns the live tunables; nil: DefaultTunables.
	Tunables func() Tunables
	Logger   *slog.Logger
}

// Engine runs the migrations of the VIPs on this host.
type Engine struct {
	cfg   Config
	host  Host
	dev   Device
	links Links
	log   *slog.Logger
	bg    sync.WaitGroup // goroutines of migrations

	// Guarded by the agent's lock (Host).
	ctls    map[netip.Addr]*vipCtl
	history []control.Migration
	// timelines of the last control.MaxTimelines migrations in history.
	timelines []keptTimeline
	// cachingBegan is closed, and forgotten, when a VIP starts caching:
	// it wakes the offers of prepared connections (offer.go).
	cachingBegan chan struct{}

	standbyMu   sync.Mutex
	standbyHits map[netip.Addr]bool

	carrierMu    sync.Mutex
	carrierWatch map[string]*cache.Orderer

	// Handover connections opened by Prepare, by VIP; see prepare.go.
	prepMu   sync.Mutex
	prepared map[netip.Addr]*preparedConn
	// Connections accepted on the handover port that have not yet sent
	// their request, by remote address; guarded by prepMu.
	idleHandovers map[netip.Addr]int
	// The accepted connections still waiting for their request, closed
	// when the engine stops; guarded by prepMu.
	waiting map[net.Conn]bool
	closing bool

	handoverRefused atomic.Uint64
	handoverLogged  atomic.Int64 // unix nanoseconds of the last refusal logged
}

// New returns an engine with no VIP.
func New(cfg Config) *Engine {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Tunables == nil {
		cfg.Tunables = DefaultTunables
	}
	if cfg.Links == nil {
		cfg.Links = KernelLinks{}
	}
	if cfg.Metrics == nil {
		cfg.Metrics = noMetrics{}
	}
	return &Engine{
		cfg: cfg, host: cfg.Host, dev: cfg.Device, links: cfg.Links, log: cfg.Logger,
		ctls:         map[netip.Addr]*vipCtl{},
		standbyHits:  map[netip.Addr]bool{},
		carrierWatch: map[string]*cache.Orderer{},
	}
}

// Enabled says whether the cache is on.
func (e *Engine) Enabled() bool { return e.dev != nil }

func (e *Engine) live() Tunables { return e.cfg.Tunables() }

// Close stops every migration and waits for their goroutines. The agent
// closes its handover listener first (Serve returns), then calls Close
// without its lock.
func (e *Engine) Close() {
	e.expirePrepared(true)
	e.closeIdleHandovers()
	e.host.Lock()
	for _, c := range e.ctls {
		c.mu.Lock()
		if c.stop != nil {
			close(c.stop)
			c.stop = nil
		}
		e.stopPipesLocked(c)
		c.mu.Unlock()
	}
	e.host.Unlock()
	e.bg.Wait()
}

// HasLocked says whether vip has a controller here: it is attached here
// with the cache on, or moving through here. Agent lock held.
func (e *Engine) HasLocked(vip netip.Addr) bool { return e.ctls[vip] != nil }

// StateLocked returns vip's state here and its VM's interface; stateNone
// (control's "") if it has no controller. Agent lock held.
func (e *Engine) StateLocked(vip netip.Addr) (control.VIPState, string) {
	c := e.ctls[vip]
	if c == nil {
		return "", ""
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state.status(), c.dev
}

// SetDevLocked records that vip's VM is behind dev now. Agent lock held.
func (e *Engine) SetDevLocked(vip netip.Addr, dev string) {
	if c := e.ctls[vip]; c != nil {
		c.mu.Lock()
		c.dev = dev
		c.mu.Unlock()
	}
}

// ReattachLocked handles `vip attach` of a VIP attached here already: a
// repeated hook changes nothing; a VM caught in a suspend is back where
// it was and gets its packets. Agent lock held.
func (e *Engine) ReattachLocked(vip netip.Addr) {
	if c := e.ctls[vip]; c != nil {
		e.onLocked(c, evReattach, "attached again on this host")
	}
}

// ForgetIfLocalLocked forgets vip's controller if its VM runs here (no
// migration under way) and says whether it did: a double start this host
// lost, whose VIP must be dropped rather than cached for a handover
// nobody will ask for. Agent lock held.
func (e *Engine) ForgetIfLocalLocked(vip netip.Addr) bool {
	c := e.ctls[vip]
	if c == nil {
		return false
	}
	c.mu.Lock()
	local := c.state == stateLocal
	c.mu.Unlock()
	if local {
		e.forgetCtlLocked(c)
	}
	return local
}

// HoldingDevsLocked returns the interfaces of the VIPs held for an
// arriving VM, by VIP. Agent lock held.
func (e *Engine) HoldingDevsLocked() map[netip.Addr]string {
	out := map[netip.Addr]string{}
	for vip, c := range e.ctls {
		c.mu.Lock()
		if c.state == stateHolding {
			out[vip] = c.dev
		}
		c.mu.Unlock()
	}
	return out
}

// RoutesLocked returns the routes of the VIPs the engine diverts: to the
// cache device, or through a fence gateway to the VM during the
// hand-back. A VIP not in diverted routes as its record says. Agent lock
// held.
func (e *Engine) RoutesLocked() (routes []route.Route, diverted map[netip.Addr]bool) {
	diverted = map[netip.Addr]bool{}
	for vip, c := range e.ctls {
		c.mu.Lock()
		switch {
		case c.state == stateLocal || c.undiverted:
		case c.fenceVia.IsValid():
			diverted[vip] = true
			routes = append(routes, route.Route{Dst: hostPrefix(vip), Dev: c.dev, Via: c.fenceVia, Metric: divertMetric(vip)})
		default:
			diverted[vip] = true
			routes = append(routes, route.Route{Dst: hostPrefix(vip), Dev: e.dev.Name(), Metric: divertMetric(vip)})
		}
		c.mu.Unlock()
	}
	return routes, diverted
}

// Activate tells the delivery of an arriving vip that its VM announced
// itself with an (the announcement that made the agent claim it).
func (e *Engine) Activate(vip netip.Addr, an xenhook.Announcement) {
	e.host.Lock()
	c := e.ctls[vip]
	e.host.Unlock()
	if c == nil {
		return
	}
	c.mu.Lock()
	o := c.orderer
	c.mu.Unlock()
	if o != nil {
		c.activate(o, an)
	}
}

// CarrierChanged tells a delivery waiting on dev's carrier that it
// changed: the link watcher calls it as the change comes, since the
// handover time is measured from that moment.
func (e *Engine) CarrierChanged(dev string, up bool) {
	e.carrierMu.Lock()
	o := e.carrierWatch[dev]
	e.carrierMu.Unlock()
	if o != nil {
		o.SetCarrier(up)
	}
}

// Refused is the number of handover connections refused because they
// did not come from a WireGuard peer's overlay address.
func (e *Engine) Refused() uint64 { return e.handoverRefused.Load() }

// Route metrics of the cache device: the standby route of a local VIP is
// worse than the VM's own route, so the kernel fails over to the cache by
// itself the instant the VM's interface vanishes; the diversion route beats
// every VM route (the agent's, MetricLocal, and Xen's vif-route, metric 2).
const (
	MetricDivert  = 0
	MetricLocal   = 1 // the agent's route of a local VIP to its VM
	MetricStandby = 100
)

// divertMetric is MetricDivert for vip's family. IPv6 has no metric 0: the
// kernel stores 0 as 1024, which every VM route and the standby route
// beat, so IPv6 VIPs were never diverted while Xen's route (metric 2) was
// there, and their packets went on to the paused or the resuming VM (15,000
// datagrams out of order in 5 moves onto the client's host). There the
// diversion takes metric 1, that of this host's own VIP route: the two are
// never wanted at once, and a move between them is one replace.
func divertMetric(vip netip.Addr) int {
	if vip.Is6() {
		return MetricLocal
	}
	return MetricDivert
}

func hostPrefix(a netip.Addr) netip.Prefix { return netip.PrefixFrom(a, a.BitLen()) }

func timePtr(t time.Time) *time.Time { return &t }
