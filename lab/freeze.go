package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// A paused VM runs nothing: a hypervisor stops its vCPUs for the
// migration's downtime, so it sends nothing, not even what its processes
// would have sent meanwhile. A namespace VM's processes would go on
// sending into an interface without carrier (dropped before any host saw
// them), which no real migration does. FreezeVM stops them, as the
// hypervisor does; ThawVM lets them go on where they were.
//
// The VM's kernel is not a process and cannot be stopped: it answers what
// reaches it and its timers (TCP retransmits, ARP) still fire. While its
// interface has no carrier nothing reaches it and what it sends dies in
// its own eth0, counted there (tx_dropped).

// FreezeVM stops every process in vm's namespace with SIGSTOP until ThawVM.
// Freezing a frozen VM stops what was started since.
func (l *Lab) FreezeVM(vm *VM) error {
	n, err := signalVM(vm, syscall.SIGSTOP, "freeze")
	if n < 0 {
		return err // nothing stopped: not frozen
	}
	l.mu.Lock()
	vm.frozen = true
	l.mu.Unlock()
	l.logf("lab %s: VM %s frozen (%d processes)", l.ID, vm.Name, n)
	return err
}

// ThawVM lets every process in vm's namespace run again (SIGCONT). It is a
// no-op on a VM that is not frozen.
func (l *Lab) ThawVM(vm *VM) error {
	l.mu.Lock()
	frozen := vm.frozen
	vm.frozen = false
	l.mu.Unlock()
	if !frozen {
		return nil
	}
	n, err := signalVM(vm, syscall.SIGCONT, "thaw")
	if n < 0 {
		return err
	}
	l.logf("lab %s: VM %s thawed (%d processes)", l.ID, vm.Name, n)
	return err
}

// signalVM sends sig to every process in vm's namespace and says to how
// many, -1 when it could not list them; a process that exited meanwhile
// is no error.
func signalVM(vm *VM, sig syscall.Signal, verb string) (int, error) {
	pids, err := nsPIDs(vm.NS)
	if err != nil {
		return -1, fmt.Errorf("lab: %s %s: %w", verb, vm.Name, err)
	}
	var errs []error
	for _, pid := range pids {
		if err := syscall.Kill(pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
			errs = append(errs, fmt.Errorf("lab: %s %s: pid %d: %w", verb, vm.Name, pid, err))
		}
	}
	return len(pids), errors.Join(errs...)
}

// Frozen reports whether vm is frozen (FreezeVM without ThawVM since).
func (l *Lab) Frozen(vm *VM) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return vm.frozen
}

// nsPIDs lists the processes whose network namespace is ns, never this
// process (a test whose thread entered ns must not stop itself).
func nsPIDs(ns string) ([]int, error) {
	if !nsExists(ns) {
		return nil, fmt.Errorf("namespace %s does not exist", ns)
	}
	out, err := run(context.Background(), "ip", "netns", "pids", ns)
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 && pid != os.Getpid() {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}
