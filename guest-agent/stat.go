package main

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
)

// pathInfo is hypeman's PathInfo: every field is always present.
type pathInfo struct {
	Exists     bool    `json:"exists"`
	IsDir      bool    `json:"is_dir"`
	IsFile     bool    `json:"is_file"`
	IsSymlink  bool    `json:"is_symlink"`
	LinkTarget string  `json:"link_target"`
	Mode       uint32  `json:"mode"`
	Size       int64   `json:"size"`
	Error      *string `json:"error"`
}

func handleStat(s *session) {
	first, err := s.recv()
	if err != nil {
		return
	}
	var req struct {
		Path        string `json:"path"`
		FollowLinks bool   `json:"follow_links"`
	}
	if first.typ != tText || json.Unmarshal(first.payload, &req) != nil || req.Path == "" {
		_ = s.sendJSON(map[string]string{"error": "the first frame must be {\"path\":...} as JSON text"})
		return
	}
	_ = s.sendJSON(statPath(req.Path, req.FollowLinks))
}

func statPath(p string, follow bool) pathInfo {
	var st os.FileInfo
	var err error
	if follow {
		st, err = os.Stat(p)
	} else {
		st, err = os.Lstat(p)
	}
	if err != nil {
		info := pathInfo{}
		if !errors.Is(err, fs.ErrNotExist) {
			msg := unwrapPath(err).Error()
			info.Error = &msg
		}
		return info
	}
	info := pathInfo{Exists: true, IsDir: st.IsDir(), IsFile: st.Mode().IsRegular(),
		Mode: uint32(st.Mode().Perm()), Size: st.Size()}
	if st.Mode()&os.ModeSymlink != 0 {
		target, _ := os.Readlink(p)
		info.IsSymlink, info.LinkTarget, info.Mode, info.Size = true, target, 0o777, int64(len(target))
	}
	return info
}
