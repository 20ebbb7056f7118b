#!/usr/bin/env bash
# Certificates and keys for an EMIXER-FL deployment.
#
#   deploy/make-certs.sh OUT_DIR SITE [SITE...]
#
# Writes, once (existing files are kept, never overwritten, so re-running only adds what is
# missing, e.g. a new site):
#   OUT_DIR/ca.key, ca.crt          the federation's own CA (keep ca.key offline)
#   OUT_DIR/server.key, server.crt  the SuperLink's TLS certificate, signed by the CA, valid for
#                                   localhost, 127.0.0.1 and $SERVER_HOSTNAME (if set)
#   OUT_DIR/sites/SITE.key          a site's ECDSA P-256 (prime256v1) private key, OpenSSH format,
#                                   the format flower-supernode --auth-supernode-private-key reads
#   OUT_DIR/sites/SITE.pub          its public key (OpenSSH), what the coordinator enrols
# Ship ca.crt and sites/SITE.key to site SITE; put sites/SITE.pub in server.yaml.
set -euo pipefail

usage() {
    echo "usage: $0 OUT_DIR SITE [SITE...]   (SERVER_HOSTNAME=host.example.org to add a SAN)" >&2
    exit 2
}
[ "$#" -ge 2 ] || usage
out=$1
shift
for site in "$@"; do
    if ! [[ "$site" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ ]]; then
        echo "error: site name '$site' may use only letters, digits, '.', '_' and '-'" >&2
        exit 2
    fi
done
command -v openssl >/dev/null || { echo "error: openssl is not installed" >&2; exit 2; }

mkdir -p "$out/sites"
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

for site in "$@"; do
    key="$out/sites/$site.key"
    pub="$out/sites/$site.pub"
    if [ -e "$key" ] || [ -e "$pub" ]; then
        echo "keeping existing key of site $site"
        continue
    fi
    if command -v ssh-keygen >/dev/null; then
        ssh-keygen -q -t ecdsa -b 256 -N "" -C "emixer-site-$site" -f "$key"
        mv "$key.pub" "$pub"
    else
        # No OpenSSH client: the same OpenSSH-format key via python's cryptography (a flwr dependency).
        python3 - "$key" "$pub" <<'PY'
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

key = ec.generate_private_key(ec.SECP256R1())
private = key.private_bytes(
    serialization.Encoding.PEM,
    serialization.PrivateFormat.OpenSSH,
    serialization.NoEncryption(),
)
public = key.public_key().public_bytes(
    serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
os.write(fd, private)
os.close(fd)
with open(sys.argv[2], "xb") as f:
    f.write(public + b"\n")
PY
    fi
    chmod 600 "$key"
    echo "wrote key pair of site $site: $key (give to the site), $pub (enrol on the server)"
done
