// Command yamuxpeer is the Go reference peer for grpcmux's yamux interop tests.
//
// It is built from Debian's 2019 snapshot of github.com/hashicorp/yamux and has
// the same command line as `python -m grpcmux.yamux`:
//
//	yamuxpeer echo  --listen HOST:PORT  --role server|client [--window N] [--nested] [--hold] [--goaway]
//	yamuxpeer drive --connect HOST:PORT --role client|server --streams N --bytes M
//	                [--window N] [--nested] [--expect-goaway] [--timeout SECONDS]
//
// echo prints its bound address as the first stdout line, accepts one TCP
// connection and echoes every stream the peer opens until the session ends.
// drive opens the streams, verifies every echoed byte, pings and prints one
// JSON line; it exits 0 only when everything matched.
//
// --nested runs an inner yamux session over the first outer stream (opened by
// the driver) with the roles swapped, as the legacy grpc-multiplexer handshake
// does; the echo/drive work then happens on the inner session.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/yamux"
)

// chunkSize is the size of reads and writes; bigger than 256 KiB so that a
// large window is filled by single DATA frames (Go writes up to the window).
const chunkSize = 1024 * 1024

// The payload, as in the Python driver: one seeded pseudo-random block of an
// odd length, repeated, each stream starting at its own offset; sending and
// checking are slices of it (the same work as `python -m grpcmux.yamux drive`).
const blockSize = 1024*1024 + 7

// newPattern returns the block followed by its first chunkSize bytes, so that
// any chunk starting inside the block is one slice.
func newPattern() []byte {
	pattern := make([]byte, blockSize+chunkSize)
	rand.New(rand.NewSource(0x79616D7578)).Read(pattern[:blockSize])
	copy(pattern[blockSize:], pattern[:chunkSize])
	return pattern
}

func startOffset(seed int64) int64 { return seed * 104729 % blockSize }

func main() {
	if len(os.Args) < 2 {
		fail(2, "usage: yamuxpeer echo|drive [flags]")
	}
	var err error
	switch os.Args[1] {
	case "echo":
		err = runEcho(os.Args[2:])
	case "drive":
		err = runDrive(os.Args[2:])
	default:
		fail(2, "unknown mode %q (want echo or drive)", os.Args[1])
	}
	if err != nil {
		fail(1, "%v", err)
	}
}

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "yamuxpeer: "+format+"\n", args...)
	os.Exit(code)
}

// parse parses flags; bad command lines exit 2 like the Python tool.
func parse(fs *flag.FlagSet, args []string) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		fail(2, "%v", err)
	}
	if fs.NArg() != 0 {
		fail(2, "unexpected arguments: %v", fs.Args())
	}
}

func newConfig(window uint) *yamux.Config {
	cfg := yamux.DefaultConfig()
	cfg.MaxStreamWindowSize = uint32(window)
	cfg.LogOutput = os.Stderr
	if err := yamux.VerifyConfig(cfg); err != nil {
		fail(2, "bad --window: %v", err)
	}
	return cfg
}

func checkRole(role string) {
	if role != "client" && role != "server" {
		fail(2, "--role must be client or server, not %q", role)
	}
}

func newSession(conn io.ReadWriteCloser, role string, cfg *yamux.Config) (*yamux.Session, error) {
	if role == "client" {
		return yamux.Client(conn, cfg)
	}
	return yamux.Server(conn, cfg)
}

func swapRole(role string) string {
	if role == "client" {
		return "server"
	}
	return "client"
}

