// Package cli parses the benchmark programs' flags: a bad flag is one line on
// stderr (exit 2), never a usage dump; -h prints the flags.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Parse parses os.Args for program name; no positional arguments are accepted.
func Parse(name string) {
	flags := flag.CommandLine
	flags.Init(name, flag.ContinueOnError)
	flags.SetOutput(io.Discard)
	err := flags.Parse(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		flags.SetOutput(os.Stdout)
		fmt.Printf("usage: %s [flags]\n", name)
		flags.PrintDefaults()
		os.Exit(0)
	}
	if err != nil {
		Fail(name, "%v", err)
	}
	if flags.NArg() > 0 {
		Fail(name, "unexpected argument %q", flags.Arg(0))
	}
}

// Fail prints "name: message" on stderr and exits with status 2.
func Fail(name, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, name+": "+format+"\n", args...)
	os.Exit(2)
}

// WaitForStop returns on SIGTERM or SIGINT or, when stdin is a pipe (a parent's),
// once that pipe closes: a benchmark program never outlives its harness.
func WaitForStop() {
	done := make(chan struct{}, 2)
	if info, err := os.Stdin.Stat(); err == nil && info.Mode()&os.ModeNamedPipe != 0 {
		go func() {
			io.Copy(io.Discard, os.Stdin)
			done <- struct{}{}
		}()
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	go func() {
		<-signals
		done <- struct{}{}
	}()
	<-done
}
