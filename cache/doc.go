// Package cache is the migration data path's core: bounded per-VIP packet
// queues, per-flow classification, the handover stream codec between
// agents, and the per-millisecond timeline of a migration's packets. It
// knows nothing about Xen, TUN devices or routes: the agent feeds it
// packets and writes out what it returns.
package cache
