package e2e

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/vmroam/vmroam/lab"
)

// soakUsage is what one agent holds that must not grow over a soak.
type soakUsage struct {
	goroutines, fds float64
	heap            float64 // bytes of live heap objects (go_memstats_heap_alloc_bytes after the agent's own GCs)
	routes          []string
	fdKinds         map[string]int // what the fds are, to say which grew
}

func (u soakUsage) String() string {
	return fmt.Sprintf("%.0f goroutines, %.0f fds %v, heap %.1f MiB, %d routes and rules", u.goroutines, u.fds, u.fdKinds, u.heap/(1<<20), len(u.routes))
}

// soakRoutes lists a host's routes in every table and its policy rules,
// sorted: what vmroam installs there, and must take away again.
func soakRoutes(t testing.TB, l *lab.Lab, h *lab.Host) []string {
	t.Helper()
	var out []string
	for _, args := range [][]string{
		{"ip", "-4", "route", "show", "table", "all"}, {"ip", "-6", "route", "show", "table", "all"},
		{"ip", "-4", "rule", "show"}, {"ip", "-6", "rule", "show"},
	} {
		b, err := l.Exec(h.NS, args...)
		if err != nil {
			t.Fatalf("%s: %s: %v\n%s", h.Name, strings.Join(args, " "), err, b)
		}
		for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
			// Kernel-made routes come and go with the traffic.
			if line != "" && !strings.Contains(line, "proto kernel") && !strings.Contains(line, "cache") {
				out = append(out, line)
			}
		}
	}
	slices.Sort(out)
	return out
}

func soakSample(t testing.TB, l *lab.Lab, h *lab.Host) soakUsage {
	t.Helper()
	fams := scrape(t, l, h)
	var u soakUsage
	u.goroutines, _ = fams.Value("go_goroutines")
	u.fds, _ = fams.Value("process_open_fds")
	u.heap, _ = fams.Value("go_memstats_heap_alloc_bytes")
	u.routes = soakRoutes(t, l, h)
	u.fdKinds = fdKinds(h.Agent.Pid())
	return u
}

// fdKinds counts a process's open files by kind: sockets by protocol
// (the /proc/PID/net table that lists their inode), others by what they
// link to, without numbers.
func fdKinds(pid int) map[string]int {
	proto := map[string]string{}
	for _, p := range []string{"tcp", "tcp6", "udp", "udp6", "raw", "raw6", "unix", "packet", "netlink"} {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, p))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			f := strings.Fields(line)
			// The inode is the 10th field of tcp/udp/raw, the 7th of unix and
			// the 9th of packet; netlink's is the last.
			for _, i := range []int{9, 6, 8, len(f) - 1} {
				if i >= 0 && i < len(f) {
					if _, seen := proto[f[i]]; !seen {
						proto[f[i]] = p
					}
				}
			}
		}
	}
	out := map[string]int{}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		target, err := os.Readlink(dir + "/" + e.Name())
		if err != nil {
			continue
		}
		kind := target
		if inode, ok := strings.CutPrefix(target, "socket:["); ok {
			kind = "socket " + proto[strings.TrimSuffix(inode, "]")]
		} else if i := strings.IndexAny(target, "[0123456789"); strings.HasPrefix(target, "anon_inode") && i > 0 {
			kind = target[:i]
		}
		out[kind]++
	}
	return out
}

