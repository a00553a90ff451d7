package main

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const cmdDir = "../../cmd/vmroam"

// buildVmroam builds the binary into a temporary directory.
func buildVmroam(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go not on PATH: cannot build the binary")
	}
	bin := filepath.Join(t.TempDir(), "vmroam")
	if out, err := exec.Command(goTool, "build", "-o", bin, cmdDir).CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	return bin
}

// wantSub is the message of a command called without its subcommand:
// "vip: want a subcommand: attach, allocate, detach or list".
var wantSub = regexp.MustCompile(`^(\w+): want a \w+: ([a-z, ]+)$`)

// sourceCommands reads cmd/vmroam's source, not its usage text: the
// commands dispatch switches on and, for those that take one, the
// subcommands their "want a subcommand" error lists.
func sourceCommands(t *testing.T) []string {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob(filepath.Join(cmdDir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	var top []string
	subs := map[string][]string{}
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.FuncDecl:
				if n.Name.Name != "dispatch" {
					return true
				}
				ast.Inspect(n.Body, func(n ast.Node) bool {
					cc, ok := n.(*ast.CaseClause)
					if !ok {
						return true
					}
					for _, e := range cc.List {
						if lit, ok := e.(*ast.BasicLit); ok && lit.Kind == token.STRING {
							s, _ := strconv.Unquote(lit.Value)
							if s != "help" && !strings.HasPrefix(s, "-") {
								top = append(top, s)
							}
						}
					}
					return true
				})
				return false
			case *ast.BasicLit:
				if n.Kind != token.STRING {
					return true
				}
				s, _ := strconv.Unquote(n.Value)
				if m := wantSub.FindStringSubmatch(s); m != nil {
					list := strings.ReplaceAll(m[2], " or ", ", ")
					subs[m[1]] = strings.Split(list, ", ")
				}
			}
			return true
		})
	}
	var cmds []string
	for _, c := range top {
		if len(subs[c]) == 0 {
			cmds = append(cmds, c)
		}
		for _, s := range subs[c] {
			cmds = append(cmds, c+" "+s)
		}
	}
	// Were the source rewritten so that neither is found any more, this
	// test would check nothing.
	for _, c := range []string{"agent", "vip attach", "keys use", "hook libvirt", "version"} {
		if !slices.Contains(cmds, c) {
			t.Fatalf("found no command %q in %s (found %q): update sourceCommands", c, cmdDir, cmds)
		}
	}
	return cmds
}

// sections returns the commands the page has a section of: its .SS lines.
func sections(page string) map[string]string {
	secs := map[string]string{}
	parts := strings.Split(page, "\n.SS \"vmroam ")
	for _, p := range parts[1:] {
		name, body, _ := strings.Cut(p, "\"\n")
		body, _, _ = strings.Cut(body, "\n.SH ")
		secs[strings.ReplaceAll(name, `\-`, "-")] = body
	}
	return secs
}

// TestManPageCoversEveryCommand: the page has a section for every command
// the source dispatches, no other, each with that command's --help.
func TestManPageCoversEveryCommand(t *testing.T) {
	bin := buildVmroam(t)
	page, err := generate(bin, "2026-12-07")
	if err != nil {
		t.Fatal(err)
	}
	text := string(page)
	if !strings.HasPrefix(text, ".\\\"") || !strings.Contains(text, "\n.TH VMROAM 1 2026-12-07 \"vmroam dev\" ") {
		t.Errorf("page header:\n%s", firstLines(text, 3))
	}
	host, _ := os.Hostname()
	secs := sections(text)
	cmds := sourceCommands(t)
	for _, c := range cmds {
		body, ok := secs[c]
		if !ok {
			t.Errorf("the man page has no section for vmroam %s", c)
			continue
		}
		delete(secs, c)
		if c == "version" {
			continue
		}
		out, err := commandHelp(bin, c, host)
		if err != nil {
			t.Error(err)
			continue
		}
		// The section holds the help as it is, every line, or names the
		// section that does.
		want := roff(strings.TrimRight(out, "\n"))
		if strings.Contains(body, want) {
			continue
		}
		_, first, ok := strings.Cut(body, "Its help is that of \\fBvmroam ")
		first, _, _ = strings.Cut(first, "\\fR above.")
		if !ok || !strings.Contains(sections(text)[strings.ReplaceAll(first, `\-`, "-")], want) {
			t.Errorf("section vmroam %s does not hold its --help:\n%s", c, body)
		}
	}
	for c := range secs {
		t.Errorf("the man page has a section for vmroam %s, which dispatch does not know", c)
	}
	if host != "" && strings.Contains(text, `(default "`+host+`")`) {
		t.Errorf("the page gives this machine's name %q as a default", host)
	}

	// What groff warns about (-ww: all warnings) is a mistake in the page.
	groff, err := exec.LookPath("groff")
	if err != nil {
		t.Skip("groff not found (Debian package groff-base; scripts/install-deps.sh installs it): the page is not rendered")
	}
	render := func(page string) string {
		cmd := exec.Command(groff, "-man", "-Tutf8", "-ww", "-z")
		cmd.Stdin = strings.NewReader(page)
		out, err := cmd.CombinedOutput()
		if err != nil {
			return string(out) + err.Error()
		}
		return string(out)
	}
	if out := render(text); out != "" {
		t.Errorf("groff warns about the page:\n%s", out)
	}
	if out := render(strings.Replace(text, ".SH FILES", ".SH FILES\n.XX", 1)); out == "" {
		t.Error("groff does not warn about an unknown macro: this test would not see a broken page")
	}
}

func TestRoffEscapes(t *testing.T) {
	for in, want := range map[string]string{
		"--json":          `\-\-json`,
		`a\b`:             `a\eb`,
		".hidden\n'quote": "\\&.hidden\n\\&'quote",
		"x. y":            "x. y",
	} {
		if got := roff(in); got != want {
			t.Errorf("roff(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestCommands(t *testing.T) {
	_, entries, _, err := parseUsage("intro\n\nUsage:\n  vmroam keys list|add [KEY]\n                  rotate\n  vmroam migrations [--json]  past\n  vmroam migrations --svg F  draw\n  vmroam version   print\n\nafter\n")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, c := range commands(entries) {
		got = append(got, c.name+"="+c.what)
	}
	want := []string{"keys list=rotate", "keys add=rotate", "migrations=past", "version=print"}
	if !slices.Equal(got, want) {
		t.Errorf("commands = %q, want %q", got, want)
	}
	if _, _, _, err := parseUsage("no usage here\n"); err == nil {
		t.Error("parseUsage took a text without Usage:")
	}
}

func TestBadDate(t *testing.T) {
	if _, err := generate("/nonexistent", "7 Dec 2026"); err == nil || !strings.Contains(err.Error(), "YYYY-MM-DD") {
		t.Errorf("generate with a bad date: %v", err)
	}
}

func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}
