#!/usr/bin/env python3
"""A client of the enrollment listener that sends its request too slowly (tests/e2e_enroll.rs), stdlib only.

Usage: slow_tls.py HOST PORT MODE
  fast     a whole 200-byte JSON body at once (the control: the server reads it and answers)
  body     the headers and the first 10 bytes of that body, then nothing
  headers  half a request line, then nothing

Prints one JSON line: {"status": HTTP status or null, "closed_after": seconds, "body": "..."}.
"""
import json
import socket
import ssl
import sys
import time

host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE  # the pin is checked by the other tests; this one is about timing
sock = ctx.wrap_socket(socket.create_connection((host, port), timeout=90), server_hostname=host)

prefix = b'{"token":"rpe1_not_a_token","public_key":"k","hostname":"'
body = prefix + b"a" * (200 - len(prefix) - 2) + b'"}'
head = b"POST /v1/enroll HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % (
    host.encode(),
    port,
    len(body),
)
start = time.monotonic()
if mode == "fast":
    sock.sendall(head + body)
elif mode == "body":
    sock.sendall(head + body[:10])
elif mode == "headers":
    sock.sendall(head[:12])
else:
    sys.exit("unknown mode " + mode)

data = b""
try:
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
except (ConnectionError, ssl.SSLError, socket.timeout):
    pass
elapsed = time.monotonic() - start
status = int(data[9:12]) if data.startswith(b"HTTP/1.1 ") else None
text = data.split(b"\r\n\r\n", 1)[1].decode(errors="replace") if b"\r\n\r\n" in data else ""
print(json.dumps({"status": status, "closed_after": round(elapsed, 2), "body": text}))
