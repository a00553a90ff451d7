package migrate

import (
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmroam/vmroam/cache"
	"github.com/vmroam/vmroam/gossip"
)

// TestWaitForClaim: the old host streams only once its table names the
// request's claimer the owner at the request's epoch; it waits for a claim
// still on its way, and refuses at once when the table names another
// owner at that epoch or later.
func TestWaitForClaim(t *testing.T) {
	vip := netip.MustParseAddr("100.100.20.1")
	req := cache.Request{VIP: vip, Epoch: 5, Claimer: "h2"}
	for _, tc := range []struct {
		name  string
		table []gossip.Record // what the table holds over time, 20 ms apart
		want  string          // "" or part of the refusal
		quick bool            // decided before the wait ends
	}{
		{name: "claimed", table: []gossip.Record{{VIP: vip, Owner: "h2", Epoch: 5}}, quick: true},
		{name: "the claim arrives", table: []gossip.Record{{VIP: vip, Owner: "h1", Epoch: 4}, {VIP: vip, Owner: "h1", Epoch: 4}, {VIP: vip, Owner: "h2", Epoch: 5}}, quick: true},
		{name: "never claimed", table: []gossip.Record{{VIP: vip, Owner: "h1", Epoch: 4}}, want: "no claim of 100.100.20.1 by \"h2\" at epoch 5"},
		{name: "not in the table", want: "no claim of"},
		{name: "another owner at that epoch", table: []gossip.Record{{VIP: vip, Owner: "h3", Epoch: 5}}, want: `names "h3" the owner`, quick: true},
		{name: "a later epoch", table: []gossip.Record{{VIP: vip, Owner: "h2", Epoch: 6}}, want: "at epoch 6", quick: true},
	} {
		t.Run(strings.ReplaceAll(tc.name, " ", "_"), func(t *testing.T) {
			start := time.Now()
			var mu sync.Mutex
			get := func(a netip.Addr) (gossip.Record, bool) {
				mu.Lock()
				defer mu.Unlock()
				if len(tc.table) == 0 || a != vip {
					return gossip.Record{}, false
				}
				i := min(int(time.Since(start)/(20*time.Millisecond)), len(tc.table)-1)
				return tc.table[i], true
			}
			const wait = 300 * time.Millisecond
			err := waitForClaim(get, req, wait)
			took := time.Since(start)
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("refused: %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want a refusal with %q", err, tc.want)
			}
			if tc.quick && took >= wait {
				t.Errorf("took %v: decided only at the deadline", took)
			}
			if !tc.quick && took < wait {
				t.Errorf("gave up after %v, before the wait of %v", took, wait)
			}
		})
	}
}
