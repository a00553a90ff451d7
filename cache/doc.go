// Package cache is the migration data path's core: bounded per-VIP packet
// queues, per-flow classification, and the handover stream codec between
// agents. It knows nothing about Xen, TUN devices or routes: the agent feeds
// it packets and writes out what it returns.
package cache
