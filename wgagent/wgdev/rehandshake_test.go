package wgdev

import (
	"encoding/hex"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/conn/bindtest"
	"golang.zx2c4.com/wireguard/device"
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
