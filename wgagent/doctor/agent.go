package doctor

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
)

// handshakeGrace is how long after its start an agent may still have peers
// it never completed a handshake with: it sends each new peer a datagram at
// once, so a handshake missing after this long means UDP does not pass.
const handshakeGrace = time.Minute

// agentView is what the agent told us: its status (nil when it did not
// answer) and the findings about it.
type agentView struct {
	status  *control.Status
	results []Result
}

// askAgent fetches the agent's status and turns what it reports about
// itself (problems, conflicts, insecure gossip, silent peers) into findings.
func askAgent(ctx context.Context, cfg Config) agentView {
	ctx, cancel := context.WithTimeout(ctx, cfg.AgentTimeout)
	defer cancel()
	st, err := control.NewClient(cfg.Socket).Status(ctx)
	if err != nil {
		r := Result{Check: "agent", Level: Fail, Found: err.Error()}
		switch {
		case errors.Is(err, control.ErrNoAgent):
			r.Found = fmt.Sprintf("no agent answers on %s", cfg.Socket)
			r.Fix = "systemctl start vmroam (why it stopped: systemctl status vmroam; journalctl -u vmroam), or pass --socket if it listens elsewhere"
		case os.Geteuid() != 0:
			r.Fix = "run vmroam doctor as root: the control socket is root's only"
		default:
			r.Fix = "systemctl status vmroam; journalctl -u vmroam"
		}
		return agentView{results: []Result{r}}
	}
	v := agentView{status: &st}
	v.results = append(v.results, Result{Check: "agent", Level: OK,
		Found: fmt.Sprintf("agent %s answers on %s: %d peers, %d VIPs, %s WireGuard on %s", st.Name, cfg.Socket, len(st.Peers), len(st.VIPs), st.Impl, st.Interface)})
	refused := map[string]bool{}
	for _, r := range st.RefusedRecords {
		refused[r.Problem()] = true
		v.results = append(v.results, Result{Check: "records", Level: Warn,
			Found: fmt.Sprintf("host %s claims %s (epoch %d), which cannot be a VIP: %s; this host refuses the record and routes nothing for it", r.Owner, r.VIP, r.Epoch, r.Reason),
			Fix:   fmt.Sprintf("if %s is one of yours, detach %s there (vmroam vip detach %s); if not, whoever holds the gossip key is hostile: rotate it (vmroam keys, docs/security.md) and set --peer-allowlist", r.Owner, r.VIP, r.VIP)})
	}
	for _, p := range st.Problems {
		if refused[p] {
			continue // a finding of its own above
		}
		v.results = append(v.results, Result{Check: "agent", Level: Warn, Found: "the agent reports: " + p,
			Fix: "see the agent's log (journalctl -u vmroam); it retries on every reconcile"})
	}
	for _, c := range st.Conflicts {
		v.results = append(v.results, Result{Check: "agent", Level: Warn,
			Found: fmt.Sprintf("VIP %s claimed by %s at epoch %d (%s wins): was its VM started twice?", c.VIP, strings.Join(c.Owners, " and "), c.Epoch, c.Winner),
			Fix:   fmt.Sprintf("stop the VM where it should not run, then on the host that runs it: vmroam vip attach %s --dev IFACE (a higher epoch ends the conflict)", c.VIP)})
	}
	if len(st.Gossip.OverCap) > 0 {
		var total uint64
		for _, n := range st.Gossip.OverCap {
			total += n
		}
		v.results = append(v.results, Result{Check: "records", Level: Warn,
			Found: fmt.Sprintf("the location table refused %d records or networks beyond its caps, by owner: %s; it holds %d of at most %d records and evicted none for them", total, st.Gossip.OverCapList(), st.Gossip.Records, st.Gossip.MaxRecords),
			Fix:   "a host that owns more VIPs or networks than one host may is misconfigured or hostile (see its vmroam status; rotate the gossip key if it is not yours); if the cluster is that large, raise --max-vips on every host"})
	}
	if !st.Gossip.Encrypted {
		v.results = append(v.results, Result{Check: "agent", Level: Warn,
			Found: "gossip is not encrypted (--insecure-gossip): anyone who reaches the gossip port can redirect VM traffic",
			Fix:   "vmroam keygen --gossip > /etc/vmroam/gossip.key && chmod 600 /etc/vmroam/gossip.key, copy it to every host, restart the agents with --encrypt-key-file /etc/vmroam/gossip.key"})
	}
	if r, ok := allowlistFinding(st); ok {
		v.results = append(v.results, r)
	}
	for _, p := range st.Peers {
		if p.SessionCheck == "gave up" {
			v.results = append(v.results, Result{Check: "agent", Level: Warn,
				Found: fmt.Sprintf("the WireGuard session with peer %s carries no round trip: connects to its handover port through the tunnel got no answer, and new handshakes did not help; migrations to or from %s would fail", p.Name, p.Name),
				Fix:   fmt.Sprintf("let the handover port (--handover-port, TCP 7947 by default) through on %s between the hosts' overlay addresses; check with: wg show %s (bytes received since the last handshake)", st.Interface, st.Interface)})
		}
	}
	if !st.Started.IsZero() && time.Since(st.Started) > handshakeGrace {
		for _, p := range st.Peers {
			if p.LastHandshake != nil || (p.State != "alive" && p.State != "suspect") {
				continue
			}
			port := "its WireGuard port"
			if ap, err := netip.ParseAddrPort(p.Endpoint); err == nil {
				port = fmt.Sprintf("UDP port %d", ap.Port())
			}
			v.results = append(v.results, Result{Check: "agent", Level: Warn,
				Found: fmt.Sprintf("no WireGuard handshake with peer %s (%s) since the agent started %s ago: VIPs behind it are unreachable", p.Name, p.Endpoint, time.Since(st.Started).Round(time.Second)),
				Fix:   fmt.Sprintf("let %s through between the two hosts (firewall, NAT); check with: wg show %s", port, st.Interface)})
		}
	}
	return v
}

