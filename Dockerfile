# syntax=docker/dockerfile:1
#
# lockstep daemon image. Build and run (dry run by default; operators add --commit):
#
#   docker build -t lockstep .
#   docker run -d --name lockstep \
#     -v /srv/lockstep/rollout.yaml:/etc/lockstep/rollout.yaml:ro \
#     -v /srv/lockstep/admin-token:/run/secrets/lockstep-token:ro \
#     -v lockstep-state:/var/lib/lockstep \
#     -p 127.0.0.1:9440:9440 -p 127.0.0.1:9441:9441 \
#     lockstep run --commit
#
# The mounted rollout.yaml needs, inside a container:
#
#   listeners:
#     admin: 0.0.0.0:9440                       # 127.0.0.1 is unreachable from outside it
#     metrics: 0.0.0.0:9441                     # /metrics, /healthz (the HEALTHCHECK), /readyz
#     token_file: /run/secrets/lockstep-token   # admin bearer token as a mounted file, not env
#   store:
#     path: ./lockstep.db                       # relative paths resolve in WORKDIR, the state volume
#
# AWS credentials come from the SDK's default chain (task or instance role, AWS_* variables).

FROM rust:1-bookworm AS build
WORKDIR /src

# Dependencies first, against stub sources: this layer is rebuilt only when Cargo.toml or
# Cargo.lock change, so a source edit recompiles lockstep alone, not the AWS SDK.
COPY Cargo.toml Cargo.lock ./
RUN mkdir src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src

COPY src ./src
# COPY keeps the files' modification times, which can be older than the stub build's outputs;
# touching the crate roots makes cargo rebuild lockstep itself instead of reusing the stub.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin lockstep


FROM debian:bookworm-slim

# ca-certificates for TLS to the AWS APIs; curl for the HEALTHCHECK (the CLI has no probe
# command). Unpinned on purpose: bookworm point and security releases drop the exact versions
# from the mirror, so pins would break rebuilds; pin the base image by digest to freeze them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# A fixed numeric uid, so orchestrators can verify runAsNonRoot and volumes can be chowned.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/lockstep --shell /usr/sbin/nologin lockstep \
    && install -d -o lockstep -g lockstep -m 0750 /var/lib/lockstep \
    && install -d -m 0755 /etc/lockstep

COPY --from=build /src/target/release/lockstep /usr/local/bin/lockstep

# The CLI reads --config from LOCKSTEP_CONFIG; mount the file here (read-only is enough).
ENV LOCKSTEP_CONFIG=/etc/lockstep/rollout.yaml
# The SQLite ledger and evidence store (store.path), and files evidence (evidence.files.path)
# if used: it must outlive the container, or a restart forgets every batch in flight.
WORKDIR /var/lib/lockstep
VOLUME ["/var/lib/lockstep"]
USER 10001:10001

# 9440 admin API (bearer token), 9441 metrics and health.
EXPOSE 9440 9441
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["curl", "--fail", "--silent", "--show-error", "--output", "/dev/null", "http://127.0.0.1:9441/healthz"]

ENTRYPOINT ["lockstep"]
CMD ["run"]
