package lab

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"
)

// Flow is an iperf3 stream running in the background between two VMs,
// measured by the receiving server, so a test can move a VM while it runs.
type Flow struct {
	l              *Lab
	to             *VM
	srv, cli       *proc
	srvLog, cliLog string
	dur            time.Duration
}

// FlowResult is what the iperf3 server (the receiver) counted.
type FlowResult struct {
	Packets    int     // UDP datagrams the sender numbered and the receiver accounted for
	Lost       int     // UDP datagrams missing at the end
	OutOfOrder int     // UDP datagrams that arrived after a later one
	Bytes      float64 // received
	Seconds    float64
	// Intervals are bytes received per FlowInterval, for TCP stalls.
	Intervals []float64
	// LostIntervals are the UDP datagrams the receiver found missing in
	// each FlowInterval (iperf3's count by sequence gaps), to tell when a
	// loss happened.
	LostIntervals []int
}

// FlowInterval is the receiver's reporting interval (iperf3 -i): the
// resolution of FlowResult.Intervals and Stall.
const FlowInterval = 100 * time.Millisecond

// Stall is the longest run of intervals in which the receiver got
// nothing, leaving out the first and the last (a stream starting or
// ending), as a duration: a TCP stream's stall seen by the receiver, to
// FlowInterval's resolution.
func (r FlowResult) Stall() time.Duration {
	longest, run := 0, 0
	for i, b := range r.Intervals {
		if i == 0 || i == len(r.Intervals)-1 {
			continue
		}
		if b == 0 {
			run++
			longest = max(longest, run)
		} else {
			run = 0
		}
	}
	return time.Duration(longest) * FlowInterval
}

// StartUDPFlow starts an iperf3 UDP stream from from to to's first VIP for
// dur: length-byte datagrams at bitrate (e.g. "20M").
//
// The receiver gets a 2 MiB socket buffer, as a VM expecting bursts
// would: on a loaded two-core machine the reader can lag for milliseconds,
// and a default 208 KiB buffer holds only ~200 small datagrams.
func (l *Lab) StartUDPFlow(from, to *VM, dur time.Duration, bitrate string, length int) (*Flow, error) {
	// iperf3's client passes -w on to the server's sockets.
	return l.startFlow(from, to, dur, "-w", "2M", "-u", "-b", bitrate, "-l", strconv.Itoa(length))
}

// StartTCPFlow starts an iperf3 TCP stream from from to to's first VIP for
// dur, at most bitrate ("" = unlimited).
func (l *Lab) StartTCPFlow(from, to *VM, dur time.Duration, bitrate string) (*Flow, error) {
	if bitrate == "" {
		return l.startFlow(from, to, dur)
	}
	return l.startFlow(from, to, dur, "-b", bitrate)
}

func (l *Lab) startFlow(from, to *VM, dur time.Duration, clientExtra ...string) (*Flow, error) {
	if len(to.VIPs) == 0 {
		return nil, fmt.Errorf("lab: flow: VM %s has no VIP", to.Name)
	}
	secs := max(1, int((dur+time.Second-1)/time.Second))
	dst := to.VIPs[0]
	port := strconv.Itoa(l.iperfPort())
	f := &Flow{l: l, to: to, dur: time.Duration(secs) * time.Second,
		srvLog: filepath.Join(l.Dir, "flow-"+to.Name+"-"+port+"-server.json"),
		cliLog: filepath.Join(l.Dir, "flow-"+to.Name+"-"+port+"-client.log")}
	var err error
	f.srv, err = l.startProc("iperf3 server in "+to.Name, to.NS, f.srvLog, nil,
		"iperf3", "-s", "-1", "-J", "-i", strconv.FormatFloat(FlowInterval.Seconds(), 'f', -1, 64), "-B", dst.String(), "-p", port)
	if err != nil {
		return nil, err
	}
	if err := l.waitListening(f.srv, to, port, f.srvLog); err != nil {
		f.srv.kill()
		return nil, err
	}
	args := []string{"iperf3", "-c", dst.String(), "-p", port, "-t", strconv.Itoa(secs)}
	if src := from.firstVIP(dst.Is6()); src.IsValid() {
		args = append(args, "-B", src.String())
	}
	f.cli, err = l.startProc("iperf3 client in "+from.Name, from.NS, f.cliLog, nil, append(args, clientExtra...)...)
	if err != nil {
		f.srv.kill()
		return nil, err
	}
	return f, nil
}

