package main

import (
	"errors"
	"flag"
	"fmt"
	"maps"
	"math"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
)

// configKind is the type a config file key's value must have.
type configKind int

const (
	kindString configKind = iota + 1
	kindIP
	kindCIDR
	kindPort
	kindInt
	kindSize
	kindBool
	kindDuration
	kindList
)

// want says what a value of the kind looks like, for errors.
func (k configKind) want() string {
	switch k {
	case kindString:
		return "a string in quotes"
	case kindIP:
		return `an IP address in quotes, like "198.51.100.10"`
	case kindCIDR:
		return `an address with its prefix length in quotes, like "100.100.0.1/16"`
	case kindPort:
		return "a port number from 0 to 65535"
	case kindInt:
		return "an integer"
	case kindSize:
		return `a size like "1GiB" or a number of bytes`
	case kindBool:
		return "true or false"
	case kindDuration:
		return `a duration in quotes, like "2s" or "500ms"`
	case kindList:
		return `an array of strings, like ["a", "b"]`
	}
	return fmt.Sprintf("kind %d", int(k))
}

// keyKinds are the keys whose flag is a string or an int but whose value
// must be more specific.
var keyKinds = map[string]configKind{
	"bind":                   kindIP,
	"advertise":              kindIP,
	"address":                kindCIDR,
	"gossip-port":            kindPort,
	"wg-port":                kindPort,
	"handover-port":          kindPort,
	"cache-max-bytes":        kindSize,
	"cache-global-max-bytes": kindSize,
}

// kindOf is the kind of a flag's value in the config file.
func kindOf(f *flag.Flag) (configKind, error) {
	if k, ok := keyKinds[f.Name]; ok {
		return k, nil
	}
	if _, ok := f.Value.(*listFlag); ok {
		return kindList, nil
	}
	g, ok := f.Value.(flag.Getter)
	if !ok {
		return 0, fmt.Errorf("flag %s: no config kind for %T", f.Name, f.Value)
	}
	switch g.Get().(type) {
	case string:
		return kindString, nil
	case bool:
		return kindBool, nil
	case int, int64, uint, uint64:
		return kindInt, nil
	case time.Duration:
		return kindDuration, nil
	}
	return 0, fmt.Errorf("flag %s: no config kind for %T", f.Name, g.Get())
}

// configValue checks a decoded TOML value against the kind and returns it
// as the flag's text.
func configValue(k configKind, v any) (string, bool) {
	switch k {
	case kindString:
		s, ok := v.(string)
		return s, ok
	case kindIP:
		// "" is the flag's default: not set.
		s, ok := v.(string)
		if _, err := netip.ParseAddr(s); !ok || (err != nil && s != "") {
			return "", false
		}
		return s, true
	case kindCIDR:
		s, ok := v.(string)
		if _, err := netip.ParsePrefix(s); !ok || (err != nil && s != "") {
			return "", false
		}
		return s, true
	case kindPort:
		n, ok := v.(int64)
		if !ok || n < 0 || n > math.MaxUint16 {
			return "", false
		}
		return strconv.FormatInt(n, 10), true
	case kindInt:
		n, ok := v.(int64)
		if !ok {
			return "", false
		}
		return strconv.FormatInt(n, 10), true
	case kindSize:
		switch v := v.(type) {
		case int64:
			if v < 0 {
				return "", false
			}
			return strconv.FormatInt(v, 10), true
		case string:
			if _, err := parseSize(v); err != nil {
				return "", false
			}
			return v, true
		}
		return "", false
	case kindBool:
		b, ok := v.(bool)
		return strconv.FormatBool(b), ok
	case kindDuration:
		s, ok := v.(string)
		if _, err := time.ParseDuration(s); !ok || err != nil {
			return "", false
		}
		return s, true
	case kindList:
		// One string is a list too, comma-separated like the flag.
		if s, ok := v.(string); ok {
			return s, true
		}
		l, ok := v.([]any)
		if !ok {
			return "", false
		}
		parts := make([]string, len(l))
		for i, e := range l {
			if parts[i], ok = e.(string); !ok {
				return "", false
			}
		}
		return strings.Join(parts, ","), true
	}
	return "", false
}

