#!/bin/sh
# vmfleet guest init: PID 1 of the initrd (busybox ash; every applet is linked in /bin).
#
#   /init                    boot: modules, disks, overlay root, config, volumes, network, app
#   /init --shutdown <s>     graceful stop (SIGTERM, wait <s> seconds, SIGKILL), sync, poweroff -f
#   /init --udhcpc <event>   udhcpc lease handler
#
# Disks: vda image (ext4, ro), vdb overlay (ext4, rw), vdc config (ext4, ro: config.sh, env.sh,
# config.json), vdd.. volumes. Console: ttyS0 (= app.log). Control channel: vmfleet.ctl= on the
# kernel command line (ttyS1 under QEMU, the virtio console hvc0 under Cloud Hypervisor), one
# reply line per command line:
#   ping [token]                 -> pong [token]   (the token tells whose ping this answers)
#   status                       -> booting | running <pid> | exited <code> | failed <message>
#   shutdown <timeout_s>         -> ok, then the VM powers off
#   mount <dev> <path> <rw|ro>   -> ok | err <message>   (also: mount <dev> <path> overlay <dev2>)
#   umount <path>                -> ok | err <message>
#   identity <epoch> <seed_hex> <mac|-> <hostname> <off|dhcp|static> [ip cidr gw [dns..]]
#                                -> ok | err <message>   (a resumed VM's new identity)
#   zerofree                     -> ok   (a template before it is saved: free memory zeroed)
# Markers on the console: "[vmfleet] app started pid=N", "[vmfleet] app exited with code N",
# then (unless a stop caused the exit) 'HYPEMAN-EXIT code=N message="..."' before the VM powers
# off, and "[vmfleet] agent ready ..." (from the agent, docs/agent-protocol.md).
#
# Every process costs a boot under emulation ~10 ms: the init reads what it can with the
# shell itself, and starts the app, the agent and the network with its helper
# (/bin/vmfleet-run, guest-run/vmfleet-run.c) in one process each, busybox's chain of them
# only when the initrd or the config disk predate the helper.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
RUN=/run/vmfleet
NEWROOT=/newroot
CFG=/cfg
CTL=/dev/ttyS1
CONSOLE=/dev/ttyS0
[ -c "$CONSOLE" ] || CONSOLE=/dev/console
RUNNER=/bin/vmfleet-run
APP_STARTED=/etc/vmfleet/app-started
#: The nice value of what the app's start does not wait for (the agent, its port's module).
LATER_NICE=10

log() { # log LEVEL PHASE MESSAGE...
	_lvl=$1 _phase=$2
	shift 2
	if ! utc_now; then
		printf '%s [%s] [%s] %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$_lvl" "$_phase" "$*" >"$CONSOLE"
		return
	fi
	printf '%04d-%02d-%02dT%02d:%02d:%02dZ [%s] [%s] %s\n' "$_y" "$_m" "$_d" \
		$((_sod / 3600)) $((_sod % 3600 / 60)) $((_sod % 60)) "$_lvl" "$_phase" "$*" >"$CONSOLE"
}

# utc_now: today's UTC date in $_y $_m $_d and the second of the day in $_sod, computed by
# the shell itself: a `date` process per log line costs the boot more than the line is
# worth under emulation. Days to a civil date: H. Hinnant's algorithm. Fails without
# $EPOCHSECONDS (a busybox too old for it).
utc_now() {
	_t=${EPOCHSECONDS:-}
	[ -n "$_t" ] || return 1
	_z=$((_t / 86400 + 719468)) _sod=$((_t % 86400))
	_era=$((_z / 146097))
	_doe=$((_z - _era * 146097))
	_yoe=$(((_doe - _doe / 1460 + _doe / 36524 - _doe / 146096) / 365))
	_doy=$((_doe - (365 * _yoe + _yoe / 4 - _yoe / 100)))
	_mp=$(((5 * _doy + 2) / 153))
	_d=$((_doy - (153 * _mp + 2) / 5 + 1))
	_m=$((_mp < 10 ? _mp + 3 : _mp - 9))
	_y=$((_yoe + _era * 400 + (_m <= 2)))
}

uptime_s() { read -r _up _ </proc/uptime && echo "$_up"; }

# dev_by_serial SERIAL: the /dev/vdX whose virtio serial is SERIAL (empty if none yet).
# The host names volume disks by serial because vdX letters follow plug order.
dev_by_serial() {
	# The control loop runs with globbing off (set -f); this needs it on.
	case $- in *f*) _noglob=1 ;; *) _noglob= ;; esac
	set +f
	_found=
	for _s in /sys/block/vd*/serial; do
		[ -f "$_s" ] || continue
		if [ "$(cat "$_s")" = "$1" ]; then
			_d=${_s%/serial}
			_found=/dev/${_d##*/}
			break
		fi
	done
	[ -n "$_noglob" ] && set -f
	[ -n "$_found" ] && echo "$_found"
}

