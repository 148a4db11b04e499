/*
 * vmfleet-run: what the guest init (worker/guest/init.sh) would otherwise do with a chain
 * of busybox processes. Under emulation every process costs the boot ~10 ms, so the
 * app's start and the network's set-up are one process each.
 *
 *   vmfleet-run exec [-n FIFO] [-N NICE] [-e ENVFILE] [-p PIDFILE] [-r ROOT] [-w DIR] [-s] [-a]
 *                    -- ARGV...
 *       Runs ARGV with exactly the environment in ENVFILE (KEY=value entries, each ended
 *       by a NUL; none: an empty environment). -n: FIFO is held open for writing (first
 *       of all) until ARGV runs or this fails, so that a reader of it (the init) sees its
 *       end then and not before. -N: ARGV runs at this nice value (what the app's start
 *       should not wait for). -s: a new session. -p: this process's pid
 *       written to PIDFILE first. -a: "[vmfleet] app started pid=N" on stdout. -r/-w:
 *       chroot to ROOT, then chdir to DIR (a path inside ROOT). ARGV[0] without a slash
 *       is looked up in the environment's PATH, as a shell would, and keeps its name
 *       as given; a file the kernel cannot execute (no #!) runs under the root's
 *       /bin/sh. Exit 127 (not found) or 126 (not executable), as a shell's.
 *
 *   vmfleet-run net IFACE ADDRESS PREFIX GATEWAY|-
 *       lo up; IFACE gets the IPv4 ADDRESS/PREFIX and goes up; the default route via
 *       GATEWAY. Exit 1 naming the step that failed.
 *
 *   vmfleet-run reseed SEED_HEX
 *       Credits the seed's bytes to the kernel's input pool and reseeds its generator at
 *       once (RNDADDENTROPY, RNDRESEEDCRNG). A VM resumed from a saved memory image (a warm
 *       template, a fork) would otherwise draw the same numbers as every other VM resumed
 *       from it until the kernel's own next reseed; writing to /dev/urandom mixes bytes in
 *       but does not reseed. In the initrd, so it works before any disk is mounted.
 *
 *   vmfleet-run mount [-l LINKDIR] [-c CONSOLE] FSTAB...
 *       Mounts every entry of each FSTAB in order, making a missing mount point first
 *       (busybox's mount -a, in a binary that starts faster). -l: then LINKDIR's symlinks
 *       are made again in /dev; -c: CONSOLE's output newline translation is turned off
 *       (plain \n in the app's log, best effort): the init's first step is one process
 *       instead of a mount, a cp and an stty each. Exit 1 naming the entry that could not
 *       be mounted; the entries before it stay mounted.
 *
 *   vmfleet-run modules LIST WHEN...
 *       Loads, in LIST's order, the module of every line "WHEN NAME PATH" whose WHEN is
 *       one of the arguments (the initrd's builder lists each module's dependencies before
 *       it, under the same WHEN); one the kernel has already (/sys/module) is skipped.
 *       Prints the names loaded; exit 1 when one could not be, after trying the rest. No
 *       modprobe: no modules.dep to read, and the kernel reads each file itself
 *       (finit_module).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <dirent.h>
#include <fcntl.h>
#include <mntent.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <termios.h>
#include <unistd.h>

/* linux/random.h's ioctls (musl's headers do not include the kernel's). */
#define RNDADDENTROPY 0x40085203 /* _IOW('R', 0x03, int[2]) */
#define RNDRESEEDCRNG 0x5207 /* _IO('R', 0x07) */
#define MAX_SEED_BYTES 512

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static const char *prog = "vmfleet-run";

static void die(int code, const char *what, const char *detail)
{
	fprintf(stderr, "%s: %s: %s\n", prog, what, detail);
	exit(code);
}

