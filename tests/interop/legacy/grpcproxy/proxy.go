// Package grpcproxy is a small transparent gRPC proxy for the legacy peers:
// every call is forwarded as opaque message bytes with its headers, messages,
// trailers and status, like the proxy inside grpc-multiplexer v0.2.1.
package grpcproxy

import (
	"context"
	"fmt"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// frame holds one gRPC message as raw bytes.
type frame struct{ payload []byte }

// rawCodec passes message bytes through without decoding them.
type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) {
	f, ok := v.(*frame)
	if !ok {
		return nil, fmt.Errorf("grpcproxy: cannot marshal %T", v)
	}
	return f.payload, nil
}

func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	f, ok := v.(*frame)
	if !ok {
		return fmt.Errorf("grpcproxy: cannot unmarshal into %T", v)
	}
	f.payload = append([]byte(nil), data...)
	return nil
}

func (rawCodec) String() string { return "proto" }

// Director picks the backend for a call and the outgoing context (metadata)
// to use on it; a status error ends the call with that status.
type Director func(ctx context.Context, method string) (context.Context, *grpc.ClientConn, error)

// NewServer returns a grpc.Server that proxies every method through director.
func NewServer(director Director, opts ...grpc.ServerOption) *grpc.Server {
	opts = append(opts,
		grpc.CustomCodec(rawCodec{}),
		grpc.UnknownServiceHandler(handler(director)))
	return grpc.NewServer(opts...)
}

// Forwarding returns the incoming metadata as outgoing metadata, minus the
// given keys: the default director behaviour.
func Forwarding(ctx context.Context, drop ...string) context.Context {
	md, _ := metadata.FromIncomingContext(ctx)
	out := md.Copy()
	for _, key := range drop {
		delete(out, key)
	}
	return metadata.NewOutgoingContext(ctx, out)
}

func handler(director Director) grpc.StreamHandler {
	return func(_ interface{}, server grpc.ServerStream) error {
		method, ok := grpc.MethodFromServerStream(server)
		if !ok {
			return status.Error(codes.Internal, "grpcproxy: no method in stream")
		}
		outCtx, conn, err := director(server.Context(), method)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithCancel(outCtx)
		defer cancel()
		desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
		client, err := grpc.NewClientStream(ctx, desc, conn, method, grpc.CallCustomCodec(rawCodec{}))
		if err != nil {
			return err
		}
		upstream := make(chan error, 1)
		go func() { upstream <- forwardRequests(server, client) }()
		downstream := make(chan error, 1)
		go func() { downstream <- forwardResponses(client, server) }()
		for {
			select {
			case err := <-upstream:
				if err != nil {
					// The caller went away or broke: cancel the backend call.
					cancel()
					return status.Errorf(codes.Canceled, "grpcproxy: request side failed: %v", err)
				}
				upstream = nil // requests done; keep waiting for the responses
			case err := <-downstream:
				server.SetTrailer(client.Trailer())
				return err // nil on success, else the backend's status
			}
		}
	}
}

func forwardRequests(server grpc.ServerStream, client grpc.ClientStream) error {
	for {
		f := &frame{}
		if err := server.RecvMsg(f); err != nil {
			if err == io.EOF {
				return client.CloseSend()
			}
			return err
		}
		if err := client.SendMsg(f); err != nil {
			if err == io.EOF {
				// The backend already ended the call; its status follows on RecvMsg.
				return nil
			}
			return err
		}
	}
}

func forwardResponses(client grpc.ClientStream, server grpc.ServerStream) error {
	// An error here means the call ended without headers; RecvMsg below
	// then returns the backend's status.
	if header, err := client.Header(); err == nil && len(header) > 0 {
		if err := server.SendHeader(header); err != nil {
			return err
		}
	}
	for {
		f := &frame{}
		if err := client.RecvMsg(f); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		if err := server.SendMsg(f); err != nil {
			return err
		}
	}
}
