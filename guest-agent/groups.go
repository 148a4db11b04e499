package main

import (
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// groupLedger lists the process groups of the commands running now, in a file outside the
// app's root. An agent that is SIGKILLed cannot kill them itself; the init starts a new
// agent, which kills what the file lists before it serves, so a killed agent's sessions
// do not outlive it.
type groupLedger struct {
	mu     sync.Mutex
	f      *os.File // nil: no ledger (the -groups flag was not given)
	groups map[int]struct{}
}

var ledger = groupLedger{groups: map[int]struct{}{}}

// openLedger kills the groups a previous agent left in path, then keeps the file for this
// agent's own groups. It is called before the chroot, so path is in the init's root.
func openLedger(path string) error {
	old, err := os.ReadFile(path)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	killed := 0
	for _, field := range strings.Fields(string(old)) {
		if pgid, err := strconv.Atoi(field); err == nil && pgid > 1 {
			if syscall.Kill(-pgid, syscall.SIGKILL) == nil {
				killed++
			}
		}
	}
	if killed > 0 {
		fmt.Printf("[vmfleet] agent killed %d process group(s) a previous agent left running\n", killed)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC|syscall.O_CLOEXEC, 0o600)
	if err != nil {
		return err
	}
	ledger.f = f
	return nil
}

func (l *groupLedger) add(pgid int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.groups[pgid] = struct{}{}
	l.write()
}

func (l *groupLedger) remove(pgid int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.groups, pgid)
	l.write()
}

func (l *groupLedger) write() {
	if l.f == nil {
		return
	}
	ids := make([]int, 0, len(l.groups))
	for pgid := range l.groups {
		ids = append(ids, pgid)
	}
	sort.Ints(ids)
	var b strings.Builder
	for _, pgid := range ids {
		fmt.Fprintf(&b, "%d\n", pgid)
	}
	_ = l.f.Truncate(0)
	_, _ = l.f.WriteAt([]byte(b.String()), 0)
}