func runEcho(args []string) error {
	fs := flag.NewFlagSet("echo", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:0", "TCP address to listen on")
	role := fs.String("role", "server", "yamux role: server or client")
	window := fs.Uint("window", 256*1024, "max stream window size")
	nested := fs.Bool("nested", false, "echo on an inner session carried by the first stream")
	hold := fs.Bool("hold", false, "read each stream to EOF before echoing anything")
	goAway := fs.Bool("goaway", false, "send GoAway after accepting the first stream")
	parse(fs, args)
	checkRole(*role)
	cfg := newConfig(*window)

	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fail(2, "cannot listen on %s: %v", *listen, err)
	}
	fmt.Println(ln.Addr().String())
	conn, err := ln.Accept()
	ln.Close()
	if err != nil {
		return err
	}
	outer, err := newSession(conn, *role, cfg)
	if err != nil {
		return err
	}
	defer outer.Close()
	work := outer
	if *nested {
		carrier, err := outer.AcceptStream()
		if err != nil {
			return fmt.Errorf("accepting the carrier stream: %v", err)
		}
		work, err = newSession(carrier, swapRole(*role), cfg)
		if err != nil {
			return err
		}
		defer work.Close()
	}

	var wg sync.WaitGroup
	for accepted := 0; ; accepted++ {
		stream, err := work.AcceptStream()
		if err != nil {
			break // the peer ended the session
		}
		if *goAway && accepted == 0 {
			// Sent before any echoed byte, so the driver sees it first.
			if err := work.GoAway(); err != nil {
				return err
			}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := echoStream(stream, *hold); err != nil {
				fmt.Fprintf(os.Stderr, "yamuxpeer: stream %d: %v\n", stream.StreamID(), err)
			}
		}()
	}
	wg.Wait()
	return nil
}

