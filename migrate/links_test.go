package migrate

import "testing"

// TestKernelLinksOpenDeliveryOnMissingDevice: a VM interface gone before
// delivery (a VM moved on at once) gives an error and a nil Delivery, not
// a nil pointer in an interface that the writer would later close (an
// agent crashed so).
func TestKernelLinksOpenDeliveryOnMissingDevice(t *testing.T) {
	d, err := KernelLinks{}.OpenDelivery("vmroam-gone0")
	if err == nil {
		t.Fatal("opened a delivery on a device that does not exist")
	}
	if d != nil {
		t.Fatalf("OpenDelivery returned %#v with its error %v: want a nil Delivery", d, err)
	}
}

// TestWriterWithoutInterface: the writer of a VIP whose interface is gone,
// outside a delivery that could spill, fails its writes and closes without
// a delivery ever opened.
func TestWriterWithoutInterface(t *testing.T) {
	h := newTestLab(t).host("h1", testTunables())
	c := &vipCtl{e: h.engine, dev: "vmroam-gone0"}
	write, prepare, closeWriter := c.writer(KernelLinks{}, new(deliveryOut))
	prepare()
	if err := write([]byte{0x45}); err == nil {
		t.Error("a write to a missing interface succeeded")
	}
	closeWriter()
	closeWriter()
}
