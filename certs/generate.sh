#!/usr/bin/env bash
# Generate a throwaway PKI for trying keyhole locally and for its tests:
#
#   certs/generate.sh OUT_DIR [NAME ...]
#
# Writes into OUT_DIR (created if needed, existing files overwritten):
#   ca.crt, ca.key          a fresh self-signed CA (its CN ends in a random suffix,
#                           so every run yields a CA distinct from the last one)
#   server.crt, server.key  serverAuth certificate signed by that CA; SANs are every
#                           NAME given (default: localhost) plus DNS:localhost,
#                           IP:127.0.0.1 and IP:::1
#   client.crt, client.key  clientAuth certificate with CN keyhole-client, for
#                           keyhole's --client-cert/--client-key (mTLS upstream)
#
# Keys are EC P-256 in PKCS#8 PEM, mode 0600. Certificates are valid for 30 days.
# Needs only the openssl command-line tool (1.1.1 or 3.x).
set -euo pipefail

usage() {
    echo "usage: $0 OUT_DIR [NAME ...]" >&2
    echo "  NAME: a DNS name or IP address for the server certificate (default: localhost)" >&2
    exit 2
}

[ $# -ge 1 ] || usage
case "$1" in -h | --help) usage ;; esac
out=$1
shift
[ $# -ge 1 ] || set -- localhost

command -v openssl >/dev/null 2>&1 || {
    echo "$0: the openssl command-line tool is required" >&2
    exit 1
}

days=30
umask 077
mkdir -p "$out"

work=$(mktemp -d -t keyhole-certs.XXXXXX)
trap 'rm -rf "$work"' EXIT

# openssl is chatty on stderr even when it succeeds ("Certificate request
# self-signature ok", ...): keep its output and show it only if a step fails.
run() {
    if ! "$@" >"$work/openssl.log" 2>&1; then
        echo "$0: failed: $*" >&2
        cat "$work/openssl.log" >&2
        exit 1
    fi
}

# A random, positive 128-bit serial number (the leading 01 keeps it positive).
serial() { echo "0x01$(openssl rand -hex 15)"; }

new_key() { run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# Build the subjectAltName list: the names given, then the loopback defaults,
# each once. Anything that looks like an IPv4 or IPv6 literal is an IP entry.
declare -A seen=()
sans=()
for name in "$@" localhost 127.0.0.1 ::1; do
    [ -n "$name" ] || continue
    if [[ $name =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || $name == *:* ]]; then
        entry="IP:$name"
    else
        entry="DNS:$name"
    fi
    [ -z "${seen[$entry]:-}" ] || continue
    seen[$entry]=1
    sans+=("$entry")
done
san_list=$(
    IFS=,
    echo "${sans[*]}"
)

# --- CA ---------------------------------------------------------------------
suffix=$(openssl rand -hex 4)
new_key "$work/ca.key"
cat >"$work/ca.ext" <<'EOF'
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EOF
run openssl req -new -key "$work/ca.key" -subj "/O=keyhole test/CN=keyhole test CA $suffix" \
    -out "$work/ca.csr"
run openssl x509 -req -in "$work/ca.csr" -signkey "$work/ca.key" -days "$days" \
    -set_serial "$(serial)" -sha256 -extfile "$work/ca.ext" -out "$work/ca.crt"

# --- leaf certificates ----------------------------------------------------
# sign NAME CN EXTENSIONS: key NAME.key, certificate NAME.crt signed by the CA.
sign() {
    local name=$1 cn=$2 ext=$3
    new_key "$work/$name.key"
    printf '%s\n' "$ext" \
        'basicConstraints = critical, CA:FALSE' \
        'keyUsage = critical, digitalSignature' \
        'subjectKeyIdentifier = hash' \
        'authorityKeyIdentifier = keyid:always' >"$work/$name.ext"
    run openssl req -new -key "$work/$name.key" -subj "/O=keyhole test/CN=$cn" \
        -out "$work/$name.csr"
    run openssl x509 -req -in "$work/$name.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
        -days "$days" -set_serial "$(serial)" -sha256 -extfile "$work/$name.ext" \
        -out "$work/$name.crt"
}

sign server "$1" "extendedKeyUsage = serverAuth
subjectAltName = $san_list"
sign client keyhole-client "extendedKeyUsage = clientAuth"

# Move the finished files into place only now, so a failed run leaves OUT_DIR as it was.
files=(ca.crt ca.key server.crt server.key client.crt client.key)
for f in "${files[@]}"; do
    case $f in
    *.crt) chmod 0644 "$work/$f" ;;
    *.key) chmod 0600 "$work/$f" ;;
    esac
    mv -f "$work/$f" "$out/$f"
done

echo "wrote ${files[*]} to $out (server names: ${san_list//,/ })"
