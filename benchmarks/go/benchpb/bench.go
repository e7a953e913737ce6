// Package benchpb is grpcmux.v1.BenchService (proto/grpcmux/v1/bench.proto) for the Go
// benchmark programs, without generated code: the two messages are encoded by hand in
// the protobuf wire format, and Codec hands them to grpc-go. So the Go backend and load
// generator speak exactly what bench.proto says, interchangeable with any other
// implementation of it (a grpcio client with bench_pb2 can call the Go backend).
package benchpb

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// Service is the full gRPC service name; Method returns a method's full path.
const Service = "grpcmux.v1.BenchService"

// Method returns "/grpcmux.v1.BenchService/<name>".
func Method(name string) string { return "/" + Service + "/" + name }

// Protobuf wire types used by bench.proto.
const (
	wireVarint = 0
	wireBytes  = 2
)

// Request is EchoRequest: payload = 1 (bytes), count = 2 and size = 3 (uint32).
type Request struct {
	Payload []byte
	Count   uint32
	Size    uint32
}

// Reply is EchoReply: payload = 1 (bytes), received = 2 (uint64).
type Reply struct {
	Payload  []byte
	Received uint64
}

// Marshal encodes the request; zero fields are omitted, as proto3 does.
func (m *Request) Marshal() []byte {
	out := make([]byte, 0, len(m.Payload)+24)
	out = appendBytes(out, 1, m.Payload)
	out = appendVarint(out, 2, uint64(m.Count))
	return appendVarint(out, 3, uint64(m.Size))
}

// Unmarshal decodes data into the request (payload aliases data); unknown fields are skipped.
func (m *Request) Unmarshal(data []byte) error {
	*m = Request{}
	return walk(data, func(field int, varint uint64, bytes []byte) {
		switch field {
		case 1:
			m.Payload = bytes
		case 2:
			m.Count = uint32(varint)
		case 3:
			m.Size = uint32(varint)
		}
	})
}

// Marshal encodes the reply; zero fields are omitted, as proto3 does.
func (m *Reply) Marshal() []byte {
	out := make([]byte, 0, len(m.Payload)+16)
	out = appendBytes(out, 1, m.Payload)
	return appendVarint(out, 2, m.Received)
}

// Unmarshal decodes data into the reply (payload aliases data); unknown fields are skipped.
func (m *Reply) Unmarshal(data []byte) error {
	*m = Reply{}
	return walk(data, func(field int, varint uint64, bytes []byte) {
		switch field {
		case 1:
			m.Payload = bytes
		case 2:
			m.Received = varint
		}
	})
}

func appendVarint(out []byte, field int, value uint64) []byte {
	if value == 0 {
		return out
	}
	out = binary.AppendUvarint(out, uint64(field)<<3|wireVarint)
	return binary.AppendUvarint(out, value)
}

func appendBytes(out []byte, field int, value []byte) []byte {
	if len(value) == 0 {
		return out
	}
	out = binary.AppendUvarint(out, uint64(field)<<3|wireBytes)
	out = binary.AppendUvarint(out, uint64(len(value)))
	return append(out, value...)
}

var errTruncated = errors.New("benchpb: truncated message")

// walk calls visit for each varint or length-delimited field of a message.
func walk(data []byte, visit func(field int, varint uint64, bytes []byte)) error {
	for len(data) > 0 {
		key, n := binary.Uvarint(data)
		if n <= 0 {
			return errTruncated
		}
		data = data[n:]
		field := int(key >> 3)
		switch key & 7 {
		case wireVarint:
			value, n := binary.Uvarint(data)
			if n <= 0 {
				return errTruncated
			}
			data = data[n:]
			visit(field, value, nil)
		case wireBytes:
			length, n := binary.Uvarint(data)
			if n <= 0 || uint64(len(data)-n) < length {
				return errTruncated
			}
			visit(field, 0, data[n:n+int(length)])
			data = data[n+int(length):]
		default:
			return fmt.Errorf("benchpb: field %d has wire type %d, not in bench.proto", field, key&7)
		}
	}
	return nil
}

// Raw is a message already in wire form (built once, sent many times): the codec
// sends its bytes as they are, and receiving into it keeps the bytes undecoded.
type Raw struct{ Data []byte }

// Marshal returns the bytes.
func (m *Raw) Marshal() []byte { return m.Data }

// Unmarshal keeps data.
func (m *Raw) Unmarshal(data []byte) error {
	m.Data = data
	return nil
}

// Message is what Codec encodes: *Request, *Reply or *Raw.
type Message interface {
	Marshal() []byte
	Unmarshal([]byte) error
}

// Codec is the "proto" codec for Message values; pass it explicitly
// (grpc.CustomCodec on the server, grpc.ForceCodec on calls) rather than
// registering it, so that grpc-go's own proto codec is never in the way.
type Codec struct{}

// Marshal encodes a Message.
func (Codec) Marshal(v interface{}) ([]byte, error) {
	m, ok := v.(Message)
	if !ok {
		return nil, fmt.Errorf("benchpb: cannot marshal %T", v)
	}
	return m.Marshal(), nil
}

// Unmarshal decodes into a Message. grpc-go (1.33, Debian's) reads every message
// into a buffer of its own, so the decoded payload may alias data.
func (Codec) Unmarshal(data []byte, v interface{}) error {
	m, ok := v.(Message)
	if !ok {
		return fmt.Errorf("benchpb: cannot unmarshal into %T", v)
	}
	return m.Unmarshal(data)
}

// Name is the content-subtype: plain application/grpc, as protobuf messages are.
func (Codec) Name() string { return "proto" }

// String is Name, for grpc.CustomCodec's older interface.
func (c Codec) String() string { return c.Name() }
