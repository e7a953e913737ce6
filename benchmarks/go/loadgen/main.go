// Command loadgen calls grpcmux.v1.BenchService at grpc-go speed and prints what it
// measured as one JSON line, the load generator of benchmarks/grpc_bench.py:
//
//	loadgen -target HOST:PORT [-kind unary|server_stream|client_stream|bidi]
//	        [-concurrency N | -rate CALLS_PER_S] [-duration 3s | -calls N] [-warmup 0.5s]
//	        [-size BYTES] [-messages N] [-client-id ID]
//
// Closed loop (-concurrency): N workers on one connection, each starting its next call
// when the last one ended; a bidi worker keeps one stream and ping-pongs on it, a call
// being one round trip. Open loop (-rate): calls start on a fixed schedule whatever
// their latency. The warm-up runs the same load first and is not counted. Bytes are
// payload bytes received (ClientStream: the count the server answers).
//
// Output (after a line "measuring" with -announce): {"kind", "calls", "elapsed_s", "calls_per_s", "bytes", "mb_per_s",
// "p50_ms", "p99_ms", "cpu_s" (this process, measured part only), ...}; a failed call
// prints {"error": "..."} instead and exits 1.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"grpcmuxbench/benchpb"
	"grpcmuxbench/cli"
)

const (
	name       = "loadgen"
	maxMessage = 64 << 20
)

var (
	target      = flag.String("target", "", "host:port to call (required)")
	kind        = flag.String("kind", "unary", "unary, server_stream, client_stream or bidi")
	concurrency = flag.Int("concurrency", 1, "closed loop: calls in flight")
	rate        = flag.Float64("rate", 0, "open loop: calls started per second (instead of -concurrency)")
	duration    = flag.Duration("duration", 3*time.Second, "how long to measure")
	calls       = flag.Int("calls", 0, "measure this many calls instead of a -duration")
	warmup      = flag.Duration("warmup", 500*time.Millisecond, "load before measuring, not counted")
	size        = flag.Int("size", 100, "payload bytes per message")
	messages    = flag.Int("messages", 16, "messages per server_stream or client_stream call")
	clientID    = flag.String("client-id", "", "send metadata client-id: ID (route through grpcmux)")
	callTimeout = flag.Duration("timeout", time.Minute, "deadline of each call")
	announce    = flag.Bool("announce", false, "print a line \"measuring\" when the measured part starts")
)

// caller makes calls of one kind; call(state) makes one call (bidi: one round trip).
type caller struct {
	conn    *grpc.ClientConn
	ctx     context.Context
	request *benchpb.Raw
	bytes   int64
}

type worker struct {
	stream    grpc.ClientStream // bidi only
	latencies []time.Duration
}

func (c *caller) newStream(ctx context.Context, method string, desc *grpc.StreamDesc) (grpc.ClientStream, error) {
	return c.conn.NewStream(ctx, desc, benchpb.Method(method))
}

func (c *caller) call(w *worker) error {
	ctx, cancel := context.WithTimeout(c.ctx, *callTimeout)
	defer cancel()
	var received int
	switch *kind {
	case "unary":
		var reply benchpb.Reply
		if err := c.conn.Invoke(ctx, benchpb.Method("Unary"), c.request, &reply); err != nil {
			return err
		}
		received = len(reply.Payload)
	case "server_stream":
		stream, err := c.newStream(ctx, "ServerStream", &grpc.StreamDesc{ServerStreams: true})
		if err != nil {
			return err
		}
		if err := stream.SendMsg(c.request); err != nil {
			return err
		}
		if err := stream.CloseSend(); err != nil {
			return err
		}
		for {
			var reply benchpb.Reply
			err := stream.RecvMsg(&reply)
			if err == io.EOF {
				break
			}
			if err != nil {
				return err
			}
			received += len(reply.Payload)
		}
	case "client_stream":
		stream, err := c.newStream(ctx, "ClientStream", &grpc.StreamDesc{ClientStreams: true})
		if err != nil {
			return err
		}
		for i := 0; i < *messages; i++ {
			if err := stream.SendMsg(c.request); err != nil {
				break // the status, below, says why
			}
		}
		if err := stream.CloseSend(); err != nil {
			return err
		}
		var reply benchpb.Reply
		if err := stream.RecvMsg(&reply); err != nil {
			return err
		}
		received = int(reply.Received)
	case "bidi":
		if err := w.stream.SendMsg(c.request); err != nil {
			return bidiError(w.stream, err)
		}
		var reply benchpb.Reply
		if err := w.stream.RecvMsg(&reply); err != nil {
			return err
		}
		received = len(reply.Payload)
	}
	atomic.AddInt64(&c.bytes, int64(received))
	return nil
}

