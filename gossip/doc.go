// Package gossip finds vmroam agents with memberlist and replicates the table
// of VIP location records between them. It touches no interface and no packet.
//
// Membership, failure detection and encryption are memberlist's. On top of it
// this package adds two things: each agent's metadata (Meta: WireGuard key,
// endpoint, overlay address, site, protocol version), and the table of
// location records (Record: VIP -> owner, epoch), spread by user broadcasts
// for speed and by push/pull state exchange for repair.
//
// memberlist does not relay user broadcasts, so a record that changes the
// local table is broadcast again on first sight, as Serf does; the table
// itself is the dedupe set, since a record seen twice no longer changes it.
package gossip
