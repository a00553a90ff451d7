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

// guestMemMB is the guest's RAM: enough for the kernel, busybox and iperf3,
// small enough to migrate in well under a second.
const guestMemMB = 192

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
// image whose directory it printed. A cached build takes well under a second.
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

// Guest is a QEMU VM with one IPv4 VIP. Host is where it runs; its methods
// must not be called concurrently.
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
		{"link", "set", g.Tap, "address", g.TapMAC.String(), "mtu", mtu},
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
		"-append", "console=ttyS0 quiet panic=-1 vmroam.ip=" + g.VIP.String() + " vmroam.gw=" + GatewayV4.String(),
		"-netdev", "tap,id=n0,ifname=" + g.Tap + ",script=no,downscript=no",
		"-device", "virtio-net-pci,netdev=n0,romfile=,mac=" + g.MAC.String() + ",host_mtu=" + mtu,
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
// Host. On failure the guest keeps running where it was and the
// destination is stopped.
func (g *Guest) Migrate(ctx context.Context) (Migration, error) {
	src, dst := g.cur, g.next
	if src == nil || dst == nil {
		return Migration{}, fmt.Errorf("lab: guest %s: Migrate without Incoming", g.Name)
	}
	fail := func(err error) (Migration, error) {
		g.next = nil
		dst.stop(g)
		return Migration{}, fmt.Errorf("lab: guest %s: migrate %s -> %s: %w", g.Name, src.host.Name, dst.host.Name, err)
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
	var info struct {
		Status    string `json:"status"`
		TotalTime int64  `json:"total-time"`
		Downtime  int64  `json:"downtime"`
		SetupTime int64  `json:"setup-time"`
		ErrorDesc string `json:"error-desc"`
		RAM       struct {
			Transferred int64 `json:"transferred"`
		} `json:"ram"`
	}
	for {
		b, err := src.q.cmd(ctx, "query-migrate", nil)
		if err != nil {
			return fail(err)
		}
		if err := json.Unmarshal(b, &info); err != nil {
			return fail(fmt.Errorf("query-migrate: %w: %s", err, b))
		}
		if info.Status == "completed" {
			break
		}
		if info.Status == "failed" || info.Status == "cancelled" {
			_, _ = src.q.cmd(ctx, "cont", nil)
			return fail(fmt.Errorf("status %s: %s", info.Status, info.ErrorDesc))
		}
		select {
		case <-ctx.Done():
			_, _ = src.q.cmd(context.Background(), "migrate_cancel", nil)
			return fail(ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	stop, err := src.q.waitEvent(ctx, "STOP", start)
	if err != nil {
		return fail(err)
	}
	resume, err := dst.q.waitEvent(ctx, "RESUME", start)
	if err != nil {
		return fail(err)
	}
	m := Migration{
		Total:    time.Duration(info.TotalTime) * time.Millisecond,
		Downtime: time.Duration(info.Downtime) * time.Millisecond,
		Setup:    time.Duration(info.SetupTime) * time.Millisecond,
		RAMBytes: info.RAM.Transferred,
		Stop:     stop.Time,
		Resume:   resume.Time,
	}
	g.cur, g.next = dst, nil
	g.Host, g.vm.Host = dst.host, dst.host
	src.stop(g)
	g.l.logf("lab %s: guest %s migrated %s -> %s: total %v, downtime %v, STOP->RESUME %v, %d bytes",
		g.l.ID, g.Name, src.host.Name, dst.host.Name, m.Total, m.Downtime, m.Paused(), m.RAMBytes)
	return m, nil
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

// GuestCounters is what the guest's kernel counted, read over the network
// from its /cgi-bin/counters, and the counters of its tap on its host.
type GuestCounters struct {
	BootID string        // changes only when the guest reboots
	Uptime time.Duration // the guest's /proc/uptime
	// SNMP is /proc/net/snmp by protocol and field: SNMP["Udp"]["RcvbufErrors"].
	SNMP map[string]map[string]int64
	Dev  map[string]IfStats // /proc/net/dev by interface ("eth0")
	Tap  IfStats            // the host side: its Tx is what went to the guest
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
	c.Tap, err = g.tapStats()
	if err != nil {
		return GuestCounters{}, err
	}
	return c, nil
}

func (g *Guest) tapStats() (IfStats, error) {
	names := []string{"rx_bytes", "rx_packets", "rx_errors", "rx_dropped", "tx_bytes", "tx_packets", "tx_errors", "tx_dropped"}
	args := []string{"cat"}
	for _, n := range names {
		args = append(args, "/sys/class/net/"+g.Tap+"/statistics/"+n)
	}
	out, err := g.l.Exec(g.Host.NS, args...)
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
	c := GuestCounters{SNMP: map[string]map[string]int64{}, Dev: map[string]IfStats{}}
	section := ""
	header := map[string][]string{} // snmp: protocol -> field names
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
						return c, fmt.Errorf("snmp %s %s %q: %w", proto, names[i], v, err)
					}
					m[names[i]] = n
				}
			}
			c.SNMP[proto] = m
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
	if c.BootID == "" || len(c.SNMP) == 0 || len(c.Dev) == 0 {
		return c, fmt.Errorf("incomplete counters page: %q", b)
	}
	return c, nil
}

// IperfUDP sends UDP into the guest's iperf3 server from VM from for dur
// at pps datagrams of length bytes per second, and returns what iperf3
// measured (the server's counts, fetched with --get-server-output rather
// than over the guest's slow serial console).
func (g *Guest) IperfUDP(from *VM, dur time.Duration, pps, length int) (UDPResult, error) {
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
	var res iperfResult
	if err := json.Unmarshal(jsonPart(out), &res); err != nil {
		if runErr != nil {
			return UDPResult{}, runErr
		}
		return UDPResult{}, fmt.Errorf("lab: iperf3 output: %w: %s", err, out)
	}
	if res.Error != "" {
		return UDPResult{}, fmt.Errorf("lab: iperf3 %s -> guest %s: %s", from.Name, g.Name, res.Error)
	}
	if runErr != nil {
		return UDPResult{}, runErr
	}
	return UDPResult{
		SentBPS:     res.End.SumSent.BitsPerSecond,
		ReceivedBPS: res.End.Sum.BitsPerSecond * (1 - res.End.Sum.LostPercent/100),
		Packets:     res.End.Sum.Packets,
		LostPackets: res.End.Sum.LostPackets,
		LostPercent: res.End.Sum.LostPercent,
		JitterMs:    res.End.Sum.JitterMs,
	}, nil
}
