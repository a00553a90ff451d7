// Command genman writes the man page vmroam(1), in roff, from the help a
// vmroam binary prints: the command list of `vmroam --help` and, for each
// command in it, `vmroam COMMAND --help`. `make package` runs it, so the
// man page says what the binary it ships with says.
//
//	go run ./scripts/genman [-date YYYY-MM-DD] BINARY > vmroam.1
package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"time"
)

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintf(os.Stderr, "genman: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("genman", flag.ContinueOnError)
	fs.SetOutput(stderr)
	date := fs.String("date", time.Now().UTC().Format(time.DateOnly), "the page's date, YYYY-MM-DD (the release's, for a reproducible page)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "Usage: genman [-date YYYY-MM-DD] BINARY > vmroam.1\n\nWrites vmroam(1) from the help the vmroam BINARY prints.\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		fs.Usage()
		return errors.New("want one argument, the vmroam binary")
	}
	page, err := generate(fs.Arg(0), *date)
	if err != nil {
		return err
	}
	_, err = stdout.Write(page)
	return err
}

// entry is one command line of the top-level usage: its synopsis and
// what it does.
type entry struct {
	synopsis string
	what     string
}

// command is a command the man page gives a section of its own: one
// that parses its own flags, such as "vip attach" or "status".
type command struct {
	name string // without "vmroam "
	what string
}

// help runs the binary with args and returns what it printed. The
// environment lacks VMROAM_SOCKET, which would show as a default.
func help(bin string, args ...string) (string, error) {
	cmd := exec.Command(bin, args...)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "VMROAM_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("%s %s: %w: %s", bin, strings.Join(args, " "), err, strings.TrimSpace(errOut.String()))
	}
	return out.String(), nil
}

// parseUsage splits the top-level usage into the paragraph before
// "Usage:", its command lines and the paragraphs after them.
func parseUsage(text string) (intro string, entries []entry, outro string, err error) {
	head, rest, ok := strings.Cut(text, "\nUsage:\n")
	if !ok {
		return "", nil, "", errors.New("vmroam --help has no \"Usage:\" line")
	}
	block, outro, _ := strings.Cut(rest, "\n\n")
	for _, line := range strings.Split(block, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case trimmed == "":
		case strings.HasPrefix(trimmed, "vmroam "):
			syn, what, _ := strings.Cut(trimmed, "  ")
			entries = append(entries, entry{synopsis: syn, what: strings.TrimSpace(what)})
		case len(entries) > 0:
			e := &entries[len(entries)-1]
			e.what = strings.TrimSpace(e.what + " " + trimmed)
		default:
			return "", nil, "", fmt.Errorf("usage line %q is no command", line)
		}
	}
	if len(entries) == 0 {
		return "", nil, "", errors.New("vmroam --help lists no command")
	}
	return strings.TrimSpace(head), entries, strings.TrimSpace(outro), nil
}

// subWords are subcommands in a synopsis: "attach", "list|add|use".
var subWords = regexp.MustCompile(`^[a-z]+(\|[a-z]+)*$`)

// commands lists, in the usage's order, every command with flags of its
// own: a synopsis's second word is the command, a third word of lower
// case letters names its subcommands.
func commands(entries []entry) []command {
	var cmds []command
	seen := map[string]bool{}
	for _, e := range entries {
		words := strings.Fields(e.synopsis)
		if len(words) < 2 {
			continue
		}
		names := []string{words[1]}
		if len(words) > 2 && subWords.MatchString(words[2]) {
			names = names[:0]
			for _, sub := range strings.Split(words[2], "|") {
				names = append(names, words[1]+" "+sub)
			}
		}
		for _, n := range names {
			if !seen[n] {
				seen[n] = true
				cmds = append(cmds, command{name: n, what: e.what})
			}
		}
	}
	return cmds
}

