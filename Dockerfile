# Build: docker build -t switchyard .
# Run:   docker run -p 8080:8080 -p 9901:9901 -v $PWD/config:/etc/switchyard switchyard
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY tests ./tests
RUN cargo build --release --locked --bin switchyard

FROM debian:bookworm-slim
# A numeric user, so that Kubernetes' runAsNonRoot can verify it (deploy/kubernetes).
RUN useradd --system --no-create-home --uid 10001 switchyard
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
COPY config/switchyard.yaml /etc/switchyard/switchyard.yaml
USER 10001
EXPOSE 8080
ENTRYPOINT ["switchyard"]
CMD ["run", "-c", "/etc/switchyard/switchyard.yaml"]
