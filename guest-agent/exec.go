package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// execRequest is hypeman's exec request (the first TEXT frame of the WebSocket).
type execRequest struct {
	Command []string          `json:"command"`
	TTY     bool              `json:"tty"`
	Env     map[string]string `json:"env"`
	Cwd     string            `json:"cwd"`
	Timeout int               `json:"timeout"`
	Rows    int               `json:"rows"`
	Cols    int               `json:"cols"`
}

type resizeRequest struct {
	Resize *struct {
		Rows int `json:"rows"`
		Cols int `json:"cols"`
	} `json:"resize"`
}

// exitTimedOut is what a command killed by its timeout reports: hypeman's observable value.
const exitTimedOut = -1

func handleExec(s *session) {
	first, err := s.recv()
	if err != nil {
		return
	}
	var req execRequest
	if first.typ != tText {
		_ = s.sendJSON(map[string]string{"error": "the first frame must be the request as JSON text"})
		return
	}
	if err := json.Unmarshal(first.payload, &req); err != nil {
		_ = s.sendJSON(map[string]string{"error": "invalid request JSON: " + err.Error()})
		return
	}
	if len(req.Command) == 0 {
		req.Command = []string{"/bin/sh"}
	}
	cmd, err := prepare(req)
	if err != nil {
		_ = s.send(tBinary, []byte("Error: "+err.Error()+"\r\n"))
		_ = s.sendJSON(map[string]int{"exitCode": 127})
		return
	}
	code := run(s, req, cmd)
	_ = s.sendJSON(map[string]int{"exitCode": code})
}

// prepare resolves the program and checks the cwd, so a missing one is exit 127 with an
// "Error: ..." line, as a shell would put it.
func prepare(req execRequest) (*exec.Cmd, error) {
	env := mergeEnv(os.Environ(), req.Env)
	if req.TTY && lookupEnv(env, "TERM") == "" {
		env = append(env, "TERM=xterm")
	}
	prog, err := lookPath(req.Command[0], lookupEnv(env, "PATH"))
	if err != nil {
		return nil, err
	}
	cwd := req.Cwd
	if cwd == "" {
		cwd = "/"
	}
	if st, err := os.Stat(cwd); err != nil {
		return nil, fmt.Errorf("cannot change to directory %s: %v", cwd, unwrap(err))
	} else if !st.IsDir() {
		return nil, fmt.Errorf("cannot change to directory %s: not a directory", cwd)
	}
	cmd := &exec.Cmd{Path: prog, Args: req.Command, Env: env, Dir: cwd}
	return cmd, nil
}

func unwrap(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func lookPath(name, path string) (string, error) {
	if strings.Contains(name, "/") {
		if err := executable(name); err != nil {
			return "", fmt.Errorf("%s: %v", name, err)
		}
		return name, nil
	}
	for _, dir := range filepath.SplitList(path) {
		if dir == "" {
			dir = "."
		}
		p := filepath.Join(dir, name)
		if executable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("%s: command not found", name)
}

func executable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return unwrap(err)
	}
	if st.IsDir() {
		return errors.New("is a directory")
	}
	if st.Mode()&0o111 == 0 {
		return errors.New("permission denied")
	}
	return nil
}

func mergeEnv(base []string, extra map[string]string) []string {
	out := make([]string, 0, len(base)+len(extra))
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if _, over := extra[k]; !over {
			out = append(out, kv)
		}
	}
	for k, v := range extra {
		out = append(out, k+"="+v)
	}
	return out
}

func lookupEnv(env []string, key string) string {
	for i := len(env) - 1; i >= 0; i-- {
		if k, v, ok := strings.Cut(env[i], "="); ok && k == key {
			return v
		}
	}
	return ""
}