// echoStream writes back everything it reads and closes after the peer's FIN.
// Reading after a remote FIN works in the 2019 snapshot; only reading after a
// local Close is broken, and echo never needs it.
func echoStream(stream *yamux.Stream, hold bool) error {
	defer stream.Close()
	if hold {
		data, err := io.ReadAll(stream)
		if err != nil {
			return err
		}
		_, err = stream.Write(data)
		return err
	}
	buf := make([]byte, chunkSize)
	for {
		n, err := stream.Read(buf)
		if n > 0 {
			if _, werr := stream.Write(buf[:n]); werr != nil {
				return werr
			}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}

type result struct {
	StreamsOK int     `json:"streams_ok"`
	Bytes     int64   `json:"bytes"`
	Seconds   float64 `json:"seconds"`
	MBPerS    float64 `json:"mb_per_s"`
	RTTMs     float64 `json:"rtt_ms"`
	GoAway    *bool   `json:"goaway,omitempty"`
}

func runDrive(args []string) error {
	fs := flag.NewFlagSet("drive", flag.ContinueOnError)
	connect := fs.String("connect", "", "TCP address of the echo peer")
	role := fs.String("role", "client", "yamux role: client or server")
	streams := fs.Int("streams", 1, "concurrent streams")
	size := fs.Int64("bytes", 1024*1024, "bytes sent (and echoed) per stream")
	window := fs.Uint("window", 256*1024, "max stream window size")
	nested := fs.Bool("nested", false, "drive an inner session carried by the first stream")
	expectGoAway := fs.Bool("expect-goaway", false, "after the streams, require that opening one more is refused by GoAway")
	timeout := fs.Duration("timeout", 120*time.Second, "overall deadline")
	parse(fs, args)
	checkRole(*role)
	if *connect == "" {
		fail(2, "--connect is required")
	}
	if *streams < 1 || *size < 0 {
		fail(2, "--streams must be >= 1 and --bytes >= 0")
	}
	cfg := newConfig(*window)
	deadline := time.Now().Add(*timeout)

	conn, err := net.DialTimeout("tcp", *connect, 10*time.Second)
	if err != nil {
		fail(2, "cannot connect to %s: %v", *connect, err)
	}
	outer, err := newSession(conn, *role, cfg)
	if err != nil {
		return err
	}
	defer outer.Close()
	work := outer
	if *nested {
		carrier, err := outer.OpenStream()
		if err != nil {
			return fmt.Errorf("opening the carrier stream: %v", err)
		}
		work, err = newSession(carrier, swapRole(*role), cfg)
		if err != nil {
			return err
		}
		defer work.Close()
	}

	pattern := newPattern()
	start := time.Now()
	errs := make(chan error, *streams)
	for i := 0; i < *streams; i++ {
		stream, err := work.OpenStream()
		if err != nil {
			return fmt.Errorf("opening stream %d: %v", i, err)
		}
		go func(seed int64) { errs <- driveStream(stream, pattern, seed, *size, deadline) }(int64(i + 1))
	}
	var firstErr error
	ok := 0
	for i := 0; i < *streams; i++ {
		if err := <-errs; err != nil {
			if firstErr == nil {
				firstErr = err
			}
		} else {
			ok++
		}
	}
	elapsed := time.Since(start).Seconds()
	if firstErr == nil {
		// Every stream leaves the table only once both FINs were exchanged, so
		// this proves the echo side half-closed after our half-close.
		firstErr = waitNoStreams(work, deadline)
	}

	res := result{StreamsOK: ok, Bytes: int64(*streams) * *size, Seconds: elapsed}
	if elapsed > 0 {
		res.MBPerS = float64(res.Bytes) / 1e6 / elapsed
	}
	if firstErr == nil && *expectGoAway {
		_, err := work.OpenStream()
		refused := err == yamux.ErrRemoteGoAway
		res.GoAway = &refused
		if !refused {
			firstErr = fmt.Errorf("expected GoAway refusal, got %v", err)
		}
	}
	if firstErr == nil {
		rtt, err := work.Ping()
		if err != nil {
			firstErr = fmt.Errorf("ping: %v", err)
		}
		// Nanoseconds: the 2019 yamux starts its clock after the ping is sent, so
		// on a busy machine the answer can come back within the same microsecond.
		res.RTTMs = float64(rtt.Nanoseconds()) / 1e6
	}
	line, _ := json.Marshal(res)
	fmt.Println(string(line))
	return firstErr
}

// driveStream sends size pattern bytes, half-closes and checks the echo.
//
// The 2019 yamux snapshot has no CloseWrite: Close sends FIN but from then on
// Read returns io.EOF whenever the receive buffer is momentarily empty, even
// though the peer may still send. So the reader runs concurrently with the
// writer, and once the writer has closed it treats an early EOF as "nothing
// buffered yet" and polls with a short back-off until all bytes arrived.
func driveStream(stream *yamux.Stream, pattern []byte, seed, size int64, deadline time.Time) error {
	var closed int32
	writeErr := make(chan error, 1)
	go func() {
		offset := startOffset(seed)
		for sent := int64(0); sent < size; {
			n := int64(chunkSize)
			if size-sent < n {
				n = size - sent
			}
			if _, err := stream.Write(pattern[offset : offset+n]); err != nil {
				writeErr <- fmt.Errorf("stream %d write: %v", stream.StreamID(), err)
				return
			}
			sent += n
			if offset += n; offset >= blockSize {
				offset -= blockSize
			}
		}
		atomic.StoreInt32(&closed, 1)
		writeErr <- stream.Close()
	}()

	offset := startOffset(seed)
	buf := make([]byte, chunkSize)
	backoff := 50 * time.Microsecond
	var got int64
	for got < size {
		if time.Now().After(deadline) {
			return fmt.Errorf("stream %d: timeout after %d of %d bytes", stream.StreamID(), got, size)
		}
		n, err := stream.Read(buf)
		if n > 0 {
			if got+int64(n) > size {
				return fmt.Errorf("stream %d: %d bytes more than sent", stream.StreamID(), got+int64(n)-size)
			}
			if !bytes.Equal(buf[:n], pattern[offset:offset+int64(n)]) {
				return fmt.Errorf("stream %d: echo differs within bytes %d..%d",
					stream.StreamID(), got, got+int64(n))
			}
			if offset += int64(n); offset >= blockSize {
				offset -= blockSize
			}
			got += int64(n)
			backoff = 50 * time.Microsecond
		}
		if errors.Is(err, io.EOF) && n == 0 {
			if atomic.LoadInt32(&closed) == 0 {
				return fmt.Errorf("stream %d: peer closed after %d of %d bytes", stream.StreamID(), got, size)
			}
			if stream.Session().IsClosed() {
				return fmt.Errorf("stream %d: session closed after %d of %d bytes", stream.StreamID(), got, size)
			}
			time.Sleep(backoff)
			if backoff < 2*time.Millisecond {
				backoff *= 2
			}
		} else if err != nil && err != io.EOF {
			return fmt.Errorf("stream %d read: %v", stream.StreamID(), err)
		}
	}
	return <-writeErr
}

func waitNoStreams(session *yamux.Session, deadline time.Time) error {
	for session.NumStreams() != 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("%d streams never saw the peer's FIN", session.NumStreams())
		}
		if session.IsClosed() {
			return errors.New("session closed before all streams finished")
		}
		time.Sleep(time.Millisecond)
	}
	return nil
}
