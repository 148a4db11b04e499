package main

// The channel framing (docs/agent-protocol.md): a 10-byte header, then the payload.
//
//	byte 0     magic 0xA9
//	byte 1     frame type
//	bytes 2-5  session id, big-endian (0: the channel itself)
//	bytes 6-9  payload length, big-endian
//
// A sender (re)starts the stream with syncMarker: the receiver drops bytes until it sees one,
// which realigns a stream cut in the middle of a frame (a VM restored from a snapshot, a
// host that reconnected).

import (
	"encoding/binary"
	"errors"
	"io"
)

const (
	magic     = 0xA9
	headerLen = 10
	// Limits: BINARY payloads, TEXT payloads (JSON documents are never split).
	maxData = 64 << 10
	maxText = 1 << 20
	// Credit: every session may send window bytes beyond what its receiver granted; a frame
	// costs its payload length plus frameCost, so many tiny frames are bounded too.
	window    = 256 << 10
	frameCost = 64
	// The receiver grants credit back once this much has been consumed.
	grantAt = 32 << 10
	// Output chunks (exec output, cp data) are at most this big, as hypeman sends them.
	chunk         = 32 << 10
	protocolVer   = 1
	sessionsLimit = 256
)

const (
	tHello  = 0x01
	tPing   = 0x02
	tPong   = 0x03
	tGone   = 0x04 // written by the guest's init when the agent died (never by the agent)
	tOpen   = 0x10
	tText   = 0x11
	tBinary = 0x12
	tEOF    = 0x13
	tCredit = 0x14
	tEnd    = 0x15
	tAbort  = 0x16
)

var syncMarker = []byte("\xa9\x00vmfleet-agent-sync\x00\xa9")

type frame struct {
	typ     byte
	sid     uint32
	payload []byte
}

func cost(n int) int64 { return int64(n) + frameCost }

func encode(f frame) []byte {
	b := make([]byte, headerLen+len(f.payload))
	b[0] = magic
	b[1] = f.typ
	binary.BigEndian.PutUint32(b[2:6], f.sid)
	binary.BigEndian.PutUint32(b[6:10], uint32(len(f.payload)))
	copy(b[headerLen:], f.payload)
	return b
}

var errResync = errors.New("framing lost")

// reader parses frames from a byte stream. After a framing error (or at the start) it is
// "unsynced" and drops bytes until the next syncMarker.
type reader struct {
	r      io.Reader
	buf    []byte
	start  int
	end    int
	synced bool
	eof    bool
}

func newReader(r io.Reader) *reader {
	return &reader{r: r, buf: make([]byte, 2*maxText)}
}

// fill reads more bytes; io.EOF when the other end is gone.
func (p *reader) fill() error {
	if p.start > 0 && p.start == p.end {
		p.start, p.end = 0, 0
	}
	if p.end == len(p.buf) {
		copy(p.buf, p.buf[p.start:p.end])
		p.end -= p.start
		p.start = 0
	}
	n, err := p.r.Read(p.buf[p.end:])
	p.end += n
	if n == 0 && err == nil {
		return io.EOF
	}
	if n > 0 {
		return nil
	}
	return err
}

func (p *reader) reset() { p.start, p.end, p.synced = 0, 0, false }

// next returns the next frame, realigning on syncMarker when needed.
func (p *reader) next() (frame, error) {
	for {
		if !p.synced {
			if i := indexOf(p.buf[p.start:p.end], syncMarker); i >= 0 {
				p.start += i + len(syncMarker)
				p.synced = true
				continue
			}
			// Keep a marker's possible prefix at the end.
			keep := len(syncMarker) - 1
			if p.end-p.start > keep {
				p.start = p.end - keep
			}
			if err := p.fill(); err != nil {
				return frame{}, err
			}
			continue
		}
		avail := p.buf[p.start:p.end]
		if len(avail) >= headerLen {
			if avail[0] != magic || avail[1] == 0 {
				// Type 0 is no frame: a marker (a peer that started over) or garbage.
				// Either way, realign on the next marker, looking from here.
				p.synced = false
				continue
			}
			n := int(binary.BigEndian.Uint32(avail[6:10]))
			if n > maxText {
				p.synced = false
				p.start++
				continue
			}
			if len(avail) >= headerLen+n {
				payload := make([]byte, n)
				copy(payload, avail[headerLen:headerLen+n])
				f := frame{typ: avail[1], sid: binary.BigEndian.Uint32(avail[2:6]), payload: payload}
				p.start += headerLen + n
				return f, nil
			}
		}
		if err := p.fill(); err != nil {
			return frame{}, err
		}
	}
}

func indexOf(b, sub []byte) int {
	for i := 0; i+len(sub) <= len(b); i++ {
		if b[i] == sub[0] && string(b[i:i+len(sub)]) == string(sub) {
			return i
		}
	}
	return -1
}
