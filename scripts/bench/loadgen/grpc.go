// -proto grpc: Envoy's RateLimitService/ShouldRateLimit over cleartext
// HTTP/2 (prior knowledge), so the HTTP /check and the gRPC service are
// measured by the same generator, the same scheduler and the same clock.
//
// Standard library only, as the rest: each connection carries one call at a
// time (like an HTTP/1.1 keep-alive connection) on raw frames. Requests are
// pre-serialised (a constant HPACK header block, the protobuf body per
// user); response headers are never decoded (HPACK state is not needed to
// skip them), the verdict is read from the response message's overall_code:
// OK counts as status 200, OVER_LIMIT as 429, a call that ends without a
// message (a gRPC error) as an error.
package main

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

const grpcPath = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

// Frame types and flags of RFC 9113.
const (
	frameData         = 0x0
	frameHeaders      = 0x1
	frameRstStream    = 0x3
	frameSettings     = 0x4
	framePing         = 0x6
	frameGoAway       = 0x7
	frameWindowUpdate = 0x8
	flagEndStream     = 0x1
	flagAck           = 0x1
	flagEndHeaders    = 0x4
	flagPadded        = 0x8
	// Windows opened at once and topped up every windowTopUp bytes read.
	bigWindow   = 1<<31 - 1
	windowTopUp = 1 << 20
)

type h2conn struct {
	c        net.Conn
	rd       *bufio.Reader
	headers  []byte // HPACK block of every call
	stream   uint32
	consumed int
	buf      []byte
	data     []byte
}

// grpcBodies pre-serialises one cycle of length-prefixed RateLimitRequest
// messages, the same user mix as buildRequests: domain "bench", one
// descriptor with the entry user_id = the user.
func grpcBodies(users []string, hotUser string, hotEvery int) [][]byte {
	n := 20000
	out := make([][]byte, n)
	for i := 0; i < n; i++ {
		user := users[i%len(users)]
		if hotEvery > 0 && i%hotEvery == hotEvery-1 {
			user = hotUser
		}
		entry := appendField(appendField(nil, 1, []byte("user_id")), 2, []byte(user))
		descriptor := appendField(nil, 1, entry)
		msg := appendField(appendField(nil, 1, []byte("bench")), 2, descriptor)
		body := make([]byte, 5, 5+len(msg))
		binary.BigEndian.PutUint32(body[1:], uint32(len(msg)))
		out[i] = append(body, msg...)
	}
	return out
}

// appendField appends a length-delimited protobuf field.
func appendField(b []byte, field int, v []byte) []byte {
	b = binary.AppendUvarint(b, uint64(field<<3|2))
	b = binary.AppendUvarint(b, uint64(len(v)))
	return append(b, v...)
}

// hpackString appends a string literal (no Huffman) with its length as an
// HPACK integer of a 7-bit prefix.
func hpackString(b []byte, s string) []byte {
	b = hpackInt(b, 0, 7, len(s))
	return append(b, s...)
}

// hpackInt appends n as an HPACK integer with an n-bit prefix after the
// high bits `first`.
func hpackInt(b []byte, first byte, prefix uint, n int) []byte {
	max := 1<<prefix - 1
	if n < max {
		return append(b, first|byte(n))
	}
	b = append(b, first|byte(max))
	for n -= max; n >= 128; n >>= 7 {
		b = append(b, byte(n%128+128))
	}
	return append(b, byte(n))
}

func grpcHeaderBlock(authority string) []byte {
	b := []byte{0x83, 0x86}                                      // :method POST, :scheme http (static table)
	b = hpackString(hpackInt(b, 0, 4, 4), grpcPath)              // :path, name indexed
	b = hpackString(hpackInt(b, 0, 4, 1), authority)             // :authority
	b = hpackString(hpackInt(b, 0, 4, 31), "application/grpc")   // content-type
	b = hpackString(hpackString(append(b, 0), "te"), "trailers") // new name
	return b
}

func appendFrame(b []byte, kind, flags byte, stream uint32, payload []byte) []byte {
	n := len(payload)
	b = append(b, byte(n>>16), byte(n>>8), byte(n), kind, flags)
	b = binary.BigEndian.AppendUint32(b, stream)
	return append(b, payload...)
}