// bidiError is the stream's status when a send failed because the call ended.
func bidiError(stream grpc.ClientStream, err error) error {
	if err == io.EOF {
		var reply benchpb.Reply
		if recvErr := stream.RecvMsg(&reply); recvErr != nil && recvErr != io.EOF {
			return recvErr
		}
	}
	return err
}

func (c *caller) openWorker() (*worker, error) {
	w := &worker{}
	if *kind == "bidi" {
		// The stream lives as long as the worker: no per-call deadline on it.
		stream, err := c.newStream(c.ctx, "Bidi", &grpc.StreamDesc{ServerStreams: true, ClientStreams: true})
		if err != nil {
			return nil, err
		}
		w.stream = stream
	}
	return w, nil
}

func (c *caller) closeWorker(w *worker) error {
	if w.stream == nil {
		return nil
	}
	if err := w.stream.CloseSend(); err != nil {
		return err
	}
	for {
		var reply benchpb.Reply
		if err := w.stream.RecvMsg(&reply); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}

// phase is one stretch of load: until a deadline, or until a number of calls were made.
type phase struct {
	until   time.Time
	calls   int64 // 0: by deadline
	claimed int64
}

func (p *phase) next() bool {
	if p.calls > 0 {
		return atomic.AddInt64(&p.claimed, 1) <= p.calls
	}
	return time.Now().Before(p.until)
}

// firstError keeps a phase's first failure; the others stop on seeing one.
type firstError struct {
	once   sync.Once
	failed int32
	err    error
}

func (f *firstError) set(err error) {
	f.once.Do(func() {
		f.err = err
		atomic.StoreInt32(&f.failed, 1)
	})
}

func (f *firstError) seen() bool { return atomic.LoadInt32(&f.failed) != 0 }

// closedLoop runs the workers through the phase; each records its latencies if asked.
func (c *caller) closedLoop(workers []*worker, p *phase, record bool) error {
	var wg sync.WaitGroup
	var failed firstError
	for _, w := range workers {
		wg.Add(1)
		go func(w *worker) {
			defer wg.Done()
			for !failed.seen() && p.next() {
				started := time.Now()
				if err := c.call(w); err != nil {
					failed.set(err)
					return
				}
				if record {
					w.latencies = append(w.latencies, time.Since(started))
				}
			}
		}(w)
	}
	wg.Wait()
	return failed.err
}

// openLoop starts calls at the rate for the phase; their latencies go to one worker.
func (c *caller) openLoop(into *worker, p *phase, record bool) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var failed firstError
	interval := time.Duration(float64(time.Second) / *rate)
	start := time.Now()
	for i := 0; !failed.seen(); i++ {
		due := start.Add(time.Duration(i) * interval)
		if p.calls > 0 {
			if int64(i) >= p.calls {
				break
			}
		} else if !due.Before(p.until) {
			break
		}
		time.Sleep(time.Until(due))
		wg.Add(1)
		go func() {
			defer wg.Done()
			started := time.Now()
			if err := c.call(nil); err != nil {
				failed.set(err)
				return
			}
			if record {
				mu.Lock()
				into.latencies = append(into.latencies, time.Since(started))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return failed.err
}

func (c *caller) run(workers []*worker, p *phase, record bool) error {
	if *rate > 0 {
		return c.openLoop(workers[0], p, record)
	}
	return c.closedLoop(workers, p, record)
}

func cpuSeconds() float64 {
	var usage syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &usage)
	return time.Duration(usage.Utime.Nano() + usage.Stime.Nano()).Seconds()
}

func percentileMs(sorted []time.Duration, p float64) float64 {
	if len(sorted) == 0 {
		return math.NaN()
	}
	i := int(float64(len(sorted)) * p / 100)
	if i >= len(sorted) {
		i = len(sorted) - 1
	}
	return float64(sorted[i]) / 1e6
}

func measure() (map[string]interface{}, error) {
	dialCtx, cancel := context.WithTimeout(context.Background(), *callTimeout)
	defer cancel()
	conn, err := grpc.DialContext(dialCtx, *target, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithDefaultCallOptions(grpc.ForceCodec(benchpb.Codec{}),
			grpc.MaxCallRecvMsgSize(maxMessage), grpc.MaxCallSendMsgSize(maxMessage)))
	if err != nil {
		return nil, fmt.Errorf("cannot connect to %s: %v", *target, err)
	}
	defer conn.Close()
	ctx := context.Background()
	if *clientID != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "client-id", *clientID)
	}
	payload := make([]byte, *size)
	for i := range payload {
		payload[i] = 'p'
	}
	request := &benchpb.Request{Payload: payload}
	if *kind == "server_stream" {
		request = &benchpb.Request{Count: uint32(*messages), Size: uint32(*size)}
	}
	c := &caller{conn: conn, ctx: ctx, request: &benchpb.Raw{Data: request.Marshal()}}

	workers := make([]*worker, *concurrency)
	if *rate > 0 {
		workers = workers[:1]
	}
	for i := range workers {
		if workers[i], err = c.openWorker(); err != nil {
			return nil, err
		}
	}
	if *warmup > 0 {
		if err := c.run(workers, &phase{until: time.Now().Add(*warmup)}, false); err != nil {
			return nil, err
		}
	}
	atomic.StoreInt64(&c.bytes, 0)
	if *announce {
		fmt.Println("measuring") // a parent samples other processes' CPU from here
	}
	cpuBefore := cpuSeconds()
	started := time.Now()
	if err := c.run(workers, &phase{until: started.Add(*duration), calls: int64(*calls)}, true); err != nil {
		return nil, err
	}
	elapsed := time.Since(started).Seconds()
	cpu := cpuSeconds() - cpuBefore
	for _, w := range workers {
		if err := c.closeWorker(w); err != nil {
			return nil, err
		}
	}

	var latencies []time.Duration
	for _, w := range workers {
		latencies = append(latencies, w.latencies...)
	}
	sort.Slice(latencies, func(i, j int) bool { return latencies[i] < latencies[j] })
	return map[string]interface{}{
		"kind":        *kind,
		"target":      *target,
		"concurrency": len(workers),
		"rate":        *rate,
		"size":        *size,
		"calls":       len(latencies),
		"elapsed_s":   elapsed,
		"calls_per_s": float64(len(latencies)) / elapsed,
		"bytes":       c.bytes,
		"mb_per_s":    float64(c.bytes) / elapsed / 1e6,
		"p50_ms":      percentileMs(latencies, 50),
		"p99_ms":      percentileMs(latencies, 99),
		"cpu_s":       cpu,
	}, nil
}

