package lab

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Default VIPs of the baseline's two VMs.
var (
	BaselineVIP1 = netip.MustParseAddr("100.100.10.1")
	BaselineVIP2 = netip.MustParseAddr("100.100.10.2")
)

// NewBaseline builds the lab topology with 2 hosts and one VM on each ("vm1"
// with 100.100.10.1 on h1, "vm2" with 100.100.10.2 on h2), but joins the hosts
// with plain stand-alone wireguard-go (binary wireguardGo, run in the
// foreground in each host namespace) configured with `wg`: listen port 51820,
// each host's peer is the other host at its underlay address, with allowed-ips
// the other VM's VIP/32 and the other host's overlay /32. Each WireGuard
// interface has 100.100.0.i/32, a route 100.100.0.0/16, MTU 1420 and is up.
// It is what vmroam is measured against. cfg.Hosts is ignored (always 2).
func NewBaseline(cfg Config, wireguardGo string) (l *Lab, vm1, vm2 *VM, err error) {
	if wireguardGo == "" {
		return nil, nil, nil, errors.New("lab: NewBaseline: no wireguard-go binary")
	}
	if wireguardGo, err = filepath.Abs(wireguardGo); err != nil {
		return nil, nil, nil, err
	}
	if _, err := exec.LookPath("wg"); err != nil {
		return nil, nil, nil, fmt.Errorf("lab: NewBaseline needs wireguard-tools: %w", err)
	}
	cfg.Hosts = 2
	l, err = New(cfg)
	if err != nil {
		return nil, nil, nil, err
	}
	defer func() {
		if err != nil {
			if cerr := l.Close(); cerr != nil {
				err = errors.Join(err, cerr)
			}
			l, vm1, vm2 = nil, nil, nil
		}
	}()
	h1, h2 := l.Hosts[0], l.Hosts[1]
	if vm1, err = l.AddVM("vm1", h1, BaselineVIP1); err != nil {
		return
	}
	if vm2, err = l.AddVM("vm2", h2, BaselineVIP2); err != nil {
		return
	}

	type keys struct{ priv, pub, file string }
	ks := make([]keys, 2)
	for i, h := range l.Hosts {
		out, kerr := run(context.Background(), "wg", "genkey")
		if kerr != nil {
			return nil, nil, nil, kerr
		}
		ks[i].priv = strings.TrimSpace(string(out))
		pub := exec.Command("wg", "pubkey")
		pub.Stdin = strings.NewReader(ks[i].priv + "\n")
		out, kerr = pub.CombinedOutput()
		if kerr != nil {
			return nil, nil, nil, fmt.Errorf("lab: wg pubkey: %w: %s", kerr, out)
		}
		ks[i].pub = strings.TrimSpace(string(out))
		ks[i].file = filepath.Join(l.Dir, h.Name+".wgkey")
		if err = os.WriteFile(ks[i].file, []byte(ks[i].priv+"\n"), 0o600); err != nil {
			return
		}
	}

	for _, h := range l.Hosts {
		if err = l.startWireguardGo(h, wireguardGo); err != nil {
			return
		}
	}
	vms := []*VM{vm1, vm2}
	for i, h := range l.Hosts {
		o := 1 - i
		other := l.Hosts[o]
		allowed := hostPrefix(vms[o].VIPs[0]).String() + "," + hostPrefix(other.Overlay.Addr()).String()
		if _, err = l.Exec(h.NS, "wg", "set", h.Iface,
			"private-key", ks[i].file,
			"listen-port", strconv.Itoa(WGPort),
			"peer", ks[o].pub,
			"endpoint", netip.AddrPortFrom(other.Underlay, WGPort).String(),
			"allowed-ips", allowed); err != nil {
			return
		}
		steps := [][]string{
			{"addr", "add", hostPrefix(h.Overlay.Addr()).String(), "dev", h.Iface},
			{"link", "set", h.Iface, "mtu", strconv.Itoa(VifMTU), "up"},
			{"route", "add", OverlayPrefix.String(), "dev", h.Iface},
		}
		for _, s := range steps {
			if err = l.ip(h.NS, s...); err != nil {
				return
			}
		}
	}
	l.logf("lab %s: baseline wireguard-go tunnel %s <-> %s up", l.ID, h1.Iface, h2.Iface)
	return l, vm1, vm2, nil
}

