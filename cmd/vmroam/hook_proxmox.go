package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/vmroam/vmroam/xenhook"
)

// pveDefaultDir is where pmxcfs mounts the cluster's shared configuration.
const pveDefaultDir = "/etc/pve"

// pveDir is where the Proxmox hook looks for VMs' configs; tests replace it.
var pveDir = pveDefaultDir

// maxVMConfig is far more than any VM config; the hook reads no further.
const maxVMConfig = 16 << 20

// runHookProxmox handles one run of a VM's Proxmox VE hookscript.
func runHookProxmox(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprint(stdout, hookUsage)
		return nil
	}
	if len(args) != 2 {
		return usagef("hook proxmox: want VMID PHASE, got %d arguments", len(args))
	}
	vmid, err := xenhook.ParseVMID(args[0])
	if err != nil {
		return usagef("hook proxmox: %v", err)
	}
	phase := xenhook.ProxmoxPhase(args[1])
	if !phase.Acts() {
		// pre-stop, or a phase of a later Proxmox: nothing to tell.
		return nil
	}
	h := &hookRun{event: fmt.Sprintf("VM %d, %s", vmid, phase), stderr: stderr}

	path, err := pveConfigPath(vmid)
	if err != nil {
		h.errorf("%v", err)
		return nil
	}
	conf, err := readVMConfig(path)
	if err != nil {
		h.errorf("%v", err)
		return nil
	}
	actions, warnings, err := xenhook.ProxmoxActions(xenhook.ProxmoxEvent{VMID: vmid, Phase: phase, Config: conf})
	for _, w := range warnings {
		h.infof("warning: %s (config %s)", w, path)
	}
	if err != nil {
		// The actions that could be worked out still run.
		h.errorf("%v (config %s)", err, path)
	}
	if len(actions) == 0 {
		return nil
	}
	unbridge(h, actions)
	h.run(ctx, actions)
	return nil
}

// unbridge takes the taps the actions attach out of the routed bridge
// (xenhook.Unbridge), so that the agent can route the VIPs to them.
func unbridge(h *hookRun, actions []xenhook.Action) {
	bridge := os.Getenv("VMROAM_PROXMOX_BRIDGE")
	if bridge == "" {
		bridge = xenhook.DefaultRoutedBridge
	}
	for _, a := range actions {
		if a.Verb != "attach" || a.Dev == "" {
			continue
		}
		switch did, err := xenhook.Unbridge(a.Dev, bridge); {
		case err != nil:
			h.errorf("%v", err)
		case did:
			h.infof("%s taken out of bridge %s: the agent routes %s to it", a.Dev, bridge, a.VIP)
		}
	}
}

// pveConfigPath finds the config of VM vmid among all nodes' directories,
// not only this node's /etc/pve/qemu-server: on a migration's target, at
// pre-start and post-start, and at post-stop when the incoming migration
// failed, it is still the source node's file (QemuServer.pm vm_start and
// vm_stop load it with migratedfrom). A VMID is the cluster's, so one node
// has it.
func pveConfigPath(vmid int) (string, error) {
	pattern := filepath.Join(pveDir, "nodes", "*", "qemu-server", strconv.Itoa(vmid)+".conf")
	paths, err := filepath.Glob(pattern)
	switch {
	case err != nil:
		return "", fmt.Errorf("looking for the VM's config: %w", err)
	case len(paths) == 0:
		return "", fmt.Errorf("no config of VM %d: nothing matches %s (the hook is for QEMU VMs, not containers)", vmid, pattern)
	case len(paths) > 1:
		return "", fmt.Errorf("VM %d has a config on several nodes: %s", vmid, strings.Join(paths, ", "))
	}
	return paths[0], nil
}

func readVMConfig(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading the VM's config: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxVMConfig+1))
	switch {
	case err != nil:
		return nil, fmt.Errorf("reading the VM's config: %w", err)
	case len(b) > maxVMConfig:
		return nil, fmt.Errorf("%s is larger than %d bytes", path, maxVMConfig)
	}
	return b, nil
}