/* The whole of FILE, NUL-terminated twice; *len its length. */
static char *read_file(const char *file, size_t *len)
{
	int fd = open(file, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		die(1, file, strerror(errno));
	size_t cap = 4096, n = 0;
	char *buf = malloc(cap + 2);
	for (;;) {
		if (!buf)
			die(1, file, "out of memory");
		ssize_t got = read(fd, buf + n, cap - n);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			die(1, file, strerror(errno));
		}
		if (got == 0)
			break;
		n += (size_t)got;
		if (n == cap) {
			cap *= 2;
			buf = realloc(buf, cap + 2);
		}
	}
	close(fd);
	buf[n] = buf[n + 1] = '\0';
	*len = n;
	return buf;
}

/* ENVFILE's entries as an environment array (NULL-terminated). */
static char **read_env(const char *file)
{
	size_t len, count = 0;
	char *data = read_file(file, &len);
	for (size_t i = 0; i < len; i++)
		if (data[i] == '\0')
			count++;
	char **env = calloc(count + 2, sizeof *env);
	if (!env)
		die(1, file, "out of memory");
	size_t k = 0;
	for (char *p = data; p < data + len; p += strlen(p) + 1)
		if (*p)
			env[k++] = p;
	env[k] = NULL;
	return env;
}

static const char *env_get(char **env, const char *key)
{
	size_t n = strlen(key);
	for (; *env; env++)
		if (strncmp(*env, key, n) == 0 && (*env)[n] == '=')
			return *env + n + 1;
	return NULL;
}

/* execve, and a script without #! run by /bin/sh (what a shell does on ENOEXEC). */
static void try_exec(const char *path, char **argv, char **env)
{
	execve(path, argv, env);
	if (errno != ENOEXEC)
		return;
	size_t argc = 0;
	while (argv[argc])
		argc++;
	char **sh = calloc(argc + 2, sizeof *sh);
	if (!sh)
		return;
	sh[0] = "sh";
	sh[1] = (char *)path;
	for (size_t i = 1; i <= argc; i++)
		sh[i + 1] = argv[i];
	execve("/bin/sh", sh, env);
	errno = ENOEXEC;
}

static int run_exec(int argc, char **argv)
{
	const char *env_file = NULL, *pid_file = NULL, *root = NULL, *dir = NULL;
	int new_session = 0, announce = 0, nice_value = 0, opt;
	char *end;
	while ((opt = getopt(argc, argv, "+n:N:e:p:r:w:sa")) != -1) {
		switch (opt) {
		case 'n':
			/* Closed by the exec (or the exit): the reader's end of file. */
			if (open(optarg, O_WRONLY | O_CLOEXEC) < 0)
				die(1, optarg, strerror(errno));
			break;
		case 'N':
			nice_value = (int)strtol(optarg, &end, 10);
			if (*optarg == '\0' || *end || nice_value < -20 || nice_value > 19)
				die(2, optarg, "not a nice value (-20..19)");
			break;
		case 'e': env_file = optarg; break;
		case 'p': pid_file = optarg; break;
		case 'r': root = optarg; break;
		case 'w': dir = optarg; break;
		case 's': new_session = 1; break;
		case 'a': announce = 1; break;
		default: die(2, "usage", "exec [-n FIFO] [-N NICE] [-e ENVFILE] [-p PIDFILE] [-r ROOT] [-w DIR] [-s] [-a] -- ARGV...");
		}
	}
	if (optind >= argc)
		die(2, "usage", "exec: no program to run");
	char **args = argv + optind;
	static char *empty[] = { NULL };
	char **env = env_file ? read_env(env_file) : empty;

	if (nice_value != 0 && setpriority(PRIO_PROCESS, 0, nice_value) != 0)
		die(1, "setpriority", strerror(errno));
	if (new_session)
		setsid(); /* fails only for a group leader, which keeps its own session */
	if (pid_file) {
		FILE *f = fopen(pid_file, "we");
		if (!f || fprintf(f, "%d\n", (int)getpid()) < 0 || fclose(f) != 0)
			die(1, pid_file, strerror(errno));
	}
	if (root && (chroot(root) != 0 || chdir("/") != 0))
		die(1, root, strerror(errno));
	if (dir && chdir(dir) != 0)
		die(1, dir, strerror(errno));
	if (announce) {
		printf("[vmfleet] app started pid=%d\n", (int)getpid());
		fflush(stdout);
	}

	if (strchr(args[0], '/')) {
		try_exec(args[0], args, env);
		die(errno == ENOENT ? 127 : 126, args[0], strerror(errno));
	}
	const char *path = env_get(env, "PATH");
	if (!path)
		path = DEFAULT_PATH;
	int denied = 0;
	char file[4096];
	for (const char *p = path;; p++) {
		const char *end = strchrnul(p, ':');
		size_t n = (size_t)(end - p);
		/* An empty PATH entry is the current directory, as for a shell. */
		int w = n ? snprintf(file, sizeof file, "%.*s/%s", (int)n, p, args[0])
			  : snprintf(file, sizeof file, "%s", args[0]);
		if (w > 0 && (size_t)w < sizeof file) {
			struct stat st;
			if (stat(file, &st) == 0 && S_ISREG(st.st_mode)) {
				try_exec(file, args, env);
				if (errno == EACCES || errno == EPERM || errno == ENOEXEC)
					denied = 1;
			}
		}
		if (!*end)
			break;
		p = end;
	}
	if (denied)
		die(126, args[0], "permission denied");
	die(127, args[0], "not found");
	return 127;
}