// Wait waits for the stream to end and returns the receiver's counts.
func (f *Flow) Wait() (FlowResult, error) {
	var res FlowResult
	limit := f.dur + 30*time.Second
	select {
	case <-f.cli.done:
	case <-time.After(limit):
		f.cli.kill()
		f.srv.kill()
		return res, fmt.Errorf("lab: iperf3 client did not end within %v: %s", limit, logTail(f.cliLog, 10))
	}
	select {
	case <-f.srv.done:
	case <-time.After(10 * time.Second):
		f.srv.kill()
		return res, fmt.Errorf("lab: iperf3 server did not end: %s", logTail(f.srvLog, 10))
	}
	if f.cli.err != nil {
		return res, fmt.Errorf("lab: iperf3 client: %v: %s", f.cli.err, logTail(f.cliLog, 10))
	}
	b, err := os.ReadFile(f.srvLog)
	if err != nil {
		return res, err
	}
	var out struct {
		Error     string `json:"error"`
		Intervals []struct {
			Sum struct {
				Bytes float64    `json:"bytes"`
				Lost  iperfCount `json:"lost_packets"`
			} `json:"sum"`
		} `json:"intervals"`
		End struct {
			Streams []struct {
				UDP *struct {
					Packets    iperfCount `json:"packets"`
					Lost       iperfCount `json:"lost_packets"`
					OutOfOrder iperfCount `json:"out_of_order"`
				} `json:"udp"`
			} `json:"streams"`
			SumReceived struct {
				Bytes   float64 `json:"bytes"`
				Seconds float64 `json:"seconds"`
			} `json:"sum_received"`
			Sum struct {
				Bytes   float64 `json:"bytes"`
				Seconds float64 `json:"seconds"`
			} `json:"sum"`
		} `json:"end"`
	}
	if err := json.Unmarshal(jsonPart(b), &out); err != nil {
		return res, fmt.Errorf("lab: iperf3 server output: %w: %s", err, logTail(f.srvLog, 10))
	}
	if out.Error != "" {
		return res, fmt.Errorf("lab: iperf3 server: %s", out.Error)
	}
	for _, iv := range out.Intervals {
		res.Intervals = append(res.Intervals, iv.Sum.Bytes)
		res.LostIntervals = append(res.LostIntervals, int(iv.Sum.Lost))
	}
	res.Bytes, res.Seconds = out.End.SumReceived.Bytes, out.End.SumReceived.Seconds
	if res.Bytes == 0 {
		res.Bytes, res.Seconds = out.End.Sum.Bytes, out.End.Sum.Seconds
	}
	for _, s := range out.End.Streams {
		if s.UDP != nil {
			res.Packets += int(s.UDP.Packets)
			res.Lost += int(s.UDP.Lost)
			res.OutOfOrder += int(s.UDP.OutOfOrder)
		}
	}
	return res, nil
}

// iperfCount is a count in iperf3's JSON. iperf3 prints a negative count
// as its unsigned 64-bit pattern: an interval's lost_packets goes below 0
// when a datagram counted lost there arrives late, out of order.
type iperfCount int64

func (c *iperfCount) UnmarshalJSON(b []byte) error {
	s := string(b)
	if n, err := strconv.ParseInt(s, 10, 64); err == nil {
		*c = iperfCount(n)
		return nil
	}
	u, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return fmt.Errorf("lab: iperf3 count %s: %w", s, err)
	}
	*c = iperfCount(int64(u))
	return nil
}
