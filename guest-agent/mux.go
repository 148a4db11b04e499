package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"os"
	"sync"
)

var errClosed = errors.New("session closed")

// conn is one host connection: it begins with the host's HELLO and ends at the next HELLO,
// at EOF, or when the transport fails. Every session belongs to one conn and dies with it.
type conn struct {
	w        io.Writer
	wmu      *sync.Mutex // shared by every conn on one transport: frames are never interleaved
	out      chan []byte
	done     chan struct{}
	once     sync.Once
	mu       sync.Mutex
	sessions map[uint32]*session
}

func newConn(w io.Writer, wmu *sync.Mutex) *conn {
	c := &conn{w: w, wmu: wmu, out: make(chan []byte, 64), done: make(chan struct{}),
		sessions: map[uint32]*session{}}
	go c.writer()
	return c
}

func (c *conn) writer() {
	for {
		select {
		case b := <-c.out:
			select {
			case <-c.done:
				return // a frame of a finished conn is never written
			default:
			}
			c.wmu.Lock()
			_, err := c.w.Write(b)
			c.wmu.Unlock()
			if err != nil {
				c.close()
				return
			}
		case <-c.done:
			return
		}
	}
}

// enqueue hands a frame to the writer; it fails once the conn or cancel is done.
func (c *conn) enqueue(f frame, cancel <-chan struct{}) error {
	select {
	case c.out <- encode(f):
		return nil
	case <-c.done:
		return errClosed
	case <-cancel:
		return errClosed
	}
}

// close ends the conn: every session is aborted (its processes killed).
func (c *conn) close() {
	c.once.Do(func() {
		close(c.done)
		c.mu.Lock()
		all := make([]*session, 0, len(c.sessions))
		for _, s := range c.sessions {
			all = append(all, s)
		}
		c.sessions = map[uint32]*session{}
		c.mu.Unlock()
		for _, s := range all {
			s.abort()
		}
	})
}

func (c *conn) hello(payload []byte) {
	var req struct {
		Version int    `json:"version"`
		Nonce   uint64 `json:"nonce"`
	}
	_ = json.Unmarshal(payload, &req)
	reply := map[string]any{"version": protocolVer, "nonce": req.Nonce, "pid": os.Getpid(),
		"window": window, "max_data": maxData, "max_text": maxText}
	if req.Version != protocolVer {
		reply["error"] = "unsupported protocol version"
	}
	body, _ := json.Marshal(reply)
	// The marker first: the host realigns on it whatever it had before.
	b := append(append([]byte{}, syncMarker...), encode(frame{typ: tHello, payload: body})...)
	select {
	case c.out <- b:
	case <-c.done:
	}
}

// handle dispatches one frame from the host.
func (c *conn) handle(f frame) {
	switch f.typ {
	case tPing:
		_ = c.enqueue(frame{typ: tPong, payload: f.payload}, nil)
	case tOpen:
		c.open(f.sid, string(f.payload))
	case tText, tBinary, tEOF:
		if s := c.session(f.sid); s != nil && !s.deliver(f) {
			s.fail("receive window exceeded")
		}
	case tCredit:
		if s := c.session(f.sid); s != nil && len(f.payload) == 4 {
			s.grant(int64(binary.BigEndian.Uint32(f.payload)))
		}
	case tAbort:
		if s := c.session(f.sid); s != nil {
			c.forget(s)
			s.abort()
		}
	}
}

func (c *conn) session(id uint32) *session {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.sessions[id]
}

func (c *conn) forget(s *session) {
	c.mu.Lock()
	if c.sessions[s.id] == s {
		delete(c.sessions, s.id)
	}
	c.mu.Unlock()
}

