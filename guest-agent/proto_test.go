package main

import (
	"bytes"
	"io"
	"testing"
)

func frames(t *testing.T, stream []byte) []frame {
	t.Helper()
	r := newReader(bytes.NewReader(stream))
	var out []frame
	for {
		f, err := r.next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, f)
	}
}

func TestFramesAfterTheMarker(t *testing.T) {
	var s []byte
	s = append(s, []byte("stale bytes of a cut frame")...)
	s = append(s, syncMarker...)
	s = append(s, encode(frame{typ: tHello, payload: []byte(`{"version":1}`)})...)
	s = append(s, encode(frame{typ: tText, sid: 7, payload: []byte(`{}`)})...)
	got := frames(t, s)
	if len(got) != 2 || got[0].typ != tHello || got[1].sid != 7 || string(got[1].payload) != "{}" {
		t.Fatalf("got %+v", got)
	}
}

func TestAMarkerMidStreamRealigns(t *testing.T) {
	var s []byte
	s = append(s, syncMarker...)
	s = append(s, encode(frame{typ: tBinary, sid: 1, payload: []byte("a")})...)
	s = append(s, 0xA9, tBinary, 0, 0) // a frame cut after 4 bytes of its header
	s = append(s, syncMarker...)
	s = append(s, encode(frame{typ: tHello, payload: []byte("x")})...)
	got := frames(t, s)
	if len(got) != 2 || got[1].typ != tHello {
		t.Fatalf("got %+v", got)
	}
}

func TestMergeEnvOverrides(t *testing.T) {
	env := mergeEnv([]string{"A=1", "PATH=/bin"}, map[string]string{"A": "2"})
	if lookupEnv(env, "A") != "2" || lookupEnv(env, "PATH") != "/bin" {
		t.Fatalf("got %v", env)
	}
}

func TestStatOfAMissingPath(t *testing.T) {
	info := statPath("/does/not/exist", false)
	if info.Exists || info.Error != nil {
		t.Fatalf("got %+v", info)
	}
}
