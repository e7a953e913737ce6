// Command client runs the gRPC interop test cases (grpc/grpc
// doc/interop-test-descriptions.md) that grpc-go's test.proto allows against a
// grpc.testing.TestService server, e.g. the one in ../server behind grpcmux.
//
// Usage: client -server_addr HOST:PORT [-test_case NAME|all] [-metadata k:v,k2:v2]
//
// It prints "PASS name" or "FAIL name: why" per case and exits 1 if any case
// failed, 2 on bad flags. -metadata is added to every call (grpcmux routes on
// client-id).
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	testpb "google.golang.org/grpc/test/grpc_testing"
)

const (
	echoInitialKey    = "x-grpc-test-echo-initial"
	echoInitialValue  = "test_initial_metadata_value"
	echoTrailingKey   = "x-grpc-test-echo-trailing-bin"
	echoTrailingValue = "\xab\xab\xab"
	caseTimeout       = 20 * time.Second
)

var (
	requestSizes  = []int{27182, 8, 1828, 45904}
	responseSizes = []int{31415, 9, 2653, 58979}
)

// interop is one client connection plus the metadata every call carries.
type interop struct {
	conn   *grpc.ClientConn
	client testpb.TestServiceClient
	extra  []string // key, value, key, value...
}

// context returns a call context with the -metadata pairs attached.
func (t *interop) context(parent context.Context, pairs ...string) context.Context {
	all := append(append([]string{}, t.extra...), pairs...)
	if len(all) == 0 {
		return parent
	}
	return metadata.AppendToOutgoingContext(parent, all...)
}

func zeros(n int) *testpb.Payload {
	return &testpb.Payload{Type: testpb.PayloadType_COMPRESSABLE, Body: make([]byte, n)}
}

// checkPayload says what is wrong with a response payload, or nil.
func checkPayload(p *testpb.Payload, size int) error {
	body := p.GetBody()
	if len(body) != size {
		return fmt.Errorf("payload is %d bytes, want %d", len(body), size)
	}
	if !bytes.Equal(body, make([]byte, size)) {
		return errors.New("payload is not all zeros")
	}
	return nil
}

// sendError explains a failed Send. grpc-go reports a stream the server already
// ended as io.EOF on Send; the real status then comes from receiving.
func sendError(what string, err error, stream grpc.ClientStream) error {
	if err == io.EOF {
		if recvErr := stream.RecvMsg(new(testpb.Empty)); recvErr != nil && recvErr != io.EOF {
			err = recvErr
		}
	}
	return fmt.Errorf("%s: %v", what, err)
}

func wantCode(err error, code codes.Code) error {
	if got := status.Code(err); got != code {
		return fmt.Errorf("status %v (%v), want %v", got, err, code)
	}
	return nil
}

func (t *interop) emptyUnary(ctx context.Context) error {
	reply, err := t.client.EmptyCall(t.context(ctx), &testpb.Empty{})
	if err != nil {
		return err
	}
	if reply == nil {
		return errors.New("no reply")
	}
	return nil
}

func (t *interop) largeUnary(ctx context.Context) error {
	reply, err := t.client.UnaryCall(t.context(ctx), &testpb.SimpleRequest{
		ResponseType: testpb.PayloadType_COMPRESSABLE,
		ResponseSize: 314159,
		Payload:      zeros(271828),
	})
	if err != nil {
		return err
	}
	return checkPayload(reply.GetPayload(), 314159)
}

func (t *interop) clientStreaming(ctx context.Context) error {
	stream, err := t.client.StreamingInputCall(t.context(ctx))
	if err != nil {
		return err
	}
	for _, size := range requestSizes {
		if err := stream.Send(&testpb.StreamingInputCallRequest{Payload: zeros(size)}); err != nil {
			return sendError(fmt.Sprintf("send %d bytes", size), err, stream)
		}
	}
	reply, err := stream.CloseAndRecv()
	if err != nil {
		return err
	}
	if got := reply.GetAggregatedPayloadSize(); got != 74922 {
		return fmt.Errorf("aggregated_payload_size %d, want 74922", got)
	}
	return nil
}

func (t *interop) serverStreaming(ctx context.Context) error {
	request := &testpb.StreamingOutputCallRequest{ResponseType: testpb.PayloadType_COMPRESSABLE}
	for _, size := range responseSizes {
		request.ResponseParameters = append(request.ResponseParameters,
			&testpb.ResponseParameters{Size: int32(size)})
	}
	stream, err := t.client.StreamingOutputCall(t.context(ctx), request)
	if err != nil {
		return err
	}
	count := 0
	for {
		reply, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("after %d responses: %v", count, err)
		}
		if count >= len(responseSizes) {
			return fmt.Errorf("more than %d responses", len(responseSizes))
		}
		if err := checkPayload(reply.GetPayload(), responseSizes[count]); err != nil {
			return fmt.Errorf("response %d: %v", count, err)
		}
		count++
	}
	if count != len(responseSizes) {
		return fmt.Errorf("%d responses, want %d", count, len(responseSizes))
	}
	return nil
}

