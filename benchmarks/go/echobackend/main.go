// Command echobackend serves grpcmux.v1.BenchService (proto/grpcmux/v1/bench.proto) at
// grpc-go speed, the backend of benchmarks/grpc_bench.py:
//
//	echobackend [-listen 127.0.0.1:0]
//
// It prints "listening PORT" once it serves, and runs until SIGTERM/SIGINT or, when
// its stdin is a pipe (a parent's), until that pipe closes: it never outlives the harness. Unary and Bidi echo each payload; ServerStream answers `count`
// messages of `size` bytes; ClientStream answers how many payload bytes arrived.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"sync"

	"google.golang.org/grpc"

	"grpcmuxbench/benchpb"
	"grpcmuxbench/cli"
)

// maxMessage bounds one message either way (streams are 1 MiB messages by default).
const maxMessage = 64 << 20

type echo struct {
	mu      sync.Mutex
	replies map[uint32][]byte // ServerStream: one encoded reply per size, built once
}

func (e *echo) streamReply(size uint32) *benchpb.Raw {
	e.mu.Lock()
	defer e.mu.Unlock()
	reply, ok := e.replies[size]
	if !ok {
		payload := make([]byte, size)
		for i := range payload {
			payload[i] = 'x'
		}
		reply = (&benchpb.Reply{Payload: payload}).Marshal()
		e.replies[size] = reply
	}
	return &benchpb.Raw{Data: reply}
}

func unary(_ interface{}, ctx context.Context, decode func(interface{}) error,
	_ grpc.UnaryServerInterceptor) (interface{}, error) {
	var request benchpb.Request
	if err := decode(&request); err != nil {
		return nil, err
	}
	return &benchpb.Reply{Payload: request.Payload}, nil
}

func (e *echo) serverStream(_ interface{}, stream grpc.ServerStream) error {
	var request benchpb.Request
	if err := stream.RecvMsg(&request); err != nil {
		return err
	}
	reply := e.streamReply(request.Size)
	for i := uint32(0); i < request.Count; i++ {
		if err := stream.SendMsg(reply); err != nil {
			return err
		}
	}
	return nil
}

func clientStream(_ interface{}, stream grpc.ServerStream) error {
	var received uint64
	for {
		var request benchpb.Request
		err := stream.RecvMsg(&request)
		if err == io.EOF {
			return stream.SendMsg(&benchpb.Reply{Received: received})
		}
		if err != nil {
			return err
		}
		received += uint64(len(request.Payload))
	}
}

func bidi(_ interface{}, stream grpc.ServerStream) error {
	for {
		var request benchpb.Request
		err := stream.RecvMsg(&request)
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.SendMsg(&benchpb.Reply{Payload: request.Payload}); err != nil {
			return err
		}
	}
}

func serviceDesc(e *echo) *grpc.ServiceDesc {
	return &grpc.ServiceDesc{
		ServiceName: benchpb.Service,
		HandlerType: (*interface{})(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Unary", Handler: unary}},
		Streams: []grpc.StreamDesc{
			{StreamName: "ServerStream", Handler: e.serverStream, ServerStreams: true},
			{StreamName: "ClientStream", Handler: clientStream, ClientStreams: true},
			{StreamName: "Bidi", Handler: bidi, ServerStreams: true, ClientStreams: true},
		},
		Metadata: "grpcmux/v1/bench.proto",
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "TCP address to serve on")
	cli.Parse("echobackend")
	server := grpc.NewServer(grpc.CustomCodec(benchpb.Codec{}),
		grpc.MaxRecvMsgSize(maxMessage), grpc.MaxSendMsgSize(maxMessage))
	server.RegisterService(serviceDesc(&echo{replies: map[uint32][]byte{}}), nil)
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		cli.Fail("echobackend", "%v", err)
	}
	go server.Serve(listener)
	fmt.Printf("listening %d\n", listener.Addr().(*net.TCPAddr).Port)

	cli.WaitForStop()
	server.Stop()
}