func dialGrpc(addr string, timeout time.Duration) (*h2conn, error) {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, err
	}
	h := &h2conn{c: c, rd: bufio.NewReaderSize(c, 16<<10), headers: grpcHeaderBlock(addr), stream: 1}
	b := []byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
	settings := []byte{0, 4} // SETTINGS_INITIAL_WINDOW_SIZE
	settings = binary.BigEndian.AppendUint32(settings, bigWindow)
	b = appendFrame(b, frameSettings, 0, 0, settings)
	b = appendFrame(b, frameWindowUpdate, 0, 0, binary.BigEndian.AppendUint32(nil, bigWindow-65535))
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(b); err != nil {
		c.Close()
		return nil, err
	}
	return h, nil
}

func (h *h2conn) Close() error { return h.c.Close() }

// roundTrip sends one call and reads frames until its stream ends.
func (h *h2conn) roundTrip(body []byte) (int, error) {
	id := h.stream
	h.stream += 2
	b := appendFrame(h.buf[:0], frameHeaders, flagEndHeaders, id, h.headers)
	b = appendFrame(b, frameData, flagEndStream, id, body)
	h.buf = b
	if _, err := h.c.Write(b); err != nil {
		return 0, fmt.Errorf("write: %w", simplify(err))
	}
	h.data = h.data[:0]
	var head [9]byte
	for {
		if _, err := io.ReadFull(h.rd, head[:]); err != nil {
			return 0, fmt.Errorf("read frame: %w", simplify(err))
		}
		n := int(head[0])<<16 | int(head[1])<<8 | int(head[2])
		kind, flags := head[3], head[4]
		stream := binary.BigEndian.Uint32(head[5:]) & 0x7fffffff
		payload, err := h.rd.Peek(n)
		if err != nil {
			// Larger than the buffer (not sent by these servers): skip it.
			if _, err := h.rd.Discard(n); err != nil {
				return 0, fmt.Errorf("read frame: %w", simplify(err))
			}
			payload = nil
		}
		end := false
		switch kind {
		case frameSettings:
			if flags&flagAck == 0 {
				h.reply(appendFrame(nil, frameSettings, flagAck, 0, nil))
			}
		case framePing:
			if flags&flagAck == 0 && payload != nil {
				h.reply(appendFrame(nil, framePing, flagAck, 0, payload))
			}
		case frameData:
			h.consumed += n
			if stream == id && payload != nil {
				p := payload
				if flags&flagPadded != 0 && len(p) > 0 {
					pad := int(p[0])
					if 1+pad <= len(p) {
						p = p[1 : len(p)-pad]
					}
				}
				h.data = append(h.data, p...)
			}
			end = stream == id && flags&flagEndStream != 0
		case frameHeaders:
			end = stream == id && flags&flagEndStream != 0
		case frameRstStream:
			if stream == id {
				h.rd.Discard(n)
				return 0, errors.New("stream reset")
			}
		case frameGoAway:
			h.rd.Discard(n)
			return 0, errors.New("goaway")
		}
		if payload != nil {
			h.rd.Discard(n)
		}
		if h.consumed >= windowTopUp {
			h.reply(appendFrame(nil, frameWindowUpdate, 0, 0, binary.BigEndian.AppendUint32(nil, uint32(h.consumed))))
			h.consumed = 0
		}
		if end {
			return grpcVerdict(h.data)
		}
	}
}

func (h *h2conn) reply(frame []byte) { _, _ = h.c.Write(frame) }

// grpcVerdict reads overall_code (field 1) of a RateLimitResponse.
func grpcVerdict(data []byte) (int, error) {
	if len(data) < 5 {
		return 0, errors.New("grpc: call ended without a response message")
	}
	msg := data[5:]
	for len(msg) > 0 {
		key, n := binary.Uvarint(msg)
		if n <= 0 {
			break
		}
		msg = msg[n:]
		field, wire := key>>3, key&7
		switch wire {
		case 0:
			v, m := binary.Uvarint(msg)
			if m <= 0 {
				return 0, errors.New("grpc: malformed response")
			}
			msg = msg[m:]
			if field == 1 {
				switch v {
				case 1:
					return 200, nil
				case 2:
					return 429, nil
				}
				return 0, fmt.Errorf("grpc: overall_code %d", v)
			}
		case 2:
			l, m := binary.Uvarint(msg)
			if m <= 0 || uint64(len(msg)-m) < l {
				return 0, errors.New("grpc: malformed response")
			}
			msg = msg[m+int(l):]
		default:
			return 0, errors.New("grpc: unexpected wire type")
		}
	}
	return 0, errors.New("grpc: response without overall_code")
}