# wait_dev DEVICE SECONDS: wait for a block device node (hot-plug takes about 2 s under TCG).
# DEVICE is /dev/vdX or serial:NAME; the resolved node is left in $WAITED_DEV.
wait_dev() {
	_n=$(($2 * 20))
	while :; do
		case $1 in
		serial:*) WAITED_DEV=$(dev_by_serial "${1#serial:}") ;;
		*) WAITED_DEV=$1 ;;
		esac
		[ -n "$WAITED_DEV" ] && [ -b "$WAITED_DEV" ] && return 0
		[ "$_n" -gt 0 ] || return 1
		_n=$((_n - 1))
		sleep 0.05
	done
}

# wait_char DEVICE SECONDS: wait for a character device node (a console made by a module).
wait_char() {
	_n=$(($2 * 20))
	while [ ! -c "$1" ]; do
		[ "$_n" -gt 0 ] || return 1
		_n=$((_n - 1))
		sleep 0.05
	done
}

# --- graceful stop ------------------------------------------------------------------------------

# stop_app TIMEOUT: SIGTERM the app, wait up to TIMEOUT s for it to exit, then SIGKILL; sync.
stop_app() {
	_t=${1:-10}
	: >"$RUN/stopping" # the app's exit is the stop's: no exit marker, no power-off of its own
	case $_t in '' | *[!0-9]*) _t=10 ;; esac
	_pid=$(cat "$RUN/app.pid" 2>/dev/null)
	if [ -n "$_pid" ] && [ ! -e "$RUN/app.exit" ]; then
		log INFO shutdown "sending SIGTERM to app pid=$_pid (timeout ${_t}s)"
		kill -TERM "$_pid" 2>/dev/null
		_n=$((_t * 10))
		while [ ! -e "$RUN/app.exit" ] && [ "$_n" -gt 0 ]; do
			sleep 0.1
			_n=$((_n - 1))
		done
		if [ ! -e "$RUN/app.exit" ]; then
			log WARN shutdown "app did not exit within ${_t}s; sending SIGKILL"
			kill -KILL "-$_pid" 2>/dev/null
			kill -KILL "$_pid" 2>/dev/null
			_n=20
			while [ ! -e "$RUN/app.exit" ] && [ "$_n" -gt 0 ]; do
				sleep 0.1
				_n=$((_n - 1))
			done
		fi
	fi
	sync
	log INFO shutdown "powering off"
}

# --- volumes ------------------------------------------------------------------------------------

vol_key() { printf '%s' "$1" | md5sum | cut -c1-32; }

# mount_volume DEV PATH MODE [OVERLAY_DEV]: prints an error message and fails on error.
mount_volume() {
	_dev=$1 _path=$2 _mode=$3 _ovl=$4
	case $_path in /*) ;; *) echo "path $_path is not absolute"; return 1 ;; esac
	wait_dev "$_dev" 20 || { echo "device $_dev did not appear within 20s"; return 1; }
	_dev=$WAITED_DEV
	_target=$NEWROOT$_path
	mkdir -p "$_target" 2>&1 || return 1
	case $_mode in
	rw) mount -t ext4 "$_dev" "$_target" 2>&1 || return 1 ;;
	ro) mount -t ext4 -o ro,noload "$_dev" "$_target" 2>&1 || return 1 ;;
	overlay)
		[ -n "$_ovl" ] || { echo "overlay mode needs an overlay device"; return 1; }
		wait_dev "$_ovl" 20 || { echo "device $_ovl did not appear within 20s"; return 1; }
		_ovl=$WAITED_DEV
		_name=${_dev##*/}
		_base=/mnt/vol-base-$_name
		_up=/mnt/vol-overlay-$_name
		mkdir -p "$_base" "$_up"
		mount -t ext4 -o ro,noload "$_dev" "$_base" 2>&1 || return 1
		if ! mount -t ext4 "$_ovl" "$_up" 2>&1; then umount "$_base"; return 1; fi
		mkdir -p "$_up/upper" "$_up/work"
		if ! mount -t overlay -o "lowerdir=$_base,upperdir=$_up/upper,workdir=$_up/work" \
			overlay "$_target" 2>&1; then
			umount "$_up"
			umount "$_base"
			return 1
		fi
		mkdir -p "$RUN/vols"
		echo "$_up $_base" >"$RUN/vols/$(vol_key "$_path")"
		;;
	*) echo "unknown mode $_mode"; return 1 ;;
	esac
}

