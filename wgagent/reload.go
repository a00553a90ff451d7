package wgagent

import (
	"context"
	"fmt"
	"log/slog"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/vmroam/vmroam/wgagent/control"
)

// configKey is one key of the config file (a flag of `vmroam agent`): the
// Config field it sets and whether Reload applies a new value while the
// agent runs. Everything that names or opens something (devices, ports,
// keys, addresses, names, the gossip layer) needs a restart; limits and
// timings read at their next use, and the lists the join loop follows,
// change live.
type configKey struct {
	name   string
	field  string // path in Config, e.g. "CacheLimits.MaxBytes"
	also   string // another field the key sets, if any (a file's path beside its contents)
	live   bool
	secret bool // its values are never logged
}

// configKeys lists every Config field but Logger; a test checks that.
var configKeys = []configKey{
	{name: "name", field: "Name"},
	{name: "bind", field: "BindAddr"},
	{name: "advertise", field: "AdvertiseAddr"},
	{name: "gossip-port", field: "GossipPort"},
	{name: "wg-port", field: "WGPort"},
	{name: "join", field: "Join", live: true},
	{name: "address", field: "Address"},
	{name: "interface", field: "Interface"},
	{name: "mtu", field: "MTU"},
	{name: "wg-impl", field: "Impl"},
	{name: "site", field: "Site"},
	{name: "trusted-site", field: "TrustedSite"},
	{name: "data-dir", field: "DataDir"},
	{name: "socket", field: "Socket"},
	{name: "encrypt-key-file", field: "GossipKeys", also: "GossipKeyFile", secret: true},
	{name: "insecure-gossip", field: "InsecureGossip"},
	{name: "gossip-profile", field: "GossipProfile"},
	{name: "reconcile-interval", field: "ReconcileInterval", live: true},
	{name: "keepalive", field: "Keepalive", live: true},
	{name: "cache", field: "Cache"},
	{name: "cache-max-bytes", field: "CacheLimits.MaxBytes", live: true},
	{name: "cache-max-packets", field: "CacheLimits.MaxPackets", live: true},
	{name: "cache-max-age", field: "CacheLimits.MaxAge", live: true},
	{name: "cache-global-max-bytes", field: "CacheGlobalMax", live: true},
	{name: "cache-linger", field: "CacheLinger", live: true},
	{name: "cache-settle", field: "CacheSettle", live: true},
	{name: "cache-interface", field: "CacheInterface"},
	{name: "handover-port", field: "HandoverPort"},
	{name: "network", field: "Networks", live: true},
	{name: "vip-prefixes", field: "VIPPrefixes"},
	{name: "alloc-settle", field: "AllocSettle", live: true},
	{name: "alloc-quarantine", field: "AllocQuarantine", live: true},
	{name: "activation", field: "Activation", live: true},
	{name: "xenstore", field: "Xenstore"},
	{name: "filter", field: "Filter"},
	// The allowlist file is re-read whenever it changes; its path is not.
	{name: "peer-allowlist", field: "PeerAllowlist"},
	{name: "max-vips", field: "MaxVIPs"},
	{name: "metrics-addr", field: "MetricsAddr"},
}

// ReloadsLive reports whether Reload applies a new value of the config key
// (a flag name without dashes, e.g. "cache-linger") while the agent runs.
// False for keys that need a restart and for keys the agent does not know.
func ReloadsLive(key string) bool {
	for _, k := range configKeys {
		if k.name == key {
			return k.live
		}
	}
	return false
}

// liveConfig is the config in effect: what the agent started with, plus
// what reloads changed since.
type liveConfig struct {
	Config
	restart  []string  // keys whose new value waits for a restart
	reloaded time.Time // when a reload last changed something
}

// live returns the config in effect. Goroutines read the settings a reload
// may change through it, without a lock; Reload swaps the whole of it.
func (a *Agent) live() *Config { return &a.conf.Load().Config }

func (k configKey) value(c *Config) reflect.Value { return fieldValue(c, k.field) }

func fieldValue(c *Config, path string) reflect.Value {
	v := reflect.ValueOf(c).Elem()
	for _, f := range strings.Split(path, ".") {
		v = v.FieldByName(f)
	}
	return v
}

// equal reports whether a and b agree on every field of the key.
func (k configKey) equal(a, b *Config) bool {
	eq := reflect.DeepEqual(k.value(a).Interface(), k.value(b).Interface())
	if k.also != "" {
		eq = eq && reflect.DeepEqual(fieldValue(a, k.also).Interface(), fieldValue(b, k.also).Interface())
	}
	return eq
}

func (k configKey) format(c *Config) string {
	if k.secret {
		return "(not shown)"
	}
	return fmt.Sprint(k.value(c).Interface())
}