static void ioctl_or_die(int fd, unsigned long req, void *arg, const char *what)
{
	if (ioctl(fd, req, arg) != 0)
		die(1, what, strerror(errno));
}

static void set_up(int fd, const char *name)
{
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
	ioctl_or_die(fd, SIOCGIFFLAGS, &ifr, name);
	ifr.ifr_flags |= IFF_UP;
	ioctl_or_die(fd, SIOCSIFFLAGS, &ifr, name);
}

static void set_in(struct sockaddr *sa, in_addr_t addr)
{
	struct sockaddr_in *in = (struct sockaddr_in *)sa;
	memset(in, 0, sizeof *in);
	in->sin_family = AF_INET;
	in->sin_addr.s_addr = addr;
}

static int run_net(int argc, char **argv)
{
	if (argc != 5)
		die(2, "usage", "net IFACE ADDRESS PREFIX GATEWAY|-");
	const char *ifname = argv[1];
	struct in_addr addr, gw;
	char *end;
	long prefix = strtol(argv[3], &end, 10);
	if (inet_pton(AF_INET, argv[2], &addr) != 1)
		die(2, argv[2], "not an IPv4 address");
	if (*argv[3] == '\0' || *end || prefix < 0 || prefix > 32)
		die(2, argv[3], "not a prefix length");
	int has_gw = strcmp(argv[4], "-") != 0;
	if (has_gw && inet_pton(AF_INET, argv[4], &gw) != 1)
		die(2, argv[4], "not an IPv4 address");

	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		die(1, "socket", strerror(errno));
	set_up(fd, "lo");
	struct ifreq ifr = { 0 };
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
	set_in(&ifr.ifr_addr, addr.s_addr);
	ioctl_or_die(fd, SIOCSIFADDR, &ifr, "address");
	set_in(&ifr.ifr_netmask, prefix ? htonl(~0u << (32 - prefix)) : 0);
	ioctl_or_die(fd, SIOCSIFNETMASK, &ifr, "netmask");
	set_up(fd, ifname);
	if (has_gw) {
		struct rtentry rt = { 0 };
		set_in(&rt.rt_dst, INADDR_ANY);
		set_in(&rt.rt_genmask, INADDR_ANY);
		set_in(&rt.rt_gateway, gw.s_addr);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		rt.rt_dev = (char *)ifname;
		ioctl_or_die(fd, SIOCADDRT, &rt, "default route");
	}
	close(fd);
	return 0;
}