# umount_volume PATH
umount_volume() {
	case $1 in /*) ;; *) echo "path $1 is not absolute"; return 1 ;; esac
	sync
	umount "$NEWROOT$1" 2>&1 || return 1
	_rec=$RUN/vols/$(vol_key "$1")
	if [ -f "$_rec" ]; then
		read -r _up _base <"$_rec"
		umount "$_up" 2>&1 || return 1
		umount "$_base" 2>&1 || return 1
		rm -f "$_rec"
	fi
}

# --- a resumed VM's new identity (worker/resume.py) -----------------------------------------------

# A template's init waits here, before it touches any disk, for the instance it becomes;
# a cold boot (no vmfleet.wait=1) goes straight on.
wait_for_instance() {
	[ "$WAIT_CONFIG" = 1 ] || return 0
	rm -f "$RUN/go"
	mkfifo "$RUN/go" || fatal template "cannot make $RUN/go"
	: >"$RUN/waiting"
	log INFO template "waiting for the instance config at $(uptime_s)s"
	read -r _ <"$RUN/go"
	rm -f "$RUN/go"
	log INFO template "instance config given at $(uptime_s)s"
}

# zero_free_memory: before a template is saved, fill the free memory with zeros and give it
# back (a tmpfs file of /dev/zero, then removed): pages the kernel freed keep their old bytes
# (the initrd's cpio, init sections), and a saved VM carries only the pages that are not
# zero, so every resume of the template loads less. Leaves 16 MiB free, fills 512 MiB at most.
zero_free_memory() {
	_kb=$(sed -n 's/^MemAvailable: *\([0-9]*\) kB/\1/p' /proc/meminfo)
	_kb=$((_kb - 16384))
	[ "$_kb" -gt 0 ] || return 0
	# Freed pages are handed out again first: 512 MiB of zeros covers them, and a large
	# shape's build does not make its VMM take all of the guest's memory on the host.
	[ "$_kb" -le 524288 ] || _kb=524288
	echo 3 >/proc/sys/vm/drop_caches
	mkdir -p /run/zero
	mount -t tmpfs -o "size=${_kb}k" zero /run/zero || return 1
	dd if=/dev/zero of=/run/zero/fill bs=1M 2>/dev/null
	rm -f /run/zero/fill
	umount /run/zero
}

# reseed_rng SEED_HEX: credited to the kernel's pool, and the generator reseeded; by the
# initrd's helper, as a template's resume comes before any disk is mounted.
reseed_rng() {
	if [ -x "$RUNNER" ]; then
		"$RUNNER" reseed "$1" >/dev/null 2>&1 || log WARN identity "RNG not reseeded"
	elif [ -x "$AGENT" ]; then
		"$AGENT" -reseed "$1" >/dev/null 2>&1 || log WARN identity "RNG not reseeded"
	fi
}

first_nic() { # the first network interface but lo, into $NIC (empty: none); no subshell
	NIC=
	for _p in /sys/class/net/*; do
		[ "${_p##*/}" = lo ] || [ ! -e "$_p" ] || { NIC=${_p##*/}; return 0; }
	done
}

# take_identity EPOCH SEED_HEX MAC|- HOSTNAME off|dhcp|static [IP CIDR GW|- [DNS...]]
# The clock, randomness for the RNG, the NIC's MAC; disks read afresh. An init waiting for
# its config then boots on (config.sh gives hostname and network); a running guest (a fork)
# takes hostname and network here.
take_identity() {
	set +f # the control loop reads with globbing off; these globs need it
	_take_identity "$@"
	_rc=$?
	set -f
	return $_rc
}

_take_identity() {
	[ $# -ge 5 ] || { echo "usage: identity EPOCH SEED MAC HOSTNAME MODE [IP CIDR GW [DNS...]]"; return 1; }
	date -u -s "@$1" >/dev/null 2>&1 || { echo "bad time $1"; return 1; }
	# Mixed into the input pool (as hex: the same entropy, and no process to start under
	# a slow CPU), so two VMs resumed from one memory image do not draw the same numbers.
	printf '%s' "$2" >/dev/urandom || { echo "cannot seed the RNG"; return 1; }
	# ... and reseed now, before the answer: the kernel's own next reseed may be a minute
	# away.
	reseed_rng "$2"
	first_nic
	_nic=$NIC
	if [ "$3" != - ] && [ -n "$_nic" ]; then
		ip link set dev "$_nic" address "$3" || { echo "cannot set MAC $3 on $_nic"; return 1; }
	fi
	if [ -e "$RUN/waiting" ]; then
		# Sectors the template read while it booted may be cached (block devices' page
		# cache included); they belong to other files now. Nothing is mounted yet. (A
		# running guest's cache matches its disks: a fork's are copies of what it had.)
		echo 3 >/proc/sys/vm/drop_caches
		rm -f "$RUN/waiting"
		echo go >"$RUN/go"
		return 0
	fi
	_host=$4 _mode=$5
	shift 5
	[ "$_host" = - ] || hostname "$_host"
	VMFLEET_HOSTNAME=$_host
	[ -n "$_nic" ] || return 0
	case $_mode in
	static)
		ip addr flush dev "$_nic"
		ip addr add "$1/$2" dev "$_nic" || { echo "cannot set address $1/$2"; return 1; }
		[ "$3" = - ] || ip route replace default via "$3" dev "$_nic"
		write_hosts "$1"
		shift 3
		write_resolv "$@"
		;;
	dhcp)
		[ -f "$RUN/udhcpc.pid" ] && kill -USR1 "$(cat "$RUN/udhcpc.pid")" 2>/dev/null
		write_hosts 127.0.1.1
		;;
	esac
	return 0
}

# --- control channel (ttyS1 or hvc0) ------------------------------------------------------------

status_line() {
	if [ -e "$RUN/app.exit" ]; then
		echo "exited $(cat "$RUN/app.exit")"
	elif [ -e "$RUN/failed" ]; then
		echo "failed $(head -n 1 "$RUN/failed")"
	elif [ -e "$RUN/app.pid" ]; then
		echo "running $(cat "$RUN/app.pid")"
	elif [ -e "$RUN/waiting" ]; then
		echo waiting
	else
		echo booting
	fi
}