// TestSoak migrates a VM around three hosts under UDP traffic for
// VMROAM_SOAK (a duration, default 10m) with agents built with the race
// detector, then brings the VM back where it was when the baseline was
// taken and checks that no agent kept more goroutines, file descriptors,
// heap, routes or rules than then, and that no namespace was left over.
// Every move is checked as in TestFaultManyMigrations. Opt-in (make soak,
// or -run naming it).
func TestSoak(t *testing.T) {
	if !longTestsWanted("TestSoak") && os.Getenv("VMROAM_SOAK") == "" {
		t.Skip("long: run make soak, set VMROAM_SOAK=10m or name it in -run")
	}
	dur := 10 * time.Minute
	if v := os.Getenv("VMROAM_SOAK"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("VMROAM_SOAK=%q: want a duration such as 10m", v)
		}
		dur = d
	}
	nsBefore := labNamespaces(t)
	// Registered before the lab's own cleanup, so it runs after the lab
	// is closed.
	t.Cleanup(func() {
		if extra := slices.DeleteFunc(labNamespaces(t), func(ns string) bool { return slices.Contains(nsBefore, ns) }); len(extra) > 0 {
			t.Errorf("namespaces left after the lab closed: %v", extra)
		}
	})
	l := newLab(t, 3) // the race detector's build
	for _, h := range l.Hosts {
		if _, err := l.StartAgent(h, "--metrics-addr", metricsAddr); err != nil {
			t.Fatal(err)
		}
	}
	h1, h3 := l.Hosts[0], l.Hosts[2]
	m, c := addPair(t, l, h1, "", h3)
	ring := []*lab.Host{h1, l.Hosts[1], h3}

	// Warm up (first tunnels, first migrations' one-time allocations),
	// then take the baseline with the VM back home.
	if _, _, err := moveLoop(l, c, m, vipM, ring, 3, "4M", t.Logf); err != nil {
		t.Fatalf("warm-up: %v", err)
	}
	home := m.Host
	settle := func() map[string]soakUsage {
		// The last move's linger and the agents' background work end;
		// then every agent is asked as it is.
		time.Sleep(8 * time.Second)
		u := map[string]soakUsage{}
		for _, h := range l.Hosts {
			u[h.Name] = soakSample(t, l, h)
		}
		return u
	}
	base := settle()
	for _, h := range l.Hosts {
		t.Logf("%s baseline: %v", h.Name, base[h.Name])
	}

	start, before := time.Now(), takeLossSnapshot(t, l, m)
	var total lab.FlowResult
	moves := 0
	for time.Since(start) < dur {
		res, n, err := moveLoop(l, c, m, vipM, ring, 6, "4M", t.Logf)
		moves += n
		total.Packets += res.Packets
		total.Lost += res.Lost
		total.OutOfOrder += res.OutOfOrder
		if err != nil {
			t.Fatalf("after %d moves: %v", moves, err)
		}
		for _, h := range l.Hosts {
			t.Logf("%s after %d moves (%v): %v", h.Name, moves, time.Since(start).Round(time.Second), soakSample(t, l, h))
		}
	}
	for m.Host != home {
		if _, n, err := moveLoop(l, c, m, vipM, ring, 1, "4M", t.Logf); err != nil {
			t.Fatalf("bringing the VM home: %v", err)
		} else {
			moves += n
		}
	}
	t.Logf("%d moves in %v", moves, time.Since(start).Round(time.Second))
	checkMoves(t, l, fmt.Sprintf("%d moves", moves), total, moves, before, m)

	// Growth: a little slack for what comes and goes (an HTTP scrape's
	// goroutines, a handover connection closing); twice the heap for the
	// garbage collector's timing. A leak per move grows past these over
	// hundreds of moves.
	var end map[string]soakUsage
	eventually(t, 60*time.Second, "every agent back to its baseline", func() error {
		end = settle()
		var grew []string
		for _, h := range l.Hosts {
			b, e := base[h.Name], end[h.Name]
			if e.goroutines > b.goroutines+5 {
				grew = append(grew, fmt.Sprintf("%s: goroutines %.0f -> %.0f", h.Name, b.goroutines, e.goroutines))
			}
			if e.fds > b.fds+3 {
				grew = append(grew, fmt.Sprintf("%s: fds %.0f -> %.0f (%v -> %v)", h.Name, b.fds, e.fds, b.fdKinds, e.fdKinds))
			}
			if e.heap > 2*b.heap+(4<<20) {
				grew = append(grew, fmt.Sprintf("%s: heap %.1f -> %.1f MiB", h.Name, b.heap/(1<<20), e.heap/(1<<20)))
			}
			if !slices.Equal(e.routes, b.routes) {
				grew = append(grew, fmt.Sprintf("%s: routes and rules differ:\nbefore:\n  %s\nafter:\n  %s", h.Name,
					strings.Join(b.routes, "\n  "), strings.Join(e.routes, "\n  ")))
			}
		}
		if len(grew) > 0 {
			return fmt.Errorf("%s", strings.Join(grew, "\n"))
		}
		return nil
	})
	for _, h := range l.Hosts {
		t.Logf("%s at the end: %v", h.Name, end[h.Name])
	}
	if t.Failed() {
		// Ten minutes of logs: what the agents warned of, with the
		// hand-backs that delivered late.
		for _, h := range l.Hosts {
			var lines []string
			for _, line := range strings.Split(agentLog(t, h), "\n") {
				if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
					lines = append(lines, line)
				}
			}
			t.Logf("---- %s: %d warnings and errors ----\n%s", h.Name, len(lines), strings.Join(lines, "\n"))
		}
	}
}

// labNamespaces lists the network namespaces (the lab's are among them).
func labNamespaces(t testing.TB) []string {
	t.Helper()
	entries, err := os.ReadDir("/run/netns")
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}
