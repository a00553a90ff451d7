package wgagent

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/vmroam/vmroam/gossip"
)

// peerAllowlist is what --peer-allowlist says: the WireGuard public keys
// that may be peers, each optionally bound to the member name that must
// present it. The gossip key lets a host join and announce anything; the
// allowlist decides which of the members this host sends VM traffic to.
type peerAllowlist struct {
	keys  map[wgtypes.Key]string // key -> the name bound to it, "" for any
	names map[string]wgtypes.Key // names bound to a key
}

// parsePeerAllowlist reads "KEY [NAME]" lines, KEY a base64 WireGuard
// public key; blank lines and #-comments are ignored. A key or a name
// listed twice is an error: the file must say one thing about each.
func parsePeerAllowlist(data []byte) (*peerAllowlist, error) {
	l := &peerAllowlist{keys: map[wgtypes.Key]string{}, names: map[string]wgtypes.Key{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for line := 1; sc.Scan(); line++ {
		s := sc.Text()
		if i := strings.IndexByte(s, '#'); i >= 0 {
			s = s[:i]
		}
		f := strings.Fields(s)
		if len(f) == 0 {
			continue
		}
		if len(f) > 2 {
			return nil, fmt.Errorf("line %d: want KEY [NAME], got %d fields", line, len(f))
		}
		k, err := wgtypes.ParseKey(f[0])
		if err != nil {
			return nil, fmt.Errorf("line %d: %q is not a WireGuard public key: %w", line, f[0], err)
		}
		if _, dup := l.keys[k]; dup {
			return nil, fmt.Errorf("line %d: key %s listed twice", line, f[0])
		}
		name := ""
		if len(f) == 2 {
			name = f[1]
			if len(name) > gossip.MaxOwnerLen {
				return nil, fmt.Errorf("line %d: name is %d bytes, limit is %d", line, len(name), gossip.MaxOwnerLen)
			}
			if _, dup := l.names[name]; dup {
				return nil, fmt.Errorf("line %d: name %s listed twice", line, name)
			}
			l.names[name] = k
		}
		l.keys[k] = name
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	return l, nil
}

// refuses says why the member called name, announcing key, may not be a
// peer, or "" if it may: its key must be listed, and a name bound to a key
// must come with that key and that key with that name.
func (l *peerAllowlist) refuses(name string, key wgtypes.Key) string {
	bound, listed := l.keys[key]
	switch {
	case !listed:
		if want, ok := l.names[name]; ok {
			return fmt.Sprintf("its WireGuard key %s is not the key %s listed for %s", key, want, name)
		}
		return fmt.Sprintf("its WireGuard key %s is not listed", key)
	case bound != "" && bound != name:
		return fmt.Sprintf("its WireGuard key %s is listed for %s", key, bound)
	}
	if want, ok := l.names[name]; ok && want != key {
		return fmt.Sprintf("the name %s is listed with the key %s", name, want)
	}
	return ""
}

// admitsUnknown says whether records of a member whose key is not known
// (not a member yet, or unreadable metadata) may be taken: only if the
// name is listed, or some key is listed for any name.
func (l *peerAllowlist) admitsUnknown(name string) bool {
	if _, ok := l.names[name]; ok {
		return true
	}
	return len(l.names) < len(l.keys)
}

// allowlistFile keeps a peerAllowlist in step with its file: each reload
// re-reads it when its modification time or size changed. A file that is
// gone or does not parse keeps the last good list in force (never "allow
// everyone") and is reported until it is fixed.
type allowlistFile struct {
	path string
	cur  atomic.Pointer[peerAllowlist] // read without the lock

	mu    sync.Mutex
	mtime time.Time
	size  int64
	err   error
}

// loadAllowlistFile reads path for the first time; any problem is an error.
func loadAllowlistFile(path string) (*allowlistFile, error) {
	f := &allowlistFile{path: path}
	if _, err := f.reload(); err != nil {
		return nil, err
	}
	return f, nil
}

// list returns the list in force; nil when there is no allowlist.
func (f *allowlistFile) list() *peerAllowlist {
	if f == nil {
		return nil
	}
	return f.cur.Load()
}

// reload re-reads the file if it changed. It reports whether a new list
// took effect, and the file's problem, if it has one now.
func (f *allowlistFile) reload() (bool, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fi, err := os.Stat(f.path)
	if err != nil {
		f.err = fmt.Errorf("peer allowlist: %w", err)
		return false, f.err
	}
	if f.cur.Load() != nil && fi.ModTime().Equal(f.mtime) && fi.Size() == f.size {
		return false, f.err
	}
	data, err := os.ReadFile(f.path)
	if err == nil && fi.Mode().Perm()&0o022 != 0 {
		err = fmt.Errorf("mode %#o: only its owner may write it (chmod go-w %s)", fi.Mode().Perm(), f.path)
	}
	var l *peerAllowlist
	if err == nil {
		l, err = parsePeerAllowlist(data)
	}
	f.mtime, f.size = fi.ModTime(), fi.Size()
	if err != nil {
		f.err = fmt.Errorf("peer allowlist %s: %w", f.path, err)
		return false, f.err
	}
	f.err = nil
	f.cur.Store(l)
	return true, nil
}

// admitMember is gossip's Config.Admit: with an allowlist, the records and
// network changes of a member whose key the list refuses are not taken, so
// such a member cannot draw a VIP's traffic away from its host.
func (a *Agent) admitMember(name string, m *gossip.Member) bool {
	l := a.allow.list()
	if l == nil {
		return true
	}
	if m == nil || m.MetaErr != nil {
		return l.admitsUnknown(name)
	}
	return l.refuses(name, wgtypes.Key(m.Meta.PublicKey)) == ""
}

// peerRefusal says why a member may not be a WireGuard peer under the
// allowlist, "" if it may (or there is no allowlist).
func (a *Agent) peerRefusal(m gossip.Member) string {
	l := a.allow.list()
	if l == nil || m.MetaErr != nil {
		return ""
	}
	return l.refuses(m.Name, wgtypes.Key(m.Meta.PublicKey))
}

// checkAllowlistLocked re-reads the allowlist if its file changed and
// reports what is wrong with it, and whether it refuses this very host
// (whose peers, sharing the list, then refuse it too). a.mu held.
func (a *Agent) checkAllowlistLocked(problem func(string, ...any)) {
	if a.allow == nil {
		a.warnNoAllowlistLocked(a.cluster.Members())
		return
	}
	changed, err := a.allow.reload()
	if changed {
		a.log.Info("peer allowlist loaded", "path", a.allow.path, "keys", len(a.allow.list().keys))
		a.refusedLogged = map[string]string{}
	}
	if err != nil {
		problem("%v (the last good list stays in force)", err)
	}
	if why := a.allow.list().refuses(a.cfg.Name, a.key.PublicKey()); why != "" {
		problem("the peer allowlist refuses this host itself: %s; hosts that share the list refuse it", why)
	}
}

// warnRefusedLocked logs, once per member and reason, that a member is
// kept out. a.mu held.
func (a *Agent) warnRefusedLocked(m gossip.Member, why string) {
	if a.refusedLogged[m.Name] == why {
		return
	}
	a.refusedLogged[m.Name] = why
	a.log.Warn("REFUSED PEER: a member with the gossip key is not in the peer allowlist; it gets no tunnel and its VIP claims are ignored",
		"member", m.Name, "endpoint", m.Meta.Endpoint, "reason", why)
}

// memberSites lists the distinct sites of the members whose metadata could be
// read, sorted; hosts without --site share the site "".
func memberSites(members []gossip.Member) []string {
	var sites []string
	for _, m := range members {
		if m.MetaErr == nil && !slices.Contains(sites, m.Meta.Site) {
			sites = append(sites, m.Meta.Site)
		}
	}
	slices.Sort(sites)
	return sites
}

// noAllowlistRisk says what running without --peer-allowlist gives away
// on a cluster that spans sites: what the gossip key alone grants.
const noAllowlistRisk = "any host holding the gossip key, at any site, can claim any VIP and receive its VM's traffic (it becomes a WireGuard peer of every host with the VIP in its AllowedIPs, gets the migration cache, and decrypts it all with its own key); see docs/security.md"

// noAllowlistFix says how to set the allowlist.
const noAllowlistFix = "list every host's WireGuard public key (vmroam status shows it) with its name, 'KEY NAME' per line, in one file on every host, mode 0644 owned by root, e.g. /etc/vmroam/peers.allow; set peer-allowlist = \"/etc/vmroam/peers.allow\" in the config (--peer-allowlist) and restart the agents"

// warnNoAllowlistLocked logs loudly, once per set of sites, that there is
// no allowlist while the members span more than one site: the gossip key
// then travels between sites and grants every VM's traffic. a.mu held.
func (a *Agent) warnNoAllowlistLocked(members []gossip.Member) {
	sites := memberSites(members)
	if len(sites) < 2 {
		return
	}
	key := strings.Join(sites, ",")
	if key == a.sitesWarned {
		return
	}
	a.sitesWarned = key
	a.log.Warn("NO PEER ALLOWLIST on a cluster that spans sites: "+noAllowlistRisk,
		"sites", sites, "fix", noAllowlistFix)
}
