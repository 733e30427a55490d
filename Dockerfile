# syntax=docker/dockerfile:1
# workersd: a static (static-pie, glibc) binary on a distroless image, running as non-root.
#
#   docker build -t workersd .
#
# The same static build runs in CI (scripts/build-static), so this file only packages what CI
# already proves builds and runs.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN scripts/build-static /out/workersd

# Distroless static: no shell, no package manager, CA certificates and /etc/passwd with the
# `nonroot` user (uid 65532).
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/workersd /usr/local/bin/workersd
USER 65532:65532
EXPOSE 9463 9464
ENTRYPOINT ["/usr/local/bin/workersd"]
CMD ["--help"]
