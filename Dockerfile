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
# Inside a container the admin port must listen beyond loopback to be scraped; the health check
# reaches it over loopback either way. Override with PENDO_SYNC__ADMIN__LISTEN. Beyond loopback
# the console and /v1 show CRM data to token holders only (admin.token, admin.viewer_token;
# admin.read_auth defaults to true there); /healthz, /readyz and /metrics stay open. Name the
# hosts you reach it by: PENDO_SYNC__ADMIN__ALLOWED_HOSTS=pendo-sync.internal (comma-separated).
ENV PENDO_SYNC__ADMIN__LISTEN=0.0.0.0:9464
EXPOSE 9464
# /readyz through the binary itself: the slim image has no curl.
HEALTHCHECK --interval=30s --timeout=15s --start-period=2m --retries=3 \
    CMD ["pendo-sync", "healthcheck"]
# SIGTERM (docker stop) finishes in-flight requests; give it time: docker stop -t 330.
STOPSIGNAL SIGTERM
ENTRYPOINT ["pendo-sync"]
CMD ["run"]