// describe names a decoded TOML value's type and shows it, for errors.
func describeValue(v any) string {
	switch v := v.(type) {
	case string:
		if len(v) > 40 {
			v = v[:40] + "..."
		}
		return fmt.Sprintf("string %q", v)
	case int64:
		return fmt.Sprintf("integer %d", v)
	case float64:
		return fmt.Sprintf("float %v", v)
	case bool:
		return fmt.Sprintf("boolean %v", v)
	case time.Time:
		return "date-time " + v.Format(time.RFC3339Nano)
	case []any:
		return fmt.Sprintf("array of %d", len(v))
	case map[string]any:
		return "table"
	}
	return fmt.Sprintf("%T", v)
}

// applyConfigFile sets every flag the file names that the command line did
// not set. Unknown keys are errors: a misspelt key must not be ignored.
func applyConfigFile(fs *flag.FlagSet, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return usagef("config file: %v", err)
	}
	return applyConfig(fs, path, data)
}

// applyConfig is applyConfigFile on the file's contents. Every key is
// checked against its flag's kind before any flag is set: a file with one
// bad key changes nothing. The first bad key in the file is reported,
// with its line when it can be found.
func applyConfig(fs *flag.FlagSet, path string, data []byte) error {
	var raw map[string]any
	md, err := toml.Decode(string(data), &raw)
	if err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			return usagef("config file %s:%d: %s", path, pe.Position.Line, pe.Message)
		}
		return usagef("config file %s: %v", path, err)
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	lines := strings.Split(string(data), "\n")
	where := func(key string) string {
		if n := keyLine(lines, key); n > 0 {
			return fmt.Sprintf("%s:%d", path, n)
		}
		return path
	}
	// In the file's order (md.Keys), so that the first mistake is named.
	keys := make([]string, 0, len(raw))
	for _, k := range md.Keys() {
		if len(k) == 0 {
			continue
		}
		if _, ok := raw[k[0]]; ok && !slices.Contains(keys, k[0]) {
			keys = append(keys, k[0])
		}
	}
	for _, k := range slices.Sorted(maps.Keys(raw)) {
		if !slices.Contains(keys, k) {
			keys = append(keys, k)
		}
	}
	type setting struct{ key, val string }
	var todo []setting
	for _, key := range keys {
		f := fs.Lookup(key)
		if key == "config" || f == nil {
			return usagef("config file %s: unknown key %q", where(key), key)
		}
		kind, err := kindOf(f)
		if err != nil {
			return err
		}
		v := raw[key]
		s, ok := configValue(kind, v)
		if !ok {
			return usagef("config file %s: %s: want %s, got %s", where(key), key, kind.want(), describeValue(v))
		}
		if !set[key] {
			todo = append(todo, setting{key, s})
		}
	}
	// Every value is checked, so Set does not fail but for a value out
	// of the flag's range (none on a 64-bit host).
	for _, st := range todo {
		if err := fs.Set(st.key, st.val); err != nil {
			return usagef("config file %s: %s: %v", where(st.key), st.key, err)
		}
	}
	return nil
}

// keyLine is the 1-based line where key is set in the file (a bare,
// quoted or table-header key at the start of a line), 0 if none is found:
// the TOML library does not say where a value was.
func keyLine(lines []string, key string) int {
	for i, l := range lines {
		l = strings.TrimSpace(l)
		for _, form := range []string{key, `"` + key + `"`, "'" + key + "'"} {
			rest, ok := strings.CutPrefix(l, form)
			if !ok {
				continue
			}
			if r := strings.TrimLeft(rest, " \t"); strings.HasPrefix(r, "=") || strings.HasPrefix(r, ".") {
				return i + 1
			}
		}
		if h := strings.Trim(l, "[] \t"); strings.HasPrefix(l, "[") && (h == key || strings.HasPrefix(h, key+".")) {
			return i + 1
		}
	}
	return 0
}

// parseSize reads a size: a number of bytes, optionally with a unit B,
// KiB, MiB, GiB or TiB ("64MiB", "1 GiB").
func parseSize(s string) (int64, error) {
	num := strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40}, {"B", 1}} {
		if n, ok := strings.CutSuffix(num, u.suffix); ok {
			num, mult = strings.TrimSpace(n), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(num, 10, 64)
	if err != nil || n < 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("%q is not a size: want bytes, or a number with B, KiB, MiB, GiB or TiB, like 64MiB", s)
	}
	return n * mult, nil
}

// sizeValue is a flag of a size in bytes (parseSize).
type sizeValue struct{ p *int64 }

func (v sizeValue) String() string {
	if v.p == nil {
		return "0"
	}
	return strconv.FormatInt(*v.p, 10)
}

func (v sizeValue) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*v.p = n
	return nil
}

func (v sizeValue) Get() any { return *v.p }
