// compose-check loads a Compose file the way `docker compose` does
// (compose-go: the Compose Specification's JSON schema, interpolation,
// extends, anchors, path resolution) and prints the resolved project as
// JSON, so tests can assert on it without a Docker engine. It also fails on
// what the loader lets through but `docker compose up` would trip on: a
// bind mount or build context that does not exist (Docker would create an
// empty directory where a file was meant) and a Dockerfile not found.
//
// Usage: compose-check FILE   (exit 0: JSON on stdout; exit 1: errors on stderr)
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/types"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: compose-check FILE")
		os.Exit(2)
	}
	project, err := load(os.Args[1])
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	if problems := missing(project); len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintf(os.Stderr, "%s: %s\n", os.Args[1], p)
		}
		os.Exit(1)
	}
	out, err := json.MarshalIndent(project, "", "  ")
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
	fmt.Println(string(out))
}

func load(file string) (*types.Project, error) {
	opts, err := cli.NewProjectOptions(
		[]string{file},
		cli.WithOsEnv,
		cli.WithResolvedPaths(true),
		cli.WithConsistency(true),
	)
	if err != nil {
		return nil, err
	}
	return cli.ProjectFromOptions(context.Background(), opts)
}

// missing lists bind sources, build contexts and Dockerfiles absent on disk.
func missing(p *types.Project) []string {
	var problems []string
	names := make([]string, 0, len(p.Services))
	for name := range p.Services {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		s := p.Services[name]
		for _, v := range s.Volumes {
			if v.Type != types.VolumeTypeBind {
				continue
			}
			if _, err := os.Stat(v.Source); err != nil {
				problems = append(problems, fmt.Sprintf("service %s: bind mount source %s: %v", name, v.Source, err))
			}
		}
		if s.Build == nil {
			continue
		}
		if st, err := os.Stat(s.Build.Context); err != nil || !st.IsDir() {
			problems = append(problems, fmt.Sprintf("service %s: build context %s is not a directory", name, s.Build.Context))
			continue
		}
		dockerfile := s.Build.Dockerfile
		if dockerfile == "" {
			dockerfile = "Dockerfile"
		}
		if !filepath.IsAbs(dockerfile) {
			dockerfile = filepath.Join(s.Build.Context, dockerfile)
		}
		if _, err := os.Stat(dockerfile); err != nil {
			problems = append(problems, fmt.Sprintf("service %s: Dockerfile %s: %v", name, dockerfile, err))
		}
	}
	return problems
}
