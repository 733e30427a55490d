# syntax=docker/dockerfile:1
# workersd: the static (static-pie, glibc) binary on an empty base, running as non-root.
#
#   docker build -t workersd .
#
# CI builds the same image without Docker (scripts/build-image) from the same static build
# (scripts/build-static) and root filesystem (scripts/image-rootfs: the binary, the CA bundle,
# /etc/passwd and /etc/group with the user 65532, /tmp). tests/image/test_image.py checks that
# this file declares what that image holds (user, entrypoint, environment, ports, labels).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-static /out/workersd && scripts/image-rootfs /out/workersd /rootfs

FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
ENV PATH=/usr/local/bin:/usr/bin:/bin SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 9463/tcp 9464/tcp
LABEL org.opencontainers.image.title=workersd \
      org.opencontainers.image.source=https://github.com/workersd/workersd \
      org.opencontainers.image.licenses=Apache-2.0
ENTRYPOINT ["/usr/local/bin/workersd"]
CMD ["--help"]