func (c *conn) open(id uint32, kind string) {
	handler, ok := handlers[kind]
	c.mu.Lock()
	_, dup := c.sessions[id]
	full := len(c.sessions) >= sessionsLimit
	var s *session
	if ok && !dup && !full {
		s = newSession(c, id)
		c.sessions[id] = s
	}
	c.mu.Unlock()
	switch {
	case !ok:
		_ = c.enqueue(frame{typ: tAbort, sid: id, payload: []byte("unknown session kind " + kind)}, nil)
		return
	case dup:
		return // a protocol error of the host's; the first session goes on
	case full:
		_ = c.enqueue(frame{typ: tAbort, sid: id, payload: []byte("too many sessions")}, nil)
		return
	}
	go func() {
		handler(s)
		c.forget(s)
		s.finish()
	}()
}

// session is one multiplexed stream; see docs/agent-protocol.md for the credit rules.
type session struct {
	c         *conn
	id        uint32
	in        chan frame
	mu        sync.Mutex
	cond      *sync.Cond
	credit    int64 // what this side may still send
	ungranted int64 // consumed from the host, not yet granted back
	closed    bool
	done      chan struct{}
	kill      func() // set by exec: kills the process group on abort
}

func newSession(c *conn, id uint32) *session {
	// Capacity: a full window of empty frames (each costs frameCost), plus an EOF.
	s := &session{c: c, id: id, in: make(chan frame, window/frameCost+2), credit: window,
		done: make(chan struct{})}
	s.cond = sync.NewCond(&s.mu)
	return s
}

func (s *session) deliver(f frame) bool {
	select {
	case s.in <- f:
		return true
	default:
		return false
	}
}

func (s *session) grant(n int64) {
	s.mu.Lock()
	s.credit += n
	s.mu.Unlock()
	s.cond.Broadcast()
}

// recv returns the next frame from the host, granting credit back as frames are consumed.
func (s *session) recv() (frame, error) {
	select {
	case f := <-s.in:
		if f.typ != tEOF {
			s.consumed(cost(len(f.payload)))
		}
		return f, nil
	case <-s.done:
		return frame{}, errClosed
	}
}

func (s *session) consumed(n int64) {
	s.mu.Lock()
	s.ungranted += n
	g := s.ungranted
	if g >= grantAt {
		s.ungranted = 0
	}
	s.mu.Unlock()
	if g >= grantAt {
		b := make([]byte, 4)
		binary.BigEndian.PutUint32(b, uint32(g))
		_ = s.c.enqueue(frame{typ: tCredit, sid: s.id, payload: b}, s.done)
	}
}

// send waits for credit, then queues one TEXT or BINARY frame.
func (s *session) send(typ byte, payload []byte) error {
	s.mu.Lock()
	for s.credit <= 0 && !s.closed {
		s.cond.Wait()
	}
	if s.closed {
		s.mu.Unlock()
		return errClosed
	}
	s.credit -= cost(len(payload))
	s.mu.Unlock()
	return s.c.enqueue(frame{typ: typ, sid: s.id, payload: payload}, s.done)
}

func (s *session) sendJSON(v any) error {
	b, _ := json.Marshal(v)
	return s.send(tText, b)
}

func (s *session) setKill(kill func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.kill = kill
	return true
}

// abort: the host gave up on the session or the conn ended; nothing more is sent.
func (s *session) abort() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	kill := s.kill
	close(s.done)
	s.mu.Unlock()
	s.cond.Broadcast()
	if kill != nil {
		kill()
	}
}

// fail ends a session with an error the host reports as AgentSessionClosed.
func (s *session) fail(reason string) {
	s.c.forget(s)
	_ = s.c.enqueue(frame{typ: tAbort, sid: s.id, payload: []byte(reason)}, nil)
	s.abort()
}

// finish: the handler is done; END tells the host no more frames follow.
func (s *session) finish() {
	s.mu.Lock()
	closed := s.closed
	s.mu.Unlock()
	if !closed {
		_ = s.c.enqueue(frame{typ: tEnd, sid: s.id}, nil)
		s.abort()
	}
}

var handlers = map[string]func(*session){
	"exec": handleExec,
	"cp":   handleCp,
	"stat": handleStat,
}