func duplexRequest(responseSize, payloadSize int) *testpb.StreamingOutputCallRequest {
	return &testpb.StreamingOutputCallRequest{
		ResponseType:       testpb.PayloadType_COMPRESSABLE,
		ResponseParameters: []*testpb.ResponseParameters{{Size: int32(responseSize)}},
		Payload:            zeros(payloadSize),
	}
}

func (t *interop) pingPong(ctx context.Context) error {
	stream, err := t.client.FullDuplexCall(t.context(ctx))
	if err != nil {
		return err
	}
	for i, size := range responseSizes {
		if err := stream.Send(duplexRequest(size, requestSizes[i])); err != nil {
			return sendError(fmt.Sprintf("send %d", i), err, stream)
		}
		reply, err := stream.Recv()
		if err != nil {
			return fmt.Errorf("receive %d: %v", i, err)
		}
		if err := checkPayload(reply.GetPayload(), size); err != nil {
			return fmt.Errorf("response %d: %v", i, err)
		}
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	if _, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("after the last response: %v, want end of stream", err)
	}
	return nil
}

func (t *interop) emptyStream(ctx context.Context) error {
	stream, err := t.client.FullDuplexCall(t.context(ctx))
	if err != nil {
		return err
	}
	if err := stream.CloseSend(); err != nil {
		return err
	}
	if reply, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("got %v, %v, want end of stream with no response", reply, err)
	}
	return nil
}

func (t *interop) timeoutOnSleepingServer(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, time.Millisecond)
	defer cancel()
	stream, err := t.client.FullDuplexCall(t.context(ctx))
	if err != nil {
		return wantCode(err, codes.DeadlineExceeded)
	}
	request := &testpb.StreamingOutputCallRequest{Payload: zeros(27182)}
	// The deadline may pass before the send: grpc then reports the end of the
	// stream (io.EOF) and the status comes from Recv.
	if err := stream.Send(request); err != nil && err != io.EOF {
		return wantCode(err, codes.DeadlineExceeded)
	}
	_, err = stream.Recv()
	return wantCode(err, codes.DeadlineExceeded)
}

func (t *interop) cancelAfterBegin(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	stream, err := t.client.StreamingInputCall(t.context(ctx))
	if err != nil {
		cancel()
		return err
	}
	cancel()
	_, err = stream.CloseAndRecv()
	return wantCode(err, codes.Canceled)
}

func (t *interop) cancelAfterFirstResponse(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := t.client.FullDuplexCall(t.context(ctx))
	if err != nil {
		return err
	}
	if err := stream.Send(duplexRequest(31415, 27182)); err != nil {
		return sendError("send", err, stream)
	}
	reply, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("receive: %v", err)
	}
	if err := checkPayload(reply.GetPayload(), 31415); err != nil {
		return err
	}
	cancel()
	_, err = stream.Recv()
	return wantCode(err, codes.Canceled)
}

// checkEcho says whether the echo metadata came back in header and trailer.
func checkEcho(header, trailer metadata.MD) error {
	if got := header.Get(echoInitialKey); len(got) != 1 || got[0] != echoInitialValue {
		return fmt.Errorf("initial metadata %s = %q, want [%q]", echoInitialKey, got, echoInitialValue)
	}
	if got := trailer.Get(echoTrailingKey); len(got) != 1 || got[0] != echoTrailingValue {
		return fmt.Errorf("trailing metadata %s = %q, want [%q]", echoTrailingKey, got, echoTrailingValue)
	}
	return nil
}

