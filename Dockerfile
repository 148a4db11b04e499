# One image for both components: `vmfleet gateway` and `vmfleet worker`.
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
 && .venv/bin/pip install --no-cache-dir .
ENV PATH=/opt/vmfleet/.venv/bin:$PATH
ENTRYPOINT ["vmfleet"]