static int hex_digit(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

static int run_reseed(int argc, char **argv)
{
	if (argc != 2)
		die(2, "usage", "reseed SEED_HEX");
	const char *hex = argv[1];
	size_t digits = strlen(hex);
	if (digits == 0 || digits % 2 || digits / 2 > MAX_SEED_BYTES)
		die(2, "reseed", "the seed must be 1 to 512 hex bytes");
	/* struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; } */
	struct {
		int entropy_count;
		int buf_size;
		unsigned char buf[MAX_SEED_BYTES];
	} info;
	size_t n = digits / 2;
	for (size_t i = 0; i < n; i++) {
		int hi = hex_digit(hex[2 * i]), lo = hex_digit(hex[2 * i + 1]);
		if (hi < 0 || lo < 0)
			die(2, "reseed", "the seed must be hex bytes");
		info.buf[i] = (unsigned char)(hi << 4 | lo);
	}
	info.entropy_count = (int)(8 * n);
	info.buf_size = (int)n;
	int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		die(1, "/dev/urandom", strerror(errno));
	ioctl_or_die(fd, RNDADDENTROPY, &info, "RNDADDENTROPY");
	ioctl_or_die(fd, RNDRESEEDCRNG, NULL, "RNDRESEEDCRNG");
	close(fd);
	return 0;
}

/* mount(2)'s flags for the fstab options that are flags; the rest is the fs's data. */
static const struct {
	const char *name;
	unsigned long flag;
} mount_flags[] = {
	{ "defaults", 0 },
	{ "rw", 0 },
	{ "ro", MS_RDONLY },
	{ "nosuid", MS_NOSUID },
	{ "nodev", MS_NODEV },
	{ "noexec", MS_NOEXEC },
	{ "noatime", MS_NOATIME },
	{ "relatime", MS_RELATIME },
	{ "bind", MS_BIND },
	{ "rbind", MS_BIND | MS_REC },
};

/* OPTS split into *flags and the options left for the filesystem (in DATA, cap bytes). */
static int parse_mount_options(const char *opts, unsigned long *flags, char *data, size_t cap)
{
	char copy[512];
	if (snprintf(copy, sizeof copy, "%s", opts) >= (int)sizeof copy)
		return -1;
	*flags = 0;
	data[0] = '\0';
	size_t used = 0;
	char *save = NULL;
	for (char *opt = strtok_r(copy, ",", &save); opt; opt = strtok_r(NULL, ",", &save)) {
		size_t i, known = sizeof mount_flags / sizeof mount_flags[0];
		for (i = 0; i < known && strcmp(opt, mount_flags[i].name) != 0; i++)
			;
		if (i < known) {
			*flags |= mount_flags[i].flag;
			continue;
		}
		int n = snprintf(data + used, cap - used, "%s%s", used ? "," : "", opt);
		if (n < 0 || (size_t)n >= cap - used)
			return -1;
		used += (size_t)n;
	}
	return 0;
}

static void mount_fstab(const char *fstab)
{
	FILE *f = setmntent(fstab, "r");
	if (!f)
		die(1, fstab, strerror(errno));
	struct mntent *m;
	while ((m = getmntent(f)) != NULL) {
		unsigned long flags;
		char data[512];
		if (parse_mount_options(m->mnt_opts, &flags, data, sizeof data) != 0)
			die(1, m->mnt_dir, "mount options too long");
		if (mkdir(m->mnt_dir, 0755) != 0 && errno != EEXIST)
			die(1, m->mnt_dir, strerror(errno));
		const char *type = strcmp(m->mnt_type, "none") == 0 ? NULL : m->mnt_type;
		if (mount(m->mnt_fsname, m->mnt_dir, type, flags, data[0] ? data : NULL) != 0)
			die(1, m->mnt_dir, strerror(errno));
	}
	endmntent(f);
}

/* DIR's symlinks, made again in /dev. */
static void copy_links(const char *dir)
{
	DIR *d = opendir(dir);
	if (!d)
		die(1, dir, strerror(errno));
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		char from[512], to[512], target[512];
		if (e->d_name[0] == '.')
			continue;
		snprintf(from, sizeof from, "%s/%s", dir, e->d_name);
		ssize_t n = readlink(from, target, sizeof target - 1);
		if (n < 0)
			continue; /* not a symlink */
		target[n] = '\0';
		snprintf(to, sizeof to, "/dev/%s", e->d_name);
		if (symlink(target, to) != 0 && errno != EEXIST)
			die(1, to, strerror(errno));
	}
	closedir(d);
}

