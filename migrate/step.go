package migrate

import (
	"fmt"

	"github.com/vmroam/vmroam/wgagent/control"
)

// The migration state machine of one VIP on this host. It is a pure
// function, step, so that every order of events can be tested without a
// network (step_test.go); ctl.go feeds it the events and performs
// the actions it returns.
//
//	            suspend, carrier lost                 claim
//	  local ───────────────────────────▶ caching ───────────────▶ forwarding
//	    ▲  │ claim (arrival before the source noticed)  ▲              │
//	    │  └───────────────────────────────────────────┼──────────────┤ linger over
//	    │              abort, reattach, carrier back   │              ▼
//	    │   drained  ◀──── holding ◀────────────────────┘            (none)
//	    └──────────────────  ▲   arrive (from none or forwarding)
//
// Timeout in caching drops the queue and leaves no controller (none).
// Suspend, carrier lost and claim in holding are those of local: the VM
// leaves again while its delivery here is under way.

// vipEvent is something that happens to a VIP attached to or moving
// through this host.
type vipEvent uint8

const (
	evSuspend     vipEvent = iota // `migrate suspend`, `vip detach`
	evCarrierLost                 // the VM's interface lost carrier or vanished
	evCarrierBack                 // the VM's interface has carrier again
	evStandbyHit                  // the cache device took a packet while the VIP was local
	evAbort                       // `migrate abort`
	evReattach                    // `vip attach` here, where the VIP is attached already
	evClaim                       // a live member with a higher epoch asks for the handover
	evTimeout                     // caching for longer than the cache's max age
	evArrive                      // `vip attach` of a VIP that another host owns
	evDrained                     // delivery to the VM here has finished
	evLingerOver                  // the handover stream to the new owner closed
	numEvents
)

var eventNames = [numEvents]string{
	"suspend", "carrier-lost", "carrier-back", "standby-hit", "abort", "reattach",
	"claim", "timeout", "arrive", "drained", "linger-over",
}

func (e vipEvent) String() string {
	if e < numEvents {
		return eventNames[e]
	}
	return fmt.Sprintf("event(%d)", e)
}

// vipAction is what the agent must do after a step.
type vipAction uint8

const (
	actNone     vipAction = iota
	actCache              // start queueing the VIP's packets; record the suspend
	actDeliver            // deliver the queue to the VM here, in order, then hand back
	actStream             // stream the queue to the claimer, then forward stragglers
	actDrop               // drop the queue, release the VIP, forget the controller
	actHold               // hold direct packets, fetch the old owner's queue, deliver
	actHandBack           // route the VIP to its VM again
	actForget             // forget the controller: the VIP is elsewhere now
	actRefuse             // the event makes no sense in this state: an error
)

var actionNames = [...]string{"none", "cache", "deliver", "stream", "drop", "hold", "hand-back", "forget", "refuse"}

func (a vipAction) String() string {
	if int(a) < len(actionNames) {
		return actionNames[a]
	}
	return fmt.Sprintf("action(%d)", a)
}

// vipState is a state of the machine.
type vipState uint8

const (
	stateNone       vipState = iota // no controller here
	stateLocal                      // the VM runs here; standby route to the cache
	stateCaching                    // source: VM suspended, packets queued
	stateForwarding                 // source: queue flushed, stragglers forwarded
	stateHolding                    // destination: packets held until delivery
	numStates
)

// vipStatus is what status shows for each state (none: nothing).
var vipStatus = [numStates]control.VIPState{"", control.VIPLocal, control.VIPCaching, control.VIPForwarding, control.VIPHolding}

// status is the state as status shows it.
func (s vipState) status() control.VIPState {
	if s < numStates {
		return vipStatus[s]
	}
	return control.VIPState(s.String())
}

func (s vipState) String() string {
	switch {
	case s == stateNone:
		return "none"
	case s < numStates:
		return string(vipStatus[s])
	}
	return fmt.Sprintf("state(%d)", s)
}

// vipPhase is the state machine's whole state for one VIP.
type vipPhase struct {
	state vipState
	// byCarrier: caching started because the interface lost carrier,
	// so carrier coming back means the VM stayed here.
	byCarrier bool
}

// step returns the phase after ev and the action the agent must take. It
// never fails: an event that makes no sense returns actRefuse and leaves
// the phase as it was, and one that changes nothing returns actNone, so
// hooks and commands may repeat themselves.
func step(p vipPhase, ev vipEvent) (vipPhase, vipAction) {
	switch p.state {
	case stateNone:
		switch ev {
		case evArrive:
			return vipPhase{state: stateHolding}, actHold
		case evAbort, evClaim:
			return p, actRefuse
		}
	case stateLocal:
		switch ev {
		case evSuspend:
			return vipPhase{state: stateCaching}, actCache
		case evCarrierLost:
			return vipPhase{state: stateCaching, byCarrier: true}, actCache
		case evStandbyHit:
			// The route flapped but the VM is here: give it what the
			// cache device took.
			return vipPhase{state: stateHolding}, actDeliver
		case evClaim:
			// An arrival before this host noticed the VM leave: the
			// claim is the suspend.
			return vipPhase{state: stateForwarding}, actStream
		}
	case stateCaching:
		switch ev {
		case evCarrierBack:
			if p.byCarrier {
				return vipPhase{state: stateHolding}, actDeliver
			}
		case evAbort, evReattach:
			return vipPhase{state: stateHolding}, actDeliver
		case evClaim:
			return vipPhase{state: stateForwarding}, actStream
		case evTimeout:
			return vipPhase{state: stateNone}, actDrop
		}
	case stateHolding:
		// The VM may leave again before its packets were all delivered
		// here (moves in quick succession): the delivery under way goes
		// on ordering them, but into the cache (spill, deliver.go), so
		// the next host gets them, in order, behind nothing.
		switch ev {
		case evDrained:
			return vipPhase{state: stateLocal}, actHandBack
		case evSuspend:
			return vipPhase{state: stateCaching}, actCache
		case evCarrierLost:
			return vipPhase{state: stateCaching, byCarrier: true}, actCache
		case evClaim:
			return vipPhase{state: stateForwarding}, actStream
		case evAbort:
			return p, actRefuse
		}
	case stateForwarding:
		switch ev {
		case evLingerOver:
			return vipPhase{state: stateNone}, actForget
		case evArrive:
			// Back here while stragglers still go to the host the VM
			// left for: they are the arrival's to hold now.
			return vipPhase{state: stateHolding}, actHold
		case evAbort, evClaim:
			return p, actRefuse
		}
	}
	return p, actNone
}
