# A small non-root image of the switchyard binary, built from the locked
# dependencies. There is no container engine where this project is tested:
# tests/integration/deploy.rs checks what can be checked without one (every
# COPY source is in the build context, the build is --locked, the image runs as
# non-root).
#
# Build: docker build --build-arg SWITCHYARD_COMMIT=$(git rev-parse --short=12 HEAD) -t switchyard .
# Run:   docker run --stop-timeout 40 -p 8080:8080 -v $PWD/my-config:/etc/switchyard switchyard
#        (the image's own config, deploy/docker/switchyard.yaml, listens on
#        0.0.0.0:8080; a config of yours must bind 0.0.0.0 too to be reachable.
#        --stop-timeout: longer than shutdown_grace, or Docker's SIGKILL after
#        10 s cuts the drain)
FROM rust:1.95-slim-bookworm AS build
# The context has no .git: the commit `switchyard version` names comes from here.
ARG SWITCHYARD_COMMIT=unknown
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# The manifest also names the test and bench targets, whose files the binary
# does not need and the build context does not hold: they are dropped here.
RUN sed -i '/^\[\[test\]\]/,$d' Cargo.toml \
 && cargo build --release --locked --bin switchyard

# glibc and libgcc only, no shell; user 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY deploy/docker/switchyard.yaml /etc/switchyard/switchyard.yaml
USER 65532:65532
EXPOSE 8080 9901
# SIGTERM drains (as does SIGQUIT); Docker's default stop signal is kept.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["run", "-c", "/etc/switchyard/switchyard.yaml"]
