package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestFlags(t *testing.T) {
	o, err := parse([]string{"-dev", "w1", "-delay", "20ms", "-jitter", "1ms", "-loss", "0.01", "-seed", "5", "-control", "/x.sock", "-rt", "10"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if o.dev != "w1" || o.cfg.Delay != 20*time.Millisecond || o.cfg.Jitter != time.Millisecond ||
		o.cfg.Loss != 0.01 || o.cfg.Seed != 5 || o.control != "/x.sock" || o.rt != 10 || o.mtu != 1500 {
		t.Fatalf("%+v", o)
	}
	for _, args := range [][]string{
		{"-delay", "x"},
		{"-delay", "-1ms"},
		{"-loss", "1"},
		{"-jitter", "-2s"},
		{"-rt", "100"},
		{"-mtu", "-1"},
		{"-dev", ""},
		{"extra"},
		{"-nosuchflag"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(args, &stdout, &stderr); code != 2 {
			t.Errorf("%q: exit %d, want 2", args, code)
		}
		if msg := stderr.String(); !strings.HasPrefix(msg, "wanem: ") || strings.Count(msg, "wanem:") != 1 || !strings.Contains(msg, "-h") {
			t.Errorf("%q: message %q", args, msg)
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run([]string{"-h"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "-delay duration") || stderr.Len() != 0 {
		t.Errorf("-h: exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
}