func (t *interop) customMetadata(ctx context.Context) error {
	echo := []string{echoInitialKey, echoInitialValue, echoTrailingKey, echoTrailingValue}
	var header, trailer metadata.MD
	reply, err := t.client.UnaryCall(t.context(ctx, echo...), &testpb.SimpleRequest{
		ResponseType: testpb.PayloadType_COMPRESSABLE,
		ResponseSize: 314159,
		Payload:      zeros(271828),
	}, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		return fmt.Errorf("unary: %v", err)
	}
	if err := checkPayload(reply.GetPayload(), 314159); err != nil {
		return fmt.Errorf("unary: %v", err)
	}
	if err := checkEcho(header, trailer); err != nil {
		return fmt.Errorf("unary: %v", err)
	}

	stream, err := t.client.FullDuplexCall(t.context(ctx, echo...))
	if err != nil {
		return fmt.Errorf("full duplex: %v", err)
	}
	if err := stream.Send(duplexRequest(314159, 271828)); err != nil {
		return sendError("full duplex send", err, stream)
	}
	if err := stream.CloseSend(); err != nil {
		return fmt.Errorf("full duplex half-close: %v", err)
	}
	streamReply, err := stream.Recv()
	if err != nil {
		return fmt.Errorf("full duplex receive: %v", err)
	}
	if err := checkPayload(streamReply.GetPayload(), 314159); err != nil {
		return fmt.Errorf("full duplex: %v", err)
	}
	if _, err := stream.Recv(); err != io.EOF {
		return fmt.Errorf("full duplex: %v after the response, want end of stream", err)
	}
	streamHeader, err := stream.Header()
	if err != nil {
		return fmt.Errorf("full duplex header: %v", err)
	}
	if err := checkEcho(streamHeader, stream.Trailer()); err != nil {
		return fmt.Errorf("full duplex: %v", err)
	}
	return nil
}

func (t *interop) unimplemented(method string) func(context.Context) error {
	return func(ctx context.Context) error {
		err := t.conn.Invoke(t.context(ctx), method, &testpb.Empty{}, &testpb.Empty{})
		return wantCode(err, codes.Unimplemented)
	}
}

// cases lists every case in the order "all" runs them.
func (t *interop) cases() []struct {
	name string
	run  func(context.Context) error
} {
	return []struct {
		name string
		run  func(context.Context) error
	}{
		{"empty_unary", t.emptyUnary},
		{"large_unary", t.largeUnary},
		{"client_streaming", t.clientStreaming},
		{"server_streaming", t.serverStreaming},
		{"ping_pong", t.pingPong},
		{"empty_stream", t.emptyStream},
		{"timeout_on_sleeping_server", t.timeoutOnSleepingServer},
		{"cancel_after_begin", t.cancelAfterBegin},
		{"cancel_after_first_response", t.cancelAfterFirstResponse},
		{"custom_metadata", t.customMetadata},
		{"unimplemented_method", t.unimplemented("/grpc.testing.TestService/UnimplementedCall")},
		{"unimplemented_service", t.unimplemented("/grpc.testing.UnimplementedService/UnimplementedCall")},
	}
}

// parseMetadata turns "k:v,k2:v2" into key, value pairs.
func parseMetadata(text string) ([]string, error) {
	var pairs []string
	if text == "" {
		return pairs, nil
	}
	for _, item := range strings.Split(text, ",") {
		parts := strings.SplitN(item, ":", 2)
		if len(parts) != 2 || parts[0] == "" {
			return nil, fmt.Errorf("-metadata: %q is not key:value", item)
		}
		pairs = append(pairs, strings.ToLower(parts[0]), parts[1])
	}
	return pairs, nil
}

func usageError(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "client: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	addr := flag.String("server_addr", "", "server HOST:PORT (required)")
	testCase := flag.String("test_case", "all", "case to run, or all")
	extra := flag.String("metadata", "", "metadata added to every call, k:v,k2:v2")
	flag.Parse()
	if *addr == "" {
		usageError("-server_addr is required")
	}
	pairs, err := parseMetadata(*extra)
	if err != nil {
		usageError("%v", err)
	}
	conn, err := grpc.Dial(*addr, grpc.WithInsecure(),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(4<<20)))
	if err != nil {
		usageError("cannot dial %s: %v", *addr, err)
	}
	defer conn.Close()
	t := &interop{conn: conn, client: testpb.NewTestServiceClient(conn), extra: pairs}

	all := t.cases()
	var selected []int
	var names []string
	for i, c := range all {
		names = append(names, c.name)
		if *testCase == "all" || *testCase == c.name {
			selected = append(selected, i)
		}
	}
	if len(selected) == 0 {
		sort.Strings(names)
		usageError("unknown -test_case %q; known: all, %s", *testCase, strings.Join(names, ", "))
	}
	failed := false
	for _, i := range selected {
		ctx, cancel := context.WithTimeout(context.Background(), caseTimeout)
		err := all[i].run(ctx)
		cancel()
		if err != nil {
			failed = true
			fmt.Printf("FAIL %s: %v\n", all[i].name, strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			fmt.Printf("PASS %s\n", all[i].name)
		}
	}
	if failed {
		os.Exit(1)
	}
}
