// Package gossip finds vmroam agents with memberlist and replicates the table
// of VIP location records and the virtual networks between them. It touches
// no interface and no packet.
//
// Membership, failure detection and encryption are memberlist's. On top of it
// this package adds three things: each agent's metadata (Meta: WireGuard key,
// endpoint, overlay address, site, protocol version), the table of location
// records (Record: VIP -> owner, epoch), and the virtual networks (Network:
// name -> prefix, epoch), the last two spread by user broadcasts for speed
// and by push/pull state exchange for repair.
//
// memberlist does not relay user broadcasts, so a record or network version
// that changes the local table is broadcast again on first sight, as Serf
// does; the table itself is the dedupe set, since a version seen twice no
// longer changes it.
package gossip
