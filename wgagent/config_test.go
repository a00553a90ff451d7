package wgagent

import (
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func validConfig() Config {
	c := DefaultConfig()
	c.Name = "h1"
	c.BindAddr = netip.MustParseAddr("198.18.0.1")
	c.Address = netip.MustParsePrefix("100.100.0.1/16")
	c.GossipKeys = [][]byte{make([]byte, 32)}
	return c
}

func TestValidate(t *testing.T) {
	if err := (&Config{}).Validate(); err == nil {
		t.Fatal("empty config accepted")
	}
	good := validConfig()
	if err := good.Validate(); err != nil {
		t.Fatalf("valid config refused: %v", err)
	}
	cases := []struct {
		name   string
		change func(*Config)
		want   string
	}{
		{"no name", func(c *Config) { c.Name = "" }, "--name"},
		{"unspecified bind", func(c *Config) { c.BindAddr = netip.MustParseAddr("0.0.0.0") }, "--advertise"},
		{"prefix as address", func(c *Config) { c.Address = netip.MustParsePrefix("100.100.0.0/16") }, "100.100.0.1/16"},
		{"no keys", func(c *Config) { c.GossipKeys = nil }, "--encrypt-key-file"},
		{"bad port", func(c *Config) { c.WGPort = 0 }, "--wg-port"},
		{"bad profile", func(c *Config) { c.GossipProfile = "moon" }, "--gossip-profile"},
		{"fast reconcile", func(c *Config) { c.ReconcileInterval = 1 }, "--reconcile-interval"},
		{"metrics without port", func(c *Config) { c.MetricsAddr = "127.0.0.1" }, "--metrics-addr"},
		{"metrics port 0", func(c *Config) { c.MetricsAddr = "127.0.0.1:0" }, "--metrics-addr"},
		{"metrics port name", func(c *Config) { c.MetricsAddr = "127.0.0.1:http" }, "--metrics-addr"},
		{"loopback VIPs", func(c *Config) { c.VIPPrefixes = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")} }, "--vip-prefixes 127.0.0.0/8"},
		{"link-local VIPs", func(c *Config) { c.VIPPrefixes = []netip.Prefix{netip.MustParsePrefix("169.254.0.0/16")} }, "--vip-prefixes 169.254.0.0/16"},
		{"unmasked VIP prefix", func(c *Config) { c.VIPPrefixes = []netip.Prefix{netip.MustParsePrefix("100.100.0.1/16")} }, "host bits"},
	}
	for _, tc := range cases {
		c := validConfig()
		tc.change(&c)
		err := c.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want mention of %s", tc.name, err, tc.want)
		}
	}
	c := validConfig()
	c.VIPPrefixes = []netip.Prefix{netip.MustParsePrefix("100.100.0.0/16"), netip.MustParsePrefix("fd76:6d72::/64")}
	if err := c.Validate(); err != nil {
		t.Errorf("--vip-prefixes refused: %v", err)
	}
	c = validConfig()
	c.GossipKeys, c.InsecureGossip = nil, true
	if err := c.Validate(); err != nil {
		t.Errorf("--insecure-gossip without keys refused: %v", err)
	}
	c = validConfig()
	c.MetricsAddr = "[::1]:9474"
	if err := c.Validate(); err != nil {
		t.Errorf("--metrics-addr [::1]:9474 refused: %v", err)
	}
	c = validConfig()
	c.BindAddr = netip.MustParseAddr("0.0.0.0")
	c.AdvertiseAddr = netip.MustParseAddr("198.18.0.1")
	if err := c.Validate(); err != nil {
		t.Errorf("unspecified bind with advertise refused: %v", err)
	}
	// A /32 overlay address (a single host) is its own prefix and fine.
	c = validConfig()
	c.Address = netip.MustParsePrefix("100.100.0.1/32")
	if err := c.Validate(); err != nil {
		t.Errorf("/32 address refused: %v", err)
	}
}

func TestJoinList(t *testing.T) {
	self := netip.MustParseAddr("198.18.0.1")
	got := joinList([]string{"198.18.0.2:7946", "198.18.0.1:7946", ""}, []string{"198.18.0.3:7946", "198.18.0.2:7946"}, self, 7946)
	want := []string{"198.18.0.2:7946", "198.18.0.3:7946"}
	if !slices.Equal(got, want) {
		t.Fatalf("joinList = %v, want %v", got, want)
	}
}

func TestKeyPersistence(t *testing.T) {
	dir := t.TempDir()
	k1, created, err := loadOrCreateKey(dir)
	if err != nil || !created {
		t.Fatalf("first start: %v created=%v", err, created)
	}
	fi, err := os.Stat(filepath.Join(dir, privateKeyFile))
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("key file mode %v, %v", fi.Mode().Perm(), err)
	}
	k2, created, err := loadOrCreateKey(dir)
	if err != nil || created || k1 != k2 {
		t.Fatalf("restart: key changed or re-created (%v, created=%v)", err, created)
	}
	os.Chmod(filepath.Join(dir, privateKeyFile), 0o644)
	if _, _, err := loadOrCreateKey(dir); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("world-readable key accepted: %v", err)
	}
	os.WriteFile(filepath.Join(dir, privateKeyFile), []byte("garbage\n"), 0o600)
	if _, _, err := loadOrCreateKey(dir); err == nil {
		t.Fatal("garbage key accepted")
	}
}

func TestStatePersistence(t *testing.T) {
	dir := t.TempDir()
	st, err := loadState(dir)
	if err != nil || len(st.Attachments) != 0 {
		t.Fatalf("empty dir: %+v %v", st, err)
	}
	in := persisted{
		Attachments: []attachment{
			{VIP: netip.MustParseAddr("fd76:6d72::a1"), Dev: "vif2", Epoch: 7},
			{VIP: netip.MustParseAddr("100.100.10.1"), Dev: "vif1", Epoch: 3},
		},
		Peers: []string{"198.18.0.3:7946", "198.18.0.2:7946"},
	}
	if err := saveState(dir, in); err != nil {
		t.Fatal(err)
	}
	out, err := loadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(out.Attachments) != 2 || out.Attachments[0].VIP != netip.MustParseAddr("100.100.10.1") || out.Attachments[1].Epoch != 7 {
		t.Fatalf("attachments = %+v", out.Attachments)
	}
	if !slices.Equal(out.Peers, []string{"198.18.0.2:7946", "198.18.0.3:7946"}) {
		t.Fatalf("peers = %v", out.Peers)
	}
	os.WriteFile(filepath.Join(dir, stateFile), []byte("{"), 0o600)
	if _, err := loadState(dir); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Fatalf("corrupt state: %v", err)
	}
}
