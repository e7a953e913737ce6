// Command server serves grpc.testing.TestService as the gRPC interop test
// descriptions (grpc/grpc doc/interop-test-descriptions.md) ask of a test server:
// payloads of the requested sizes, the echo metadata of custom_metadata, and
// response intervals. grpcmux's interop suite puts it behind a multiplexer client.
//
// Usage: server -listen 127.0.0.1:0   (prints "listening HOST:PORT", serves until killed)
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	testpb "google.golang.org/grpc/test/grpc_testing"
)

const (
	echoInitialKey  = "x-grpc-test-echo-initial"
	echoTrailingKey = "x-grpc-test-echo-trailing-bin"
)

type testServer struct {
	testpb.UnimplementedTestServiceServer
}

func payload(size int32) (*testpb.Payload, error) {
	if size < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "negative response size %d", size)
	}
	return &testpb.Payload{Type: testpb.PayloadType_COMPRESSABLE, Body: make([]byte, size)}, nil
}

// echoMetadata sends back the custom_metadata case's keys as header and trailer.
func echoMetadata(ctx context.Context, header func(metadata.MD) error, trailer func(metadata.MD)) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if values := md.Get(echoInitialKey); len(values) > 0 {
		if err := header(metadata.Pairs(echoInitialKey, values[0])); err != nil {
			return err
		}
	}
	if values := md.Get(echoTrailingKey); len(values) > 0 {
		trailer(metadata.Pairs(echoTrailingKey, values[0]))
	}
	return nil
}

func (testServer) EmptyCall(ctx context.Context, _ *testpb.Empty) (*testpb.Empty, error) {
	return &testpb.Empty{}, nil
}

func (testServer) UnaryCall(ctx context.Context, in *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	err := echoMetadata(ctx,
		func(md metadata.MD) error { return grpc.SendHeader(ctx, md) },
		func(md metadata.MD) { grpc.SetTrailer(ctx, md) })
	if err != nil {
		return nil, err
	}
	body, err := payload(in.GetResponseSize())
	if err != nil {
		return nil, err
	}
	return &testpb.SimpleResponse{Payload: body}, nil
}

func (testServer) StreamingOutputCall(in *testpb.StreamingOutputCallRequest, stream testpb.TestService_StreamingOutputCallServer) error {
	return respond(stream, in.GetResponseParameters())
}

func respond(stream interface {
	Send(*testpb.StreamingOutputCallResponse) error
	Context() context.Context
}, parameters []*testpb.ResponseParameters) error {
	for _, p := range parameters {
		if p.GetIntervalUs() > 0 {
			select {
			case <-time.After(time.Duration(p.GetIntervalUs()) * time.Microsecond):
			case <-stream.Context().Done():
				return stream.Context().Err()
			}
		}
		body, err := payload(p.GetSize())
		if err != nil {
			return err
		}
		if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: body}); err != nil {
			return err
		}
	}
	return nil
}

func (testServer) StreamingInputCall(stream testpb.TestService_StreamingInputCallServer) error {
	var total int32
	for {
		in, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&testpb.StreamingInputCallResponse{AggregatedPayloadSize: total})
		}
		if err != nil {
			return err
		}
		total += int32(len(in.GetPayload().GetBody()))
	}
}

func (testServer) FullDuplexCall(stream testpb.TestService_FullDuplexCallServer) error {
	err := echoMetadata(stream.Context(), stream.SendHeader, stream.SetTrailer)
	if err != nil {
		return err
	}
	for {
		in, err := stream.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		if err := respond(stream, in.GetResponseParameters()); err != nil {
			return err
		}
	}
}

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve on")
	flag.Parse()
	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("cannot listen on %s: %v", *listen, err)
	}
	server := grpc.NewServer()
	testpb.RegisterTestServiceServer(server, testServer{})
	fmt.Fprintf(os.Stdout, "listening %s\n", listener.Addr())
	if err := server.Serve(listener); err != nil {
		log.Fatal(err)
	}
}
