// dockerfile-check lints a Dockerfile with BuildKit's own parser and the
// rules of `docker build --check`, without a Docker engine or network, and
// prints what tests need to assert on as JSON: each stage's base image and
// instructions, and every lint warning.
//
// With -context DIR it also checks what `docker build DIR` would trip on
// and the linter cannot see without a build: a COPY or ADD source (not
// --from a stage) that is missing from DIR, or that DIR/.dockerignore
// excludes.
//
// Usage: dockerfile-check [-context DIR] FILE
// Exit 0: no warning; 1: a parse error or a warning (JSON still printed); 2: usage.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/moby/buildkit/client/llb"
	"github.com/moby/buildkit/client/llb/sourceresolver"
	"github.com/moby/buildkit/frontend/dockerfile/dockerfile2llb"
	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
	digest "github.com/opencontainers/go-digest"
)

// offline answers base image look-ups with an empty linux/amd64 config, so
// linting never pulls from a registry (only rules about a base image's own
// ENV or platform lose their input).
type offline struct{}

func (offline) ResolveImageConfig(_ context.Context, ref string, _ sourceresolver.Opt) (string, digest.Digest, []byte, error) {
	return ref, "", []byte(`{"architecture":"amd64","os":"linux","config":{}}`), nil
}

type instruction struct {
	Cmd  string `json:"cmd"`
	Text string `json:"text"`
	Line int    `json:"line"`
}

type stage struct {
	Name         string        `json:"name"`
	Base         string        `json:"base"`
	Instructions []instruction `json:"instructions"`
}

type warning struct {
	Rule   string `json:"rule"`
	Detail string `json:"detail"`
	Line   int    `json:"line"`
}

type report struct {
	Stages   []stage   `json:"stages"`
	Warnings []warning `json:"warnings"`
	Error    string    `json:"error,omitempty"`
}

func main() {
	context := flag.String("context", "", "build context directory: check COPY/ADD sources against it and its .dockerignore")
	flag.Parse()
	if flag.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: dockerfile-check [-context DIR] FILE")
		os.Exit(2)
	}
	file := flag.Arg(0)
	dt, err := os.ReadFile(file)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	r := check(file, dt)
	if *context != "" && r.Error == "" {
		if err := checkContext(&r, dt, *context); err != nil {
			r.Error = err.Error()
		}
	}
	out, _ := json.MarshalIndent(r, "", "  ")
	fmt.Println(string(out))
	if r.Error != "" || len(r.Warnings) > 0 {
		os.Exit(1)
	}
}

func check(name string, dt []byte) report {
	r := report{Stages: []stage{}, Warnings: []warning{}}
	ast, err := parser.Parse(bytes.NewReader(dt))
	if err != nil {
		r.Error = err.Error()
		return r
	}
	stages, _, err := instructions.Parse(ast.AST, nil)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	for _, s := range stages {
		st := stage{Name: s.Name, Base: s.BaseName, Instructions: []instruction{}}
		for _, c := range s.Commands {
			line := 0
			if loc := c.Location(); len(loc) > 0 {
				line = loc[0].Start.Line
			}
			st.Instructions = append(st.Instructions, instruction{Cmd: c.Name(), Text: fmt.Sprint(c), Line: line})
		}
		r.Stages = append(r.Stages, st)
	}

	sm := llb.NewSourceMap(nil, name, "Dockerfile", dt)
	sm.Definition = &llb.Definition{}
	res, err := dockerfile2llb.DockerfileLint(context.Background(), dt, dockerfile2llb.ConvertOpt{
		MetaResolver: offline{},
		SourceMap:    sm,
	})
	if err != nil {
		r.Error = err.Error()
		return r
	}
	if res.Error != nil {
		r.Error = res.Error.Message
	}
	for _, w := range res.Warnings {
		line := 0
		if len(w.Location.Ranges) > 0 {
			line = int(w.Location.Ranges[0].Start.Line)
		}
		r.Warnings = append(r.Warnings, warning{Rule: w.RuleName, Detail: w.Detail, Line: line})
	}
	return r
}

// checkContext adds a warning for each COPY/ADD source from the build
// context that does not exist there or that .dockerignore excludes.
func checkContext(r *report, dt []byte, dir string) error {
	var patterns []string
	if f, err := os.Open(filepath.Join(dir, ".dockerignore")); err == nil {
		patterns, err = ignorefile.ReadAll(f)
		f.Close()
		if err != nil {
			return fmt.Errorf(".dockerignore: %w", err)
		}
	}
	matcher, err := patternmatcher.New(patterns)
	if err != nil {
		return fmt.Errorf(".dockerignore: %w", err)
	}
	ast, err := parser.Parse(bytes.NewReader(dt))
	if err != nil {
		return err
	}
	stages, _, err := instructions.Parse(ast.AST, nil)
	if err != nil {
		return err
	}
	for _, s := range stages {
		for _, c := range s.Commands {
			var sources []string
			switch c := c.(type) {
			case *instructions.CopyCommand:
				if c.From != "" {
					continue
				}
				sources = c.SourcePaths
			case *instructions.AddCommand:
				sources = c.SourcePaths
			default:
				continue
			}
			line := c.Location()[0].Start.Line
			for _, src := range sources {
				if strings.Contains(src, "://") {
					continue // ADD of a URL
				}
				rel := filepath.Clean(strings.TrimPrefix(src, "/"))
				matches, _ := filepath.Glob(filepath.Join(dir, rel))
				if len(matches) == 0 {
					r.Warnings = append(r.Warnings, warning{Rule: "CopySourceMissing", Detail: fmt.Sprintf("%s %q: not found in the build context %s", c.Name(), src, dir), Line: line})
					continue
				}
				if ignored, err := matcher.MatchesOrParentMatches(filepath.ToSlash(rel)); err == nil && ignored {
					r.Warnings = append(r.Warnings, warning{Rule: "CopyIgnoredFile", Detail: fmt.Sprintf("%s %q: excluded by .dockerignore", c.Name(), src), Line: line})
				}
			}
		}
	}
	return nil
}