// roff escapes text for a roff line: backslashes, the hyphens (which
// roff would otherwise print as typographic ones, not to be copied into a
// shell) and a control character at the start of a line.
func roff(text string) string {
	text = strings.NewReplacer(`\`, `\e`, "-", `\-`).Replace(text)
	lines := strings.Split(text, "\n")
	for i, l := range lines {
		if strings.HasPrefix(l, ".") || strings.HasPrefix(l, "'") {
			lines[i] = `\&` + l
		}
	}
	return strings.Join(lines, "\n")
}

// literal is text the page shows as it is, line for line.
func literal(b *strings.Builder, text string) {
	b.WriteString(".PP\n.RS 4\n.nf\n")
	b.WriteString(roff(strings.TrimRight(text, "\n")))
	b.WriteString("\n.fi\n.RE\n")
}

// generate returns the page for the binary bin, dated date.
func generate(bin, date string) ([]byte, error) {
	if _, err := time.Parse(time.DateOnly, date); err != nil {
		return nil, fmt.Errorf("date %q is not YYYY-MM-DD: %w", date, err)
	}
	top, err := help(bin, "--help")
	if err != nil {
		return nil, err
	}
	intro, entries, outro, err := parseUsage(top)
	if err != nil {
		return nil, err
	}
	ver, err := help(bin, "version")
	if err != nil {
		return nil, err
	}
	ver = strings.TrimSpace(strings.TrimPrefix(ver, "vmroam"))
	host, _ := os.Hostname()

	var b strings.Builder
	fmt.Fprintf(&b, ".\\\" Generated by scripts/genman from `vmroam --help`; do not edit.\n")
	fmt.Fprintf(&b, ".TH VMROAM 1 %s \"vmroam %s\" \"vmroam manual\"\n", date, roff(ver))
	b.WriteString(".SH NAME\n")
	name := strings.TrimSuffix(strings.TrimPrefix(strings.Join(strings.Fields(intro), " "), "vmroam "), ".")
	fmt.Fprintf(&b, "vmroam \\- %s\n", roff(name))
	b.WriteString(".SH SYNOPSIS\n.nf\n")
	for _, e := range entries {
		fmt.Fprintf(&b, "\\fB%s\\fR\n", roff(e.synopsis))
	}
	b.WriteString(".fi\n.SH DESCRIPTION\n")
	fmt.Fprintf(&b, "%s\n", roff(strings.Join(strings.Fields(intro), " ")))
	for _, para := range strings.Split(outro, "\n\n") {
		fmt.Fprintf(&b, ".PP\n%s\n", roff(strings.Join(strings.Fields(para), " ")))
	}
	b.WriteString(".SH COMMANDS\n")
	// Commands that share a help (hook libvirt, hook proxmox) show it once.
	shown := map[string]string{}
	for _, c := range commands(entries) {
		fmt.Fprintf(&b, ".SS \"vmroam %s\"\n", roff(c.name))
		if c.what != "" {
			fmt.Fprintf(&b, "%s.\n", roff(strings.TrimSuffix(c.what, ".")))
		}
		if c.name == "version" { // its --help is the version
			continue
		}
		text, err := commandHelp(bin, c.name, host)
		if err != nil {
			return nil, err
		}
		if first, ok := shown[text]; ok {
			fmt.Fprintf(&b, ".PP\nIts help is that of \\fBvmroam %s\\fR above.\n", roff(first))
			continue
		}
		shown[text] = c.name
		literal(&b, text)
	}
	b.WriteString(`.SH FILES
.TP
.I /etc/vmroam/vmroam.toml
the agent's config file, under systemd (every key is an agent flag)
.TP
.I /run/vmroam/vmroam.sock
the agent's control socket, which the other commands talk to
.TP
.I /var/lib/vmroam
the agent's WireGuard private key and the members it has seen
.TP
.I /usr/share/doc/vmroam
README.md, DESIGN.md, config.md (every key and flag), metrics.md, security.md
.SH SEE ALSO
.BR systemctl (1),
.BR wg (8)
`)
	return []byte(b.String()), nil
}

// commandHelp returns the --help of the command name ("vip attach"). The
// agent's --name defaults to the name of the host it runs on, not to that
// of this host: host, replaced.
func commandHelp(bin, name, host string) (string, error) {
	text, err := help(bin, append(strings.Fields(name), "--help")...)
	if err != nil {
		return "", err
	}
	usage, _, _ := strings.Cut(text, "\n\n")
	if !strings.HasPrefix(usage, "Usage: vmroam ") || !strings.Contains(usage, "vmroam "+name+" ") && !strings.HasSuffix(usage, "vmroam "+name) {
		return "", fmt.Errorf("vmroam %s --help does not begin with its usage: %q", name, firstLine(text))
	}
	if name == "agent" && host != "" {
		def := regexp.MustCompile(`(\n  -name name\n[^\n]*)` + regexp.QuoteMeta(fmt.Sprintf("(default %q)", host)))
		text = def.ReplaceAllString(text, "${1}(default: the host's name)")
	}
	return text, nil
}

func firstLine(s string) string {
	l, _, _ := strings.Cut(s, "\n")
	return l
}