// checkKeyFile checks what the agent demands of the gossip key file (not
// readable by group or others, parses) and that only root can change it.
func checkKeyFile(path string) Result {
	r := Result{Check: "gossip_key"}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		r.Level, r.Found = Fail, fmt.Sprintf("gossip key file %s: %v", path, err)
		r.Fix = fmt.Sprintf("vmroam keygen --gossip > %s && chmod 600 %s (the same key on every host)", path, path)
		return r
	}
	if perm := os.FileMode(st.Mode).Perm(); perm&0o077 != 0 {
		r.Level = Fail
		r.Found = fmt.Sprintf("gossip key file %s has mode %#o: group or others can read the key that lets anyone join the cluster, and the agent refuses it", path, perm)
		r.Fix = fmt.Sprintf("chmod 600 %s", path)
		return r
	}
	keys, err := gossip.LoadKeyFile(path)
	if err != nil {
		r.Level, r.Found = Fail, err.Error()
		r.Fix = fmt.Sprintf("vmroam keygen --gossip > %s (the same key on every host)", path)
		return r
	}
	if st.Uid != 0 {
		r.Level = Warn
		r.Found = fmt.Sprintf("gossip key file %s is owned by uid %d, not root: that user can change the cluster's key", path, st.Uid)
		r.Fix = fmt.Sprintf("chown root:root %s", path)
		return r
	}
	r.Level = OK
	r.Found = fmt.Sprintf("gossip key file %s: mode %#o, owned by root, %d key(s)", path, os.FileMode(st.Mode).Perm(), len(keys))
	return r
}

// allowlistFinding warns of a cluster whose hosts span more than one site
// (hosts without --site count as one more) and no --peer-allowlist: the
// gossip key, on hosts at every site, is then all it takes to draw any
// VM's traffic.
func allowlistFinding(st control.Status) (Result, bool) {
	if st.Gossip.PeerAllowlist {
		return Result{}, false
	}
	sites := []string{st.Site}
	for _, p := range st.Peers {
		if !slices.Contains(sites, p.Site) {
			sites = append(sites, p.Site)
		}
	}
	if len(sites) < 2 {
		return Result{}, false
	}
	slices.Sort(sites)
	names := make([]string, len(sites))
	for i, s := range sites {
		names[i] = strconv.Quote(s)
	}
	return Result{Check: "agent", Level: Warn,
		Found: fmt.Sprintf("no peer allowlist (--peer-allowlist) on a cluster whose hosts are in %d sites (%s): any host holding the gossip key can claim any VIP and receive its VM's traffic, decrypted with its own WireGuard key (docs/security.md)", len(sites), strings.Join(names, ", ")),
		Fix:   "put every host's WireGuard public key (vmroam status shows it) with its name, 'KEY NAME' per line, in one file on every host (e.g. /etc/vmroam/peers.allow, writable by root only), set peer-allowlist = \"/etc/vmroam/peers.allow\" in the config (--peer-allowlist) and restart the agents"}, true
}
