# A recording TCP relay: every connection's bytes, per direction and in order,
# go to OUT/<n>.<c2s|s2c>.<k> files (one per read), and whole streams to
# OUT/<n>.c2s / OUT/<n>.s2c. Upstream None: a listener that answers nothing
# (records what a client sends first) except 'N' to an SSLRequest/GSSENCRequest.
import os, socket, sys, threading
listen_port, upstream, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.makedirs(out, exist_ok=True)
counter = [0]
lock = threading.Lock()
def pump(src, dst, path):
    with open(path, 'ab') as f:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b''
            if not data:
                break
            f.write(data); f.flush()
            try:
                dst.sendall(data)
            except OSError:
                break
    for s in (dst, src):
        try: s.shutdown(socket.SHUT_RDWR)
        except OSError: pass
def serve(conn):
    with lock:
        counter[0] += 1; n = counter[0]
    base = os.path.join(out, '%02d' % n)
    if upstream == 'none':
        with open(base + '.c2s', 'ab') as f:
            conn.settimeout(3)
            try:
                while True:
                    data = conn.recv(65536)
                    if not data: break
                    f.write(data); f.flush()
                    if data[4:8] in (b'\x04\xd2\x16\x2f', b'\x04\xd2\x16\x30'):
                        conn.sendall(b'N')
            except OSError:
                pass
        conn.close(); return
    host, port = upstream.rsplit(':', 1)
    up = socket.create_connection((host, int(port)))
    threading.Thread(target=pump, args=(conn, up, base + '.c2s'), daemon=True).start()
    pump(up, conn, base + '.s2c')
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(('127.0.0.1', listen_port)); srv.listen(16)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
