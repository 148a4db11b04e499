package main

import (
	"os"
	"strconv"
	"syscall"
)

// normalPriority puts every thread of the agent back at nice 0. The init starts the agent
// at a low priority (vmfleet-run exec -N), so that on a guest with one vCPU the app's own
// start comes first; once its channel is open the agent runs at the normal priority, and
// so do the commands it starts. On Linux a nice value is a thread's, hence each of them.
func normalPriority() {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return
	}
	for _, task := range tasks {
		if tid, err := strconv.Atoi(task.Name()); err == nil {
			_ = syscall.Setpriority(syscall.PRIO_PROCESS, tid, 0)
		}
	}
}
