# Build: docker build -t pendo-sync .
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
RUN cargo build --release --locked && strip target/release/pendo-sync

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home /var/lib/pendo-sync pendo-sync \
    && mkdir -p /var/lib/pendo-sync /etc/pendo-sync && chown pendo-sync /var/lib/pendo-sync
COPY --from=builder /src/target/release/pendo-sync /usr/local/bin/pendo-sync
COPY config/example.toml /etc/pendo-sync/config.example.toml
USER pendo-sync
VOLUME ["/var/lib/pendo-sync"]
ENV PENDO_SYNC_CONFIG=/etc/pendo-sync/config.toml
ENTRYPOINT ["pendo-sync"]
CMD ["sync"]