func main() {
	cli.Parse(name)
	switch {
	case *target == "":
		cli.Fail(name, "-target HOST:PORT is required")
	case *kind != "unary" && *kind != "server_stream" && *kind != "client_stream" && *kind != "bidi":
		cli.Fail(name, "-kind: expected unary, server_stream, client_stream or bidi, got %q", *kind)
	case *concurrency < 1:
		cli.Fail(name, "-concurrency must be at least 1, got %d", *concurrency)
	case *rate < 0 || math.IsInf(*rate, 0) || math.IsNaN(*rate):
		cli.Fail(name, "-rate must be a positive number of calls per second")
	case *rate > 0 && *kind == "bidi":
		cli.Fail(name, "-rate works with unary, server_stream and client_stream calls, not bidi")
	case *calls < 0 || *size < 0 || *messages < 1:
		cli.Fail(name, "-calls and -size must be at least 0, -messages at least 1")
	case *calls == 0 && *duration <= 0:
		cli.Fail(name, "-duration must be positive (or give -calls)")
	case *warmup < 0:
		cli.Fail(name, "-warmup must not be negative")
	}
	result, err := measure()
	encoder := json.NewEncoder(os.Stdout)
	if err != nil {
		encoder.Encode(map[string]string{"error": err.Error()})
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		os.Exit(1)
	}
	encoder.Encode(result)
}
