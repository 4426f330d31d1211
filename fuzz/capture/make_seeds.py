#!/usr/bin/env python3
"""Writes the seed corpora fuzz/corpus/<target>/seed-* from the captures in
fuzz/capture/ (real psql and mariadb sessions, recorded by relay.py; see
fuzz/README.md) plus a few synthetic seeds for what no capture has, each in
the input format of its target (fuzz/targets/<target>.rs).

Regression inputs (crash-*) in the corpora are left alone.
Run from anywhere: python3 fuzz/capture/make_seeds.py
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")
PG = os.path.join(HERE, "postgres")
MY = os.path.join(HERE, "mariadb")


def read(path):
    with open(path, "rb") as f:
        return f.read()


def name(text):
    """Input::name: a one-byte length, then the text."""
    b = text.encode()
    return bytes([len(b)]) + b


def write(target, seeds):
    out = os.path.join(CORPUS, target)
    os.makedirs(out, exist_ok=True)
    for old in os.listdir(out):
        if old.startswith("seed-"):
            os.remove(os.path.join(out, old))
    for label, data in seeds:
        with open(os.path.join(out, "seed-" + label), "wb") as f:
            f.write(data)


def captures(folder, suffix):
    for f in sorted(os.listdir(folder)):
        if f.endswith(suffix):
            yield f[: -len(suffix)], read(os.path.join(folder, f))


def pg_message(tag, body):
    return tag + struct.pack(">I", 4 + len(body)) + body


def mysql_packet(seq, payload):
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def split_mysql(stream):
    packets = []
    while len(stream) >= 4:
        n = int.from_bytes(stream[:3], "little")
        packets.append((stream[3], stream[4 : 4 + n]))
        stream = stream[4 + n :]
    return packets


# --- postgres_codec: [selector][user name][stream] -------------------------
seeds = []
for label, data in captures(PG, ".c2s"):
    seeds.append(("client-" + label, b"\x00" + name("iam_user") + data))
for label, data in captures(PG, ".s2c"):
    seeds.append(("server-" + label, b"\x00" + name("") + data))
# Synthetic: no capture has these (psql 15 sends no GSSENCRequest without
# Kerberos credentials, and offers SCRAM-SHA-256-PLUS only over TLS).
seeds.append(("synthetic-gssenc", b"\x00" + name("") + bytes.fromhex("0000000804d21630")))
sasl = struct.pack(">I", 10) + b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
seeds.append(("synthetic-sasl-plus", b"\x00" + name("") + pg_message(b"R", sasl)))
write("postgres_codec", seeds)

# --- postgres_session: [flags][token?][user?][seed u64][client len u16][client][server]
def pg_session(flags, client, server, token=None, user=None):
    head = bytes([flags])
    if flags & 2:
        head += name(token)
    if flags & 4:
        head += name(user)
    return head + struct.pack(">Q", 0x1234_5678_9ABC_DEF0) + struct.pack(">H", len(client)) + client + server


seeds = []
for label, client in captures(PG, ".c2s"):
    s2c = os.path.join(PG, label + ".s2c")
    server = read(s2c) if os.path.exists(s2c) else b""
    seeds.append((label, pg_session(0, client, server)))
# The cleartext session with a token (keyhole answers the request itself)
# and with a user mapping; the SCRAM session with a token (refused).
seeds.append(("cleartext-token", pg_session(2 | 4, read(os.path.join(PG, "cleartext.c2s")), read(os.path.join(PG, "cleartext.s2c")), "iam-token", "iam_user")))
seeds.append(("scram-token", pg_session(2, read(os.path.join(PG, "scram.c2s")), read(os.path.join(PG, "scram.s2c")), "iam-token")))
seeds.append(("sslmode-require-local-tls", pg_session(1, read(os.path.join(PG, "sslmode-require.c2s")), read(os.path.join(PG, "sslmode-require.s2c")))))
scram = read(os.path.join(PG, "scram.s2c"))
plus = pg_message(b"R", sasl)
first_len = 1 + int.from_bytes(scram[1:5], "big")
seeds.append(("synthetic-scram-plus-offer", pg_session(0, read(os.path.join(PG, "scram.c2s")), plus + scram[first_len:])))
write("postgres_session", seeds)

# --- mysql_codec: [selector][bits u32][user name][stream] ------------------
seeds = []
for label, data in captures(MY, ".s2c"):
    seeds.append(("server-" + label, b"\x00" + struct.pack(">I", 0x800) + name("iam_user") + data))
for label, data in captures(MY, ".c2s"):
    seeds.append(("client-" + label, b"\x00" + struct.pack(">I", 0x800) + name("iam_user") + data))
write("mysql_codec", seeds)

# --- mysql_session: [flags][token?][user?][order u32][seed u64][server len u16][server][client]
def my_session(flags, server, client, token=None, user=None):
    head = bytes([flags])
    if flags & 4:
        head += name(token)
    if flags & 8:
        head += name(user)
    return head + struct.pack(">I", 0xAAAA_AAAA) + struct.pack(">Q", 0x0FED_CBA9_8765_4321) + struct.pack(">H", len(server)) + server + client


seeds = []
for label, client in captures(MY, ".c2s"):
    server = read(os.path.join(MY, label + ".s2c"))
    flags = 1 if label == "ssl" else 0
    seeds.append((label, my_session(flags, server, client)))
seeds.append(("native-token-user", my_session(4 | 8, read(os.path.join(MY, "native.s2c")), read(os.path.join(MY, "native.c2s")), "iam-token", "iam_user")))
# Derived: MariaDB has no mysql_clear_password server plugin outside PAM;
# Aurora and Cloud SQL switch to it. The ed25519 session's AuthSwitchRequest
# with the plugin renamed and no plugin data (as Aurora sends it).
server = read(os.path.join(MY, "ed25519-switch.s2c"))
packets = split_mysql(server)
renamed = b"".join(
    mysql_packet(seq, b"\xfemysql_clear_password\x00" if p[:1] == b"\xfe" else p)
    for seq, p in packets
)
seeds.append(("derived-clear-password-switch-token", my_session(4, renamed, read(os.path.join(MY, "ed25519-switch.c2s")), "iam-token")))
write("mysql_session", seeds)

# --- tls_record and tls_differential: synthetic record descriptions -------
def spec(flags, length, seed_or_bytes, padding=b"", outer=b"", version=b"", nonce=b"", ct=b""):
    out = bytes([flags]) + ct + struct.pack(">H", length)
    out += seed_or_bytes + padding + outer + version + nonce
    return out


def plain_spec(length, seed=7):
    return spec(0, length, bytes([seed]))


def tls_record_seeds():
    seeds = []
    for suite in range(6):
        # keyhole-sealed records of a few sizes, then reference-sealed ones.
        ops = b""
        for length in (0, 1, 100, 0x8000, 0x8001):
            ops += b"\x02" + bytes([23]) + struct.pack(">H", length) + b"\x05"
        ops += b"\x00" + plain_spec(300)
        ops += b"\x00" + spec(0x80, 20, b"\x09", padding=b"\x40")  # padded (TLS 1.3)
        ops += b"\x00" + spec(0x04, 2, b"\x01")  # an alert
        seeds.append(("suite%d-records" % suite, bytes([suite]) + b"\x00\x00" + ops))
        seeds.append(("suite%d-flip" % suite, bytes([suite]) + b"\x00\x00" + b"\x00" + plain_spec(50) + b"\x04\x00\x20\x01" + b"\x00" + plain_spec(10)))
    # Real TLS bytes from the wire, as raw records (they do not open:
    # other keys), cut into the 255-byte pieces the raw operation takes.
    for label, path, skip in (
        ("postgres-server-tls", os.path.join(PG, "sslmode-require.s2c"), 1),
        ("mariadb-server-tls", os.path.join(MY, "ssl.s2c"), None),
    ):
        data = read(path)
        if skip is None:
            # After the greeting packet.
            skip = 4 + int.from_bytes(data[:3], "little")
        data = data[skip:]
        ops = b""
        for i in range(0, min(len(data), 255 * 15), 255):
            chunk = data[i : i + 255]
            ops += b"\x05" + bytes([len(chunk)]) + chunk
        seeds.append((label, b"\x00\x00\x00" + ops))
    return seeds


write("tls_record", tls_record_seeds())

seeds = []
for suite in range(6):
    seeds.append(("suite%d-data" % suite, bytes([suite]) + plain_spec(0) + b"\x00" + plain_spec(1000) + b"\x00" + spec(0x08, 0, b"\x03") + b"\x00"))
    seeds.append(("suite%d-padded" % suite, bytes([suite]) + spec(0x80, 100, b"\x01", padding=b"\x10") + b"\x00"))
    seeds.append(("suite%d-corrupt" % suite, bytes([suite]) + plain_spec(64) + b"\x30\x00\x10\x40"))
    seeds.append(("suite%d-alert" % suite, bytes([suite]) + spec(0x04, 2, b"\x00") + b"\x00"))
    seeds.append(("suite%d-nonce" % suite, bytes([suite]) + spec(0x50, 8, b"ABCDEFGH", nonce=b"\x00\x00\x00\x00\x00\x00\x00\x07") + b"\x00"))
write("tls_differential", seeds)

# --- config: lines of text ---------------------------------------------------
config_seeds = {
    "readme-targets": "\n".join([
        "postgres://orders.abc123.eu-west-1.rds.amazonaws.com:5432?iam=aws",
        "mysql://shop.abc123.eu-west-1.rds.amazonaws.com",
        "postgres://127.0.0.1:15432?server-name=db.internal&ca-file=ca.pem",
        "postgres://10.20.0.3:5432?tls-mode=verify-ca&iam=gcp",
    ]),
    "via-hops": "\n".join([
        "postgres://orders.abc123.eu-west-1.rds.amazonaws.com?via=ssh://me@bastion.example.com:2222&iam=aws",
        "mysql://db.internal?via=socks5://me:secret-password@10.0.0.9:1080",
        "postgres://db.internal?via=http://proxy.corp:3128",
        "postgres://localhost:5432?via=direct&tls-mode=disable",
        "https://user:hunter2-pass@proxy.example:8443",
    ]),
    "cloudsql": "\n".join([
        "cloudsql://my-proj:us-central1:orders",
        "example.com:my-proj:europe-west1:db?private-ip&auto-iam-authn=true",
        "cloudsql://prod-db.example.com",
    ]),
    "flags-and-env": "\n".join([
        "--port=6000",
        "--max-connections=10",
        "--startup-timeout=1m30s",
        "env KEYHOLE_ALLOW=10.0.0.0/8, fd00::/8",
        "env ALL_PROXY=socks5://u:p4ssword-xyz@127.0.0.1:1080",
        "postgres://db.internal:5432?listen=127.0.0.1:6543&allow=192.168.0.0/16",
        "postgres://[::1]:5432?unix-socket=/tmp/kh",
    ]),
    "values": "\n".join(["30s", "500ms", "1h30m", "10.0.0.0/8", "::ffff:10.0.0.1", "[::1]:6432", "127.0.0.1:6432"]),
    "toml-file": "--skip-failed-targets\n[file]\n"
    "targets = [\"postgres://a.internal\", \"mysql://b.internal:3307?user=app\"]\n"
    "port = 7000\nconnect-timeout = \"5s\"\nkernel-tls = \"auto\"\n",
}
write("config", sorted((k, v.encode()) for k, v in config_seeds.items()))
print("seeds written under", os.path.normpath(CORPUS), file=sys.stderr)
