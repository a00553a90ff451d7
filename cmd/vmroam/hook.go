package main

import (
	"context"
	"fmt"
	"io"
	"log/syslog"
	"os"
	"strings"
	"time"

	"github.com/vmroam/vmroam/wgagent/control"
	"github.com/vmroam/vmroam/xenhook"
)

const hookUsage = `Usage: vmroam hook libvirt DOMAIN OP SUBOP EXTRA  (domain XML on stdin)
       vmroam hook proxmox VMID PHASE

Hypervisor hooks run these; people do not. They tell the agent about a VM's
VIPs as it starts, migrates and stops, exit 0 whatever happens, so as never
to stop a VM, and report errors on stderr and to syslog (daemon.err, tag
vmroam-hook).

libvirt's qemu hook (scripts/libvirt/qemu, make install-libvirt): prepare
and start -> pre-provision, started -> attach, release -> detach; VIPs from
the domain XML.

A Proxmox VE hookscript (scripts/proxmox/vmroam-hookscript, make
install-proxmox): pre-start -> pre-provision, post-start -> attach,
post-stop -> detach; VIPs from the VM's config,
` + pveDefaultDir + `/nodes/*/qemu-server/VMID.conf: the "vmroam-vip: ADDRESS [netN]"
lines of its description, else its cloud-init ipconfigN addresses, each
behind tapVMIDiN. Proxmox plugs every tap into a bridge, and a VIP is routed
to its VM's own interface: at post-start the hook takes each VIP's tap out
of the bridge ` + xenhook.DefaultRoutedBridge + ` ($VMROAM_PROXMOX_BRIDGE), an empty
bridge the VM's netN names for Proxmox's sake; a tap in another bridge is
left there, and the agent refuses it.

The agent is found through $VMROAM_SOCKET, else ` + control.DefaultSocket + `;
libvirt clears its hooks' environment, so under libvirt the agent must
listen there.
`

const (
	// hookTimeout bounds all of one hook's calls to the agent: libvirt
	// waits for the hook before it goes on starting or stopping the VM.
	hookTimeout = 10 * time.Second
	// maxDomainXML is far more than any domain XML; the hook reads no
	// further.
	maxDomainXML = 16 << 20
)

// hookInput is where the hook reads the domain XML; tests replace it.
var hookInput io.Reader = os.Stdin

// hookSyslog sends one error line to syslog (daemon.err): libvirt keeps a
// hook's stderr only when the hook fails, and this one never does. Tests
// replace it.
var hookSyslog = func(line string) {
	w, err := syslog.New(syslog.LOG_DAEMON|syslog.LOG_ERR, "vmroam-hook")
	if err != nil {
		return
	}
	defer w.Close()
	w.Err(line)
}

func runHook(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usagef("hook: want a hypervisor: libvirt or proxmox")
	}
	switch args[0] {
	case "libvirt":
		return runHookLibvirt(ctx, args[1:], stdout, stderr)
	case "proxmox":
		return runHookProxmox(ctx, args[1:], stdout, stderr)
	case "-h", "-help", "--help":
		fmt.Fprint(stdout, hookUsage)
		return nil
	}
	return usagef("hook: unknown hypervisor %q (want libvirt or proxmox)", args[0])
}

// runHookLibvirt handles one call of libvirt's qemu hook. It writes
// nothing on stdout: for "migrate" and "restore", libvirt takes the hook's
// stdout as the domain XML to use instead.
func runHookLibvirt(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	// No flags: libvirt's arguments are taken as they come ("-" is a
	// common one, and a domain's name may start with a dash).
	if len(args) == 1 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprint(stdout, hookUsage)
		return nil
	}
	if len(args) != 4 {
		return usagef("hook libvirt: want DOMAIN OP SUBOP EXTRA, got %d arguments", len(args))
	}
	ev := xenhook.LibvirtEvent{Domain: args[0], Op: args[1], SubOp: args[2], Extra: args[3]}
	h := &hookRun{event: fmt.Sprintf("domain %s, %s %s", ev.Domain, ev.Op, ev.SubOp), stderr: stderr}

	// Read everything libvirt writes, even when the event needs none of
	// it: a hook that leaves its stdin unread can fail libvirt's write.
	xml, err := io.ReadAll(io.LimitReader(hookInput, maxDomainXML+1))
	io.Copy(io.Discard, hookInput)
	switch {
	case err != nil:
		h.errorf("reading the domain XML: %v", err)
		return nil
	case len(xml) > maxDomainXML:
		h.errorf("the domain XML is larger than %d bytes", maxDomainXML)
		return nil
	}
	ev.XML = xml

	actions, err := xenhook.LibvirtActions(ev)
	if err != nil {
		// The actions that could be worked out still run.
		h.errorf("%v", err)
	}
	if len(actions) == 0 {
		return nil
	}
	h.run(ctx, actions)
	return nil
}

