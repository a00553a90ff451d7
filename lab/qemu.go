package lab

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// QEMU guests. A Guest is a real VM: qemu-system-x86_64 in a host
// namespace, booting the kernel and initramfs of scripts/make-guest.sh,
// its virtio-net NIC on a tap in that namespace that the host configures as
// it does a vif (plugVif). QMP on a unix socket controls it; live migration
// goes over the underlay to a QEMU started with -incoming on another host.

// MigratePort is the TCP port a destination QEMU listens on, on its host's
// underlay address.
const MigratePort = 4444

// guestRmem is the guest's net.core.rmem_default: a socket queue long
// enough (tens of thousands of small datagrams) that iperf3 in a TCG guest
// on a busy machine catches up instead of losing.
const guestRmem = 16 << 20

// guestMemMB is the guest's RAM: enough for the kernel, busybox and iperf3,
// small enough to migrate in under a second (TestQEMUGuestMigrate logs
// QEMU's total-time: 616 and 843 ms in two runs, TCG on 2 shared cores).
const guestMemMB = 192

// tapQueueLen is the length of each tap's queue to QEMU, in packets.
const tapQueueLen = 10000

// GuestImage is a kernel and initramfs made by scripts/make-guest.sh.
type GuestImage struct {
	Dir    string // the cache directory holding both
	Kernel string // Dir/vmlinuz
	Initrd string // Dir/initrd.img
}

// RequireQEMU returns nil when qemu-system-x86_64 is installed, else an
// error saying so; tests turn it into t.Skip.
func RequireQEMU() error {
	if _, err := exec.LookPath("qemu-system-x86_64"); err != nil {
		return fmt.Errorf("lab: qemu-system-x86_64 not found (Debian package qemu-system-x86; make deps): %w", err)
	}
	return nil
}

// BuildGuestImage runs script (scripts/make-guest.sh) with --cache cache
// ("" = the script's default, /var/cache/vmroam-lab/guest) and returns the
// image whose directory it printed. A cached build only asks apt and dpkg
// for versions (TestQEMUGuestMigrate logs its time: 2.0 and 3.8 s in two
// runs on a busy 2-core machine).
func BuildGuestImage(ctx context.Context, script, cache string) (GuestImage, error) {
	args := []string{script}
	if cache != "" {
		args = append(args, "--cache", cache)
	}
	cmd := exec.CommandContext(ctx, "bash", args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return GuestImage{}, fmt.Errorf("lab: %s: %w: %s", script, err, strings.TrimSpace(stderr.String()))
	}
	dir := strings.TrimSpace(string(out))
	if i := strings.LastIndexByte(dir, '\n'); i >= 0 {
		dir = dir[i+1:]
	}
	img := GuestImage{Dir: dir, Kernel: filepath.Join(dir, "vmlinuz"), Initrd: filepath.Join(dir, "initrd.img")}
	for _, f := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return GuestImage{}, fmt.Errorf("lab: %s printed %q: %w", script, dir, err)
		}
	}
	return img, nil
}

// Accel is QEMU's accelerator here: "kvm" when /dev/kvm exists and the CPU
// shows vmx or svm, else "tcg". A paravirtual /dev/kvm without those flags
// starts QEMU but hangs a stock kernel early, so it does not count.
func Accel() string {
	if _, err := os.Stat("/dev/kvm"); err != nil {
		return "tcg"
	}
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "tcg"
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "flags") {
			continue
		}
		for _, f := range strings.Fields(line) {
			if f == "vmx" || f == "svm" {
				return "kvm"
			}
		}
		break
	}
	return "tcg"
}

