package xenhook

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
)

// DefaultRoutedBridge is the bridge a Proxmox VE VM's VIP interfaces name
// (net<N>: bridge=vmroam0): Proxmox plugs every tap into a bridge, and a
// VIP is routed to its VM's own interface, which a bridge port is not. The
// operator makes an empty bridge of that name on every node, for Proxmox
// to plug the taps into, and the hook takes them out of it again at
// post-start (Unbridge), as Xen's vif-route leaves a vif unbridged. A tap
// in any other bridge is left alone: the agent then refuses it, saying so.
const DefaultRoutedBridge = "vmroam0"

// Unbridge takes dev out of bridge if dev is one of its ports, and says
// whether it did. An interface that is not there (yet), in another
// bridge, or in none is left as it is.
func Unbridge(dev, bridge string) (bool, error) {
	link, err := netlink.LinkByName(dev)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return false, nil
		}
		return false, fmt.Errorf("unbridge %s: %w", dev, err)
	}
	master := link.Attrs().MasterIndex
	if master == 0 {
		return false, nil
	}
	m, err := netlink.LinkByIndex(master)
	if err != nil {
		return false, fmt.Errorf("unbridge %s: its master: %w", dev, err)
	}
	if m.Attrs().Name != bridge {
		return false, nil
	}
	if err := netlink.LinkSetNoMaster(link); err != nil {
		return false, fmt.Errorf("unbridge %s from %s: %w", dev, bridge, err)
	}
	return true, nil
}
