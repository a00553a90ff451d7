package lab

import (
	"encoding/binary"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// AnnounceVM sends, from inside vm, what a resumed Linux guest sends: a
// gratuitous ARP request for each IPv4 VIP, from eth0's MAC to broadcast.
func (l *Lab) AnnounceVM(vm *VM) error {
	return inNetNS(vm.NS, func() error {
		ifi, err := net.InterfaceByName("eth0")
		if err != nil {
			return fmt.Errorf("lab: AnnounceVM %s: %w", vm, err)
		}
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW, int(htons(unix.ETH_P_ARP)))
		if err != nil {
			return fmt.Errorf("lab: AnnounceVM %s: packet socket: %w", vm, err)
		}
		defer unix.Close(fd)
		bcast := []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
		for _, vip := range vm.VIPs {
			if !vip.Is4() {
				continue
			}
			ip := vip.As4()
			f := make([]byte, 0, 42)
			f = append(f, bcast...)
			f = append(f, ifi.HardwareAddr...)
			f = binary.BigEndian.AppendUint16(f, unix.ETH_P_ARP)
			f = binary.BigEndian.AppendUint16(f, 1)      // Ethernet
			f = binary.BigEndian.AppendUint16(f, 0x0800) // IPv4
			f = append(f, 6, 4)
			f = binary.BigEndian.AppendUint16(f, 1) // request
			f = append(f, ifi.HardwareAddr...)
			f = append(f, ip[:]...)
			f = append(f, 0, 0, 0, 0, 0, 0)
			f = append(f, ip[:]...) // target = sender: gratuitous
			sa := &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ARP), Ifindex: ifi.Index, Halen: 6}
			copy(sa.Addr[:], bcast)
			if err := unix.Sendto(fd, f, 0, sa); err != nil {
				return fmt.Errorf("lab: AnnounceVM %s: send: %w", vm, err)
			}
		}
		return nil
	})
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }
