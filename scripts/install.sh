#!/usr/bin/env bash
# Installs what vmfleet needs and is missing: Debian packages, the virtualenv, the guest
# agent and the init's helper (built from guest-agent/ and guest-run/ when their sources
# changed), the guest kernel. Idempotent: a second run checks and builds nothing.
#   scripts/install.sh [KERNEL_DIR]
# KERNEL_DIR: the data dir the guest kernel is fetched into (default: vmfleet's data dir).
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(qemu-system-x86 busybox-static e2fsprogs erofs-utils skopeo umoci
                 docker-registry cpio kmod lz4 python3-venv iproute2 nftables conntrack golang-go
                 musl-tools  # builds guest-run/: the init's static helper
                 docker-compose chromium  # only for the tests: docker-compose validates
                                          # compose.yaml, chromium renders /ui
                 wrk)  # only for bench/gateway.py: a load generator that saturates first
VENV=.venv
STAMP=$VENV/.installed

say() { printf 'install: %s\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else say "run as root: $*"; exit 1
    fi
}

missing_packages() {
    local pkg
    for pkg in "${DEBIAN_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || printf '%s\n' "$pkg"
    done
}

install_debian_packages() {
    local missing
    missing=$(missing_packages)
    [ -z "$missing" ] && return 0
    say "Debian packages missing: $(echo $missing)"
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
        say "as root, run: apt-get update && apt-get install -y --no-install-recommends $(echo $missing)"
        exit 1
    fi
    as_root apt-get update -q
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
}

install_virtualenv() {
    # Reinstall only when the project's dependency list changed since the last install.
    local want
    want=$(sha256sum pyproject.toml constraints/*.txt | sha256sum | cut -d' ' -f1)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/vmfleet" ]; then
        return 0
    fi
    say "creating the virtualenv in $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check --require-hashes \
        -r constraints/nats-server.txt -r constraints/inotify-simple.txt
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
    echo "$want" > "$STAMP"
}

# The guest agent: a static Go binary (standard library only, so no module downloads),
# rebuilt when a source file changed. The worker finds it there (VMFLEET_AGENT_BINARY).
AGENT_DIR=.cache/guest-agent
build_guest_agent() {
    local want
    want=$(cat guest-agent/go.mod guest-agent/*.go | sha256sum | cut -d' ' -f1)
    if [ -x "$AGENT_DIR/vmfleet-agent" ] && [ "$(cat "$AGENT_DIR/.sources" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    say "building the guest agent into $AGENT_DIR/vmfleet-agent"
    mkdir -p "$AGENT_DIR"
    (cd guest-agent && CGO_ENABLED=0 go build -buildvcs=false -trimpath -ldflags='-s -w' \
        -o "../$AGENT_DIR/vmfleet-agent.tmp" .)
    mv "$AGENT_DIR/vmfleet-agent.tmp" "$AGENT_DIR/vmfleet-agent"
    echo "$want" > "$AGENT_DIR/.sources"
}

# The init's helper (guest-run/vmfleet-run.c): one static binary, so that starting the app and
# setting up the network cost the boot one process each. Rebuilt when its source changed.
RUN_DIR=.cache/guest-run
build_guest_run() {
    local want
    want=$(cat guest-run/*.c | sha256sum | cut -d' ' -f1)
    if [ -x "$RUN_DIR/vmfleet-run" ] && [ "$(cat "$RUN_DIR/.sources" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    say "building the init's helper into $RUN_DIR/vmfleet-run"
    mkdir -p "$RUN_DIR"
    musl-gcc -static -Os -s -Wall -Wextra -Werror -o "$RUN_DIR/vmfleet-run.tmp" guest-run/vmfleet-run.c
    mv "$RUN_DIR/vmfleet-run.tmp" "$RUN_DIR/vmfleet-run"
    echo "$want" > "$RUN_DIR/.sources"
}

fetch_guest_kernel() {
    "$VENV/bin/vmfleet" kernel fetch ${1:+--data-dir "$1"}
}

install_debian_packages
install_virtualenv
build_guest_agent
build_guest_run
fetch_guest_kernel "${1:-}"
