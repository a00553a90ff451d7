// Package xenhook turns hypervisor events into agent calls: Xen's hotplug
// hook (scripts/xen/vmroam.hook), the xenstore watches that say a domain is
// being suspended for migration or is arriving from one, libvirt's qemu
// hook (scripts/libvirt/qemu, which runs `vmroam hook libvirt`), Proxmox
// VE's guest hookscript (scripts/proxmox/vmroam-hookscript, which runs
// `vmroam hook proxmox`), and the frames by which a resumed VM announces
// itself on its interface. It owns
// no state the agent relies on; what it remembers only keeps it from
// reporting the same event twice.
//
// The xenstore facts it builds on, from Xen's sources: libxl asks a guest to
// suspend by writing "suspend" to /local/domain/<domid>/control/shutdown
// (libxl__domain_pvcontrol) and the guest acknowledges by clearing it;
// during `xl migrate` the destination creates the domain as
// "<name>--incoming" (written to /local/domain/<domid>/name when the domain
// is made, before the memory stream) and the source renames its copy
// "<name>--migratedaway" once the destination has the whole image
// (tools/xl/xl_migrate.c). xenstored's "@introduceDomain" fires only when
// the domain is introduced, which for an incoming domain is after the
// stream, so the name under /local/domain is what announces it early. Its
// vifs, and with them their addresses (the backend's "ip", which vif-route
// reads too), appear only after the stream, when libxl adds the devices
// just before their hotplug scripts run (libxl_create.c,
// domcreate_attach_devices).
package xenhook
