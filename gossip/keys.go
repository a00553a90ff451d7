package gossip

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"

	"github.com/hashicorp/memberlist"
)

// Cluster-wide key rotation. memberlist's Keyring changes one member's keys
// only; these operations ask every member that memberlist lists as alive or
// suspect, directly over its reliable (TCP) channel, encrypted with the
// asking member's primary key, and collect one answer from each. A member
// writes its key file first and changes its keyring only once that worked,
// so a restart finds the keys it was using. Use refuses unless every member
// answered that it has the key, and Remove refuses while any member still
// encrypts with it: either would split the cluster into members that cannot
// read each other.
//
// The answers carry fingerprints (KeyFingerprint), never keys. The request
// carries the key, as safe as any gossip, which the same keys protect.

// Key operations, as the wire carries them.
const (
	keyOpList    byte = 1
	keyOpInstall byte = 2
	keyOpUse     byte = 3
	keyOpRemove  byte = 4
)

// maxKeyErrLen bounds the error text of a reply.
const maxKeyErrLen = 1024

// KeyReport is one member's answer to a key operation.
type KeyReport struct {
	Member string
	// Keys are the fingerprints of the member's keys after the operation,
	// its primary key first. Empty when it did not answer.
	Keys []string
	// Err says why the operation failed there ("" when it worked);
	// ErrNoAnswer when the member did not answer in time.
	Err string
}

// ErrNoAnswer is KeyReport.Err of a member that did not answer.
const ErrNoAnswer = "no answer"

// Has reports whether the member holds the key with fingerprint fp.
func (r KeyReport) Has(fp string) bool { return slices.Contains(r.Keys, fp) }

// Primary returns the fingerprint of the member's primary key, "" if unknown.
func (r KeyReport) Primary() string {
	if len(r.Keys) == 0 {
		return ""
	}
	return r.Keys[0]
}

// KeyError is the error of a key operation that was refused or failed on
// some members; Reports holds every member's answer.
type KeyError struct {
	Msg     string
	Reports []KeyReport
}

func (e *KeyError) Error() string { return e.Msg }

// ListKeys asks every member for its keys' fingerprints.
func (c *Cluster) ListKeys(ctx context.Context) ([]KeyReport, error) {
	if c.mc.Keyring == nil {
		return nil, errors.New("gossip: keys: encryption is off (--insecure-gossip)")
	}
	return c.keyRound(ctx, keyOpList, nil), nil
}

// InstallKey adds key to every member's keyring and key file, the first
// step of a rotation: members then read messages encrypted with it but do
// not use it yet. Installing a key a member has is a no-op there, so
// InstallKey can be repeated until every member has it.
func (c *Cluster) InstallKey(ctx context.Context, key []byte) ([]KeyReport, error) {
	if err := c.checkKeyOp(key); err != nil {
		return nil, fmt.Errorf("gossip: install key: %w", err)
	}
	rs := c.keyRound(ctx, keyOpInstall, key)
	return rs, failedOn("install key", rs)
}

// UseKey makes key the primary (encrypting) key of every member. It
// refuses, changing nothing, unless every member answered that it has the
// key installed.
func (c *Cluster) UseKey(ctx context.Context, key []byte) ([]KeyReport, error) {
	if err := c.checkKeyOp(key); err != nil {
		return nil, fmt.Errorf("gossip: use key: %w", err)
	}
	fp := KeyFingerprint(key)
	list := c.keyRound(ctx, keyOpList, nil)
	var lacking []string
	for _, r := range list {
		if r.Err != "" || !r.Has(fp) {
			lacking = append(lacking, describe(r, "does not have it"))
		}
	}
	if len(lacking) > 0 {
		return list, &KeyError{
			Msg:     fmt.Sprintf("use key %s refused: not every member has it (%s); run 'vmroam keys add' again first", fp, strings.Join(lacking, ", ")),
			Reports: list,
		}
	}
	rs := c.keyRound(ctx, keyOpUse, key)
	return rs, failedOn("use key", rs)
}

