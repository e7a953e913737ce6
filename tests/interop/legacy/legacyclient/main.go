// Command legacyclient behaves on the wire like the grpc-multiplexer v0.2.1
// client: yamux client over TCP, one stream carrying "<client-id>\n", then a
// yamux *server* session on that same stream whose inner streams are served by
// a transparent gRPC proxy to the local gRPC server. It exits when the
// multiplexer connection ends.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"

	"grpcmuxinterop/legacy/grpcproxy"
)

func main() {
	clientID := flag.String("client-id", "", "client id announced to the multiplexer")
	muxAddr := flag.String("multiplexer-address", "localhost:7602", "multiplexer server address")
	grpcAddr := flag.String("grpc-server-address", "localhost:7592", "local gRPC server to expose")
	flag.Parse()
	if *clientID == "" {
		fmt.Fprintln(os.Stderr, "legacyclient: --client-id is required")
		os.Exit(2)
	}
	if err := run(*clientID, *muxAddr, *grpcAddr); err != nil {
		fmt.Fprintf(os.Stderr, "legacyclient: %v\n", err)
		os.Exit(1)
	}
}

func run(clientID, muxAddr, grpcAddr string) error {
	conn, err := net.DialTimeout("tcp", muxAddr, 10*time.Second)
	if err != nil {
		return fmt.Errorf("can't connect to multiplexer: %v", err)
	}
	defer conn.Close()
	outer, err := yamux.Client(conn, nil)
	if err != nil {
		return err
	}
	defer outer.Close()
	carrier, err := outer.OpenStream()
	if err != nil {
		return err
	}
	if _, err := carrier.Write([]byte(clientID + "\n")); err != nil {
		return fmt.Errorf("can't send client id: %v", err)
	}
	inner, err := yamux.Server(carrier, yamux.DefaultConfig())
	if err != nil {
		return err
	}
	defer inner.Close()

	backend, err := grpc.Dial(grpcAddr, grpc.WithInsecure())
	if err != nil {
		return fmt.Errorf("can't connect to gRPC server: %v", err)
	}
	defer backend.Close()
	director := func(ctx context.Context, _ string) (context.Context, *grpc.ClientConn, error) {
		return grpcproxy.Forwarding(ctx), backend, nil
	}
	fmt.Println("connected")
	// Serve returns once the inner session (hence the tunnel) is gone.
	return grpcproxy.NewServer(director).Serve(inner)
}
