package migrate

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/xenhook"
)

// startDeliveryLocked runs an orderer that writes stream (then direct)
// packets to the VM and, once drained, hands the VIP back to the kernel.
// The caller holds c.mu.
//
// With abort, stream is this host's own cache, complete unless pipes
// still feed it (a delivery the VM left, spilled into it): then the
// stream closes once they have drained.
func (e *Engine) startDeliveryLocked(c *vipCtl, stream, direct *cache.Queue, abort bool) {
	c.state = stateHolding
	c.stream, c.queue, c.takeInto = stream, direct, nil
	c.stop = make(chan struct{})
	c.deliverStop = c.stop
	c.out = new(deliveryOut)
	write, prepareWriter, closeWriter := c.writer(e.links, c.out)
	o := &cache.Orderer{Stream: stream, Direct: direct, Settle: e.live().Settle, Write: write, Timeline: c.tl}
	c.orderer = o
	if c.tl != nil {
		into := cache.SeriesReceived
		if c.source { // an abort: the stream is this host's cache
			into = cache.SeriesCached
		}
		stream.Record(c.tl, into, cache.SeriesNone)
		direct.Record(c.tl, cache.SeriesHeld, cache.SeriesNone)
	}
	stop := c.stop
	if abort {
		if pipes := slices.Clone(c.pipes); len(pipes) > 0 {
			e.bg.Add(1)
			go func() {
				defer e.bg.Done()
				for _, p := range pipes {
					select {
					case <-p.o.Done():
					case <-p.stop:
					case <-stop:
						return
					}
				}
				o.Closed()
			}()
		} else {
			o.Closed()
		}
	}
	// An arrival waits for what Config.Activation names; a VM that stays
	// here (abort, a route flap) runs already and needs its carrier only.
	mode := ActivationCarrier
	if !abort {
		mode = e.live().Activation
	}
	if mode != ActivationAnnounce {
		o.SetCarrier(e.links.Carrier(c.dev))
		e.watchCarrier(c.dev, o)
	}
	if mode != ActivationCarrier {
		e.bg.Add(1)
		go e.watchAnnouncements(c, o, stop)
	}
	e.bg.Add(2)
	go func() {
		defer e.bg.Done()
		defer closeWriter() // only Run writes
		prepareWriter()
		if err := o.Run(stop); err != nil {
			e.log.Error("delivering cached packets", "vip", c.vip, "err", err)
		}
	}()
	go func() {
		defer e.bg.Done()
		e.watchDelivery(c, o, stop)
	}()
}

// watchAnnouncements opens the gate of o when the arriving VM announces
// itself on its interface (gratuitous ARP, RARP, unsolicited NA), until
// stop is closed.
func (e *Engine) watchAnnouncements(c *vipCtl, o *cache.Orderer, stop chan struct{}) {
	defer e.bg.Done()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-stop:
		case <-ctx.Done():
		}
		cancel()
	}()
	c.mu.Lock()
	dev := c.dev
	c.mu.Unlock()
	err := e.links.WatchAnnouncements(ctx, dev, func(an xenhook.Announcement) {
		if c.activate(o, an) {
			e.log.Debug("arriving VM announced itself", "vip", c.vip, "dev", dev, "kind", an.Kind, "mac", an.MAC.String(), "ip", an.IP)
		}
	})
	if err != nil {
		e.log.Debug("watching for the VM's announcements", "vip", c.vip, "dev", dev, "err", err)
	}
}

// activate opens o's gate for an arriving VM that announced itself with
// an, learning its MAC if unknown; it says whether an is the arrival's
// activation (the first sign that the VM runs).
func (c *vipCtl) activate(o *cache.Orderer, an xenhook.Announcement) (first bool) {
	c.mu.Lock()
	if len(c.mac) != 6 {
		c.mac = an.MAC
	}
	first = c.rec.Activation == "" && o.Stats().CarrierUp.IsZero()
	if first {
		c.rec.Activation = an.Kind
	}
	c.mu.Unlock()
	o.SetCarrier(true)
	return first
}