// RemoveKey removes key from every member's keyring and key file. It
// refuses the key this member encrypts with, and, unless force, a key that
// any member still encrypts with or a key some member did not say it no
// longer uses (it did not answer): those members would be cut off.
func (c *Cluster) RemoveKey(ctx context.Context, key []byte, force bool) ([]KeyReport, error) {
	if err := c.checkKeyOp(key); err != nil {
		return nil, fmt.Errorf("gossip: remove key: %w", err)
	}
	fp := KeyFingerprint(key)
	if bytes.Equal(c.mc.Keyring.GetPrimaryKey(), key) {
		return nil, fmt.Errorf("gossip: remove key %s refused: it is the primary key of this member; 'vmroam keys use' another key first", fp)
	}
	list := c.keyRound(ctx, keyOpList, nil)
	var users []string
	for _, r := range list {
		switch {
		case r.Err != "":
			users = append(users, describe(r, ""))
		case r.Primary() == fp:
			users = append(users, r.Member+" encrypts with it")
		}
	}
	if len(users) > 0 {
		if !force {
			return list, &KeyError{
				Msg:     fmt.Sprintf("remove key %s refused: %s; removing it would cut them off (--force removes it anyway)", fp, strings.Join(users, ", ")),
				Reports: list,
			}
		}
		c.log.Warn("removing a gossip key that members may still use (forced)", "key", fp, "members", users)
	}
	rs := c.keyRound(ctx, keyOpRemove, key)
	return rs, failedOn("remove key", rs)
}

func (c *Cluster) checkKeyOp(key []byte) error {
	if c.mc.Keyring == nil {
		return errors.New("encryption is off (--insecure-gossip)")
	}
	return memberlist.ValidateKey(key)
}

func describe(r KeyReport, ok string) string {
	if r.Err != "" {
		return r.Member + ": " + r.Err
	}
	return r.Member + " " + ok
}

// failedOn returns a KeyError naming the members where an operation did
// not work, or nil.
func failedOn(what string, rs []KeyReport) error {
	var bad []string
	for _, r := range rs {
		if r.Err != "" {
			bad = append(bad, describe(r, ""))
		}
	}
	if len(bad) == 0 {
		return nil
	}
	return &KeyError{
		Msg:     fmt.Sprintf("%s: failed on %d of %d members (%s); it is safe to run it again", what, len(bad), len(rs), strings.Join(bad, ", ")),
		Reports: rs,
	}
}

// keyRound sends op to every member memberlist lists (this one is answered
// directly) and returns one report per member, sorted by name; those that
// did not answer before ctx is done say ErrNoAnswer.
func (c *Cluster) keyRound(ctx context.Context, op byte, key []byte) []KeyReport {
	nodes := c.ml.Members()
	id := rand.Uint64()
	ch := make(chan KeyReport, len(nodes))
	c.keyMu.Lock()
	c.keyWait[id] = ch
	c.keyMu.Unlock()
	defer func() {
		c.keyMu.Lock()
		delete(c.keyWait, id)
		c.keyMu.Unlock()
	}()

	got := map[string]KeyReport{}
	msg := encodeKeyOp(id, op, c.name, key)
	for _, n := range nodes {
		if n.Name == c.name {
			got[c.name] = c.applyKeyOp(op, key)
			continue
		}
		got[n.Name] = KeyReport{Member: n.Name, Err: ErrNoAnswer}
		c.spawn(func() {
			// A failed send is an answer too: the member cannot be asked.
			if err := c.ml.SendReliable(n, msg); err != nil {
				ch <- KeyReport{Member: n.Name, Err: "not reachable: " + err.Error()}
			}
		})
	}
	waiting := len(nodes) - 1
	for waiting > 0 {
		select {
		case r := <-ch:
			if prev, ok := got[r.Member]; ok && prev.Err == ErrNoAnswer {
				got[r.Member] = r
				waiting--
			}
		case <-ctx.Done():
			waiting = 0
		case <-c.done:
			waiting = 0
		}
	}
	out := make([]KeyReport, 0, len(got))
	for _, r := range got {
		out = append(out, r)
	}
	slices.SortFunc(out, func(a, b KeyReport) int { return strings.Compare(a.Member, b.Member) })
	return out
}

// spawn runs f in a goroutine that Shutdown waits for; after Shutdown it
// runs nothing.
func (c *Cluster) spawn(f func()) {
	c.life.RLock()
	defer c.life.RUnlock()
	if c.closed {
		return
	}
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		f()
	}()
}

