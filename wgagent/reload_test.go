package wgagent

import (
	"context"
	"io"
	"log/slog"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
)

// A Config field that no config key names would be silently ignored by a
// reload: every field must say whether it reloads live.
func TestConfigKeysCoverConfig(t *testing.T) {
	names := map[string]bool{}
	fields := map[string]bool{}
	for _, k := range configKeys {
		if names[k.name] {
			t.Errorf("config key %q listed twice", k.name)
		}
		names[k.name] = true
		c := validConfig()
		for _, f := range []string{k.field, k.also} {
			if f == "" {
				continue
			}
			if !fieldValue(&c, f).IsValid() {
				t.Errorf("config key %q: no Config field %s", k.name, f)
			}
			fields[f] = true
		}
	}
	var walk func(prefix string, typ reflect.Type)
	walk = func(prefix string, typ reflect.Type) {
		for f := range typ.Fields() {
			path := prefix + f.Name
			if path == "Logger" || fields[path] {
				continue
			}
			nested := false
			for p := range fields {
				nested = nested || strings.HasPrefix(p, path+".")
			}
			if nested {
				walk(path+".", f.Type)
				continue
			}
			t.Errorf("Config field %s has no config key in configKeys: add it, saying whether Reload applies it live", path)
		}
	}
	walk("", reflect.TypeFor[Config]())
}

// changeValue sets v to a different valid-looking value of its type.
func changeValue(t *testing.T, v reflect.Value) {
	t.Helper()
	switch x := v.Interface().(type) {
	case netip.Addr:
		v.Set(reflect.ValueOf(netip.MustParseAddr("192.0.2.99")))
		return
	case netip.Prefix:
		v.Set(reflect.ValueOf(netip.MustParsePrefix("100.101.0.9/16")))
		return
	case []NetworkConfig:
		v.Set(reflect.ValueOf(append(slices.Clone(x), NetworkConfig{Name: "new", Prefix: netip.MustParsePrefix("100.102.0.0/24")})))
		return
	case [][]byte:
		v.Set(reflect.ValueOf(append(slices.Clone(x), make([]byte, 32))))
		return
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(v.String() + "x")
	case reflect.Int, reflect.Int64:
		v.SetInt(v.Int() + 1)
	case reflect.Bool:
		v.SetBool(!v.Bool())
	case reflect.Slice:
		v.Set(reflect.Append(v, reflect.New(v.Type().Elem()).Elem()))
	default:
		t.Fatalf("changeValue: no rule for %s", v.Type())
	}
}

func TestDiffConfigFindsEveryKey(t *testing.T) {
	base := validConfig()
	for _, k := range configKeys {
		for _, f := range []string{k.field, k.also} {
			if f == "" {
				continue
			}
			c := validConfig()
			changeValue(t, fieldValue(&c, f))
			live, restart := diffConfig(&base, &c)
			want, other := restart, live
			if k.live {
				want, other = live, restart
			}
			if len(want) != 1 || want[0].name != k.name || len(other) != 0 {
				t.Errorf("%s (%s) changed: live %v, restart %v", k.name, f, keyNames(live), keyNames(restart))
			}
		}
	}
	if live, restart := diffConfig(&base, &base); len(live)+len(restart) != 0 {
		t.Errorf("no change: live %v, restart %v", keyNames(live), keyNames(restart))
	}
}

func TestWithLiveTakesOnlyLiveKeys(t *testing.T) {
	cur := validConfig()
	next := validConfig()
	for _, k := range configKeys {
		changeValue(t, k.value(&next))
		if k.also != "" {
			changeValue(t, fieldValue(&next, k.also))
		}
	}
	got := withLive(&cur, &next)
	for _, k := range configKeys {
		from := &cur
		if k.live {
			from = &next
		}
		if !k.equal(&got, from) {
			t.Errorf("%s (live %v) = %s, want %s", k.name, k.live, k.format(&got), k.format(from))
		}
	}
}

func TestReloadsLive(t *testing.T) {
	for key, want := range map[string]bool{
		"cache-linger": true, "keepalive": true, "join": true, "reconcile-interval": true,
		"mtu": false, "interface": false, "encrypt-key-file": false, "no-such-key": false,
	} {
		if got := ReloadsLive(key); got != want {
			t.Errorf("ReloadsLive(%q) = %v, want %v", key, got, want)
		}
	}
}

// reloadAgent is the part of an agent Reload uses: no devices, no gossip.
func reloadAgent(cfg Config, log *slog.Logger) *Agent {
	a := &Agent{cfg: cfg, log: log, trigger: make(chan struct{}, 1), budget: cache.NewBudget(cfg.CacheGlobalMax)}
	a.conf.Store(&liveConfig{Config: cfg})
	return a
}

