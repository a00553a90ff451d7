// Package xenhook turns hypervisor events (Xen hotplug and xenstore, libvirt's
// qemu hook, carrier and gratuitous ARP/RARP on a VM's interface) into agent
// calls. It owns no state.
//
// Not built yet: the hypervisor integration issue fills it in.
package xenhook
