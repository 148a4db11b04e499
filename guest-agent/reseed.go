package main

import (
	"encoding/hex"
	"fmt"
	"os"
	"syscall"
	"unsafe"
)

// The random driver's ioctls (linux/random.h).
const (
	rndAddEntropy = 0x40085203 // _IOW('R', 0x03, int[2])
	rndReseedCrng = 0x5207     // _IO('R', 0x07)
)

// reseed credits seedHex's bytes to the kernel's input pool and makes the kernel reseed its
// generator at once. A VM resumed from a saved memory image (a warm template, a fork) would
// otherwise draw the same numbers as every other VM resumed from it until the kernel's own
// next reseed; writing to /dev/urandom mixes bytes in but does not reseed.
func reseed(seedHex string) error {
	seed, err := hex.DecodeString(seedHex)
	if err != nil || len(seed) == 0 {
		return fmt.Errorf("the seed must be hex bytes")
	}
	dev, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer dev.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	info := make([]byte, 8+len(seed)+3)
	*(*int32)(unsafe.Pointer(&info[0])) = int32(8 * len(seed))
	*(*int32)(unsafe.Pointer(&info[4])) = int32(len(seed))
	copy(info[8:], seed)
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, dev.Fd(), rndAddEntropy, uintptr(unsafe.Pointer(&info[0]))); errno != 0 {
		return fmt.Errorf("RNDADDENTROPY: %v", errno)
	}
	if _, _, errno := syscall.Syscall(syscall.SYS_IOCTL, dev.Fd(), rndReseedCrng, 0); errno != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %v", errno)
	}
	return nil
}
