package wgagent

import (
	"context"
	"errors"
	"slices"
	"strings"
	"time"

	"github.com/vmroam/vmroam/gossip"
	"github.com/vmroam/vmroam/wgagent/control"
)

// keyRoundTimeout bounds how long a key operation waits for the members'
// answers, per round (use and remove ask twice); the client waits 15 s.
const keyRoundTimeout = 5 * time.Second

// Keys lists the cluster's gossip keys (`vmroam keys list`).
func (b backend) Keys(ctx context.Context) (control.Keys, error) {
	ctx, cancel := context.WithTimeout(ctx, keyRoundTimeout)
	defer cancel()
	rs, err := b.a.cluster.ListKeys(ctx)
	if err != nil {
		return control.Keys{}, badRequest("%v", err)
	}
	return keysStatus(rs), nil
}

// ChangeKeys installs, uses or removes a gossip key on every member
// (`vmroam keys add|use|remove`). A refusal or a failure on some members is
// an error that names them.
func (b backend) ChangeKeys(ctx context.Context, op string, key []byte, force bool) (control.Keys, error) {
	a := b.a
	if len(a.cfg.GossipKeys) == 0 {
		return control.Keys{}, badRequest("gossip is not encrypted here (--insecure-gossip): there are no keys to change")
	}
	ctx, cancel := context.WithTimeout(ctx, keyRoundTimeout)
	defer cancel()
	var rs []gossip.KeyReport
	var err error
	switch op {
	case control.KeyOpInstall:
		rs, err = a.cluster.InstallKey(ctx, key)
	case control.KeyOpUse:
		rs, err = a.cluster.UseKey(ctx, key)
	case control.KeyOpRemove:
		rs, err = a.cluster.RemoveKey(ctx, key, force)
	default:
		return control.Keys{}, badRequest("unknown key operation %q", op)
	}
	var ke *gossip.KeyError
	switch {
	case errors.As(err, &ke):
		// Refused, or failed on some members: the message names them.
		return control.Keys{}, err
	case err != nil:
		return control.Keys{}, badRequest("%v", err)
	}
	a.log.Info("gossip keys changed cluster-wide", "op", op, "key", gossip.KeyFingerprint(key), "members", len(rs))
	return keysStatus(rs), nil
}

// keysStatus summarizes the members' reports: each key with how many hold
// it and how many encrypt with it.
func keysStatus(rs []gossip.KeyReport) control.Keys {
	out := control.Keys{Keys: []control.KeyUse{}, Members: []control.MemberKeys{}}
	use := map[string]*control.KeyUse{}
	for _, r := range rs {
		mk := control.MemberKeys{Member: r.Member, Keys: r.Keys, Error: r.Err}
		if mk.Keys == nil {
			mk.Keys = []string{}
		}
		out.Members = append(out.Members, mk)
		for i, fp := range r.Keys {
			u := use[fp]
			if u == nil {
				u = &control.KeyUse{Fingerprint: fp}
				use[fp] = u
			}
			u.Members++
			if i == 0 {
				u.Primary++
			}
		}
	}
	for _, u := range use {
		out.Keys = append(out.Keys, *u)
	}
	slices.SortFunc(out.Keys, func(x, y control.KeyUse) int {
		if x.Primary != y.Primary {
			return y.Primary - x.Primary
		}
		if x.Members != y.Members {
			return y.Members - x.Members
		}
		return strings.Compare(x.Fingerprint, y.Fingerprint)
	})
	return out
}