// Guest is a QEMU VM with one IPv4 VIP. Host is where it runs. Its methods
// must not be called concurrently, except IperfUDP, which may run while
// the guest migrates.
type Guest struct {
	Name   string
	VIP    netip.Addr
	MAC    net.HardwareAddr // the guest's NIC
	TapMAC net.HardwareAddr // the host side, as libvirt sets it: the NIC's with fe as first byte
	Tap    string           // its tap's name on every host, the lab's vif naming
	Host   *Host            // the host that runs it now

	l    *Lab
	img  GuestImage
	vm   *VM   // Name, Vif = Tap, Host, VIPs: what plugVif needs
	cur  *qemu // the running QEMU
	next *qemu // the destination made by Incoming, until Migrate
	// retired sums the final counters of the taps of the hosts the guest
	// left, so that Counters' Tap grows across migrations as the guest's do.
	retired IfStats
}

// qemu is one QEMU process of a guest.
type qemu struct {
	host    *Host
	p       *proc
	q       *qmp
	console string // its serial console, written to a file
}

// StartGuest boots guest name on h: a tap (MTU 1420, MAC TapMAC) in h's
// namespace configured as Xen's vif-route does a vif, and QEMU attached to
// it, controlled over QMP. It returns once the guest's init has printed
// "vmroam-guest: ready" on the console (up to 90 s). The lab's Close stops
// the QEMU processes; the taps go with the namespaces.
func (l *Lab) StartGuest(img GuestImage, name string, h *Host, vip netip.Addr) (*Guest, error) {
	if err := RequireQEMU(); err != nil {
		return nil, err
	}
	if !vmNameRE.MatchString(name) {
		return nil, fmt.Errorf("lab: StartGuest: bad name %q (want [a-z0-9-], up to 31 chars)", name)
	}
	if !vip.Is4() {
		return nil, fmt.Errorf("lab: StartGuest %s: VIP must be IPv4, got %v", name, vip)
	}
	if err := l.ownHost(h); err != nil {
		return nil, err
	}
	tap := "vr" + l.ID + "v" + name
	tap = tap[:min(len(tap), 15)]
	if o := l.VM(name); o != nil || l.vmWithVif(tap) != nil {
		return nil, fmt.Errorf("lab: StartGuest %s: name or tap %s clashes with a VM", name, tap)
	}
	sum := sha256.Sum256([]byte(l.ID + "/" + name))
	g := &Guest{
		Name:   name,
		VIP:    vip,
		MAC:    net.HardwareAddr{0x52, 0x54, 0x00, sum[0], sum[1], sum[2]},
		TapMAC: net.HardwareAddr{0xfe, 0x54, 0x00, sum[0], sum[1], sum[2]},
		Tap:    tap,
		Host:   h,
		l:      l,
		img:    img,
	}
	g.vm = &VM{Name: name, Vif: tap, Host: h, VIPs: []netip.Addr{vip}}
	q, err := g.startQEMU(h, "")
	if err != nil {
		return nil, err
	}
	g.cur = q
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	start := time.Now()
	if err := q.waitConsole(ctx, "vmroam-guest: ready"); err != nil {
		g.Stop()
		return nil, err
	}
	l.logf("lab %s: guest %s (%s, %s) up on %s in %v (tap %s)", l.ID, name, vip, Accel(), h.Name,
		time.Since(start).Round(time.Millisecond), tap)
	return g, nil
}

func (l *Lab) vmWithVif(vif string) *VM {
	for _, vm := range l.VMs() {
		if vm.Vif == vif {
			return vm
		}
	}
	return nil
}

