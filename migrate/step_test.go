package migrate

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/vmroam/vmroam/wgagent/control"
)

var allStates = []vipState{stateNone, stateLocal, stateCaching, stateHolding, stateForwarding}

func allPhases() []vipPhase {
	var ps []vipPhase
	for _, s := range allStates {
		ps = append(ps, vipPhase{state: s})
	}
	return append(ps, vipPhase{state: stateCaching, byCarrier: true})
}

func (p vipPhase) String() string {
	s := p.state.String()
	if p.byCarrier {
		s += "(carrier)"
	}
	return s
}

// TestStepTable pins every transition that does something; every other
// (phase, event) pair must change nothing and do nothing.
func TestStepTable(t *testing.T) {
	type want struct {
		next vipPhase
		act  vipAction
	}
	local, caching, holding, forwarding, none := vipPhase{state: stateLocal}, vipPhase{state: stateCaching}, vipPhase{state: stateHolding}, vipPhase{state: stateForwarding}, vipPhase{}
	cachingByCarrier := vipPhase{state: stateCaching, byCarrier: true}
	table := map[vipPhase]map[vipEvent]want{
		none: {
			evArrive: {holding, actHold},
			evAbort:  {none, actRefuse},
			evClaim:  {none, actRefuse},
		},
		local: {
			evSuspend:     {caching, actCache},
			evCarrierLost: {cachingByCarrier, actCache},
			evStandbyHit:  {holding, actDeliver},
			evClaim:       {forwarding, actStream},
		},
		caching: {
			evAbort:    {holding, actDeliver},
			evReattach: {holding, actDeliver},
			evClaim:    {forwarding, actStream},
			evTimeout:  {none, actDrop},
		},
		cachingByCarrier: {
			evCarrierBack: {holding, actDeliver},
			evAbort:       {holding, actDeliver},
			evReattach:    {holding, actDeliver},
			evClaim:       {forwarding, actStream},
			evTimeout:     {none, actDrop},
		},
		holding: {
			evDrained:     {local, actHandBack},
			evSuspend:     {caching, actCache},
			evCarrierLost: {cachingByCarrier, actCache},
			evClaim:       {forwarding, actStream},
			evAbort:       {holding, actRefuse},
		},
		forwarding: {
			evLingerOver: {none, actForget},
			evArrive:     {holding, actHold},
			evAbort:      {forwarding, actRefuse},
			evClaim:      {forwarding, actRefuse},
		},
	}
	for _, p := range allPhases() {
		for ev := range numEvents {
			w, ok := table[p][ev]
			if !ok {
				w = want{p, actNone}
			}
			next, act := step(p, ev)
			if next != w.next || act != w.act {
				t.Errorf("step(%v, %v) = %v, %v; want %v, %v", p, ev, next, act, w.next, w.act)
			}
		}
	}
}

// episode follows what happens to the packets of one migration through
// this host, to check the rules every order of events must keep.
type episode struct {
	open      bool // packets are being kept for somebody
	disposed  int  // deliver, stream or drop of those packets
	streamed  bool
	delivered bool
}

// TestStepEveryOrder runs every sequence of up to 6 events from a VIP
// attached here (local) and from one not known here (none), and checks
// that whatever the order:
//   - the packets of a migration go to exactly one place: delivered here,
//     streamed to the new owner, or dropped at the timeout, never two;
//   - once streamed away they are never delivered here;
//   - refused and deferred events change nothing;
//   - the state is always one of the known ones and byCarrier only marks
//     a cache.
func TestStepEveryOrder(t *testing.T) {
	const depth = 6
	runs := 0
	var walk func(p vipPhase, e episode, trail []vipEvent)
	walk = func(p vipPhase, e episode, trail []vipEvent) {
		runs++
		if len(trail) == depth {
			return
		}
		for ev := range numEvents {
			next, act := step(p, ev)
			tr := append(slices.Clone(trail), ev)
			fail := func(format string, args ...any) {
				t.Fatalf("after %v (from %v): %s", tr, p, fmt.Sprintf(format, args...))
			}
			if !slices.Contains(allStates, next.state) {
				fail("unknown state %v", next.state)
			}
			if next.byCarrier && next.state != stateCaching {
				fail("byCarrier set in %v", next)
			}
			if (act == actRefuse || act == actNone) && next != p {
				fail("%v changed the phase to %v", act, next)
			}
			ne := e
			switch act {
			case actCache:
				if ne.open && p.state != stateHolding {
					fail("cache started twice")
				}
				// From holding the arrival's episode ends: what it
				// has not delivered is the new cache's start.
				ne = episode{open: true}
			case actHold:
				// A new arrival: whatever came before here is over
				// (forwarding ends its linger), a new episode starts
				// whose packets are delivered here.
				ne = episode{open: true, disposed: 1, delivered: true}
			case actDeliver, actStream, actDrop:
				if p.state == stateHolding {
					ne = episode{} // as for actCache: a new episode
				}
				if !ne.open {
					// From local, the standby queue or the claim opens
					// and closes the episode in one step.
					ne = episode{open: true}
				}
				if ne.disposed > 0 {
					fail("%v after the packets already went somewhere", act)
				}
				ne.disposed++
				ne.streamed = act == actStream
				ne.delivered = act == actDeliver
			}
			if ne.streamed && ne.delivered {
				fail("delivered here after being streamed away")
			}
			if next.state == stateLocal || next.state == stateNone {
				if ne.open && ne.disposed != 1 {
					fail("episode over in %v with its packets disposed %d times", next, ne.disposed)
				}
				ne = episode{}
			}
			walk(next, ne, tr)
		}
	}
	walk(vipPhase{state: stateLocal}, episode{}, nil)
	walk(vipPhase{state: stateNone}, episode{}, nil)
	t.Logf("%d event orders checked", runs)
}