oneline() { tr '\n\r' '  ' | sed 's/ *$//'; }

control_loop() {
	set -f
	_cr=$(printf '\r')
	stty -F "$CTL" raw -echo 2>/dev/null
	exec 3<>"$CTL"
	while :; do
		if ! IFS= read -r _line <&3; then
			sleep 1
			continue
		fi
		_line=${_line%"$_cr"}
		# shellcheck disable=SC2086
		set -- $_line
		case $1 in
		'') continue ;;
		ping) _reply="pong${2:+ $2}" ;;
		settime)
			# The guest clock stood still during standby; the host sends the time after restore.
			if date -u -s "@$2" >/dev/null 2>&1; then _reply=ok; else _reply="err bad time $2"; fi
			;;
		status) _reply=$(status_line) ;;
		zerofree)
			if _out=$(zero_free_memory 2>&1); then _reply=ok; else _reply="err $(echo "$_out" | oneline)"; fi
			;;
		identity)
			shift
			if _out=$(take_identity "$@" 2>&1); then _reply=ok; else _reply="err $(echo "$_out" | oneline)"; fi
			;;
		shutdown)
			stop_app "$2"
			printf 'ok\n' >&3
			exec 3>&- # the last close waits until the reply has left the UART
			poweroff -f
			sleep 5
			continue
			;;
		mount)
			if [ $# -lt 4 ]; then
				_reply="err usage: mount <dev> <path> <rw|ro|overlay> [overlay_dev]"
			elif _out=$(mount_volume "$2" "$3" "$4" "$5"); then
				_reply=ok
				log INFO volumes "mounted $2 at $3 ($4)"
			else
				_reply="err $(echo "${_out:-mount failed}" | oneline)"
			fi
			;;
		umount)
			if [ $# -lt 2 ]; then
				_reply="err usage: umount <path>"
			elif _out=$(umount_volume "$2"); then
				_reply=ok
				log INFO volumes "unmounted $2"
			else
				_reply="err $(echo "${_out:-umount failed}" | oneline)"
			fi
			;;
		*) _reply="err unknown command $1" ;;
		esac
		printf '%s\n' "$_reply" >&3
	done
}

# --- boot ---------------------------------------------------------------------------------------

park() { while :; do sleep 3600; done; }

# sysinit: /proc, /sys, /dev and its subdirectories (the initrd's fstabs), the /dev links,
# plain \n on the console (app.log): one process of the helper; with busybox, one process
# per step when the initrd has no helper or it failed.
sysinit() {
	if [ -x "$RUNNER" ] && "$RUNNER" mount -l /etc/vmfleet/dev -c "$CONSOLE" \
		/etc/vmfleet/fstab.sys /etc/vmfleet/fstab.dev; then
		return 0
	fi
	mount -a -T /etc/vmfleet/fstab.sys 2>/dev/null
	mkdir -p /dev/pts /dev/shm "$RUN"
	mount -a -T /etc/vmfleet/fstab.dev
	cp -a /etc/vmfleet/dev/fd /etc/vmfleet/dev/stdin /etc/vmfleet/dev/stdout \
		/etc/vmfleet/dev/stderr /dev/
	stty -F "$CONSOLE" -onlcr 2>/dev/null
}

fatal() { # fatal PHASE MESSAGE: keep the VM up so the control channel can report and stop it
	log ERROR "$1" "$2"
	echo "$2" >"$RUN/failed"
	park
}

