package lab

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
)

// HTTPGet fetches url from inside network namespace ns, e.g. an agent's
// metrics on 127.0.0.1 of its host, and returns the body of a 200 answer.
// The connection's socket is made in ns; the test process stays where it is.
func (l *Lab) HTTPGet(ctx context.Context, ns, url string) ([]byte, error) {
	tr := &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var c net.Conn
			err := inNetNS(ns, func() error {
				var err error
				c, err = (&net.Dialer{}).DialContext(ctx, network, addr)
				return err
			})
			return c, err
		},
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, fmt.Errorf("lab: GET %s: %w", url, err)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, fmt.Errorf("lab: GET %s in %s: %w", url, ns, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("lab: GET %s in %s: reading the body: %w", url, ns, err)
	}
	if resp.StatusCode != http.StatusOK {
		return body, fmt.Errorf("lab: GET %s in %s: %s", url, ns, resp.Status)
	}
	return body, nil
}
