package main

import (
	"flag"
	"fmt"
	"strings"
	"testing"
)

// tomlLiterals are values of every TOML type, each with the kinds that
// take it and how an error shows it.
var tomlLiterals = []struct {
	lit   string
	kinds []configKind
	shown string
}{
	{`5`, []configKind{kindPort, kindInt, kindSize}, "integer 5"},
	{`-1`, []configKind{kindInt}, "integer -1"},
	{`70000`, []configKind{kindInt, kindSize}, "integer 70000"},
	{`1.5`, nil, "float 1.5"},
	{`true`, []configKind{kindBool}, "boolean true"},
	{`"lots"`, []configKind{kindString, kindList}, `string "lots"`},
	{`"5"`, []configKind{kindString, kindList, kindSize}, `string "5"`},
	{`"198.51.100.10"`, []configKind{kindString, kindList, kindIP}, `string "198.51.100.10"`},
	{`"100.100.0.1/16"`, []configKind{kindString, kindList, kindCIDR}, `string "100.100.0.1/16"`},
	{`"2s"`, []configKind{kindString, kindList, kindDuration}, `string "2s"`},
	{`"1GiB"`, []configKind{kindString, kindList, kindSize}, `string "1GiB"`},
	{`""`, []configKind{kindString, kindList, kindIP, kindCIDR}, `string ""`}, // IP and CIDR: not set
	{`[1]`, nil, "array of 1"},
	{`["a", "b"]`, []configKind{kindList}, "array of 2"},
	{`[]`, []configKind{kindList}, "array of 0"},
	{`1979-05-27T07:32:00Z`, nil, "date-time 1979-05-27T07:32:00Z"},
	{`{ a = 1 }`, nil, "table"},
}

// TestConfigTypes: every key, given a value of every TOML type, is taken
// exactly when the value fits the key's kind; otherwise the error names
// the file, the line, the key, what it wants and what it got, and no flag
// changed.
func TestConfigTypes(t *testing.T) {
	kinds := map[configKind]int{}
	agentFlagSet().VisitAll(func(f *flag.Flag) {
		if f.Name == "config" {
			return
		}
		kind, err := kindOf(f)
		if err != nil {
			t.Fatal(err)
		}
		kinds[kind]++
		for _, tc := range tomlLiterals {
			fs := agentFlagSet()
			// A valid key first: a bad file must not set it either.
			data := "# a comment\nlog-level = \"debug\"\n" + f.Name + " = " + tc.lit + "\n"
			if f.Name == "log-level" {
				data = "# a comment\nname = \"x\"\n" + f.Name + " = " + tc.lit + "\n"
			}
			err := applyConfig(fs, "vmroam.toml", []byte(data))
			fits := false
			for _, k := range tc.kinds {
				fits = fits || k == kind
			}
			if fits {
				if err != nil {
					t.Errorf("%s = %s: %v", f.Name, tc.lit, err)
				}
				continue
			}
			want := fmt.Sprintf("config file vmroam.toml:3: %s: want %s, got %s", f.Name, kind.want(), tc.shown)
			if err == nil || err.Error() != want {
				t.Errorf("%s = %s:\n got %v\nwant %s", f.Name, tc.lit, err, want)
			}
			fs.VisitAll(func(g *flag.Flag) {
				if g.Value.String() != g.DefValue {
					t.Errorf("%s = %s was refused, but --%s changed to %q", f.Name, tc.lit, g.Name, g.Value.String())
				}
			})
		}
	})
	for k := kindString; k <= kindList; k++ {
		if kinds[k] == 0 {
			t.Errorf("no key of kind %s", k.want())
		}
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct{ data, want string }{
		{"bind = 5\n", `config file vmroam.toml:1: bind: want an IP address in quotes, like "198.51.100.10", got integer 5`},
		{"\n\ncache-max-bytes = \"lots\"\n", `config file vmroam.toml:3: cache-max-bytes: want a size like "1GiB" or a number of bytes, got string "lots"`},
		{"mtu = \"1400\"\n", `config file vmroam.toml:1: mtu: want an integer, got string "1400"`},
		{"  \"cache\" = \"yes\"\n", `config file vmroam.toml:1: cache: want true or false, got string "yes"`},
		{"keepalive = 25\n", `config file vmroam.toml:1: keepalive: want a duration in quotes, like "2s" or "500ms", got integer 25`},
		{"gossip-port = 99999\n", `config file vmroam.toml:1: gossip-port: want a port number from 0 to 65535, got integer 99999`},
		{"address = \"100.100.0.1\"\n", `config file vmroam.toml:1: address: want an address with its prefix length in quotes, like "100.100.0.1/16", got string "100.100.0.1"`},
		{"[bind]\nx = 1\n", `config file vmroam.toml:1: bind: want an IP address in quotes, like "198.51.100.10", got table`},
		{"mtu = 1400\nbnid = \"198.18.0.7\"\n", `config file vmroam.toml:2: unknown key "bnid"`},
		{"[cache.x]\n", `config file vmroam.toml:1: cache: want true or false, got table`},
		{"config = \"x\"\n", `config file vmroam.toml:1: unknown key "config"`},
		{"mtu = \n", `config file vmroam.toml:1: expected value but found '\n' instead`},
		{"mtu = 1\nmtu = 2\n", `config file vmroam.toml:2: Key 'mtu' has already been defined.`},
		{"name = \"" + strings.Repeat("x", 50) + "\"\nbind = true", `config file vmroam.toml:2: bind: want an IP address in quotes, like "198.51.100.10", got boolean true`},
	} {
		err := applyConfig(agentFlagSet(), "vmroam.toml", []byte(tc.data))
		if err == nil || err.Error() != tc.want {
			t.Errorf("%q:\n got %v\nwant %s", tc.data, err, tc.want)
		}
	}
}

func TestConfigSizes(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
	}{{"65536", 65536}, {"64KiB", 64 << 10}, {"64MiB", 64 << 20}, {"1 GiB", 1 << 30}, {"2TiB", 2 << 40}, {"100B", 100}, {"0", 0}} {
		if n, err := parseSize(tc.in); err != nil || n != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, n, err, tc.want)
		}
	}
	for _, bad := range []string{"", "lots", "1.5GiB", "-1", "1GB", "1 KiB B", "9999999TiB", "GiB"} {
		if n, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) = %d", bad, n)
		}
	}
	fs := agentFlagSet()
	if err := applyConfig(fs, "vmroam.toml", []byte("cache-max-bytes = \"32MiB\"\ncache-global-max-bytes = 1073741824\n")); err != nil {
		t.Fatal(err)
	}
	if got := fs.Lookup("cache-max-bytes").Value.String(); got != "33554432" {
		t.Errorf("cache-max-bytes = %s", got)
	}
	cfg, err := agentConfig([]string{"--insecure-gossip", "--bind", "198.18.0.1", "--address", "100.100.0.1/16", "--cache-max-bytes", "1MiB", "--cache-global-max-bytes", "2GiB"}, &strings.Builder{}, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.CacheLimits.MaxBytes != 1<<20 || cfg.CacheGlobalMax != 2<<30 {
		t.Errorf("flags: per VIP %d, global %d", cfg.CacheLimits.MaxBytes, cfg.CacheGlobalMax)
	}
}