// TestStepNoDeadEnd: from every phase some events lead back to a VIP that
// is plainly here (local) or plainly elsewhere (none).
func TestStepNoDeadEnd(t *testing.T) {
	for _, p := range allPhases() {
		seen := map[vipPhase]bool{p: true}
		frontier := []vipPhase{p}
		found := false
		for len(frontier) > 0 && !found {
			q := frontier[0]
			frontier = frontier[1:]
			for ev := range numEvents {
				next, _ := step(q, ev)
				if next.state == stateLocal || next.state == stateNone {
					found = true
				}
				if !seen[next] {
					seen[next] = true
					frontier = append(frontier, next)
				}
			}
		}
		if !found && p.state != stateLocal && p.state != stateNone {
			t.Errorf("%v: no way back to local or none", p)
		}
	}
}

// TestStepScenarios: the orders the issue names end in the same state.
func TestStepScenarios(t *testing.T) {
	tests := []struct {
		name   string
		from   vipState
		events []vipEvent
		want   vipState    // final state
		acts   []vipAction // actions that are not actNone, in order
	}{
		{"announced move", stateLocal, []vipEvent{evSuspend, evClaim, evLingerOver}, stateNone, []vipAction{actCache, actStream, actForget}},
		{"vif vanishes, then the claim", stateLocal, []vipEvent{evCarrierLost, evClaim, evLingerOver}, stateNone, []vipAction{actCache, actStream, actForget}},
		{"claim before the source noticed", stateLocal, []vipEvent{evClaim, evSuspend, evCarrierLost, evLingerOver}, stateNone, []vipAction{actStream, actForget}},
		{"suspend twice", stateLocal, []vipEvent{evSuspend, evSuspend, evClaim, evLingerOver}, stateNone, []vipAction{actCache, actStream, actForget}},
		{"detach after the claim", stateLocal, []vipEvent{evClaim, evSuspend, evLingerOver, evSuspend}, stateNone, []vipAction{actStream, actForget}},
		{"duplicate claim", stateLocal, []vipEvent{evSuspend, evClaim, evClaim, evLingerOver}, stateNone, []vipAction{actCache, actStream, actRefuse, actForget}},
		{"carrier flaps", stateLocal, []vipEvent{evCarrierLost, evCarrierBack, evDrained}, stateLocal, []vipAction{actCache, actDeliver, actHandBack}},
		{"announced suspend ignores carrier", stateLocal, []vipEvent{evSuspend, evCarrierLost, evCarrierBack}, stateCaching, []vipAction{actCache}},
		{"abort", stateLocal, []vipEvent{evSuspend, evAbort, evAbort, evDrained}, stateLocal, []vipAction{actCache, actDeliver, actRefuse, actHandBack}},
		{"attached again here", stateLocal, []vipEvent{evSuspend, evReattach, evDrained}, stateLocal, []vipAction{actCache, actDeliver, actHandBack}},
		{"timeout", stateLocal, []vipEvent{evSuspend, evTimeout, evClaim}, stateNone, []vipAction{actCache, actDrop, actRefuse}},
		{"standby route used", stateLocal, []vipEvent{evStandbyHit, evDrained}, stateLocal, []vipAction{actDeliver, actHandBack}},
		{"arrival, attached twice", stateNone, []vipEvent{evArrive, evReattach, evDrained}, stateLocal, []vipAction{actHold, actHandBack}},
		{"moves on before delivery is over", stateNone, []vipEvent{evArrive, evClaim, evDrained, evLingerOver}, stateNone, []vipAction{actHold, actStream, actForget}},
		{"paused again while delivering", stateNone, []vipEvent{evArrive, evSuspend, evDrained, evClaim, evLingerOver}, stateNone, []vipAction{actHold, actCache, actStream, actForget}},
		{"leaves while delivering, back again", stateNone, []vipEvent{evArrive, evCarrierLost, evCarrierBack, evDrained}, stateLocal, []vipAction{actHold, actCache, actDeliver, actHandBack}},
		{"back before the linger is over", stateLocal, []vipEvent{evSuspend, evClaim, evArrive, evDrained}, stateLocal, []vipAction{actCache, actStream, actHold, actHandBack}},
	}
	for _, tt := range tests {
		t.Run(strings.ReplaceAll(tt.name, " ", "_"), func(t *testing.T) {
			p := vipPhase{state: tt.from}
			var acts []vipAction
			for _, ev := range tt.events {
				var act vipAction
				p, act = step(p, ev)
				if act != actNone {
					acts = append(acts, act)
				}
			}
			if p.state != tt.want || !slices.Equal(acts, tt.acts) {
				t.Errorf("%v from %v: end %v with %v; want %v with %v", tt.events, tt.from, p.state, acts, tt.want, tt.acts)
			}
		})
	}
}

// TestStateStatus: every state but none has the name status shows, one of
// control's, and no two share one.
func TestStateStatus(t *testing.T) {
	seen := map[control.VIPState]vipState{}
	for _, st := range allStates {
		name := st.status()
		if st == stateNone {
			if name != "" {
				t.Errorf("none shows as %q", name)
			}
			continue
		}
		if name == "" || strings.HasPrefix(string(name), "state(") {
			t.Errorf("%d has no status name", st)
		}
		if other, dup := seen[name]; dup {
			t.Errorf("%v and %v both show as %q", st, other, name)
		}
		seen[name] = st
	}
	if len(allStates) != int(numStates) {
		t.Errorf("allStates has %d states, the machine %d", len(allStates), numStates)
	}
}