// startWireguardGo runs `wireguard-go -f h.Iface` in h's namespace and waits
// for its interface and UAPI socket.
func (l *Lab) startWireguardGo(h *Host, bin string) error {
	logPath := filepath.Join(l.Dir, h.Name+"-wireguard-go.log")
	p, err := l.startProc("wireguard-go "+h.Name, h.NS, logPath,
		[]string{"LOG_LEVEL=error", "WG_PROCESS_FOREGROUND=1"}, bin, "-f", h.Iface)
	if err != nil {
		return err
	}
	sock := filepath.Join(wgSockDir, h.Iface+".sock")
	deadline := time.Now().Add(10 * time.Second)
	for {
		if p.exited() {
			return fmt.Errorf("lab: wireguard-go in %s exited (%v); log tail:\n%s", h.NS, p.err, logTail(logPath, 20))
		}
		if _, serr := os.Stat(sock); serr == nil {
			if l.ip(h.NS, "link", "show", h.Iface) == nil {
				return nil
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: wireguard-go in %s: no %s after 10s; log tail:\n%s", h.NS, sock, logTail(logPath, 20))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// iperfPort hands out a fresh iperf3 port per run, so runs never collide.
func (l *Lab) iperfPort() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	p := l.nextPort
	l.nextPort++
	if l.nextPort > 5999 {
		l.nextPort = 5201
	}
	return p
}

// iperfResult is the part of `iperf3 -J` output the lab reads.
type iperfResult struct {
	Error string `json:"error"`
	End   struct {
		SumSent struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
			Retransmits   int     `json:"retransmits"`
		} `json:"sum_sent"`
		SumReceived struct {
			Bytes         float64 `json:"bytes"`
			BitsPerSecond float64 `json:"bits_per_second"`
		} `json:"sum_received"`
		Sum struct {
			BitsPerSecond float64 `json:"bits_per_second"`
			JitterMs      float64 `json:"jitter_ms"`
			LostPackets   int     `json:"lost_packets"`
			Packets       int     `json:"packets"`
			LostPercent   float64 `json:"lost_percent"`
		} `json:"sum"`
	} `json:"end"`
}

// IperfTCP runs `iperf3 -s -1` in to's namespace bound to its first VIP,
// waits until it listens, runs `iperf3 -c VIP -t dur -J` from from, and
// returns the bits per second received (end.sum_received.bits_per_second).
// dur is rounded up to whole seconds.
func (l *Lab) IperfTCP(from, to *VM, dur time.Duration) (float64, error) {
	res, err := l.iperf(from, to, dur)
	if err != nil {
		return 0, err
	}
	return res.End.SumReceived.BitsPerSecond, nil
}

// UDPResult is what IperfUDP measured.
type UDPResult struct {
	SentBPS     float64 // offered load the client sent
	ReceivedBPS float64 // what arrived
	Packets     int
	LostPackets int
	LostPercent float64
	JitterMs    float64
}

// IperfUDP is IperfTCP with UDP at the given bitrate ("500M"; "" = 1M,
// iperf3's default), datagrams of 1392 bytes so that they fit the 1420 tunnel.
func (l *Lab) IperfUDP(from, to *VM, dur time.Duration, bitrate string) (UDPResult, error) {
	extra := []string{"-u", "-l", "1392"}
	if bitrate != "" {
		extra = append(extra, "-b", bitrate)
	}
	res, err := l.iperf(from, to, dur, extra...)
	if err != nil {
		return UDPResult{}, err
	}
	r := UDPResult{
		SentBPS:     res.End.SumSent.BitsPerSecond,
		ReceivedBPS: res.End.SumReceived.BitsPerSecond,
		Packets:     res.End.Sum.Packets,
		LostPackets: res.End.Sum.LostPackets,
		LostPercent: res.End.Sum.LostPercent,
		JitterMs:    res.End.Sum.JitterMs,
	}
	if r.ReceivedBPS == 0 && r.Packets > 0 { // older iperf3 without sum_received for UDP
		r.ReceivedBPS = res.End.Sum.BitsPerSecond * (1 - r.LostPercent/100)
	}
	return r, nil
}

func (l *Lab) iperf(from, to *VM, dur time.Duration, clientExtra ...string) (*iperfResult, error) {
	if len(to.VIPs) == 0 {
		return nil, fmt.Errorf("lab: iperf: VM %s has no VIP", to.Name)
	}
	secs := int((dur + time.Second - 1) / time.Second)
	if secs < 1 {
		secs = 1
	}
	dst := to.VIPs[0]
	port := strconv.Itoa(l.iperfPort())
	logPath := filepath.Join(l.Dir, "iperf3-"+to.Name+"-"+port+".log")
	srv, err := l.startProc("iperf3 server in "+to.Name, to.NS, logPath, nil,
		"iperf3", "-s", "-1", "-B", dst.String(), "-p", port)
	if err != nil {
		return nil, err
	}
	defer func() {
		// -1: the server exits after one test; give it a moment, then kill.
		select {
		case <-srv.done:
		case <-time.After(3 * time.Second):
			srv.kill()
		}
	}()

	if err := l.waitListening(srv, to, port, logPath); err != nil {
		return nil, err
	}

	args := []string{"iperf3", "-c", dst.String(), "-p", port, "-t", strconv.Itoa(secs), "-J"}
	if src := from.firstVIP(dst.Is6()); src.IsValid() {
		args = append(args, "-B", src.String())
	}
	args = append(args, clientExtra...)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs)*time.Second+30*time.Second)
	defer cancel()
	out, runErr := l.ExecContext(ctx, from.NS, args...)
	var res iperfResult
	if jerr := json.Unmarshal(jsonPart(out), &res); jerr != nil {
		if runErr != nil {
			return nil, runErr
		}
		return nil, fmt.Errorf("lab: iperf3 output: %w: %s", jerr, out)
	}
	if res.Error != "" {
		return nil, fmt.Errorf("lab: iperf3 %s -> %s: %s", from.Name, to.Name, res.Error)
	}
	if runErr != nil {
		return nil, runErr
	}
	l.logf("lab %s: iperf3 %s -> %s %s: %.0f Mbit/s", l.ID, from.Name, to.Name,
		strings.Join(clientExtra, " "), res.End.SumReceived.BitsPerSecond/1e6)
	return &res, nil
}

// waitListening waits until the iperf3 server srv in VM to listens on port.
func (l *Lab) waitListening(srv *proc, to *VM, port, logPath string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		if srv.exited() {
			return fmt.Errorf("lab: iperf3 server in %s exited (%v): %s", to.NS, srv.err, logTail(logPath, 20))
		}
		out, _ := l.Exec(to.NS, "ss", "-Hltn", "sport = :"+port)
		if strings.Contains(string(out), ":"+port) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("lab: iperf3 server in %s not listening on %s after 10s: %s", to.NS, port, logTail(logPath, 20))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// jsonPart drops anything before the first '{' (warnings ip or iperf3 may print).
func jsonPart(b []byte) []byte {
	if i := strings.IndexByte(string(b), '{'); i > 0 {
		return b[i:]
	}
	return b
}

// BuildWireguardGo builds the stand-alone wireguard-go from the
// golang.zx2c4.com/wireguard module this project depends on, into
// dir/wireguard-go, and returns its path. It runs `go build`, so the current
// directory must be inside the vmroam module.
func BuildWireguardGo(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "wireguard-go")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "golang.zx2c4.com/wireguard")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("lab: %s: %w: %s", cmd, err, out)
	}
	return bin, nil
}
