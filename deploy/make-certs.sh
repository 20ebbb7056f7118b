#!/usr/bin/env bash
# The coordinator's certificates for an EMIXER-FL deployment.
#
#   deploy/make-certs.sh OUT_DIR
#
# Writes, once (existing files are kept, never overwritten):
#   OUT_DIR/ca.key, ca.crt          the federation's own CA (keep ca.key offline)
#   OUT_DIR/server.key, server.crt  the SuperLink's TLS certificate, signed by the CA, valid for
#                                   localhost, 127.0.0.1 and $SERVER_HOSTNAME (if set)
# Ship ca.crt to every site. Site keys are NOT made here: each hospital runs
# `emixer keygen --out SITE.key` itself and sends only SITE.pub, which goes in server.yaml.
set -euo pipefail

usage() {
    echo "usage: $0 OUT_DIR   (SERVER_HOSTNAME=host.example.org to add a SAN)" >&2
    exit 2
}
[ "$#" -ge 1 ] || usage
if [ "$#" -gt 1 ]; then
    echo "error: site keys are made at each site (emixer keygen --out SITE.key), never here;" \
        "put each site's SITE.pub in server.yaml" >&2
    exit 2
fi
out=$1
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 2; }

mkdir -p "$out"
chmod 700 "$out"
days=${CERT_DAYS:-825}

if [ -e "$out/ca.key" ] || [ -e "$out/ca.crt" ]; then
    if ! [ -e "$out/ca.key" ] || ! [ -e "$out/ca.crt" ]; then
        echo "error: $out has only one of ca.key / ca.crt; restore the other or remove both" >&2
        exit 2
    fi
    echo "keeping existing CA $out/ca.crt"
else
    openssl ecparam -name prime256v1 -genkey -noout -out "$out/ca.key"
    chmod 600 "$out/ca.key"
    openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" \
        -subj "/CN=EMIXER-FL federation CA" -out "$out/ca.crt"
    echo "wrote CA $out/ca.crt"
fi

if [ -e "$out/server.key" ] || [ -e "$out/server.crt" ]; then
    echo "keeping existing SuperLink certificate $out/server.crt"
else
    san="DNS:localhost,IP:127.0.0.1"
    if [ -n "${SERVER_HOSTNAME:-}" ]; then
        if [[ "$SERVER_HOSTNAME" =~ ^[0-9.]+$ ]]; then
            san="$san,IP:$SERVER_HOSTNAME"
        else
            san="$san,DNS:$SERVER_HOSTNAME"
        fi
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    openssl ecparam -name prime256v1 -genkey -noout -out "$out/server.key"
    chmod 600 "$out/server.key"
    openssl req -new -key "$out/server.key" -subj "/CN=${SERVER_HOSTNAME:-localhost}" \
        -out "$tmp/server.csr"
    printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
        "$san" >"$tmp/ext.cnf"
    openssl x509 -req -in "$tmp/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
        -CAcreateserial -CAserial "$tmp/ca.srl" -days "$days" -sha256 \
        -extfile "$tmp/ext.cnf" -out "$out/server.crt" 2>/dev/null
    echo "wrote SuperLink certificate $out/server.crt ($san)"
fi