// spillLocked ends the delivery under way, if any, because its VM left
// again (suspended, gone, or claimed by another host) before it was over:
// the delivery's migration is filed with what reached the VM, and its
// orderer goes on, as a pipe, ordering what its migration still brings,
// but into a new cache, c's queue from now on, which the next host gets.
// Take feeds the pipe's direct queue meanwhile, so no packet overtakes
// one the pipe still orders. Stopping the orderer instead lost what it
// had not taken, or, with the interface gone, blocked the next handover
// for 10 s. Both locks held.
func (e *Engine) spillLocked(c *vipCtl, why string) {
	o := c.orderer
	if o == nil {
		return
	}
	into := e.newQueue()
	c.out.spill.Store(into)
	e.unwatchCarrier(c.dev, o)
	o.SetCarrier(true) // into the cache, whether or not the VM's interface is there
	o.Redirect()
	st := o.Stats()
	// What reached the VM; a write to it under way now may add one.
	st.Delivered = c.out.toVM.Load()
	c.noteDeliveredLocked(st)
	c.rec.Done = timePtr(time.Now())
	if c.source { // an abort: the stream is the cache
		e.finishLocked(c, migrationQueues{cache: o.Stream, held: o.Direct, orderer: o})
	} else {
		e.finishLocked(c, migrationQueues{stream: o.Stream, held: o.Direct, orderer: o})
	}
	c.pipes = append(c.pipes, pipe{o: o, stop: c.deliverStop})
	c.takeInto, c.queue = o.Direct, into
	if c.stop == c.deliverStop {
		c.stop = nil
	}
	c.orderer, c.deliverStop, c.out = nil, nil, nil
	c.fenceVia = netip.Addr{}
	e.log.Info("the VM left during its delivery here: what is not delivered yet goes on into the cache", "vip", c.vip, "why", why,
		"delivered", st.Delivered, "pending", o.Stream.Len()+o.Direct.Len())
}

// stopPipesLocked stops c's spilled deliveries: c ends. c.mu held.
func (e *Engine) stopPipesLocked(c *vipCtl) {
	for _, p := range c.pipes {
		select {
		case <-p.stop:
		default:
			close(p.stop)
		}
	}
	c.pipes, c.takeInto = nil, nil
}

// waitPipes waits, up to wait, until c's spilled deliveries have written
// into the cache all their migrations brought, or stop closes.
func (c *vipCtl) waitPipes(stop <-chan struct{}, wait time.Duration) {
	c.mu.Lock()
	pipes := slices.Clone(c.pipes)
	c.mu.Unlock()
	deadline := time.Now().Add(wait)
	for _, p := range pipes {
		select {
		case <-p.o.Done():
		case <-p.stop:
			continue
		case <-stop:
			return
		case <-time.After(time.Until(deadline)):
			return
		}
		for !p.o.Idle() && time.Now().Before(deadline) {
			time.Sleep(100 * time.Microsecond)
		}
	}
}

// noteDeliveredLocked files in c's record what its delivery did. c.mu
// held.
func (c *vipCtl) noteDeliveredLocked(st cache.OrdererStats) {
	c.rec.Delivered, c.rec.Late = st.Delivered, st.Late
	if !st.FirstDelivery.IsZero() {
		c.rec.FirstDelivery = timePtr(st.FirstDelivery)
	}
	if !st.CarrierUp.IsZero() {
		c.rec.CarrierUp = timePtr(st.CarrierUp)
		if c.rec.Activation == "" {
			c.rec.Activation = "carrier"
		}
	}
	if c.queue != nil {
		qs := c.queue.Stats()
		c.rec.Held = qs.Packets
		c.rec.Dropped = dropMap(qs, c.stream)
		if c.source && c.stream != nil { // an abort: the stream is the cache
			ss := c.stream.Stats()
			c.rec.Cached, c.rec.CachedBytes = ss.Packets, ss.Bytes
		}
	}
}