// startQEMU makes the tap on h, plugs it as a vif and starts QEMU there;
// with incoming non-empty, QEMU waits for a migration on it.
func (g *Guest) startQEMU(h *Host, incoming string) (*qemu, error) {
	l := g.l
	mtu := strconv.Itoa(VifMTU)
	for _, s := range [][]string{
		{"tuntap", "add", "dev", g.Tap, "mode", "tap"},
		// A long queue to QEMU rides out the moments a TCG guest on a busy
		// machine falls behind (tun's default is 500 packets).
		{"link", "set", g.Tap, "address", g.TapMAC.String(), "mtu", mtu, "txqueuelen", strconv.Itoa(tapQueueLen)},
	} {
		if err := l.ip(h.NS, s...); err != nil {
			g.delTap(h)
			return nil, err
		}
	}
	vm := *g.vm
	vm.Host = h
	if err := l.plugVif(&vm, h); err != nil {
		g.delTap(h)
		return nil, err
	}
	sock := filepath.Join(l.Dir, "qmp-"+g.Name+"-"+h.Name+".sock")
	if len(sock) > 107 {
		g.delTap(h)
		return nil, fmt.Errorf("lab: QMP socket path %q longer than 107 bytes; use a shorter Dir", sock)
	}
	_ = os.Remove(sock)
	console := filepath.Join(l.Dir, "console-"+g.Name+"-"+h.Name+".log")
	_ = os.Remove(console)
	args := []string{"qemu-system-x86_64",
		"-name", "guest=" + g.Name,
		"-accel", Accel(),
		"-machine", "pc",
		"-m", strconv.Itoa(guestMemMB), "-smp", "1",
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-serial", "file:" + console,
		"-qmp", "unix:" + sock + ",server=on,wait=off",
		"-kernel", g.img.Kernel, "-initrd", g.img.Initrd,
		"-append", "console=ttyS0 quiet panic=-1 vmroam.ip=" + g.VIP.String() + " vmroam.gw=" + GatewayV4.String() +
			" vmroam.rmem=" + strconv.Itoa(guestRmem),
		"-netdev", "tap,id=n0,ifname=" + g.Tap + ",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,romfile=,mac=" + g.MAC.String() + ",host_mtu=" + mtu + ",rx_queue_size=1024",
	}
	if incoming != "" {
		args = append(args, "-incoming", incoming)
	}
	logPath := filepath.Join(l.Dir, "qemu-"+g.Name+"-"+h.Name+".log")
	p, err := l.startProc("qemu "+g.Name+" on "+h.Name, h.NS, logPath, nil, args...)
	if err != nil {
		g.delTap(h)
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	go func() {
		select {
		case <-p.done: // QEMU died: stop waiting for its socket
			cancel()
		case <-ctx.Done():
		}
	}()
	q, err := dialQMP(ctx, sock)
	if err != nil {
		p.kill()
		g.delTap(h)
		return nil, fmt.Errorf("%w; QEMU log: %s", err, logTail(logPath, 10))
	}
	return &qemu{host: h, p: p, q: q, console: console}, nil
}

func (g *Guest) delTap(h *Host) {
	if err := g.l.ip(h.NS, "link", "del", g.Tap); err != nil && !isGone(err) {
		g.l.logf("lab %s: guest %s: %v", g.l.ID, g.Name, err)
	}
}

// waitConsole waits until the console file has a line containing s, or
// QEMU exits, or ctx ends.
func (q *qemu) waitConsole(ctx context.Context, s string) error {
	for {
		b, _ := os.ReadFile(q.console)
		if bytes.Contains(b, []byte(s)) {
			return nil
		}
		if q.p.exited() {
			return fmt.Errorf("lab: QEMU on %s exited (%v) before %q; console: %s", q.host.Name, q.p.err, s, logTail(q.console, 10))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("lab: QEMU on %s: no %q on the console: %w; console: %s", q.host.Name, s, ctx.Err(), logTail(q.console, 10))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// stop quits QEMU over QMP (SIGTERM, then SIGKILL, if that fails) and
// deletes its tap.
func (q *qemu) stop(g *Guest) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	_, _ = q.q.cmd(ctx, "quit", nil)
	cancel()
	select {
	case <-q.p.done:
	case <-time.After(5 * time.Second):
		if err := q.p.stop(5 * time.Second); err != nil {
			g.l.logf("lab %s: guest %s: %v", g.l.ID, g.Name, err)
		}
	}
	q.q.close()
	g.delTap(q.host)
}

// Incoming starts the destination of a migration on host to: a tap of the
// same name and MAC, plugged as a vif (as Xen's hotplug does for the new
// domain before the old one suspends), and QEMU with
// -incoming tcp:<to's underlay>:MigratePort. Migrate moves the guest there.
func (g *Guest) Incoming(to *Host) error {
	if err := g.l.ownHost(to); err != nil {
		return err
	}
	if g.cur == nil {
		return fmt.Errorf("lab: guest %s: Incoming: not running", g.Name)
	}
	if g.next != nil || to == g.Host {
		return fmt.Errorf("lab: guest %s: Incoming on %s: already there or pending", g.Name, to.Name)
	}
	uri := "tcp:" + netip.AddrPortFrom(to.Underlay, MigratePort).String()
	q, err := g.startQEMU(to, uri)
	if err != nil {
		return err
	}
	g.next = q
	g.l.logf("lab %s: guest %s: incoming QEMU on %s at %s", g.l.ID, g.Name, to.Name, uri)
	return nil
}

// Migration is what one live migration took, as QEMU reports it.
type Migration struct {
	Total    time.Duration // query-migrate total-time
	Downtime time.Duration // query-migrate downtime: the guest was paused this long
	Setup    time.Duration // query-migrate setup-time
	RAMBytes int64         // RAM transferred
	Stop     time.Time     // the source's STOP event
	Resume   time.Time     // the destination's RESUME event
}

// Paused is the time from the source's STOP to the destination's RESUME,
// by QEMU's own event timestamps (both on this machine's clock).
func (m Migration) Paused() time.Duration { return m.Resume.Sub(m.Stop) }

// Migrate live-migrates the guest to the QEMU Incoming started, waits until
// QEMU says completed and the destination has resumed, then quits the
// source QEMU and deletes its tap (the old domain is destroyed), and sets
// Host. On a failure before QEMU says completed, the migration is
// cancelled, the guest keeps running where it was and the destination is
// stopped. After completed, the destination is the only copy of the guest:
// a later failure (no STOP or RESUME event) still moves the guest there,
// and Migrate returns the error.
func (g *Guest) Migrate(ctx context.Context) (Migration, error) {
	src, dst := g.cur, g.next
	if src == nil || dst == nil {
		return Migration{}, fmt.Errorf("lab: guest %s: Migrate without Incoming", g.Name)
	}
	wrap := func(err error) error {
		return fmt.Errorf("lab: guest %s: migrate %s -> %s: %w", g.Name, src.host.Name, dst.host.Name, err)
	}
	// fail undoes a migration that has not completed: the source runs on.
	fail := func(err error) (Migration, error) {
		if g.cancelMigration(src) == migCompleted {
			g.moved(src, dst)
			return Migration{}, wrap(fmt.Errorf("%w (it completed while being cancelled: the guest is on %s)", err, dst.host.Name))
		}
		g.next = nil
		dst.stop(g)
		return Migration{}, wrap(err)
	}
	for _, c := range []struct {
		name string
		args any
	}{
		{"migrate-set-capabilities", map[string]any{"capabilities": []map[string]any{{"capability": "events", "state": true}}}},
		// QEMU's default cap is 32 MiB/s (7.2), too slow for a lab on one machine.
		{"migrate-set-parameters", map[string]any{"max-bandwidth": int64(1) << 30}},
	} {
		if _, err := src.q.cmd(ctx, c.name, c.args); err != nil {
			return fail(err)
		}
	}
	start := time.Now().Add(-time.Second) // QEMU's timestamps are second/µs: allow skew
	uri := "tcp:" + netip.AddrPortFrom(dst.host.Underlay, MigratePort).String()
	if _, err := src.q.cmd(ctx, "migrate", map[string]any{"uri": uri}); err != nil {
		return fail(err)
	}
	var info migInfo
	// QEMU 7.2 says "completed" a moment before it has filled in the times.
	var completed time.Time
poll:
	for {
		i, err := queryMigrate(ctx, src)
		if err != nil {
			if !completed.IsZero() {
				break // completed: only the times are missing
			}
			return fail(err)
		}
		info = i
		switch info.Status {
		case migCompleted:
			if completed.IsZero() {
				completed = time.Now()
			}
			if info.TotalTime > 0 || time.Since(completed) > time.Second {
				break poll
			}
		case migFailed, migCancelled:
			return fail(fmt.Errorf("status %s: %s", info.Status, info.ErrorDesc))
		}
		select {
		case <-ctx.Done():
			if !completed.IsZero() {
				break poll
			}
			return fail(ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	// From here on the destination is the only copy of the guest.
	stop, err := src.q.waitEvent(ctx, "STOP", start)
	if err != nil {
		g.moved(src, dst)
		return Migration{}, wrap(err)
	}
	resume, err := dst.q.waitEvent(ctx, "RESUME", start)
	if err != nil {
		g.moved(src, dst)
		return Migration{}, wrap(err)
	}
	m := Migration{
		Total:    time.Duration(info.TotalTime) * time.Millisecond,
		Downtime: time.Duration(info.Downtime) * time.Millisecond,
		Setup:    time.Duration(info.SetupTime) * time.Millisecond,
		RAMBytes: info.RAM.Transferred,
		Stop:     stop.Time,
		Resume:   resume.Time,
	}
	g.moved(src, dst)
	g.l.logf("lab %s: guest %s migrated %s -> %s: total %v, downtime %v, STOP->RESUME %v, %d bytes",
		g.l.ID, g.Name, src.host.Name, dst.host.Name, m.Total, m.Downtime, m.Paused(), m.RAMBytes)
	return m, nil
}

// migStatus is query-migrate's status.
type migStatus string

const (
	migNone      migStatus = "" // no migration yet: query-migrate returns {}
	migCompleted migStatus = "completed"
	migFailed    migStatus = "failed"
	migCancelled migStatus = "cancelled"
)

type migInfo struct {
	Status    migStatus `json:"status"`
	TotalTime int64     `json:"total-time"`
	Downtime  int64     `json:"downtime"`
	SetupTime int64     `json:"setup-time"`
	ErrorDesc string    `json:"error-desc"`
	RAM       struct {
		Transferred int64 `json:"transferred"`
	} `json:"ram"`
}

func queryMigrate(ctx context.Context, q *qemu) (migInfo, error) {
	b, err := q.q.cmd(ctx, "query-migrate", nil)
	if err != nil {
		return migInfo{}, err
	}
	var info migInfo
	if err := json.Unmarshal(b, &info); err != nil {
		return migInfo{}, fmt.Errorf("query-migrate: %w: %s", err, b)
	}
	return info, nil
}

// cancelMigration cancels src's outgoing migration, waits (up to 10 s)
// until QEMU says it ended, and resumes src unless it completed, which it
// returns; a migration that had not started counts as cancelled.
func (g *Guest) cancelMigration(src *qemu) migStatus {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := src.q.cmd(ctx, "migrate_cancel", nil); err != nil {
		g.l.logf("lab %s: guest %s: %v", g.l.ID, g.Name, err)
	}
	st := migCancelled
wait:
	for {
		info, err := queryMigrate(ctx, src)
		if err != nil {
			g.l.logf("lab %s: guest %s: waiting for the cancel: %v", g.l.ID, g.Name, err)
			break
		}
		switch info.Status {
		case migCompleted:
			return migCompleted
		case migNone, migFailed, migCancelled:
			st = info.Status
			break wait
		}
		select {
		case <-ctx.Done():
			g.l.logf("lab %s: guest %s: migration still %s after migrate_cancel", g.l.ID, g.Name, info.Status)
			break wait
		case <-time.After(20 * time.Millisecond):
		}
	}
	// QEMU resumes a source it paused itself when it cancels; cont covers
	// a failure after the pause, and is a no-op on a running guest.
	ctxCont, cancelCont := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancelCont()
	if _, err := src.q.cmd(ctxCont, "cont", nil); err != nil {
		g.l.logf("lab %s: guest %s: cont after migration %q: %v", g.l.ID, g.Name, st, err)
	}
	return st
}

// moved makes dst the guest's QEMU after a completed migration, then quits
// the source and deletes its tap.
func (g *Guest) moved(src, dst *qemu) {
	// The source is paused for good: what its tap counted is final once
	// QEMU stops reading it, so take it just before the tap goes.
	ctxQuit, cancelQuit := context.WithTimeout(context.Background(), 5*time.Second)
	_, _ = src.q.cmd(ctxQuit, "quit", nil)
	cancelQuit()
	if st, err := g.tapStats(src.host); err == nil {
		g.retired = g.retired.add(st)
	} else {
		g.l.logf("lab %s: guest %s: source tap: %v", g.l.ID, g.Name, err)
	}
	g.cur, g.next = dst, nil
	g.Host, g.vm.Host = dst.host, dst.host
	src.stop(g)
}

// Stop quits every QEMU of the guest and deletes their taps. It is
// idempotent.
func (g *Guest) Stop() {
	for _, q := range []*qemu{g.next, g.cur} {
		if q != nil {
			q.stop(g)
		}
	}
	g.cur, g.next = nil, nil
}

// IfStats is one interface's counters, as /proc/net/dev or
// /sys/class/net/<if>/statistics show them.
type IfStats struct {
	RxBytes, RxPackets, RxErrs, RxDrop int64
	TxBytes, TxPackets, TxErrs, TxDrop int64
}

func (a IfStats) add(b IfStats) IfStats {
	return IfStats{a.RxBytes + b.RxBytes, a.RxPackets + b.RxPackets, a.RxErrs + b.RxErrs, a.RxDrop + b.RxDrop,
		a.TxBytes + b.TxBytes, a.TxPackets + b.TxPackets, a.TxErrs + b.TxErrs, a.TxDrop + b.TxDrop}
}

// GuestCounters is what the guest's kernel counted, read over the network
// from its /cgi-bin/counters, and the counters of its tap on its host.
type GuestCounters struct {
	BootID string        // changes only when the guest reboots
	Uptime time.Duration // the guest's /proc/uptime
	// SNMP is /proc/net/snmp by protocol and field: SNMP["Udp"]["RcvbufErrors"].
	SNMP map[string]map[string]int64
	Dev  map[string]IfStats // /proc/net/dev by interface ("eth0")
	// Tap is the host side, summed over the taps of every host the guest
	// ran on: its Tx is what the hosts handed to QEMU.
	Tap IfStats
}

// Counters reads the guest's counters from its host's namespace (one short
// TCP connection to the guest's port 80, itself counted) and its tap's.
func (g *Guest) Counters(ctx context.Context) (GuestCounters, error) {
	body, err := g.l.HTTPGet(ctx, g.Host.NS, "http://"+g.VIP.String()+"/cgi-bin/counters")
	if err != nil {
		return GuestCounters{}, fmt.Errorf("lab: guest %s counters: %w", g.Name, err)
	}
	c, err := parseGuestCounters(body)
	if err != nil {
		return GuestCounters{}, fmt.Errorf("lab: guest %s counters: %w", g.Name, err)
	}
	tap, err := g.tapStats(g.Host)
	if err != nil {
		return GuestCounters{}, err
	}
	c.Tap = g.retired.add(tap)
	return c, nil
}

// Loss places the datagrams of one UDP run into the guest that did not
// reach its socket, from what the sender sent and the guest's counters
// before and after the run. Other traffic in the same window (a ping, the
// counters' own TCP connection) is counted too: a few packets.
type Loss struct {
	Sent int64 // datagrams sent
	// BeforeTap: sent but never offered to one of the guest's taps: lost
	// on the way, before or in vmroam.
	BeforeTap int64
	// TapDrop: offered to a tap that dropped it (tx_dropped): its queue to
	// QEMU was full, or QEMU had closed it (the source after migration).
	TapDrop int64
	// InQEMU: handed to a tap but not received by the guest's NIC, e.g.
	// queued on the source's tap while the guest was paused for good.
	InQEMU       int64
	NICDrop      int64 // the guest's eth0 rx_dropped
	InGuest      int64 // received by eth0 but not delivered to a UDP socket
	RcvbufErrors int64 // of those, the socket's buffer was full (Udp RcvbufErrors)
}

// PlaceLoss computes Loss for sent datagrams between counters before and after.
func PlaceLoss(sent int64, before, after GuestCounters) Loss {
	tapTx := after.Tap.TxPackets - before.Tap.TxPackets
	tapDrop := after.Tap.TxDrop - before.Tap.TxDrop
	rx := after.Dev["eth0"].RxPackets - before.Dev["eth0"].RxPackets
	udp := after.SNMP["Udp"]["InDatagrams"] - before.SNMP["Udp"]["InDatagrams"]
	return Loss{
		Sent:         sent,
		BeforeTap:    sent - tapTx - tapDrop,
		TapDrop:      tapDrop,
		InQEMU:       tapTx - rx,
		NICDrop:      after.Dev["eth0"].RxDrop - before.Dev["eth0"].RxDrop,
		InGuest:      rx - udp,
		RcvbufErrors: after.SNMP["Udp"]["RcvbufErrors"] - before.SNMP["Udp"]["RcvbufErrors"],
	}
}

func (g *Guest) tapStats(h *Host) (IfStats, error) {
	names := []string{"rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped"}
	args := []string{"cat"}
	for _, n := range names {
		args = append(args, "/sys/class/net/"+g.Tap+"/statistics/"+n)
	}
	out, err := g.l.Exec(h.NS, args...)
	if err != nil {
		return IfStats{}, err
	}
	f := strings.Fields(string(out))
	if len(f) != len(names) {
		return IfStats{}, fmt.Errorf("lab: tap %s statistics: %q", g.Tap, out)
	}
	var v [8]int64
	for i := range v {
		if v[i], err = strconv.ParseInt(f[i], 10, 64); err != nil {
			return IfStats{}, fmt.Errorf("lab: tap %s statistics: %w", g.Tap, err)
		}
	}
	return IfStats{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]}, nil
}

// parseGuestCounters reads the guest's counters page: "boot_id ID",
// "uptime SECONDS IDLE", "== snmp" and /proc/net/snmp, "== dev" and
// /proc/net/dev.
func parseGuestCounters(b []byte) (GuestCounters, error) {
	c := GuestCounters{Dev: map[string]IfStats{}}
	section := ""
	var snmp []string
	for _, line := range strings.Split(string(b), "\n") {
		line = strings.TrimRight(line, "\r")
		f := strings.Fields(line)
		switch {
		case len(f) == 0:
			continue
		case strings.HasPrefix(line, "== "):
			section = f[1]
			continue
		}
		switch section {
		case "":
			switch f[0] {
			case "boot_id":
				if len(f) > 1 {
					c.BootID = f[1]
				}
			case "uptime":
				if len(f) > 1 {
					s, err := strconv.ParseFloat(f[1], 64)
					if err != nil {
						return c, fmt.Errorf("uptime %q: %w", line, err)
					}
					c.Uptime = time.Duration(s * float64(time.Second))
				}
			}
		case "snmp":
			snmp = append(snmp, line)
		case "dev":
			name, rest, ok := strings.Cut(line, ":")
			if !ok {
				continue // the two header lines
			}
			v := strings.Fields(rest)
			if len(v) < 16 {
				return c, fmt.Errorf("dev line %q", line)
			}
			var n [16]int64
			for i := range n {
				var err error
				if n[i], err = strconv.ParseInt(v[i], 10, 64); err != nil {
					return c, fmt.Errorf("dev line %q: %w", line, err)
				}
			}
			// rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop ...
			c.Dev[strings.TrimSpace(name)] = IfStats{n[0], n[1], n[2], n[3], n[8], n[9], n[10], n[11]}
		}
	}
	var err error
	if c.SNMP, err = parseSNMP(snmp); err != nil {
		return c, err
	}
	if c.BootID == "" || len(c.SNMP) == 0 || len(c.Dev) == 0 {
		return c, fmt.Errorf("incomplete counters page: %q", b)
	}
	return c, nil
}

// parseSNMP parses the lines of /proc/net/snmp: per protocol a line of
// field names, then one of values.
func parseSNMP(lines []string) (map[string]map[string]int64, error) {
	out := map[string]map[string]int64{}
	header := map[string][]string{} // protocol -> field names
	for _, line := range lines {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		proto := strings.TrimSuffix(f[0], ":")
		names, ok := header[proto]
		if !ok || len(names) == 0 {
			header[proto] = f[1:]
			continue
		}
		header[proto] = nil
		m := map[string]int64{}
		for i, v := range f[1:] {
			if i < len(names) {
				n, err := strconv.ParseInt(v, 10, 64)
				if err != nil {
					return out, fmt.Errorf("snmp %s %s %q: %w", proto, names[i], v, err)
				}
				m[names[i]] = n
			}
		}
		out[proto] = m
	}
	return out, nil
}

// GuestUDP is one iperf3 UDP run into a guest.
type GuestUDP struct {
	Sent     int64 // datagrams the client sent
	Received int64 // datagrams the guest's iperf3 read
	// Lost is iperf3's lost_packets: the holes in the sequence it read.
	Lost int64
	// Unread were sent after the last datagram iperf3 read: still on the
	// way or queued when the run ended (iperf3 stops reading then), or
	// lost at the very end.
	Unread  int64
	SentBPS float64 // offered load
}

// IperfUDP sends UDP into the guest's iperf3 server from VM from for dur
// at pps datagrams of length bytes per second. The server's counts come
// back over the network (--get-server-output), not over the guest's slow
// serial console.
func (g *Guest) IperfUDP(from *VM, dur time.Duration, pps, length int) (GuestUDP, error) {
	secs := max(1, int((dur+time.Second-1)/time.Second))
	bps := int64(pps) * int64(length) * 8
	args := []string{"iperf3", "-c", g.VIP.String(), "-p", "5201", "-u", "-l", strconv.Itoa(length),
		"-b", strconv.FormatInt(bps, 10), "-t", strconv.Itoa(secs), "-J", "--get-server-output"}
	if src := from.VIP4(); src.IsValid() {
		args = append(args, "-B", src.String())
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+30*time.Second)
	defer cancel()
	out, runErr := g.l.ExecContext(ctx, from.NS, args...)
	var res struct {
		Error string `json:"error"`
		End   struct {
			SumSent struct {
				Packets       int64   `json:"packets"`
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_sent"`
			SumReceived struct {
				Packets     int64 `json:"packets"`
				LostPackets int64 `json:"lost_packets"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(jsonPart(out), &res); err != nil {
		if runErr != nil {
			return GuestUDP{}, runErr
		}
		return GuestUDP{}, fmt.Errorf("lab: iperf3 output: %w: %s", err, out)
	}
	if res.Error != "" {
		return GuestUDP{}, fmt.Errorf("lab: iperf3 %s -> guest %s: %s", from.Name, g.Name, res.Error)
	}
	if runErr != nil {
		return GuestUDP{}, runErr
	}
	if res.End.SumSent.Packets == 0 {
		return GuestUDP{}, fmt.Errorf("lab: iperf3 %s -> guest %s: no sum_sent packets (iperf3 older than 3.12?): %s", from.Name, g.Name, out)
	}
	return GuestUDP{
		Sent:     res.End.SumSent.Packets,
		Received: res.End.SumReceived.Packets - res.End.SumReceived.LostPackets,
		Lost:     res.End.SumReceived.LostPackets,
		Unread:   res.End.SumSent.Packets - res.End.SumReceived.Packets,
		SentBPS:  res.End.SumSent.BitsPerSecond,
	}, nil
}

// String lists where the datagrams went, for logs.
func (x Loss) String() string {
	return fmt.Sprintf("sent %d: before the tap %d, tap drops %d, tap->NIC %d, NIC drops %d, NIC->socket %d (RcvbufErrors %d)",
		x.Sent, x.BeforeTap, x.TapDrop, x.InQEMU, x.NICDrop, x.InGuest, x.RcvbufErrors)
}