# virtio_devices: the device ids of the VM's virtio PCI devices, into $VIRTIO_DEVICES.
virtio_devices() {
	VIRTIO_DEVICES=
	for _p in /sys/bus/pci/devices/*; do
		[ -r "$_p/vendor" ] || continue
		read -r _v <"$_p/vendor"
		[ "$_v" = 0x1af4 ] || continue
		read -r _i <"$_p/device"
		VIRTIO_DEVICES="$VIRTIO_DEVICES $_i"
	done
}

# load_modules [--later] WHEN...: the modules /etc/vmfleet/module-devices gives for any
# WHEN (each after its dependencies); none for a device this VM does not have. One process:
# the helper, or in an initrd without it busybox's modprobe (dependencies from the initrd's
# own modules.dep; it is not at /sbin/modprobe, where the kernel would run it). --later: at
# a low priority (LATER_NICE), after the app's start.
load_modules() {
	[ -f /etc/vmfleet/module-devices ] || return 0
	_prefix=
	if [ "$1" = --later ]; then
		shift
		[ -x "$RUNNER" ] && _prefix="$RUNNER exec -N $LATER_NICE --"
	fi
	if [ -x "$RUNNER" ]; then
		# shellcheck disable=SC2086
		if _out=$($_prefix "$RUNNER" modules /etc/vmfleet/module-devices "$@" 2>&1); then
			[ -z "$_out" ] || log INFO modules "loaded $_out"
		else
			log WARN modules "$(echo "$_out" | oneline)"
		fi
		return 0
	fi
	_mods=
	while read -r _when _name _; do
		case " $* " in *" $_when "*) _mods="$_mods $_name" ;; esac
	done </etc/vmfleet/module-devices
	[ -n "$_mods" ] || return 0
	# shellcheck disable=SC2086
	if _err=$(busybox modprobe -a $_mods 2>&1); then
		log INFO modules "loaded$_mods"
	else
		log WARN modules "modprobe$_mods: $(echo "$_err" | oneline)"
	fi
}

# ACPI's power button (the host's fallback when the control channel does not answer a
# stop) is not needed to boot: set up in the background, once the app had the CPU first.
start_acpid() {
	(
		sleep 2
		load_modules acpi
		[ -d /sys/class/input ] && acpid -c /etc/acpi -l /var/log/acpid.log 2>/dev/null
	) &
}

# mount_fstab FSTAB: its entries mounted, in one process (the helper starts faster than
# busybox's mount).
mount_fstab() {
	if [ -x "$RUNNER" ]; then "$RUNNER" mount "$1"; else mount -a -T "$1"; fi
}

# mounted DIR: whether something is mounted on DIR (read by the shell: no process).
mounted() {
	while read -r _ _dir _; do
		[ "$_dir" = "$1" ] && return 0
	done </proc/mounts
	return 1
}

mount_root_by_steps() {
	mounted /lower && mounted /overlay && mounted "$CFG" ||
		mount_fstab /etc/vmfleet/fstab.disks 2>/dev/null || disks_not_mounted
	mounted "$NEWROOT" && return 0
	[ -d /overlay/upper ] && [ -d /overlay/work ] || mkdir -p /overlay/upper /overlay/work
	mount_fstab /etc/vmfleet/fstab.overlay || fatal rootfs "cannot mount the overlay root"
}

disks_not_mounted() { # the first disk of fstab.disks that is not mounted is fatal
	mounted /lower || fatal rootfs "cannot mount image disk /dev/vda"
	mounted /overlay || fatal rootfs "cannot mount overlay disk /dev/vdb"
	mounted "$CFG" || fatal config "cannot mount config disk /dev/vdc"
}

setup_root() {
	for _d in vda vdb vdc; do
		wait_dev "/dev/$_d" 10 || fatal disks "/dev/$_d did not appear"
	done
	# The disks, the overlay root and /proc, /sys, /dev in it with one mount process (the
	# host made the overlay's directories); step by step when that did not all work.
	mount_fstab /etc/vmfleet/fstab.root 2>/dev/null || mount_root_by_steps
	[ -f "$CFG/config.sh" ] || fatal config "config disk has no config.sh"
	# shellcheck source=/dev/null
	. "$CFG/config.sh" || fatal config "cannot read config.sh"
	read -r _up _ </proc/uptime
	log INFO rootfs "root ready (image ro, overlay rw) at ${_up}s"
}

setup_volumes() {
	_i=0
	while [ "$_i" -lt "${VMFLEET_VOL_COUNT:-0}" ]; do
		eval "_vd=\$VMFLEET_VOL_${_i}_DEVICE _vp=\$VMFLEET_VOL_${_i}_PATH"
		eval "_vm=\$VMFLEET_VOL_${_i}_MODE _vo=\$VMFLEET_VOL_${_i}_OVERLAY"
		if _out=$(mount_volume "$_vd" "$_vp" "$_vm" "$_vo"); then
			log INFO volumes "mounted $_vd at $_vp ($_vm)"
		else
			log ERROR volumes "cannot mount $_vd at $_vp ($_vm): $(echo "$_out" | oneline)"
		fi
		_i=$((_i + 1))
	done
}

bind_system() {
	for _d in proc sys dev tmp run; do
		[ -d "$NEWROOT/$_d" ] && continue
		mkdir -p "$NEWROOT/proc" "$NEWROOT/sys" "$NEWROOT/dev" "$NEWROOT/tmp" "$NEWROOT/run"
		break
	done
	# Bound with the root already (fstab.root), unless the image lacked a mount point.
	mounted "$NEWROOT/proc" && mounted "$NEWROOT/sys" && mounted "$NEWROOT/dev" && return 0
	# /proc, /sys and /dev (with its fd links, made at boot) in one mount process.
	mount_fstab /etc/vmfleet/fstab.bind || log ERROR mounts "cannot bind /proc, /sys or /dev"
}

write_resolv() { # nameservers...
	[ $# -gt 0 ] || return 0
	etc_file "$NEWROOT/etc/resolv.conf"
	for _ns in "$@"; do echo "nameserver $_ns"; done >"$NEWROOT/etc/resolv.conf"
}

# etc_file PATH: PATH's directory exists and PATH is no symlink (an image's resolv.conf
# often points into a /run this guest does not have): ready to be written. Tested by the
# shell first, so a boot makes no process for what is already so.
etc_file() {
	[ -d "${1%/*}" ] || mkdir -p "${1%/*}"
	if [ -L "$1" ]; then rm -f "$1"; fi
}

write_hosts() { # ADDRESS: where this guest's own hostname resolves
	etc_file "$NEWROOT/etc/hosts"
	{
		printf '127.0.0.1\tlocalhost\n'
		printf '::1\tlocalhost ip6-localhost ip6-loopback\n'
		[ -z "$VMFLEET_HOSTNAME" ] || printf '%s\t%s\n' "$1" "$VMFLEET_HOSTNAME"
	} >"$NEWROOT/etc/hosts"
}

setup_network() {
	# Written by the shell: no hostname process.
	[ -n "$VMFLEET_HOSTNAME" ] && echo "$VMFLEET_HOSTNAME" >/proc/sys/kernel/hostname
	# The instance's own address when it has a fixed one; else Debian's 127.0.1.1.
	if [ "$VMFLEET_NET_ENABLED" = 1 ] && [ "$VMFLEET_NET_MODE" != dhcp ]; then
		write_hosts "$VMFLEET_NET_IP"
	else
		write_hosts 127.0.1.1
	fi
	if [ "$VMFLEET_NET_ENABLED" != 1 ]; then
		ip link set lo up
		log INFO network "disabled"
		return 0
	fi
	_if=
	_n=100
	while [ -z "$_if" ] && [ "$_n" -gt 0 ]; do
		for _p in /sys/class/net/*; do
			[ "${_p##*/}" = lo ] || [ ! -e "$_p" ] || { _if=${_p##*/}; break; }
		done
		[ -n "$_if" ] || { sleep 0.05; _n=$((_n - 1)); }
	done
	[ -n "$_if" ] || { log ERROR network "no network interface appeared"; return 0; }
	set -f
	# shellcheck disable=SC2086
	set -- $VMFLEET_NET_DNS
	set +f
	case $VMFLEET_NET_MODE in
	dhcp)
		ip link set lo up
		ip link set "$_if" up
		rm -f "$RUN/dhcp-dns"
		if udhcpc -i "$_if" -b -t 5 -T 2 -p "$RUN/udhcpc.pid" -s /usr/share/udhcpc/default.script \
			>/dev/null 2>&1; then
			if [ $# -eq 0 ] && [ -f "$RUN/dhcp-dns" ]; then
				set -f
				# shellcheck disable=SC2046
				set -- $(cat "$RUN/dhcp-dns")
				set +f
			fi
			log INFO network "$_if configured by DHCP"
		else
			log ERROR network "DHCP on $_if failed"
		fi
		;;
	*)
		if [ -x "$RUNNER" ] && [ "${VMFLEET_NET_IP#*:}" = "$VMFLEET_NET_IP" ]; then
			# IPv4: lo, the address, the link and the route in one process.
			_err=$("$RUNNER" net "$_if" "$VMFLEET_NET_IP" "$VMFLEET_NET_CIDR" \
				"${VMFLEET_NET_GW:--}" 2>&1) || log ERROR network "$(echo "$_err" | oneline)"
		else
			ip link set lo up
			ip addr add "$VMFLEET_NET_IP/$VMFLEET_NET_CIDR" dev "$_if" || log ERROR network "ip addr add failed"
			ip link set "$_if" up || log ERROR network "ip link set $_if up failed"
			if [ -n "$VMFLEET_NET_GW" ]; then
				ip route add default via "$VMFLEET_NET_GW" || log ERROR network "default route failed"
			fi
		fi
		log INFO network "$_if $VMFLEET_NET_IP/$VMFLEET_NET_CIDR gw ${VMFLEET_NET_GW:-none}"
		;;
	esac
	write_resolv "$@"
}