// applyKeyOp changes this member's keys: the key file first, then the
// keyring, so that the file never lacks a key the member uses.
func (c *Cluster) applyKeyOp(op byte, key []byte) KeyReport {
	c.keyApplyMu.Lock()
	defer c.keyApplyMu.Unlock()
	rep := KeyReport{Member: c.name}
	ring := c.mc.Keyring
	if ring == nil {
		rep.Err = "gossip encryption is off"
		return rep
	}
	keys := slices.Clone(ring.GetKeys())
	idx := slices.IndexFunc(keys, func(k []byte) bool { return bytes.Equal(k, key) })
	var next [][]byte
	switch op {
	case keyOpList:
	case keyOpInstall:
		if idx < 0 {
			next = append(keys, bytes.Clone(key))
		}
	case keyOpUse:
		switch {
		case idx < 0:
			rep.Err = "key " + KeyFingerprint(key) + " is not installed"
		case idx > 0:
			next = append([][]byte{keys[idx]}, slices.Delete(slices.Clone(keys), idx, idx+1)...)
		}
	case keyOpRemove:
		switch {
		case idx == 0:
			rep.Err = "key " + KeyFingerprint(key) + " is the primary key here"
		case idx > 0:
			next = slices.Delete(slices.Clone(keys), idx, idx+1)
		}
	default:
		rep.Err = fmt.Sprintf("unknown key operation %d", op)
	}
	if rep.Err == "" && next != nil {
		if err := c.persistKeys(next); err != nil {
			rep.Err = err.Error()
		} else {
			var err error
			switch op {
			case keyOpInstall:
				err = ring.AddKey(key)
			case keyOpUse:
				err = ring.UseKey(key)
			case keyOpRemove:
				err = ring.RemoveKey(key)
			}
			if err != nil {
				rep.Err = err.Error()
			} else {
				c.log.Info("gossip keys changed", "op", keyOpName(op), "key", KeyFingerprint(key), "keys", len(next))
			}
		}
	}
	for _, k := range ring.GetKeys() {
		rep.Keys = append(rep.Keys, KeyFingerprint(k))
	}
	if rep.Err != "" && op != keyOpList {
		c.log.Warn("gossip key operation failed", "op", keyOpName(op), "key", KeyFingerprint(key), "err", rep.Err)
	}
	return rep
}

func (c *Cluster) persistKeys(keys [][]byte) error {
	if c.keyFile == "" {
		return nil
	}
	if err := WriteKeyFile(c.keyFile, keys); err != nil {
		return fmt.Errorf("keys not changed: %w", err)
	}
	return nil
}

func keyOpName(op byte) string {
	switch op {
	case keyOpList:
		return "list"
	case keyOpInstall:
		return "install"
	case keyOpUse:
		return "use"
	case keyOpRemove:
		return "remove"
	}
	return fmt.Sprintf("op-%d", op)
}

// handleKeyOp answers a key operation another member asked for. It runs
// in its own goroutine: writing the key file must not hold up gossip.
func (c *Cluster) handleKeyOp(id uint64, op byte, from string, key []byte) {
	if c.admit != nil {
		m, known := c.member(from)
		var mp *Member
		if known {
			mp = &m
		}
		if !c.admit(from, mp) {
			c.log.Warn("ignored a gossip key operation from a refused member", "member", from, "op", keyOpName(op))
			return
		}
	}
	rep := c.applyKeyOp(op, key)
	for _, n := range c.ml.Members() {
		if n.Name == from {
			if err := c.ml.SendReliable(n, encodeKeyReply(id, rep)); err != nil {
				c.log.Warn("gossip key operation: answer not sent", "to", from, "err", err)
			}
			return
		}
	}
	c.log.Warn("gossip key operation: the asking member is gone", "member", from)
}

// handleKeyReply passes an answer to the round waiting for it; an answer
// nobody waits for (late, or not asked for) is dropped.
func (c *Cluster) handleKeyReply(id uint64, rep KeyReport) {
	c.keyMu.Lock()
	ch := c.keyWait[id]
	c.keyMu.Unlock()
	if ch == nil {
		return
	}
	select {
	case ch <- rep:
	default:
	}
}

