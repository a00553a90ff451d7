// Package cache is the migration data path's core. One job per file:
//
//   - queues and ordering: queue.go (bounded per-VIP packet queues and the
//     shared byte budget), flow.go (per-flow classification), orderer.go
//     (delivery at the new host in an order that loses and reorders
//     nothing, paced), timeline.go (a migration's packets per millisecond);
//   - the handover's wire format: stream.go (frames, Reader, Writer),
//     handover.go (Sender and Receiver, the two ends of one handover),
//     preview.go (copies sent ahead on a prepared connection);
//   - device I/O: intercept.go (the cache TUN device and its sinks),
//     deliver.go (writing packets to a VM's interface).
//
// It knows nothing about Xen or routes: the agent decides when a VIP's
// packets go to the cache device and where they are delivered.
package cache
