package wanem

import (
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// OpenTUN creates (or attaches to) the TUN device name with IFF_TUN|IFF_NO_PI
// in the calling thread's network namespace: one IP packet per Read and per
// Write, no extra header. The device disappears when the file is closed
// (unless it was made persistent). It is created down; bring it up with
// `ip link set NAME up` or netlink.
//
// The file is blocking, so it stays out of the runtime's poller: there,
// every packet arriving woke an idle runtime thread, a quarter of a CPU at
// 15,000 packets/s on the lab machine, while Run reads the descriptor on a
// thread of its own anyway. So a Read blocks until a packet comes, and
// SetReadDeadline does not work.
func OpenTUN(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("wanem: open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("wanem: TUN name %q: %w", name, err)
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("wanem: TUNSETIFF %s: %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+ifr.Name()), nil
}