// encodeKeyOp encodes a key operation:
//
//	type(1) id(8) op(1) from-len(1) from key-len(1) key
func encodeKeyOp(id uint64, op byte, from string, key []byte) []byte {
	b := make([]byte, 0, 1+8+1+1+len(from)+1+len(key))
	b = append(b, msgKeyOp)
	b = binary.BigEndian.AppendUint64(b, id)
	b = append(b, op, byte(len(from)))
	b = append(b, from...)
	b = append(b, byte(len(key)))
	return append(b, key...)
}

func decodeKeyOp(b []byte) (id uint64, op byte, from string, key []byte, err error) {
	if len(b) < 1+8+1+1 || b[0] != msgKeyOp {
		return 0, 0, "", nil, fmt.Errorf("decode key operation: %w", errTruncated)
	}
	id, op = binary.BigEndian.Uint64(b[1:9]), b[9]
	if op < keyOpList || op > keyOpRemove {
		return 0, 0, "", nil, fmt.Errorf("decode key operation: unknown operation %d", op)
	}
	n := int(b[10])
	b = b[11:]
	if n == 0 || len(b) < n+1 {
		return 0, 0, "", nil, fmt.Errorf("decode key operation: name: %w", errTruncated)
	}
	from, b = string(b[:n]), b[n:]
	k := int(b[0])
	b = b[1:]
	if len(b) != k {
		return 0, 0, "", nil, fmt.Errorf("decode key operation: %d key bytes, %d left", k, len(b))
	}
	if (op == keyOpList) != (k == 0) {
		return 0, 0, "", nil, fmt.Errorf("decode key operation: a %d-byte key with %s", k, keyOpName(op))
	}
	if k > 0 {
		if err := memberlist.ValidateKey(b); err != nil {
			return 0, 0, "", nil, fmt.Errorf("decode key operation: %w", err)
		}
		key = bytes.Clone(b)
	}
	return id, op, from, key, nil
}

// encodeKeyReply encodes an answer:
//
//	type(1) id(8) name-len(1) name count(1) fingerprint(8)*count err-len(2) err
func encodeKeyReply(id uint64, r KeyReport) []byte {
	name := r.Member
	if len(name) > MaxOwnerLen {
		name = name[:MaxOwnerLen]
	}
	keys := r.Keys
	if len(keys) > 255 {
		keys = keys[:255]
	}
	msg := r.Err
	if len(msg) > maxKeyErrLen {
		msg = msg[:maxKeyErrLen]
	}
	b := make([]byte, 0, 1+8+1+len(name)+1+8*len(keys)+2+len(msg))
	b = append(b, msgKeyReply)
	b = binary.BigEndian.AppendUint64(b, id)
	b = append(b, byte(len(name)))
	b = append(b, name...)
	b = append(b, byte(len(keys)))
	for _, fp := range keys {
		raw, _ := hex.DecodeString(fp)
		var fixed [8]byte
		copy(fixed[:], raw)
		b = append(b, fixed[:]...)
	}
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	return append(b, msg...)
}

func decodeKeyReply(b []byte) (uint64, KeyReport, error) {
	id, r, err := decodeKeyReplyFields(b)
	if err != nil {
		// A rejected answer gives nothing, not the fields read before the fault.
		return 0, KeyReport{}, fmt.Errorf("decode key reply: %w", err)
	}
	return id, r, nil
}

func decodeKeyReplyFields(b []byte) (uint64, KeyReport, error) {
	var r KeyReport
	if len(b) < 1+8+1 || b[0] != msgKeyReply {
		return 0, r, errTruncated
	}
	id := binary.BigEndian.Uint64(b[1:9])
	n := int(b[9])
	b = b[10:]
	if n == 0 || len(b) < n+1 {
		return 0, r, fmt.Errorf("name: %w", errTruncated)
	}
	r.Member, b = string(b[:n]), b[n:]
	count := int(b[0])
	b = b[1:]
	if len(b) < 8*count+2 {
		return 0, r, fmt.Errorf("fingerprints: %w", errTruncated)
	}
	for i := 0; i < count; i++ {
		r.Keys = append(r.Keys, hex.EncodeToString(b[:8]))
		b = b[8:]
	}
	m := int(binary.BigEndian.Uint16(b))
	b = b[2:]
	if m > maxKeyErrLen || len(b) != m {
		return 0, r, fmt.Errorf("error text of %d bytes, %d left", m, len(b))
	}
	r.Err = string(b)
	return id, r, nil
}