// run tells the agent about actions, one after the other, reporting each.
// A failure is reported and the next one tried: the VM goes on starting or
// stopping whatever the agent says.
func (h *hookRun) run(ctx context.Context, actions []xenhook.Action) {
	ctx, cancel := context.WithTimeout(ctx, hookTimeout)
	defer cancel()
	c := client("")
	for _, a := range actions {
		switch a.Verb {
		case "prepare":
			// Only a head start for the handover (the agent connects to
			// the VIP's host now): the attach once QEMU runs is what
			// routes the VIP here, so a failure here must not stop the VM.
			v, err := c.Prepare(ctx, a.VIP)
			if err != nil {
				h.infof("prepare %s: %v; the handover will connect at the claim instead", a.VIP, err)
				continue
			}
			h.infof("prepare %s: ready (owner %s)", v.VIP, orDash(v.Owner))
		case "attach":
			attach, when := c.Attach, ""
			if a.WhenAnnounced {
				attach, when = c.AttachWhenAnnounced, " --when announced"
			}
			v, err := attach(ctx, a.VIP, a.Dev)
			if err != nil {
				h.errorf("vip attach %s --dev %s%s: %v; the VM runs, but vmroam does not route %s to it", a.VIP, a.Dev, when, err, a.VIP)
				continue
			}
			if v.State == control.VIPAwaiting {
				h.infof("%s attached on %s when the VM announces itself (%s runs it until then)", v.VIP, v.Dev, orDash(v.Owner))
				continue
			}
			h.infof("%s attached on %s (epoch %d)", v.VIP, v.Dev, v.Epoch)
		case "detach":
			v, err := c.Detach(ctx, a.VIP)
			switch {
			case err != nil:
				h.errorf("vip detach %s: %v; the agent may still route %s here", a.VIP, err, a.VIP)
			case v.Local:
				h.errorf("vip detach %s: still attached here (on %s)", a.VIP, v.Dev)
			case v.State == control.VIPReleased:
				h.infof("%s released (epoch %d)", v.VIP, v.Epoch)
			case v.State == control.VIPCaching || v.State == control.VIPForwarding:
				h.infof("%s detached: cached for the host it moves to (for at most --cache-max-age, then released)", v.VIP)
			default:
				h.infof("%s is not attached here (state %s, owner %s); nothing to do", v.VIP, v.State, orDash(v.Owner))
			}
		default:
			h.errorf("unknown action %q for %s", a.Verb, a.VIP)
		}
	}
}

// hookRun reports what one hook call did, each line naming the event.
type hookRun struct {
	// event names the VM and the event ("domain web1, started begin").
	event  string
	stderr io.Writer
}

func (h *hookRun) prefix() string { return h.event }

func (h *hookRun) infof(format string, args ...any) {
	fmt.Fprintf(h.stderr, "vmroam hook: %s: %s\n", h.prefix(), fmt.Sprintf(format, args...))
}

// errorf reports loudly: stderr, where libvirt's debug log and anyone
// running the hook by hand see it, and syslog, which is always kept.
func (h *hookRun) errorf(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	// xenhook's errors name the event already.
	msg = strings.TrimPrefix(msg, "xenhook: "+h.prefix()+": ")
	line := fmt.Sprintf("vmroam hook: ERROR %s: %s", h.prefix(), msg)
	fmt.Fprintln(h.stderr, line)
	hookSyslog(line)
}