// diffConfig returns the keys whose values differ between from and to,
// split into those a reload applies live and those that need a restart.
func diffConfig(from, to *Config) (live, restart []configKey) {
	for _, k := range configKeys {
		if k.equal(from, to) {
			continue
		}
		if k.live {
			live = append(live, k)
		} else {
			restart = append(restart, k)
		}
	}
	return live, restart
}

func keyNames(keys []configKey) []string {
	var out []string
	for _, k := range keys {
		out = append(out, k.name)
	}
	return out
}

// withLive returns cur with the values of its live keys taken from next.
func withLive(cur, next *Config) Config {
	out := *cur
	for _, k := range configKeys {
		if k.live {
			k.value(&out).Set(k.value(next))
			if k.also != "" {
				fieldValue(&out, k.also).Set(fieldValue(next, k.also))
			}
		}
	}
	return out
}

// Reload applies cfg, a new config for the running agent (SIGHUP re-reads
// the config file). Keys that change live (ReloadsLive) take effect now or
// at their next use: new cache limits for migrations that start from now
// on, the keepalive and the reconcile interval at the next reconcile, which
// Reload asks for. A changed key that needs a restart keeps its running
// value; it is logged, shown in status and returned in restart. An invalid
// cfg changes nothing. Both lists hold config keys, as in the config file.
func (a *Agent) Reload(cfg Config) (applied, restart []string, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, nil, fmt.Errorf("config refused, nothing changed: %w", err)
	}
	a.reloadMu.Lock()
	defer a.reloadMu.Unlock()
	cur := a.conf.Load()
	liveKeys, restartKeys := diffConfig(&cur.Config, &cfg)
	applied, restart = keyNames(liveKeys), keyNames(restartKeys)
	next := withLive(&cur.Config, &cfg)
	if err := next.Validate(); err != nil {
		return nil, nil, fmt.Errorf("config refused, nothing changed: with the running values of the keys that need a restart (%s) it is invalid: %w",
			strings.Join(restart, ", "), err)
	}
	for _, k := range liveKeys {
		a.log.Info("config reloaded", "key", k.name, "from", k.format(&cur.Config), "to", k.format(&next))
	}
	for _, k := range restartKeys {
		a.log.Warn("config changed, but this key needs a restart: running with the old value until then",
			"key", k.name, "running", k.format(&cur.Config), "file", k.format(&cfg))
	}
	if len(applied) == 0 && len(restart) == 0 {
		a.log.Info("config reloaded: nothing changed")
	}
	lc := &liveConfig{Config: next, restart: restart, reloaded: cur.reloaded}
	if len(applied) > 0 {
		lc.reloaded = time.Now()
	}
	a.conf.Store(lc)
	if a.budget != nil {
		a.budget.SetMax(next.CacheGlobalMax)
	}
	if slices.Contains(applied, "join") || slices.Contains(applied, "network") {
		a.restartJoin()
	}
	a.kick()
	return applied, restart, nil
}

// configStatus reports the settings a reload can change, as in effect.
func (a *Agent) configStatus() *control.Config {
	lc := a.conf.Load()
	c := &lc.Config
	st := &control.Config{
		LogLevel:            logLevel(a.log),
		Join:                slices.Clone(c.Join),
		Networks:            []string{},
		ReconcileInterval:   c.ReconcileInterval.String(),
		Keepalive:           c.Keepalive.String(),
		CacheMaxBytes:       c.CacheLimits.MaxBytes,
		CacheMaxPackets:     c.CacheLimits.MaxPackets,
		CacheMaxAge:         c.CacheLimits.MaxAge.String(),
		CacheGlobalMaxBytes: c.CacheGlobalMax,
		CacheLinger:         c.CacheLinger.String(),
		CacheSettle:         c.CacheSettle.String(),
		Activation:          string(c.Activation),
		AllocSettle:         c.AllocSettle.String(),
		AllocQuarantine:     c.AllocQuarantine.String(),
		RestartNeeded:       slices.Clone(lc.restart),
	}
	if st.Join == nil {
		st.Join = []string{}
	}
	if st.RestartNeeded == nil {
		st.RestartNeeded = []string{}
	}
	for _, n := range c.Networks {
		st.Networks = append(st.Networks, n.String())
	}
	if !lc.reloaded.IsZero() {
		reloaded := lc.reloaded
		st.Reloaded = &reloaded
	}
	return st
}

// logLevel names the lowest level l logs: the CLI owns the level (and
// changes it on reload); the agent only sees its effect.
func logLevel(l *slog.Logger) string {
	for _, lv := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError} {
		if l.Enabled(context.Background(), lv) {
			return strings.ToLower(lv.String())
		}
	}
	return "none"
}
