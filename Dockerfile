# Builds the idem binary and ships it on a slim Debian image.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      libclang-dev clang cmake libcurl4-openssl-dev libsasl2-dev libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      ca-certificates libcurl4 libsasl2-2 libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/idem /usr/local/bin/idem
COPY config /etc/idem
VOLUME /var/lib/idem
EXPOSE 9464
ENTRYPOINT ["idem"]
CMD ["run", "--config", "/etc/idem/idem.docker.toml"]
