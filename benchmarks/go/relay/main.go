// Command relay forwards TCP connections to one address, byte for byte: the cheapest
// proxy hop there is (Go's io.Copy between TCP sockets uses splice(2), so the bytes
// never enter user space). benchmarks/grpc_bench.py chains two relays between the
// load generator and the backend, the hops a tunnel adds, to show how much of the
// direct rate any two-process proxy can keep on this machine:
//
//	relay -target HOST:PORT [-listen 127.0.0.1:0]
//
// It prints "listening PORT" once it accepts, and runs until SIGTERM/SIGINT or, when
// its stdin is a pipe (a parent's), until that pipe closes.
package main

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"

	"grpcmuxbench/cli"
)

func forward(caller net.Conn, target string) {
	defer caller.Close()
	upstream, err := net.Dial("tcp", target)
	if err != nil {
		fmt.Fprintf(os.Stderr, "relay: %v\n", err)
		return
	}
	defer upstream.Close()
	done := make(chan struct{}, 2)
	pipe := func(to, from net.Conn) {
		io.Copy(to, from)
		to.(*net.TCPConn).CloseWrite()
		done <- struct{}{}
	}
	go pipe(upstream, caller)
	go pipe(caller, upstream)
	<-done
	<-done
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "TCP address to accept on")
	target := flag.String("target", "", "HOST:PORT every connection is forwarded to (required)")
	cli.Parse("relay")
	if *target == "" {
		cli.Fail("relay", "-target is required")
	}
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		cli.Fail("relay", "%v", err)
	}
	go func() {
		for {
			conn, err := listener.Accept()
			if err != nil {
				return
			}
			go forward(conn, *target)
		}
	}()
	fmt.Printf("listening %d\n", listener.Addr().(*net.TCPAddr).Port)

	cli.WaitForStop()
}
