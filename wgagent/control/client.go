package control

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"syscall"
)

// ErrNoAgent says nothing answers on the control socket.
var ErrNoAgent = errors.New("no agent answers")

// SocketPath picks the socket a client uses: the flag if set, else
// $VMROAM_SOCKET, else DefaultSocket.
func SocketPath(flag string) string {
	if flag != "" {
		return flag
	}
	if env := os.Getenv(SocketEnv); env != "" {
		return env
	}
	return DefaultSocket
}

// Client talks to an agent's control socket.
type Client struct {
	path string
	http *http.Client
}

// NewClient returns a client for the socket at path. It does not connect.
func NewClient(path string) *Client {
	return &Client{
		path: path,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "unix", path)
			},
		}},
	}
}

// Status fetches the agent's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var st Status
	err := c.do(ctx, http.MethodGet, "/v1/status", nil, &st)
	return st, err
}

// Attach asks the agent to own vip behind dev.
func (c *Client) Attach(ctx context.Context, vip netip.Addr, dev string) (VIP, error) {
	return c.attach(ctx, AttachRequest{VIP: vip, Dev: dev})
}

// AttachWhenAnnounced asks the agent to own vip behind dev once the VM
// announces itself there (see WhenAnnounced).
func (c *Client) AttachWhenAnnounced(ctx context.Context, vip netip.Addr, dev string) (VIP, error) {
	return c.attach(ctx, AttachRequest{VIP: vip, Dev: dev, When: WhenAnnounced})
}

func (c *Client) attach(ctx context.Context, req AttachRequest) (VIP, error) {
	var v VIP
	err := c.do(ctx, http.MethodPost, "/v1/vips", req, &v)
	return v, err
}

// Detach asks the agent to release vip.
func (c *Client) Detach(ctx context.Context, vip netip.Addr) (VIP, error) {
	var v VIP
	err := c.do(ctx, http.MethodDelete, "/v1/vips/"+vip.String(), nil, &v)
	return v, err
}

// Suspend asks the agent to start caching vip's packets.
func (c *Client) Suspend(ctx context.Context, vip netip.Addr) (VIP, error) {
	var v VIP
	err := c.do(ctx, http.MethodPost, "/v1/migrate/suspend", VIPRequest{VIP: vip}, &v)
	return v, err
}

// Abort asks the agent to deliver vip's cache to the VM on this host.
func (c *Client) Abort(ctx context.Context, vip netip.Addr) (VIP, error) {
	var v VIP
	err := c.do(ctx, http.MethodPost, "/v1/migrate/abort", VIPRequest{VIP: vip}, &v)
	return v, err
}

// Prepare tells the agent that vip is about to arrive on this host.
func (c *Client) Prepare(ctx context.Context, vip netip.Addr) (VIP, error) {
	var v VIP
	err := c.do(ctx, http.MethodPost, "/v1/migrate/prepare", VIPRequest{VIP: vip}, &v)
	return v, err
}

// Allocate asks for a free address in network, attached to dev ("" =
// reserved on the agent's host).
func (c *Client) Allocate(ctx context.Context, network, dev string) (VIP, error) {
	var v VIP
	err := c.do(ctx, http.MethodPost, "/v1/vips/allocate", AllocateRequest{Network: network, Dev: dev}, &v)
	return v, err
}

// AddNetwork declares a virtual network cluster-wide.
func (c *Client) AddNetwork(ctx context.Context, name string, prefix netip.Prefix) (Network, error) {
	var n Network
	err := c.do(ctx, http.MethodPost, "/v1/networks", NetworkRequest{Name: name, Prefix: prefix}, &n)
	return n, err
}

// RemoveNetwork removes a virtual network cluster-wide.
func (c *Client) RemoveNetwork(ctx context.Context, name string) (Network, error) {
	var n Network
	err := c.do(ctx, http.MethodDelete, "/v1/networks/"+url.PathEscape(name), nil, &n)
	return n, err
}

// Keys lists the cluster's gossip keys as each member reports them.
func (c *Client) Keys(ctx context.Context) (Keys, error) {
	var k Keys
	err := c.do(ctx, http.MethodGet, "/v1/keys", nil, &k)
	return k, err
}

// ChangeKeys installs, uses or removes a gossip key cluster-wide; op is
// KeyOpInstall, KeyOpUse or KeyOpRemove.
func (c *Client) ChangeKeys(ctx context.Context, op string, key []byte, force bool) (Keys, error) {
	var k Keys
	err := c.do(ctx, http.MethodPost, "/v1/keys/"+url.PathEscape(op), KeyRequest{Key: key, Force: force}, &k)
	return k, err
}

// Migrations lists the agent's side of recent migrations.
func (c *Client) Migrations(ctx context.Context) ([]Migration, error) {
	var ms []Migration
	err := c.do(ctx, http.MethodGet, "/v1/migrations", nil, &ms)
	return ms, err
}

// Migration fetches one migration by ID, with its timeline. An ID the agent
// does not know gives an error wrapping ErrNotFound.
func (c *Client) Migration(ctx context.Context, id string) (Migration, error) {
	var m Migration
	err := c.do(ctx, http.MethodGet, "/v1/migrations/"+url.PathEscape(id), nil, &m)
	return m, err
}

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vmroam"+path, body)
	if err != nil {
		return err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("%w on %s: is the agent running?", ErrNoAgent, c.path)
		}
		if errors.Is(err, syscall.EACCES) {
			return fmt.Errorf("control socket %s: permission denied (the control API is for root)", c.path)
		}
		return fmt.Errorf("control socket %s: %w", c.path, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		var eb errorBody
		if json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&eb) != nil || eb.Error == "" {
			if resp.StatusCode == http.StatusNotFound {
				// Not our JSON: the route itself is unknown.
				return fmt.Errorf("the agent on %s does not serve %s %s: is it an older version?", c.path, method, path)
			}
			eb.Error = resp.Status
		}
		switch resp.StatusCode {
		case http.StatusBadRequest:
			return fmt.Errorf("%w%s", ErrBadRequest, strings.TrimPrefix(eb.Error, ErrBadRequest.Error()))
		case http.StatusNotFound:
			return fmt.Errorf("%w%s", ErrNotFound, strings.TrimPrefix(eb.Error, ErrNotFound.Error()))
		}
		return errors.New(eb.Error)
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("control socket %s: decode reply: %w", c.path, err)
	}
	return nil
}
