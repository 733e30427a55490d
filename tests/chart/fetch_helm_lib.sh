#!/usr/bin/env bash
# Fetches Helm's Go library as a C shared library (libhelm_sdkpy.so, from the PyPI wheel
# helm-sdkpy) for tests/chart. The wheel declares Requires-Python >= 3.12, so it is downloaded
# (not installed) and unpacked; tests/chart/helm_lib.py loads the .so with cffi from any
# Python 3. Idempotent: prints the library path and exits when it is already there.
#
#   bash tests/chart/fetch_helm_lib.sh          # unpacks into ${HELM_SDKPY_DIR:-/tmp/helm-sdkpy}
#
# Needs python3 with pip, and network access to PyPI.
set -euo pipefail

version=0.1.32
# sha256 of helm_sdkpy-0.1.32-py3-none-any.whl (PyPI); a different file is refused.
sha256=bcf5bf73cacc373bebedfb9c988969aa12a9eda86a140deba658fbf28eb789c5

dir="${HELM_SDKPY_DIR:-/tmp/helm-sdkpy}"
dest="$dir/$version"
lib="$dest/helm_sdkpy/_lib/linux-amd64/libhelm_sdkpy.so"

if [ -f "$lib" ]; then
    echo "$lib"
    exit 0
fi
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) echo "fetch_helm_lib: helm-sdkpy $version ships linux-amd64 only, not $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac

mkdir -p "$dir"
# One fetch at a time (parallel CI jobs sharing the cache directory).
exec 9>"$dir/.lock"
flock 9
if [ -f "$lib" ]; then
    echo "$lib"
    exit 0
fi
tmp="$(mktemp -d "$dir/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

python3 -m pip download --quiet --disable-pip-version-check --no-deps \
    --python-version 3.12 --only-binary=:all: -d "$tmp/wheel" "helm-sdkpy==$version" >&2
wheel="$tmp/wheel/helm_sdkpy-$version-py3-none-any.whl"
got="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [ "$got" != "$sha256" ]; then
    echo "fetch_helm_lib: sha256 mismatch for $wheel: got $got, want $sha256" >&2
    exit 1
fi
python3 -m zipfile -e "$wheel" "$tmp/unpacked"
test -f "$tmp/unpacked/helm_sdkpy/_lib/linux-amd64/libhelm_sdkpy.so"
rm -rf "$dest"
mv "$tmp/unpacked" "$dest"
echo "$lib"
