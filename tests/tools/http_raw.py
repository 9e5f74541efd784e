#!/usr/bin/env python3
"""Raw HTTP/1.1 exchanges for tests/e2e_http.rs, standard library only. Prints one JSON object.

  http_raw.py upgrade HOST PORT ROUNDS   Upgrade request to /ws, then ROUNDS echo round trips
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


def upgrade(host, port, rounds):
    s = connect(host, port)
    s.sendall(
        b"GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n" % host.encode()
    )
    head, rest = read_head(s)
    out = {"status": status_of(head), "head": head, "echoed": 0}
    if out["status"] != 101:
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


if __name__ == "__main__":
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "upgrade":
        upgrade(host, port, int(sys.argv[4]))
    else:
        malformed(host, port)
