// Package cache owns the migration data path: it intercepts a migrating VIP's
// packets, keeps them in bounded per-VIP queues and delivers them, in order, at
// the VIP's new host. It knows nothing about Xen.
//
// Not built yet: the migration issue fills it in.
package cache
