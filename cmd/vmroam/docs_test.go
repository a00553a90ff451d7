package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/wgagent"
	"github.com/vmroam/vmroam/wgagent/control"
)

// repoRoot is where the Makefile, docs/ and scripts/ are.
const repoRoot = "../.."

// reloadsLive says whether a reload applies the agent flag: the agent's
// keys as wgagent says, plus the CLI's own.
func reloadsLive(key string) bool { return key == "log-level" || wgagent.ReloadsLive(key) }

// agentFlagSet is the agent's flags with their defaults.
func agentFlagSet() *flag.FlagSet { return newAgentFlags(&bytes.Buffer{}, &bytes.Buffer{}).fs }

// configRows returns the key table of docs/config.md: key -> its cells.
func configRows(t *testing.T) map[string][]string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "docs", "config.md"))
	if err != nil {
		t.Fatal(err)
	}
	rows := map[string][]string{}
	for _, line := range strings.Split(string(b), "\n") {
		cells := strings.Split(line, "|")
		if len(cells) < 7 || !strings.HasPrefix(strings.TrimSpace(cells[1]), "`") {
			continue
		}
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		rows[strings.Trim(cells[1], "`")] = cells[2:6] // type, default, reload, what
	}
	return rows
}

var backticked = regexp.MustCompile("`([^`]*)`")

// TestConfigDocs: every agent flag has a row in docs/config.md whose
// default is the flag's and whose reload column says what a reload does.
func TestConfigDocs(t *testing.T) {
	rows := configRows(t)
	fs := agentFlagSet()
	fs.VisitAll(func(f *flag.Flag) {
		row, ok := rows[f.Name]
		if !ok {
			t.Errorf("docs/config.md has no row for the agent flag --%s", f.Name)
			return
		}
		delete(rows, f.Name)
		def, reload := row[1], row[2]
		switch f.Name {
		case "name": // the host name: differs between machines
		case "socket": // $VMROAM_SOCKET may be set where the test runs
			if !strings.Contains(def, control.DefaultSocket) {
				t.Errorf("socket: default %q, want %s", def, control.DefaultSocket)
			}
		default:
			m := backticked.FindStringSubmatch(def)
			switch {
			case f.DefValue == "" && m != nil:
				t.Errorf("--%s has no default, docs say %q", f.Name, def)
			case f.DefValue != "" && m == nil:
				t.Errorf("--%s: docs give no default, want %s", f.Name, f.DefValue)
			case m != nil && !sameValue(m[1], f.DefValue):
				t.Errorf("--%s: docs say the default is %s, the flag's is %s", f.Name, m[1], f.DefValue)
			}
		}
		switch {
		case f.Name == "config":
			if reload != "-" {
				t.Errorf("--config: reload %q, want -", reload)
			}
		case reloadsLive(f.Name) && !strings.HasPrefix(reload, "yes"):
			t.Errorf("--%s reloads live, docs say %q", f.Name, reload)
		case !reloadsLive(f.Name) && reload != "restart":
			t.Errorf("--%s needs a restart, docs say %q", f.Name, reload)
		}
	})
	for key := range rows {
		t.Errorf("docs/config.md documents %q, which is no agent flag", key)
	}
}

// sameValue compares a default as written in the docs with the flag's.
func sameValue(doc, def string) bool {
	if doc == def {
		return true
	}
	d1, err1 := time.ParseDuration(doc)
	d2, err2 := time.ParseDuration(def)
	return err1 == nil && err2 == nil && d1 == d2
}

var exampleSetting = regexp.MustCompile(`^#?([a-z][a-z0-9-]*) = `)

// TestExampleConfig: the example file names every key the file may set,
// marks those that need a restart, and parses both as it ships (all
// commented out) and with every setting uncommented.
func TestExampleConfig(t *testing.T) {
	path := filepath.Join(repoRoot, "docs", "vmroam.example.toml")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var uncommented []string
	for _, line := range strings.Split(string(b), "\n") {
		m := exampleSetting.FindStringSubmatch(line)
		if m == nil {
			uncommented = append(uncommented, line)
			continue
		}
		key := m[1]
		seen[key] = true
		if marked := strings.Contains(line, "[restart]"); marked == reloadsLive(key) {
			t.Errorf("example: %s is marked [restart] %v, but reloads live %v", key, marked, reloadsLive(key))
		}
		uncommented = append(uncommented, strings.TrimPrefix(line, "#"))
	}
	agentFlagSet().VisitAll(func(f *flag.Flag) {
		if f.Name != "config" && !seen[f.Name] {
			t.Errorf("the example config lacks %s", f.Name)
		}
	})
	if err := applyConfigFile(agentFlagSet(), path); err != nil {
		t.Errorf("the example as shipped: %v", err)
	}
	all := filepath.Join(t.TempDir(), "all.toml")
	if err := os.WriteFile(all, []byte(strings.Join(uncommented, "\n")), 0o600); err != nil {
		t.Fatal(err)
	}
	fs := agentFlagSet()
	if err := applyConfigFile(fs, all); err != nil {
		t.Fatalf("the example with every setting uncommented: %v", err)
	}
	if got := fs.Lookup("bind").Value.String(); got != "198.51.100.10" {
		t.Errorf("uncommented example: bind = %q: the settings were not read", got)
	}
}
