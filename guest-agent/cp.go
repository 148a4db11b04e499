package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"syscall"
)

// cpRequest is hypeman's cp request: direction "to" (one entry) or "from" (a tree).
type cpRequest struct {
	Direction  string `json:"direction"`
	GuestPath  string `json:"guest_path"`
	IsDir      bool   `json:"is_dir"`
	Mode       uint32 `json:"mode"`
	UID        *int   `json:"uid"`
	GID        *int   `json:"gid"`
	FollowLink bool   `json:"follow_links"`
}

func cpError(s *session, msg, path string) {
	e := map[string]string{"type": "error", "message": msg}
	if path != "" {
		e["path"] = path
	}
	_ = s.sendJSON(e)
}

func handleCp(s *session) {
	first, err := s.recv()
	if err != nil {
		return
	}
	var req cpRequest
	if first.typ != tText || json.Unmarshal(first.payload, &req) != nil {
		cpError(s, "the first frame must be the cp request as JSON text", "")
		return
	}
	if req.GuestPath == "" {
		cpError(s, "guest_path is required", "")
		return
	}
	switch req.Direction {
	case "to":
		copyTo(s, req)
	case "from":
		copyFrom(s, req)
	default:
		cpError(s, fmt.Sprintf("unknown direction %q", req.Direction), "")
	}
}

// --- to the guest: one entry per session ---------------------------------------------------

func copyTo(s *session, req cpRequest) {
	var written int64
	var err error
	if req.IsDir {
		err = makeDir(req)
		if err == nil {
			err = drainUntilEnd(s, nil, &written)
		}
	} else {
		err = writeFile(s, req, &written)
	}
	if errors.Is(err, errClosed) {
		return
	}
	res := map[string]any{"type": "result", "success": err == nil}
	if err != nil {
		res["error"] = err.Error()
	}
	if written > 0 {
		res["bytes_written"] = written
	}
	_ = s.sendJSON(res)
}

func makeDir(req cpRequest) error {
	mode := os.FileMode(req.Mode & 0o7777)
	if mode == 0 {
		mode = 0o755
	}
	if st, err := os.Lstat(req.GuestPath); err == nil && !st.IsDir() {
		return fmt.Errorf("%s exists and is not a directory", req.GuestPath)
	}
	if err := os.MkdirAll(req.GuestPath, mode&0o777); err != nil {
		return unwrapPath(err)
	}
	if err := chmod(req.GuestPath, mode); err != nil {
		return err
	}
	return chownIfAsked(req)
}

func writeFile(s *session, req cpRequest, written *int64) error {
	mode := os.FileMode(req.Mode & 0o7777)
	if mode == 0 {
		mode = 0o644
	}
	var failure error
	if st, err := os.Stat(req.GuestPath); err == nil && st.IsDir() {
		failure = fmt.Errorf("%s is a directory", req.GuestPath)
	} else if err := os.MkdirAll(filepath.Dir(req.GuestPath), 0o755); err != nil {
		failure = unwrapPath(err)
	}
	var f *os.File
	if failure == nil {
		var err error
		f, err = os.OpenFile(req.GuestPath, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode&0o777)
		if err != nil {
			failure = unwrapPath(err)
		}
	}
	// The data is read to its end even after a failure, so the reply follows the "end".
	err := drainUntilEnd(s, f, written)
	if f != nil {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if failure != nil {
		return failure
	}
	if err != nil {
		return err
	}
	if err := chmod(req.GuestPath, mode); err != nil {
		return err
	}
	return chownIfAsked(req)
}

// chmod sets all twelve mode bits (os.FileMode would drop setuid, setgid and sticky given as
// raw bits, as hypeman's numbers are).
func chmod(path string, mode os.FileMode) error {
	if err := syscall.Chmod(path, uint32(mode)); err != nil {
		return fmt.Errorf("%s: %v", path, err)
	}
	return nil
}

func chownIfAsked(req cpRequest) error {
	if req.UID == nil || req.GID == nil || (*req.UID <= 0 && *req.GID <= 0) {
		return nil
	}
	return unwrapPath(os.Lchown(req.GuestPath, *req.UID, *req.GID))
}

func unwrapPath(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return fmt.Errorf("%s: %v", pe.Path, pe.Err)
	}
	return err
}

// drainUntilEnd writes BINARY frames to w (when not nil) until {"type":"end"}.
func drainUntilEnd(s *session, w io.Writer, written *int64) error {
	var werr error
	for {
		f, err := s.recv()
		if err != nil {
			return errClosed
		}
		switch f.typ {
		case tBinary:
			if w != nil && werr == nil {
				n, err := w.Write(f.payload)
				*written += int64(n)
				werr = unwrapPath(err)
			}
		case tText:
			var m struct {
				Type string `json:"type"`
			}
			if json.Unmarshal(f.payload, &m) == nil && m.Type == "end" {
				return werr
			}
			// Any other text frame is ignored, as hypeman does.
		case tEOF:
			return werr
		}
	}
}

