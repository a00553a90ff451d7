// Package migrate is the migration engine: for each VIP attached to or
// moving through this host, the state machine (step.go), the cache of its
// packets while its VM is suspended here, the handover to the new host
// (serve.go at the old host, arrive.go at the new), the delivery to the VM
// where it arrives, in order (deliver.go), and the hand-back to the kernel
// without reordering (fence.go). DESIGN.md's "Migration: the caching
// protocol" is what it implements.
//
// The agent (package wgagent) runs it: it feeds it the hypervisor's and
// the operator's events (SuspendLocked, ArriveLocked, AbortLocked, ...)
// and implements Host, the engine's narrow view of the agent: its lock,
// its attachments, the gossip table, the members and the routes. The
// engine drives Device (the cache device) and Links (the VM interfaces),
// both interfaces so that every case runs over fakes without root
// (fakes_test.go): real handover streams between engines on loopback
// TCP, the agent, the device and the VM faked.
//
// Locks, in the order they are taken, never the reverse:
//
//  1. the agent's lock (Host's Locker). It also guards the engine's tables
//     (the controllers, the history): the engine runs inside the agent's
//     critical section. Methods whose names end in Locked are called with
//     it held; the engine's own goroutines take it through Host.
//  2. a controller's lock (vipCtl.mu), for the fields the data path reads.
//  3. the leaf locks (standbyMu, carrierMu, prepMu), held for a map
//     operation only.
//
// Host methods say whether they need the agent's lock; none calls back
// into the engine. The test host checks that the Locked ones are called
// with it held.
package migrate
