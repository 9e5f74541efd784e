#!/usr/bin/env python3
"""Raw HTTP/1.1 exchanges for tests/e2e_http.rs, standard library only. Prints one JSON object.

  http_raw.py upgrade HOST PORT ROUNDS [TOKEN]
                                         Upgrade request to /ws (TOKEN, default websocket; h2c also sends
                                         HTTP2-Settings), then ROUNDS echo round trips if switched
  http_raw.py get HOST PORT PATH...      one GET per PATH, sent exactly as given (each on its own connection);
                                         prints {PATH: [status, body]}
  http_raw.py keepalive HOST PORT PATH DIR
                                         GETs on one kept-alive connection: one (prints "ready"), then after
                                         DIR/go-fail appears until a 503 (prints "refused"), then after
                                         DIR/go-heal appears until a 200 again; prints every status seen
  http_raw.py malformed HOST PORT        bad request line, oversized header, invalid chunking; each on its own
                                         connection while a stalled connection (half a request head) stays open
"""
import json
import socket
import sys
import time


def connect(host, port):
    s = socket.create_connection((host, port), timeout=20)
    s.settimeout(20)
    return s


def read_head(s):
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = s.recv(65536)
        if not b:
            break
        buf += b
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def status_of(head):
    parts = head.split(" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None


def read_response(s, head, rest):
    """The body of a response whose head was read (Content-Length, chunked, or until close)."""
    length = None
    chunked = False
    for line in head.split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
        if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    body = rest
    while True:
        if length is not None and len(body) >= length:
            return body[:length]
        if chunked and body.endswith(b"0\r\n\r\n"):
            break
        b = s.recv(65536)
        if not b:
            break
        body += b
    if chunked:
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size.split(b";")[0] or b"0", 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        return out
    return body


def upgrade(host, port, rounds, token):
    s = connect(host, port)
    extra = b""
    if token == "h2c":
        # Deliberately not named in `Connection`: the gateway must drop it anyway.
        extra = b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
    s.sendall(
        b"GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: %s\r\nConnection: Upgrade\r\n%s"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        % (host.encode(), token.encode(), extra)
    )
    head, rest = read_head(s)
    out = {"status": status_of(head), "head": head, "echoed": 0}
    if out["status"] != 101:
        out["body"] = read_response(s, head, rest).decode("latin-1")
        print(json.dumps(out))
        return
    pending = rest
    for i in range(rounds):
        msg = b"message %d " % i + b"x" * (i * 37 % 2000)
        s.sendall(msg)
        got = pending
        while len(got) < len(msg):
            b = s.recv(65536)
            if not b:
                break
            got += b
        pending = got[len(msg):]
        if got[: len(msg)] != msg:
            break
        out["echoed"] += 1
    s.close()
    print(json.dumps(out))


def exchange(host, port, data):
    s = connect(host, port)
    try:
        s.sendall(data)
    except OSError:
        pass
    try:
        head, _ = read_head(s)
    except OSError as e:
        head = "error: %s" % e
    s.close()
    return status_of(head), head.split("\r\n")[0]


def malformed(host, port):
    stalled = connect(host, port)
    stalled.sendall(b"GET /small HTTP/1.1\r\nHost: %s\r\nX-Slow: " % host.encode())
    out = {}
    out["bad_request_line"] = exchange(host, port, b"GARBAGE\r\n\r\n")
    out["space_in_header_name"] = exchange(host, port, b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: 1\r\n\r\n")
    out["oversized_header"] = exchange(
        host, port, b"GET /small HTTP/1.1\r\nHost: %s\r\nX-Big: %s\r\n\r\n" % (host.encode(), b"a" * 100000)
    )
    out["invalid_chunking"] = exchange(
        host,
        port,
        b"POST /upload HTTP/1.1\r\nHost: %s\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZZ\r\n\r\n" % host.encode(),
    )
    # A good request still works while the stalled connection is open.
    out["good_while_stalled"] = exchange(host, port, b"GET /small HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host.encode())
    stalled.close()
    print(json.dumps(out))


def get(host, port, paths):
    out = {}
    for path in paths:
        s = connect(host, port)
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % (path.encode("latin-1"), host.encode()))
        try:
            head, rest = read_head(s)
            out[path] = [status_of(head), read_response(s, head, rest).decode("latin-1")]
        except OSError as e:
            out[path] = [None, "error: %s" % e]
        s.close()
    print(json.dumps(out))


def keepalive(host, port, path, trigger_dir):
    import os

    s = connect(host, port)
    seen = []

    def once():
        s.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode()))
        head, rest = read_head(s)
        body = read_response(s, head, rest)
        seen.append(status_of(head))
        return status_of(head), body

    def until(trigger, want, deadline=90):
        while not os.path.exists(os.path.join(trigger_dir, trigger)):
            time.sleep(0.05)
        end = time.time() + deadline
        while time.time() < end:
            status, body = once()
            if status == want:
                return body.decode("latin-1")
            time.sleep(0.3)
        return None

    once()
    print("ready", flush=True)
    refused = until("go-fail", 503)
    print("refused" if refused is not None else "never-refused", flush=True)
    healed = until("go-heal", 200)
    print(json.dumps({"seen": seen, "refused_page": refused, "healed": healed is not None}), flush=True)


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "upgrade":
        upgrade(host, port, int(sys.argv[4]), sys.argv[5] if len(sys.argv) > 5 else "websocket")
    elif mode == "get":
        get(host, port, sys.argv[4:])
    elif mode == "keepalive":
        keepalive(host, port, sys.argv[4], sys.argv[5])
    else:
        malformed(host, port)
