// vmfleet-agent: the agent inside every vmfleet guest. It runs commands, copies files and
// answers stat for the host, over one framed, multiplexed channel (docs/agent-protocol.md):
// a virtio-serial port named vmfleet.agent (QEMU) or a vsock port (Cloud Hypervisor).
// It is never a network service.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const portName = "vmfleet.agent"

func main() {
	root := flag.String("root", "", "chroot into this directory once the channel is open")
	channel := flag.String("channel", "virtio", "virtio (a virtio-serial port named "+portName+") or vsock")
	vsockPort := flag.Uint("vsock-port", 5170, "the vsock port to listen on (-channel vsock)")
	wait := flag.Duration("wait", 30*time.Second, "how long to wait for the channel's device")
	groups := flag.String("groups", "", "a file (outside -root) listing the commands' process groups; a new agent kills those an old one left")
	reseedHex := flag.String("reseed", "", "credit these hex bytes to the kernel's RNG, reseed it and exit (the init, after a resume)")
	flag.Parse()
	if *reseedHex != "" {
		if err := reseed(*reseedHex); err != nil {
			fatal(err)
		}
		return
	}
	if *groups != "" {
		if err := openLedger(*groups); err != nil {
			fmt.Fprintf(os.Stderr, "[vmfleet] agent: no process-group ledger: %v\n", err)
		}
	}

	var serve func()
	switch *channel {
	case "virtio":
		dev, err := findPort(*wait)
		if err != nil {
			fatal(err)
		}
		f, err := os.OpenFile(dev, os.O_RDWR, 0)
		if err != nil {
			fatal(err)
		}
		serve = func() { serveStream(f) }
	case "vsock":
		fd, err := listenVsock(uint32(*vsockPort), *wait)
		if err != nil {
			fatal(err)
		}
		serve = func() { serveVsock(fd) }
	default:
		// unix:PATH: a unix socket served like vsock (the host's tests, without a guest).
		path := strings.TrimPrefix(*channel, "unix:")
		if path == *channel {
			fatal(fmt.Errorf("unknown channel %q", *channel))
		}
		fd, err := listenUnix(path)
		if err != nil {
			fatal(err)
		}
		serve = func() { serveVsock(fd) }
	}
	normalPriority()
	if *root != "" {
		if err := syscall.Chroot(*root); err != nil {
			fatal(fmt.Errorf("chroot %s: %v", *root, err))
		}
		if err := os.Chdir("/"); err != nil {
			fatal(err)
		}
	}
	fmt.Printf("[vmfleet] agent ready channel=%s pid=%d\n", *channel, os.Getpid())
	serve()
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "[vmfleet] agent failed: %v\n", err)
	os.Exit(1)
}

// findPort waits for the virtio-serial port named vmfleet.agent (virtio_console makes it
// shortly after it is loaded) and returns its /dev node.
func findPort(wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		names, _ := filepath.Glob("/sys/class/virtio-ports/*/name")
		for _, n := range names {
			b, err := os.ReadFile(n)
			if err == nil && strings.TrimSpace(string(b)) == portName {
				dev := "/dev/" + filepath.Base(filepath.Dir(n))
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %s", portName)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// serveStream serves a virtio-serial port: one transport for the VM's whole life. Reads
// fail while no host is connected; a HELLO from the host starts a new conn.
func serveStream(f *os.File) {
	serveFrames(f, func(r *reader) bool {
		r.reset()
		time.Sleep(100 * time.Millisecond)
		return true
	})
}

// serveConn serves one vsock connection until it ends.
func serveConn(f io.ReadWriteCloser) {
	defer f.Close()
	serveFrames(f, func(*reader) bool { return false })
}

// serveFrames hands the frames read from one transport to the conn the latest HELLO
// opened. When a read fails, the host is gone and its sessions go with it; retry says
// whether the transport outlives its host (a port) or ends with it (a connection).
func serveFrames(f io.ReadWriter, retry func(*reader) bool) {
	var wmu sync.Mutex
	r := newReader(f)
	var c *conn
	defer func() {
		if c != nil {
			c.close()
		}
	}()
	for {
		fr, err := r.next()
		if err != nil {
			if c != nil {
				c.close()
				c = nil
			}
			if !retry(r) {
				return
			}
			continue
		}
		if fr.typ == tHello {
			if c != nil {
				c.close()
			}
			c = newConn(f, &wmu)
			c.hello(fr.payload)
			continue
		}
		if c != nil {
			c.handle(fr)
		}
	}
}

func listenUnix(path string) (int, error) {
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	if err := syscall.Bind(fd, &syscall.SockaddrUnix{Name: path}); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	if err := syscall.Listen(fd, 4); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	return fd, nil
}

// --- vsock (Cloud Hypervisor): the standard library has no AF_VSOCK sockaddr ---------------

const afVsock = 40

type sockaddrVM struct {
	Family    uint16
	Reserved1 uint16
	Port      uint32
	CID       uint32
	Flags     uint8
	Zero      [3]uint8
}

func listenVsock(port uint32, wait time.Duration) (int, error) {
	deadline := time.Now().Add(wait)
	for {
		fd, err := bindVsock(port)
		if err == nil {
			return fd, nil
		}
		if time.Now().After(deadline) {
			return -1, fmt.Errorf("vsock port %d: %v", port, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func bindVsock(port uint32) (int, error) {
	fd, err := syscall.Socket(afVsock, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	sa := sockaddrVM{Family: afVsock, Port: port, CID: 0xFFFFFFFF} // VMADDR_CID_ANY
	_, _, errno := syscall.Syscall(syscall.SYS_BIND, uintptr(fd), uintptr(unsafe.Pointer(&sa)), unsafe.Sizeof(sa))
	if errno != 0 {
		syscall.Close(fd)
		return -1, errno
	}
	if err := syscall.Listen(fd, 4); err != nil {
		syscall.Close(fd)
		return -1, err
	}
	return fd, nil
}

// serveVsock accepts host connections (vsock, or unix for tests); a new one replaces the previous (whose sessions end).
func serveVsock(lfd int) {
	var mu sync.Mutex
	var current *os.File
	for {
		nfd, _, errno := syscall.Syscall6(syscall.SYS_ACCEPT4, uintptr(lfd), 0, 0, syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, 0, 0)
		if errno != 0 {
			if errno == syscall.EINTR || errno == syscall.ECONNABORTED {
				continue
			}
			time.Sleep(100 * time.Millisecond)
			continue
		}
		f := os.NewFile(nfd, "vsock")
		mu.Lock()
		if current != nil {
			current.Close()
		}
		current = f
		mu.Unlock()
		go serveConn(f)
	}
}
