#!/usr/bin/env bash
# Install Debian's kubernetes-client (kubectl 1.20), the real client the fake_kube tests use.
#
# Normally a plain `apt-get install kubernetes-client`. Where another package already owns
# /usr/bin/kubectl (some images ship the Cloud SDK's kubectl), dpkg refuses to overwrite it;
# then the same Debian package is unpacked into /opt/kubernetes-client instead (the tests
# look there first), leaving the other kubectl alone. Idempotent; needs root.
set -euo pipefail
DEST=/opt/kubernetes-client
if [ -x "$DEST/usr/bin/kubectl" ] || dpkg -s kubernetes-client >/dev/null 2>&1; then
  echo "kubernetes-client already installed"; exit 0
fi
apt-get update -qq
owner=$(dpkg -S /usr/bin/kubectl 2>/dev/null | cut -d: -f1 || true)
if [ -z "$owner" ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kubernetes-client
else
  echo "/usr/bin/kubectl belongs to package '$owner': unpacking kubernetes-client into $DEST"
  tmp=$(mktemp -d); chmod 755 "$tmp"
  (cd "$tmp" && apt-get download kubernetes-client)
  mkdir -p "$DEST"
  dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$DEST"
  rm -rf "$tmp"
fi