# The app's process: env -i, then env.sh, then a new session, root /newroot, cwd = workdir.
# Everything it needs comes in as arguments, so no name of ours can clash with the app's env.
# shellcheck disable=SC2016
APP_SCRIPT='echo $$ >/run/vmfleet/app.pid
echo "[vmfleet] app started pid=$$"
unset SHLVL PWD OLDPWD
. /cfg/env.sh
exec /bin/busybox setsid /bin/busybox nsenter -F "$@"'

# The guest agent: the app's environment (env.sh) and root (it chroots itself into /newroot
# once its channel is open). vmfleet.agent=vsock on the kernel command line (Cloud
# Hypervisor) makes it listen on vsock; else it serves the virtio-serial port vmfleet.agent.
# shellcheck disable=SC2016
AGENT_SCRIPT='unset SHLVL PWD OLDPWD
. /cfg/env.sh
exec /cfg/vmfleet-agent -root /newroot -channel "$1" -groups /run/vmfleet/agent-groups'
# On the config disk, not in the initrd (worker/guest/config_disk.py says why).
AGENT=$CFG/vmfleet-agent
AGENT_CHANNEL=virtio
# What the host's side realigns on, then a GONE frame (docs/agent-protocol.md).
AGENT_GONE='\251\000vmfleet-agent-sync\000\251\251\004\000\000\000\000\000\000\000\000'

agent_port() { # the /dev node of the virtio-serial port named vmfleet.agent
	for _n in /sys/class/virtio-ports/*/name; do
		[ -f "$_n" ] && [ "$(cat "$_n")" = vmfleet.agent ] && { _d=${_n%/name}; echo "/dev/${_d##*/}"; return 0; }
	done
	return 1
}