// FuzzConfigFile: whatever the config file holds, applyConfig does not
// panic; a file it refuses changes no flag and its error names the file;
// every value of a file it takes reads back through its flag.
func FuzzConfigFile(f *testing.F) {
	f.Add([]byte("name = \"h7\"\nbind = \"198.18.0.7\"\naddress = \"100.100.0.7/16\"\njoin = [\"198.18.0.1\", \"198.18.0.2:7947\"]\nmtu = 1380\n"))
	f.Add([]byte("cache-max-bytes = \"lots\"\n"))
	f.Add([]byte("cache-max-bytes = \"64MiB\"\ncache = false\nkeepalive = \"0s\"\n"))
	f.Add([]byte("bind = 5\n"))
	f.Add([]byte("[bind]\n'mtu' = 1\n"))
	f.Add([]byte("network = \"blue=100.64.1.0/24,red=100.64.2.0/24\"\n"))
	f.Add([]byte("gossip-port = -1\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		fs := agentFlagSet()
		err := applyConfig(fs, "fuzz.toml", data)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "config file fuzz.toml") {
				t.Fatalf("error does not name the file: %v", err)
			}
			fs.VisitAll(func(g *flag.Flag) {
				if g.Value.String() != g.DefValue {
					t.Fatalf("refused file (%v) changed --%s to %q", err, g.Name, g.Value.String())
				}
			})
			return
		}
		fs.VisitAll(func(g *flag.Flag) {
			again := agentFlagSet()
			if err := again.Set(g.Name, g.Value.String()); err != nil {
				t.Fatalf("--%s = %q does not read back: %v", g.Name, g.Value.String(), err)
			}
			if got := again.Lookup(g.Name).Value.String(); got != g.Value.String() {
				t.Fatalf("--%s = %q reads back as %q", g.Name, g.Value.String(), got)
			}
		})
	})
}