func TestReloadApplies(t *testing.T) {
	var logs strings.Builder
	cfg := validConfig()
	a := reloadAgent(cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	joinCtx, rejoin := context.WithCancel(context.Background())
	defer rejoin()
	a.rejoin = rejoin

	next := validConfig()
	next.CacheLinger = 5 * time.Second
	next.CacheGlobalMax = 2 << 30
	next.Keepalive = 10 * time.Second
	next.Join = []string{"198.18.0.9"}
	next.MTU = 1400
	next.Interface = "vmr9"
	applied, restart, err := a.Reload(next)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"join", "keepalive", "cache-global-max-bytes", "cache-linger"}; !slices.Equal(applied, want) {
		t.Errorf("applied %q, want %q", applied, want)
	}
	if want := []string{"interface", "mtu"}; !slices.Equal(restart, want) {
		t.Errorf("restart %q, want %q", restart, want)
	}
	l := a.live()
	if l.CacheLinger != 5*time.Second || l.Keepalive != 10*time.Second || !slices.Equal(l.Join, next.Join) {
		t.Errorf("live config not updated: linger %v, keepalive %v, join %q", l.CacheLinger, l.Keepalive, l.Join)
	}
	if l.MTU != cfg.MTU || l.Interface != cfg.Interface {
		t.Errorf("keys that need a restart changed: mtu %d, interface %q", l.MTU, l.Interface)
	}
	if a.budget.Max() != 2<<30 {
		t.Errorf("global cache cap %d, want %d", a.budget.Max(), 2<<30)
	}
	if joinCtx.Err() == nil {
		t.Error("a new join list did not restart the join loop")
	}
	select {
	case <-a.trigger:
	default:
		t.Error("no reconcile asked for")
	}
	for _, want := range []string{"key=cache-linger from=2s to=5s", "key=mtu running=1420 file=1400", "needs a restart"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
	st := a.configStatus()
	if st.CacheLinger != "5s" || st.Keepalive != "10s" || !slices.Equal(st.RestartNeeded, []string{"interface", "mtu"}) || st.Reloaded == nil {
		t.Errorf("status config %+v", st)
	}

	// The same file again: nothing to apply, the restart keys still wait.
	applied, restart, err = a.Reload(next)
	if err != nil || len(applied) != 0 || len(restart) != 2 {
		t.Errorf("same config again: applied %q, restart %q, err %v", applied, restart, err)
	}
	// Back to the running values: nothing waits for a restart any more.
	back := next
	back.MTU, back.Interface = cfg.MTU, cfg.Interface
	if _, restart, err = a.Reload(back); err != nil || len(restart) != 0 || len(a.configStatus().RestartNeeded) != 0 {
		t.Errorf("restart keys reverted: restart %q, status %q, err %v", restart, a.configStatus().RestartNeeded, err)
	}
}

func TestReloadRefusesBadConfig(t *testing.T) {
	cfg := validConfig()
	a := reloadAgent(cfg, slog.New(slog.NewTextHandler(io.Discard, nil)))
	before := *a.live()

	bad := validConfig()
	bad.CacheLinger = 7 * time.Second // valid on its own: must not be applied either
	bad.ReconcileInterval = time.Millisecond
	if _, _, err := a.Reload(bad); err == nil || !strings.Contains(err.Error(), "--reconcile-interval") {
		t.Errorf("invalid config: err %v", err)
	}
	// Valid as a file, invalid with the running value of a restart key:
	// the file turns the cache off and shrinks its limits, but the cache
	// stays on until a restart.
	mixed := validConfig()
	mixed.Cache = false
	mixed.CacheLimits.MaxBytes = 10
	if _, _, err := a.Reload(mixed); err == nil || !strings.Contains(err.Error(), "cache") {
		t.Errorf("config invalid with the running cache: err %v", err)
	}
	if after := *a.live(); !reflect.DeepEqual(before, after) {
		t.Errorf("a refused reload changed the config:\nbefore %+v\nafter  %+v", before, after)
	}
	select {
	case <-a.trigger:
		t.Error("a refused reload asked for a reconcile")
	default:
	}
}

func TestLogLevel(t *testing.T) {
	for _, lv := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn, slog.LevelError} {
		var v slog.LevelVar
		v.Set(lv)
		l := slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: &v}))
		if got, want := logLevel(l), strings.ToLower(lv.String()); got != want {
			t.Errorf("logLevel at %v = %q", lv, got)
		}
	}
}

// A key may set two fields (a file's path and what it holds): a change in
// either is a change of the key, and a live key copies both.
func TestConfigKeyWithTwoFields(t *testing.T) {
	k := configKey{name: "two", field: "Site", also: "Xenstore", live: true}
	a, b := validConfig(), validConfig()
	if !k.equal(&a, &b) {
		t.Fatal("equal configs differ")
	}
	b.Xenstore = "/run/other/socket"
	if k.equal(&a, &b) {
		t.Error("a change of the second field went unseen")
	}
	old := configKeys
	defer func() { configKeys = old }()
	configKeys = []configKey{k}
	if got := withLive(&a, &b); got.Xenstore != b.Xenstore {
		t.Errorf("withLive kept the second field at %q", got.Xenstore)
	}
}