# start_agent: the agent, at a low priority until its channel is open: on a guest with one
# vCPU the app's start comes first (the agent then resets itself).
start_agent() {
	if [ ! -x "$AGENT" ]; then
		log WARN agent "no $AGENT on the config disk: exec, cp and stat will not work"
		return 0
	fi
	# A dead agent is started again (after 1 s, doubling up to 30 s while it keeps dying
	# within a minute), so that a crash or a kill does not leave the instance without
	# exec, cp and stat for the rest of its life.
	(
		_delay=1
		while :; do
			read -r _since _ </proc/uptime
			_since=${_since%.*}
			if [ -x "$RUNNER" ] && [ -f "$CFG/env.list" ]; then
				"$RUNNER" exec -N "$LATER_NICE" -e "$CFG/env.list" -- "$AGENT" -root "$NEWROOT" \
					-channel "$AGENT_CHANNEL" -groups "$RUN/agent-groups" </dev/null >"$CONSOLE" 2>&1
			else
				env -i /bin/busybox sh -c "$AGENT_SCRIPT" vmfleet-agent "$AGENT_CHANNEL" \
					</dev/null >"$CONSOLE" 2>&1
			fi
			_status=$?
			# A virtio-serial port keeps no connection state: say so on it, so the host ends
			# the agent's sessions at once (a vsock connection closes by itself).
			if [ "$AGENT_CHANNEL" = virtio ] && _port=$(agent_port); then
				printf "$AGENT_GONE" >"$_port" 2>/dev/null
			fi
			read -r _now _ </proc/uptime
			[ $((${_now%.*} - _since)) -ge 60 ] && _delay=1
			log ERROR agent "the agent exited with status $_status; starting it again in ${_delay}s"
			sleep "$_delay"
			_delay=$((_delay * 2))
			[ "$_delay" -gt 30 ] && _delay=30
		done
	) &
}