// run starts the command in its own session (process group), streams its output, feeds
// its input, and returns the exit code. Abort and timeout kill the whole group.
func run(s *session, req execRequest, cmd *exec.Cmd) int {
	var output *os.File // what the command writes (pipe read end or PTY master)
	var input io.WriteCloser
	var term *os.File
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if req.TTY {
		master, slave, err := openPTY()
		if err != nil {
			_ = s.send(tBinary, []byte("Error: cannot open a terminal: "+err.Error()+"\r\n"))
			return 127
		}
		rows, cols := req.Rows, req.Cols
		if rows <= 0 || cols <= 0 {
			rows, cols = 24, 80
		}
		_ = setWinsize(master, rows, cols)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
		cmd.SysProcAttr.Setctty = true
		cmd.SysProcAttr.Ctty = 0
		output, input, term = master, master, master
		defer slave.Close()
	} else {
		r, w, err := os.Pipe()
		if err != nil {
			_ = s.send(tBinary, []byte("Error: "+err.Error()+"\r\n"))
			return 127
		}
		stdin, err := cmd.StdinPipe()
		if err != nil {
			_ = s.send(tBinary, []byte("Error: "+err.Error()+"\r\n"))
			return 127
		}
		cmd.Stdout, cmd.Stderr = w, w // one pipe: stdout and stderr in the order written
		output, input = r, stdin
		defer w.Close()
	}
	defer output.Close()
	if err := cmd.Start(); err != nil {
		_ = s.send(tBinary, []byte("Error: "+unwrap(err).Error()+"\r\n"))
		return 127
	}
	pid := cmd.Process.Pid
	ledger.add(pid)
	defer ledger.remove(pid)
	killGroup := func() { _ = syscall.Kill(-pid, syscall.SIGKILL) }
	if !s.setKill(killGroup) {
		killGroup()
	}
	// The parent's copies of the child's ends: EOF on output once the group has exited.
	if f, ok := cmd.Stdout.(*os.File); ok {
		f.Close()
	}
	var timedOut bool
	var tmu sync.Mutex
	if req.Timeout > 0 {
		timer := time.AfterFunc(time.Duration(req.Timeout)*time.Second, func() {
			tmu.Lock()
			timedOut = true
			tmu.Unlock()
			killGroup()
		})
		defer timer.Stop()
	}
	go feedInput(s, input, term)
	streamed := make(chan struct{})
	var exited atomic.Bool
	go func() {
		streamOutput(s, output, &exited)
		close(streamed)
	}()
	err := cmd.Wait()
	// Output still in the pipe is sent, however slowly the client reads it; but once the
	// pipe stays empty for drainIdle, a background process that keeps it open does not
	// hold the reply (hypeman's agent would wait for it).
	exited.Store(true)
	_ = output.SetReadDeadline(time.Now().Add(drainIdle))
	<-streamed
	tmu.Lock()
	defer tmu.Unlock()
	if timedOut {
		return exitTimedOut
	}
	return exitCode(cmd.ProcessState, err)
}

// drainIdle: after the command exited, how long the output may stay silent before the
// reply is sent without waiting for its end.
const drainIdle = 200 * time.Millisecond

func exitCode(st *os.ProcessState, err error) int {
	if st == nil {
		return 127
	}
	if ws, ok := st.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal()) // as a shell reports it
	}
	return st.ExitCode()
}

func streamOutput(s *session, output *os.File, exited *atomic.Bool) {
	buf := make([]byte, chunk)
	for {
		if exited.Load() {
			_ = output.SetReadDeadline(time.Now().Add(drainIdle))
		}
		n, err := output.Read(buf)
		if n > 0 {
			data := make([]byte, n)
			copy(data, buf[:n])
			if s.send(tBinary, data) != nil {
				return
			}
		}
		if err != nil {
			return // EOF, EIO (the PTY's last holder closed it), or the drain deadline
		}
	}
}

// feedInput writes BINARY frames to the command's stdin (consecutive frames are one byte
// stream), applies resizes to a TTY, and closes stdin at EOF (a TTY gets ^D).
func feedInput(s *session, input io.WriteCloser, term *os.File) {
	for {
		f, err := s.recv()
		if err != nil {
			if term == nil {
				input.Close()
			}
			return
		}
		switch f.typ {
		case tBinary:
			if _, err := input.Write(f.payload); err != nil {
				continue // the command stopped reading; keep draining so credit flows
			}
		case tText:
			var r resizeRequest
			if json.Unmarshal(f.payload, &r) == nil && r.Resize != nil {
				if term != nil && r.Resize.Rows > 0 && r.Resize.Cols > 0 {
					_ = setWinsize(term, r.Resize.Rows, r.Resize.Cols)
				}
				continue // a resize of a session without a TTY changes nothing
			}
			_, _ = input.Write(f.payload)
		case tEOF:
			if term != nil {
				_, _ = term.Write([]byte{4})
			} else {
				input.Close()
			}
		}
	}
}
