package wgdev

import (
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// delayBind delays every datagram it sends by a fixed time, as a WAN does.
type delayBind struct {
	conn.Bind
	delay time.Duration
}

func (b delayBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	copies := make([][]byte, len(bufs))
	for i, p := range bufs {
		copies[i] = append([]byte(nil), p...)
	}
	time.AfterFunc(b.delay, func() { b.Bind.Send(copies, ep) })
	return nil
}

// TestRehandshakeAfterCrossedInitiations builds the stall Rehandshake is
// for: two devices that add each other at once, 50 ms apart, each send an
// initiation and each answer the other's, and neither gets a session
// before WireGuard's own retry 5 s later. Rehandshake on one of them gives
// both a session within a few round trips.
func TestRehandshakeAfterCrossedInitiations(t *testing.T) {
	const oneWay = 50 * time.Millisecond
	binds := bindtest.NewChannelBinds()
	var devs [2]*device.Device
	var keys [2]wgtypes.Key
	for i := range devs {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		keys[i] = k
		log := slog.New(slog.DiscardHandler)
		logger := &device.Logger{
			Verbosef: func(format string, args ...any) { log.Debug(fmt.Sprintf(format, args...)) },
			Errorf:   func(format string, args ...any) { t.Logf("device %d: "+format, append([]any{i}, args...)...) },
		}
		devs[i] = device.NewDevice(tuntest.NewChannelTUN().TUN(), delayBind{binds[i], oneWay}, logger)
		defer devs[i].Close()
		if err := devs[i].IpcSet("private_key=" + hex.EncodeToString(k[:]) + "\n"); err != nil {
			t.Fatal(err)
		}
		if err := devs[i].Up(); err != nil {
			t.Fatal(err)
		}
	}
	// bindtest's first bind reaches the second at port 1, the second the
	// first at port 2. The keepalive makes each send its initiation as
	// soon as it has the peer.
	for i, port := range []int{1, 2} {
		peer := keys[1-i].PublicKey()
		set := fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=100.64.0.%d/32\npersistent_keepalive_interval=25\n",
			hex.EncodeToString(peer[:]), port, 2-i)
		if err := devs[i].IpcSet(set); err != nil {
			t.Fatal(err)
		}
	}
	handshakes := func() (n int) {
		for i, d := range devs {
			text, err := d.IpcGet()
			if err != nil {
				t.Fatal(err)
			}
			st, err := parseUAPI(fmt.Sprint("dev", i), text)
			if err != nil {
				t.Fatal(err)
			}
			if len(st.Peers) == 1 && !st.Peers[0].LastHandshakeTime.IsZero() {
				n++
			}
		}
		return n
	}

	// Ten round trips without a session: the initiations crossed.
	start := time.Now()
	for time.Since(start) < 20*oneWay {
		if n := handshakes(); n > 0 {
			t.Fatalf("%d of 2 devices completed a handshake after %v: the initiations did not cross", n, time.Since(start))
		}
		time.Sleep(oneWay / 5)
	}

	if err := rehandshake(devs[0], keys[1].PublicKey()); err != nil {
		t.Fatal(err)
	}
	// WireGuard's own retry comes at least 5 s after the first initiation:
	// sessions before that are the rehandshake's.
	asked := time.Now()
	for handshakes() < 2 {
		if time.Since(start) > 4*time.Second {
			t.Fatalf("no session at both ends %v after the rehandshake", time.Since(asked))
		}
		time.Sleep(oneWay / 5)
	}
	t.Logf("both ends have a session %v after the rehandshake (one-way delay %v)", time.Since(asked).Round(time.Millisecond), oneWay)

	if err := rehandshake(devs[0], keys[0].PublicKey()); err == nil {
		t.Error("rehandshake with an unknown peer: no error")
	}
}

// TestRehandshakeRevivesAOneWaySession builds a session that one end
// counts as made and the other cannot read: the second end forgets the
// first's keypairs (it removes and adds the peer again), as crossed
// handshakes handled on two workers at once can leave two ends. What the
// first sends is lost, and wireguard-go starts anew only after 15 s
// without an answer; a Rehandshake of the first end revives it at once.
func TestRehandshakeRevivesAOneWaySession(t *testing.T) {
	binds := bindtest.NewChannelBinds()
	tuns := [2]*tuntest.ChannelTUN{tuntest.NewChannelTUN(), tuntest.NewChannelTUN()}
	var devs [2]*device.Device
	var keys [2]wgtypes.Key
	for i := range devs {
		devs[i], keys[i] = newTestDevice(t, tuns[i].TUN(), binds[i])
	}
	addr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{100, 64, 0, byte(i + 1)}) }
	// peerSet is dev i's configuration of the other end, without a
	// keepalive: nothing is sent that the test does not send.
	peerSet := func(i int) string {
		return fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=%s/32\n", hexKey(keys[1-i].PublicKey()), i+1, addr(1-i))
	}
	for i := range devs {
		if err := devs[i].IpcSet(peerSet(i)); err != nil {
			t.Fatal(err)
		}
	}
	// delivered sends a ping from dev 0 and says whether dev 1 got it.
	delivered := func(wait time.Duration) bool {
		tuns[0].Outbound <- tuntest.Ping(addr(1), addr(0))
		select {
		case <-tuns[1].Inbound:
			return true
		case <-time.After(wait):
			return false
		}
	}
	if !delivered(5 * time.Second) {
		t.Fatal("no session to begin with")
	}
	forget := fmt.Sprintf("public_key=%s\nremove=true\n", hexKey(keys[0].PublicKey()))
	if err := devs[1].IpcSet(forget + peerSet(1)); err != nil {
		t.Fatal(err)
	}
	if delivered(300 * time.Millisecond) {
		t.Fatal("dev 1 read a packet of a session it forgot")
	}
	if err := rehandshake(devs[0], keys[1].PublicKey()); err != nil {
		t.Fatal(err)
	}
	if !delivered(5 * time.Second) {
		t.Fatal("no packet through after the rehandshake")
	}
}

// newTestDevice starts embedded wireguard-go with a new key on tun and
// bind, closed at the test's end.
func newTestDevice(t *testing.T, tun tun.Device, bind conn.Bind) (*device.Device, wgtypes.Key) {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	d := device.NewDevice(tun, bind, device.NewLogger(device.LogLevelError, ""))
	t.Cleanup(d.Close)
	if err := d.IpcSet("private_key=" + hexKey(k) + "\n"); err != nil {
		t.Fatal(err)
	}
	if err := d.Up(); err != nil {
		t.Fatal(err)
	}
	return d, k
}