// --- from the guest: a whole tree in one session -------------------------------------------

type header struct {
	Type       string `json:"type"`
	Path       string `json:"path"`
	Mode       uint32 `json:"mode"`
	IsDir      bool   `json:"is_dir"`
	IsSymlink  bool   `json:"is_symlink,omitempty"`
	LinkTarget string `json:"link_target,omitempty"`
	Size       int64  `json:"size"`
	Mtime      int64  `json:"mtime"`
	UID        int    `json:"uid,omitempty"`
	GID        int    `json:"gid,omitempty"`
}

type walker struct {
	s      *session
	follow bool
	// The previous entry's end is held back: only the last one carries final:true.
	pending bool
}

var errStop = errors.New("stop")

func copyFrom(s *session, req cpRequest) {
	w := &walker{s: s, follow: req.FollowLink}
	root := filepath.Clean(req.GuestPath)
	name := filepath.Base(root)
	if name == "/" || name == "." {
		name = "root"
	}
	st, err := w.stat(root)
	if err != nil {
		cpError(s, unwrapPath(err).Error(), req.GuestPath)
		return
	}
	if err := w.entry(root, name, st, true); err != nil {
		return
	}
	if w.pending {
		_ = s.sendJSON(map[string]any{"type": "end", "final": true})
	}
}

func (w *walker) stat(p string) (os.FileInfo, error) {
	if w.follow {
		return os.Stat(p)
	}
	return os.Lstat(p)
}

func (w *walker) flushEnd() error {
	if !w.pending {
		return nil
	}
	w.pending = false
	return w.s.sendJSON(map[string]any{"type": "end", "final": false})
}

func (w *walker) entry(p, rel string, st os.FileInfo, top bool) error {
	if err := w.flushEnd(); err != nil {
		return err
	}
	h := header{Type: "header", Path: rel, Mode: uint32(st.Mode().Perm()), Mtime: st.ModTime().Unix()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		h.UID, h.GID = int(sys.Uid), int(sys.Gid)
	}
	switch {
	case st.Mode()&os.ModeSymlink != 0:
		target, err := os.Readlink(p)
		if err != nil {
			cpError(w.s, unwrapPath(err).Error(), p)
			return errStop
		}
		h.IsSymlink, h.LinkTarget, h.Size = true, target, int64(len(target))
	case st.IsDir():
		h.IsDir = true
	case st.Mode().IsRegular():
		h.Size = st.Size()
	default:
		return nil // devices, sockets, fifos: not copied
	}
	if err := w.s.sendJSON(h); err != nil {
		return err
	}
	if h.Size > 0 && !h.IsSymlink {
		if err := w.sendData(p, h.Size); err != nil {
			return err
		}
	}
	w.pending = true
	if !h.IsDir {
		return nil
	}
	if !top {
		// A directory reached through a followed symlink is not descended into (loops).
		if lst, err := os.Lstat(p); err == nil && lst.Mode()&os.ModeSymlink != 0 {
			return nil
		}
	}
	return w.children(p, rel)
}

func (w *walker) children(dir, rel string) error {
	d, err := os.Open(dir)
	if err != nil {
		cpError(w.s, unwrapPath(err).Error(), dir)
		return errStop
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		cpError(w.s, unwrapPath(err).Error(), dir)
		return errStop
	}
	sort.Strings(names)
	for _, name := range names {
		p := filepath.Join(dir, name)
		st, err := w.stat(p)
		if err != nil {
			cpError(w.s, unwrapPath(err).Error(), p)
			return errStop
		}
		if err := w.entry(p, rel+"/"+name, st, false); err != nil {
			return err
		}
	}
	return nil
}

// sendData sends exactly size bytes of the file in chunks; a file that shrank meanwhile
// is an error (the header promised size bytes), one that grew is cut at size.
func (w *walker) sendData(p string, size int64) error {
	f, err := os.Open(p)
	if err != nil {
		cpError(w.s, unwrapPath(err).Error(), p)
		return errStop
	}
	defer f.Close()
	left := size
	for left > 0 {
		n := int64(chunk)
		if left < n {
			n = left
		}
		buf := make([]byte, n)
		got, err := io.ReadFull(f, buf)
		if got > 0 {
			if serr := w.s.send(tBinary, buf[:got]); serr != nil {
				return serr
			}
			left -= int64(got)
		}
		if err != nil {
			cpError(w.s, fmt.Sprintf("file changed size while being copied (%d of %d bytes read)", size-left, size), p)
			return errStop
		}
	}
	return nil
}
