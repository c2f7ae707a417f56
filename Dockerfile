# A small non-root image of the switchyard binary, built from the locked
# dependencies. There is no container engine where this project is tested:
# tests/integration/deploy.rs checks what can be checked without one (every
# COPY source is in the build context, the build is --locked, the image runs as
# non-root).
#
# Build: docker build -t switchyard .
# Run:   docker run -p 8080:8080 -p 9901:9901 -v $PWD/my-config:/etc/switchyard switchyard
#        (listeners and admin.bind must bind 0.0.0.0 to be reachable from outside)
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The manifest also names the test and bench targets, whose files the binary
# does not need and the build context does not hold: they are dropped here.
RUN sed -i '/^\[\[test\]\]/,$d' Cargo.toml \
 && cargo build --release --locked --bin switchyard

# glibc and libgcc only, no shell; user 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config/switchyard.yaml /etc/switchyard/switchyard.yaml
USER 65532:65532
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["run", "-c", "/etc/switchyard/switchyard.yaml"]
