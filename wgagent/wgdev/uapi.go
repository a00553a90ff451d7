package wgdev

import (
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The embedded device is read and configured with its UAPI text directly
// (device.IpcGet, device.IpcSet), not through wgctrl and the UAPI socket:
// wgctrl dials the socket and asks the kernel for a "wireguard" netlink
// family first, 0.2 ms per read against 3 µs, and every reconcile reads
// the device once or twice, several times per migration at both ends
// while the handover's packets need the CPU. The text is the cross-platform
// UAPI protocol (wireguard.com/xplatform), the one wgctrl speaks over the
// socket; the tests check both readings agree.

// parseUAPI reads the answer to a UAPI get into the form wgctrl gives,
// but for the device's PublicKey, which the caller derives (a curve25519
// multiplication, ten times the rest of the parse).
func parseUAPI(name, text string) (*wgtypes.Device, error) {
	dev := &wgtypes.Device{Name: name, Type: wgtypes.Userspace}
	var peer *wgtypes.Peer
	var hsSec, hsNsec int64
	endPeer := func() {
		if peer == nil {
			return
		}
		if hsSec != 0 || hsNsec != 0 {
			peer.LastHandshakeTime = time.Unix(hsSec, hsNsec)
		}
		dev.Peers = append(dev.Peers, *peer)
		peer, hsSec, hsNsec = nil, 0, 0
	}
	for line := range strings.Lines(text) {
		line = strings.TrimRight(line, "\n")
		if line == "" {
			continue
		}
		key, value, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("UAPI get: line %q has no '='", line)
		}
		var err error
		switch key {
		case "errno":
			if value != "0" {
				return nil, fmt.Errorf("UAPI get: errno %s", value)
			}
		case "private_key":
			dev.PrivateKey, err = parseHexKey(value)
		case "listen_port":
			dev.ListenPort, err = strconv.Atoi(value)
		case "fwmark":
			dev.FirewallMark, err = strconv.Atoi(value)
		case "public_key":
			endPeer()
			peer = &wgtypes.Peer{}
			peer.PublicKey, err = parseHexKey(value)
		default:
			if peer == nil {
				return nil, fmt.Errorf("UAPI get: %q before any peer", key)
			}
			err = parsePeerLine(peer, key, value, &hsSec, &hsNsec)
		}
		if err != nil {
			return nil, fmt.Errorf("UAPI get: %s: %w", key, err)
		}
	}
	endPeer()
	return dev, nil
}

func parsePeerLine(p *wgtypes.Peer, key, value string, hsSec, hsNsec *int64) error {
	var err error
	switch key {
	case "preshared_key":
		p.PresharedKey, err = parseHexKey(value)
	case "protocol_version":
		p.ProtocolVersion, err = strconv.Atoi(value)
	case "endpoint":
		var ap netip.AddrPort
		if ap, err = netip.ParseAddrPort(value); err == nil {
			p.Endpoint = net.UDPAddrFromAddrPort(ap)
		}
	case "last_handshake_time_sec":
		*hsSec, err = strconv.ParseInt(value, 10, 64)
	case "last_handshake_time_nsec":
		*hsNsec, err = strconv.ParseInt(value, 10, 64)
	case "tx_bytes":
		p.TransmitBytes, err = strconv.ParseInt(value, 10, 64)
	case "rx_bytes":
		p.ReceiveBytes, err = strconv.ParseInt(value, 10, 64)
	case "persistent_keepalive_interval":
		var s int
		s, err = strconv.Atoi(value)
		p.PersistentKeepaliveInterval = time.Duration(s) * time.Second
	case "allowed_ip":
		var pfx netip.Prefix
		if pfx, err = netip.ParsePrefix(value); err == nil {
			p.AllowedIPs = append(p.AllowedIPs, net.IPNet{
				IP:   pfx.Addr().AsSlice(),
				Mask: net.CIDRMask(pfx.Bits(), pfx.Addr().BitLen()),
			})
		}
	default:
		// A newer wireguard-go may say more; what we do not know we
		// do not need.
	}
	return err
}

func parseHexKey(s string) (wgtypes.Key, error) {
	var k wgtypes.Key
	b, err := hex.DecodeString(s)
	if err != nil {
		return k, err
	}
	if len(b) != len(k) {
		return k, fmt.Errorf("key of %d bytes, want %d", len(b), len(k))
	}
	copy(k[:], b)
	return k, nil
}

// formatUAPISet writes c as a UAPI set.
func formatUAPISet(c wgtypes.Config) (string, error) {
	var b strings.Builder
	hexKey := func(name string, k wgtypes.Key) {
		fmt.Fprintf(&b, "%s=%s\n", name, hex.EncodeToString(k[:]))
	}
	if c.PrivateKey != nil {
		hexKey("private_key", *c.PrivateKey)
	}
	if c.ListenPort != nil {
		fmt.Fprintf(&b, "listen_port=%d\n", *c.ListenPort)
	}
	if c.FirewallMark != nil {
		fmt.Fprintf(&b, "fwmark=%d\n", *c.FirewallMark)
	}
	if c.ReplacePeers {
		b.WriteString("replace_peers=true\n")
	}
	for _, p := range c.Peers {
		hexKey("public_key", p.PublicKey)
		if p.Remove {
			b.WriteString("remove=true\n")
			continue
		}
		if p.UpdateOnly {
			b.WriteString("update_only=true\n")
		}
		if p.PresharedKey != nil {
			hexKey("preshared_key", *p.PresharedKey)
		}
		if p.Endpoint != nil {
			ap := p.Endpoint.AddrPort()
			if !ap.IsValid() {
				return "", fmt.Errorf("peer %s: endpoint %v is not an address and port", p.PublicKey, p.Endpoint)
			}
			fmt.Fprintf(&b, "endpoint=%s\n", netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
		}
		if p.PersistentKeepaliveInterval != nil {
			fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", int(p.PersistentKeepaliveInterval.Seconds()))
		}
		if p.ReplaceAllowedIPs {
			b.WriteString("replace_allowed_ips=true\n")
		}
		for _, n := range p.AllowedIPs {
			pfx, err := ipNetPrefix(n)
			if err != nil {
				return "", fmt.Errorf("peer %s: %w", p.PublicKey, err)
			}
			fmt.Fprintf(&b, "allowed_ip=%s\n", pfx)
		}
	}
	return b.String(), nil
}

func ipNetPrefix(n net.IPNet) (netip.Prefix, error) {
	addr, ok := netip.AddrFromSlice(n.IP)
	ones, bits := n.Mask.Size()
	if !ok || bits == 0 {
		return netip.Prefix{}, fmt.Errorf("allowed IP %v is not a prefix", n)
	}
	// An IPv4 address may come in 16 bytes with a 16-byte mask.
	addr = addr.Unmap()
	ones -= bits - addr.BitLen()
	if ones < 0 || bits < addr.BitLen() {
		return netip.Prefix{}, fmt.Errorf("allowed IP %v: mask does not fit the address", n)
	}
	return netip.PrefixFrom(addr, ones), nil
}