resolve_argv0() { # NAME: the image's path of NAME, found in the app's PATH
	case $1 in */*) echo "$1"; return 0 ;; esac
	set -f
	_old=$IFS
	IFS=:
	for _d in ${VMFLEET_PATH:-/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin}; do
		if [ -n "$_d" ] && { [ -f "$NEWROOT$_d/$1" ] || [ -L "$NEWROOT$_d/$1" ]; }; then
			IFS=$_old
			set +f
			echo "$_d/$1"
			return 0
		fi
	done
	IFS=$_old
	set +f
	echo "$1"
}

# start_app: the app in the background, its pid in $APP_PID (wait_app waits for it).
start_app() {
	eval "set -- $VMFLEET_ARGV"
	_wd=${VMFLEET_WORKDIR:-/}
	[ -d "$NEWROOT$_wd" ] || mkdir -p "$NEWROOT$_wd"
	if [ $# -eq 0 ]; then
		log WARN app "no entrypoint or cmd: nothing to run"
		set -- /bin/true
	fi
	read -r _up _ </proc/uptime
	log INFO app "starting in $_wd at ${_up}s: $VMFLEET_ARGV"
	if [ -x "$RUNNER" ] && [ -f "$CFG/env.list" ]; then
		# One process: new session, pid file, env, root, cwd, then the program found in
		# the app's PATH inside its root, as the image's shell would find it.
		"$RUNNER" exec -n "$APP_STARTED" -e "$CFG/env.list" -p "$RUN/app.pid" -r "$NEWROOT" \
			-w "$_wd" -s -a -- "$@" </dev/null >"$CONSOLE" 2>&1 &
		APP_PID=$!
		# The rest of the boot (the agent's module and start) waits until the program
		# runs: on one vCPU it would otherwise come first.
		[ -p "$APP_STARTED" ] && read -r _ <"$APP_STARTED"
		return 0
	fi
	if [ -e "$NEWROOT/bin/sh" ] || [ -L "$NEWROOT/bin/sh" ]; then
		# The image's shell finds the program in PATH and keeps argv[0] as given.
		# shellcheck disable=SC2016
		set -- /bin/sh -c 'exec "$@"' sh "$@"
	else
		_a0=$(resolve_argv0 "$1")
		shift
		set -- "$_a0" "$@"
	fi
	env -i /bin/busybox sh -c "$APP_SCRIPT" vmfleet-app \
		"--root=$NEWROOT" "--wd=$NEWROOT$_wd" -- "$@" </dev/null >"$CONSOLE" 2>&1 &
	APP_PID=$!
}

# wait_app: the app's exit, recorded and (unless a stop asked for it) the VM's power-off.
wait_app() {
	wait "$APP_PID"
	_code=$?
	echo "[vmfleet] app exited with code $_code"
	echo "$_code" >"$RUN/app.exit.tmp"
	mv "$RUN/app.exit.tmp" "$RUN/app.exit"
	# A stop asked for this exit: its control channel reply and power-off are the stop's.
	[ -e "$RUN/stopping" ] && return 0
	# The program has ended, and so does the VM: the host reads this marker from the app
	# log once the VMM is gone (the instance becomes Stopped with this exit code).
	echo "HYPEMAN-EXIT code=$_code message=\"$(exit_message "$_code")\""
	sync
	poweroff -f
}

# exit_message CODE: how the app ended, in hypeman's words (Go's signal descriptions)
exit_message() {
	case $1 in
	0) echo success ;;
	126) echo "permission denied (command not executable)" ;;
	127) echo "command not found" ;;
	*)
		if [ "$1" -gt 128 ] 2>/dev/null; then
			_m="killed by signal $(($1 - 128)) ($(signal_text $(($1 - 128))))"
			if [ "$1" = 137 ] && oom_killed; then _m="$_m - OOM"; fi
			echo "$_m"
		else
			echo "exit code $1"
		fi
		;;
	esac
}

oom_killed() { dmesg 2>/dev/null | grep -qiE 'out of memory|oom-kill|oom_reaper'; }

signal_text() {
	case $1 in
	1) echo hangup ;; 2) echo interrupt ;; 3) echo quit ;; 4) echo "illegal instruction" ;;
	5) echo "trace/breakpoint trap" ;; 6) echo aborted ;; 7) echo "bus error" ;;
	8) echo "floating point exception" ;; 9) echo killed ;; 10) echo "user defined signal 1" ;;
	11) echo "segmentation fault" ;; 12) echo "user defined signal 2" ;; 13) echo "broken pipe" ;;
	14) echo "alarm clock" ;; 15) echo terminated ;; 16) echo "stack fault" ;;
	17) echo "child exited" ;; 18) echo continued ;; 19) echo "stopped (signal)" ;;
	20) echo stopped ;; 21) echo "stopped (tty input)" ;; 22) echo "stopped (tty output)" ;;
	23) echo "urgent I/O condition" ;; 24) echo "CPU time limit exceeded" ;;
	25) echo "file size limit exceeded" ;; 26) echo "virtual timer expired" ;;
	27) echo "profiling timer expired" ;; 28) echo "window changed" ;; 29) echo "I/O possible" ;;
	30) echo "power failure" ;; 31) echo "bad system call" ;; *) echo "signal $1" ;;
	esac
}

# read_cmdline: vmfleet.ctl=DEV (the control channel's device), vmfleet.probe=1,
# vmfleet.agent=virtio|vsock (the agent's channel), vmfleet.wait=1 (a template: wait for
# the instance config before touching the disks)
read_cmdline() {
	PROBE=0
	WAIT_CONFIG=0
	read -r _cmdline </proc/cmdline
	for _arg in $_cmdline; do
		case $_arg in
		vmfleet.ctl=*) CTL=/dev/${_arg#vmfleet.ctl=} ;;
		vmfleet.probe=1) PROBE=1 ;;
		vmfleet.agent=*) AGENT_CHANNEL=${_arg#vmfleet.agent=} ;;
		vmfleet.wait=1) WAIT_CONFIG=1 ;;
		esac
	done
}

boot() {
	sysinit
	[ -c "$CONSOLE" ] || CONSOLE=/dev/ttyS0
	exec </dev/null >"$CONSOLE" 2>&1
	read_cmdline
	if [ "$PROBE" = 1 ]; then
		# The host's accelerator probe: reaching this line proves the VM can boot.
		echo "vmfleet-probe-ok"
		poweroff -f
	fi
	read -r _up _ </proc/uptime
	read -r _release </proc/sys/kernel/osrelease
	log INFO boot "vmfleet init on kernel $_release at ${_up}s"
	_ctl_up=
	if [ -c "$CTL" ]; then
		control_loop &
		_ctl_up=1
	fi
	virtio_devices
	# A control channel on a virtio console (hvc0, Cloud Hypervisor) appears only once
	# virtio_console is loaded; a serial one (ttyS1, QEMU) was there from the start, and
	# the console's module (then only the agent's port) waits until the app has started.
	_later=
	if [ -n "$_ctl_up" ]; then
		_boot=
		for _id in $VIRTIO_DEVICES; do
			case $_id in 0x1003 | 0x1043) _later="$_later $_id" ;; *) _boot="$_boot $_id" ;; esac
		done
		VIRTIO_DEVICES=$_boot
	fi
	# shellcheck disable=SC2086
	load_modules boot $VIRTIO_DEVICES
	if [ -z "$_ctl_up" ]; then
		if wait_char "$CTL" 5; then
			control_loop &
		else
			log WARN control "no $CTL: control channel disabled"
		fi
	fi
	wait_for_instance
	setup_root
	setup_volumes
	bind_system
	setup_network
	start_app
	# The agent's port's module, when the app's start did not wait for it.
	# shellcheck disable=SC2086
	[ -z "$_later" ] || load_modules --later $_later
	start_agent
	start_acpid
	wait_app
	park
}

udhcpc_event() { # udhcpc sets: interface ip mask router dns
	case $1 in
	deconfig)
		ip addr flush dev "$interface"
		ip link set "$interface" up
		;;
	bound | renew)
		ip addr flush dev "$interface"
		ip addr add "$ip/${mask:-24}" dev "$interface"
		for _r in $router; do
			ip route replace default via "$_r" dev "$interface"
			break
		done
		[ -n "$dns" ] && echo "$dns" >"$RUN/dhcp-dns"
		;;
	esac
	return 0
}

case $1 in
--shutdown)
	stop_app "$2"
	poweroff -f
	;;
--udhcpc) udhcpc_event "$2" ;;
*)
	if [ "$$" = 1 ]; then
		boot
	else
		echo "usage: /init [--shutdown SECONDS | --udhcpc EVENT]" >&2
		exit 2
	fi
	;;
esac
