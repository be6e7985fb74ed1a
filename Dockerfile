# syntax=docker/dockerfile:1
# The meshfed operator as a small static image: built for musl on Alpine, run from scratch as a non-root user.
#   docker build -t ghcr.io/meshfed/meshfed:0.1.0 .
# The same static binary builds without Docker:
#   rustup target add x86_64-unknown-linux-musl   # and musl-gcc (Debian: musl-tools)
#   cargo build --release --locked -p meshfed-operator --bin meshfed --target x86_64-unknown-linux-musl

FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev ca-certificates
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p meshfed-operator --bin meshfed \
    && install -D -s target/release/meshfed /out/meshfed

FROM scratch
# Member API servers are verified with the CA data of their kubeconfigs; the bundle is only for a kubeconfig that
# names a publicly trusted API server without CA data.
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/meshfed /meshfed
USER 65532:65532
ENTRYPOINT ["/meshfed"]
CMD ["run"]