static void console_without_onlcr(const char *console)
{
	int fd = open(console, O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (fd < 0)
		return;
	struct termios t;
	if (tcgetattr(fd, &t) == 0) {
		t.c_oflag &= ~(tcflag_t)ONLCR;
		tcsetattr(fd, TCSANOW, &t);
	}
	close(fd);
}

static int run_mount(int argc, char **argv)
{
	const char *links = NULL, *console = NULL;
	int opt;
	while ((opt = getopt(argc, argv, "+l:c:")) != -1) {
		switch (opt) {
		case 'l': links = optarg; break;
		case 'c': console = optarg; break;
		default: die(2, "usage", "mount [-l LINKDIR] [-c CONSOLE] FSTAB...");
		}
	}
	for (int i = optind; i < argc; i++)
		mount_fstab(argv[i]);
	if (links)
		copy_links(links);
	if (console)
		console_without_onlcr(console);
	return 0;
}

static int wanted(const char *when, int argc, char **argv)
{
	for (int i = 0; i < argc; i++)
		if (strcmp(when, argv[i]) == 0)
			return 1;
	return 0;
}

/* Whether the kernel has module NAME already: the kernel would read and lay out all of it
 * again before it found that out. */
static int loaded(const char *name)
{
	char path[256];
	snprintf(path, sizeof path, "/sys/module/%s", name);
	return access(path, F_OK) == 0;
}

static int run_modules(int argc, char **argv)
{
	if (argc < 2)
		die(2, "usage", "modules LIST WHEN...");
	FILE *f = fopen(argv[1], "re");
	if (!f)
		die(1, argv[1], strerror(errno));
	char line[1024], when[64], name[128], path[768];
	int failed = 0;
	const char *sep = "";
	while (fgets(line, sizeof line, f)) {
		if (sscanf(line, "%63s %127s %767s", when, name, path) != 3)
			continue;
		if (!wanted(when, argc - 2, argv + 2) || loaded(name))
			continue;
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || syscall(SYS_finit_module, fd, "", 0) != 0) {
			if (errno != EEXIST) {
				fprintf(stderr, "%s: %s: %s\n", prog, name, strerror(errno));
				failed = 1;
			}
		} else {
			printf("%s%s", sep, name);
			sep = " ";
		}
		if (fd >= 0)
			close(fd);
	}
	fclose(f);
	if (*sep)
		putchar('\n');
	return failed;
}

int main(int argc, char **argv)
{
	if (argc >= 2 && strcmp(argv[1], "exec") == 0)
		return run_exec(argc - 1, argv + 1);
	if (argc >= 2 && strcmp(argv[1], "net") == 0)
		return run_net(argc - 1, argv + 1);
	if (argc >= 2 && strcmp(argv[1], "reseed") == 0)
		return run_reseed(argc - 1, argv + 1);
	if (argc >= 2 && strcmp(argv[1], "mount") == 0)
		return run_mount(argc - 1, argv + 1);
	if (argc >= 2 && strcmp(argv[1], "modules") == 0)
		return run_modules(argc - 1, argv + 1);
	die(2, "usage",
	    "exec [...] -- ARGV... | net IFACE ADDRESS PREFIX GATEWAY|- | reseed SEED_HEX"
	    " | mount [-l LINKDIR] [-c CONSOLE] FSTAB... | modules LIST WHEN...");
	return 2;
}