// interfaceGone says whether err, from writing to the VM behind dev,
// means that the VM left: the interface is gone or has no carrier
// (ENODEV, ENXIO, ENETDOWN, or no such link at the socket's opening).
func interfaceGone(links Links, dev string, err error) bool {
	return err != nil && !links.Carrier(dev)
}

// deliveryOut is where a delivery's writes go: to the VM, counted, until
// spill is set (spillLocked), then into that cache.
type deliveryOut struct {
	spill atomic.Pointer[cache.Queue]
	toVM  atomic.Uint64 // packets written to the VM
}

// leftDuringDelivery tells c's state machine that the VM's interface went
// while the delivery writing to out ran, and says whether that delivery
// now spills. Without the agent's lock (the orderer's goroutine).
func (e *Engine) leftDuringDelivery(c *vipCtl, out *deliveryOut) bool {
	e.host.Lock()
	c.mu.Lock()
	current := c.out == out
	c.mu.Unlock()
	if current {
		e.onLocked(c, evCarrierLost, "interface gone during the delivery")
	}
	e.host.Unlock()
	return out.spill.Load() != nil
}

// writer returns the delivery function; prepare, which opens the packet
// socket ahead of the first packet if the VM's interface is there (else
// the first write opens it); and closeWriter, to call once no write can
// come. All three are for the orderer's goroutine only. Once out.spill is
// set, writes go there instead (spillLocked); a write that finds the
// interface gone spills, rather than fail and lose the delivery's rest.
func (c *vipCtl) writer(links Links, out *deliveryOut) (write func([]byte) error, prepare, closeWriter func()) {
	spill := func(q *cache.Queue, pkt []byte) {
		if reason := q.Push(pkt, time.Now()); reason != "" {
			c.e.dropOnce(c, reason)
		}
	}
	var d Delivery
	var mac net.HardwareAddr // the VM's, once known
	open := func() error {
		if d != nil {
			return nil
		}
		c.mu.Lock()
		dev := c.dev
		c.mu.Unlock()
		opened, err := links.OpenDelivery(dev)
		if err != nil {
			return err
		}
		d = opened
		if mac != nil {
			return d.SetMAC(mac)
		}
		return nil
	}
	closeWriter = func() {
		if d != nil {
			d.Close()
			d = nil
		}
	}
	prepare = func() { open() }
	var toVM func(pkt []byte) error
	write = func(pkt []byte) error {
		if q := out.spill.Load(); q != nil {
			spill(q, pkt)
			return nil
		}
		err := toVM(pkt)
		if err == nil {
			out.toVM.Add(1)
			return nil
		}
		c.mu.Lock()
		dev := c.dev
		c.mu.Unlock()
		if interfaceGone(links, dev, err) && c.e.leftDuringDelivery(c, out) {
			spill(out.spill.Load(), pkt)
			return nil
		}
		return err
	}
	toVM = func(pkt []byte) error {
		if err := open(); err != nil {
			return err
		}
		if mac == nil {
			c.mu.Lock()
			dev, m := c.dev, c.mac
			c.mu.Unlock()
			if len(m) != 6 {
				learnt, ok := links.NeighborMAC(dev, c.vip)
				switch {
				case ok:
					m = learnt
				case c.vip.Is4():
					var err error
					if m, err = links.ResolveMAC(dev, c.vip, AnycastGateway, time.Second); err != nil {
						return err
					}
				default:
					return fmt.Errorf("no MAC known for %s on %s", c.vip, dev)
				}
			}
			if err := d.SetMAC(m); err != nil {
				return err
			}
			mac = m
		}
		err := d.Write(pkt)
		if errors.Is(err, unix.ENXIO) || errors.Is(err, unix.ENODEV) {
			// The interface was made anew since the socket opened (a
			// vif that flapped): open on the new one.
			closeWriter()
			if err := open(); err != nil {
				return err
			}
			err = d.Write(pkt)
		}
		return err
	}
	return write, prepare, closeWriter
}

