// Command legacyserver behaves on the wire like the grpc-multiplexer v0.2.1
// server. Per multiplexer connection: yamux server session, accept the first
// stream, read "<client-id>\n", run a yamux *client* session on that stream,
// open one inner stream and use it as the only connection of a gRPC channel.
// The proxy listener routes each call by its `client-id` metadata (removed
// before forwarding) with the original's status codes and messages.
//
// It prints "multiplexer HOST:PORT" and "proxy HOST:PORT" (bound addresses)
// as its first two stdout lines, then "registered ID" / "unregistered ID".
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"

	"github.com/hashicorp/yamux"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"grpcmuxinterop/legacy/grpcproxy"
)

const clientIDKey = "client-id"

type registry struct {
	mu      sync.Mutex
	clients map[string]*grpc.ClientConn
}

func (r *registry) add(id string, conn *grpc.ClientConn) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.clients[id]; ok {
		return fmt.Errorf("client %q already registered", id)
	}
	r.clients[id] = conn
	say("registered %s", id)
	return nil
}

func (r *registry) remove(id string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.clients, id)
	say("unregistered %s", id)
}

func (r *registry) get(id string) (*grpc.ClientConn, bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	conn, ok := r.clients[id]
	return conn, ok
}

var stdout sync.Mutex

func say(format string, args ...interface{}) {
	stdout.Lock()
	defer stdout.Unlock()
	fmt.Printf(format+"\n", args...)
}

func main() {
	muxListen := flag.String("multiplexer-listener", "localhost:7602", "multiplexer listen address")
	proxyListen := flag.String("proxy-listener", "localhost:7592", "gRPC proxy listen address")
	flag.Parse()
	muxLis, err := net.Listen("tcp", *muxListen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "legacyserver: %v\n", err)
		os.Exit(2)
	}
	proxyLis, err := net.Listen("tcp", *proxyListen)
	if err != nil {
		fmt.Fprintf(os.Stderr, "legacyserver: %v\n", err)
		os.Exit(2)
	}
	say("multiplexer %s", muxLis.Addr())
	say("proxy %s", proxyLis.Addr())

	reg := &registry{clients: map[string]*grpc.ClientConn{}}
	go func() {
		for {
			conn, err := muxLis.Accept()
			if err != nil {
				fmt.Fprintf(os.Stderr, "legacyserver: accept: %v\n", err)
				return
			}
			go func() {
				if err := handleClient(conn, reg); err != nil {
					fmt.Fprintf(os.Stderr, "legacyserver: client %s: %v\n", conn.RemoteAddr(), err)
				}
			}()
		}
	}()

	director := func(ctx context.Context, _ string) (context.Context, *grpc.ClientConn, error) {
		md, _ := metadata.FromIncomingContext(ctx)
		ids, ok := md[clientIDKey]
		if !ok {
			return nil, nil, status.Errorf(codes.InvalidArgument, "no metadata with key '%v' supplied", clientIDKey)
		}
		if len(ids) != 1 {
			return nil, nil, status.Errorf(codes.InvalidArgument, "request needs only one element for metadata '%v'", clientIDKey)
		}
		conn, ok := reg.get(ids[0])
		if !ok {
			return nil, nil, status.Errorf(codes.NotFound, "Client '%v' not registered", ids[0])
		}
		return grpcproxy.Forwarding(ctx, clientIDKey), conn, nil
	}
	if err := grpcproxy.NewServer(director).Serve(proxyLis); err != nil {
		fmt.Fprintf(os.Stderr, "legacyserver: %v\n", err)
		os.Exit(1)
	}
}

func handleClient(conn net.Conn, reg *registry) error {
	outer, err := yamux.Server(conn, nil)
	if err != nil {
		return err
	}
	defer outer.Close()
	carrier, err := outer.AcceptStream()
	if err != nil {
		return err
	}
	line, err := bufio.NewReader(carrier).ReadString('\n')
	if err != nil {
		return fmt.Errorf("can't read client id: %v", err)
	}
	id := strings.TrimSuffix(line, "\n")
	inner, err := yamux.Client(carrier, yamux.DefaultConfig())
	if err != nil {
		return err
	}
	defer inner.Close()
	tunnel, err := inner.OpenStream()
	if err != nil {
		return err
	}
	defer tunnel.Close()
	channel, err := grpc.Dial("", grpc.WithInsecure(), // the original dials an empty target
		grpc.WithContextDialer(func(context.Context, string) (net.Conn, error) { return tunnel, nil }))
	if err != nil {
		return err
	}
	defer channel.Close()
	if err := reg.add(id, channel); err != nil {
		return err
	}
	defer reg.remove(id)
	<-outer.CloseChan()
	<-inner.CloseChan()
	return nil
}