// watchDelivery waits until the orderer drained what the migration brought,
// then routes the VIP to the VM directly, and stops the orderer after a
// grace period for packets that were already on their way to the cache.
func (e *Engine) watchDelivery(c *vipCtl, o *cache.Orderer, stop chan struct{}) {
	select {
	case <-stop:
		return
	case <-o.Done():
	}
	c.mu.Lock()
	spilled := c.orderer != o
	c.mu.Unlock()
	if spilled { // the VM left: the pipe is the next migration's
		return
	}
	t0 := time.Now()
	waited, quiet, steps := e.fence(c, o)
	fenced := time.Since(t0)
	e.host.Lock()
	c.mu.Lock()
	if c.orderer != o { // spilled during the fence
		c.mu.Unlock()
		e.host.Unlock()
		e.host.Reconcile()
		return
	}
	st := o.Stats()
	c.noteDeliveredLocked(st)
	c.stepLocked(evDrained)
	c.fenceVia = netip.Addr{}
	c.drained = st.Delivered
	c.mu.Unlock()
	e.host.Unlock()
	e.host.Reconcile()
	select {
	case <-stop:
	case <-time.After(300 * time.Millisecond):
	}
	e.host.Lock()
	c.mu.Lock()
	var after uint64
	if c.orderer == o { // else the VM left again (spillLocked)
		after = e.endDeliveryLocked(c)
	}
	c.mu.Unlock()
	e.host.Unlock()
	// Packets the cache still delivered after the hand-back were routed
	// to it before, yet went out after newer ones the kernel sent: each
	// is likely out of order at the VM.
	lv := slog.LevelInfo
	if after > 0 || !quiet {
		lv = slog.LevelWarn
	}
	e.log.Log(context.Background(), lv, "migration delivered", "vip", c.vip, "delivered", st.Delivered,
		"hand_back", fenced, "fence_wait", waited, "fence_steps", steps, "cache_quiet", quiet, "delivered_after_hand_back", after)
}

// endDeliveryLocked stops c's delivery, which has drained what the
// migration brought, gives c a new standby queue, and files the
// migration; it returns how many packets it delivered after the
// hand-back. Both locks held.
func (e *Engine) endDeliveryLocked(c *vipCtl) (after uint64) {
	o := c.orderer
	e.unwatchCarrier(c.dev, o)
	select {
	case <-c.deliverStop:
	default:
		close(c.deliverStop)
	}
	if c.stop == c.deliverStop {
		c.stop = nil
	}
	c.orderer, c.deliverStop, c.out = nil, nil, nil
	c.queue = e.newQueue()
	e.stopPipesLocked(c) // an abort's: drained into the stream before it closed
	after = o.Stats().Delivered - c.drained
	c.rec.Delivered += after // as the timeline counts them
	c.rec.Done = timePtr(time.Now())
	if c.source { // an abort: the stream is the cache
		e.finishLocked(c, migrationQueues{cache: o.Stream, held: o.Direct, orderer: o})
	} else {
		e.finishLocked(c, migrationQueues{stream: o.Stream, held: o.Direct, orderer: o})
	}
	return after
}

// finishLocked files the migration record, and its totals from the queues
// it used in the metrics. Both locks held.
func (e *Engine) finishLocked(c *vipCtl, q migrationQueues) {
	if c.rec.VIP == "" {
		return
	}
	e.cfg.Metrics.MigrationEnded(c.totalsLocked(q))
	e.keepTimelineLocked(c)
	e.history = append(e.history, c.rec)
	if len(e.history) > 100 {
		e.history = e.history[len(e.history)-100:]
	}
	c.rec = control.Migration{}
	c.flush = cache.FlushStats{}
}
