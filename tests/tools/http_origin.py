#!/usr/bin/env python3
"""Test origin application behind nginx (tests/e2e_http.rs), standard library only.

  POST /upload   reads the body (Content-Length or chunked), answers {"sha256": ..., "bytes": ...}
  GET  /chunked  answers with a chunked body of N numbered lines (?n=N, default 50); with ?hold=PATH it sends
                 the first line, creates PATH.held and sends the rest only once PATH exists (at most 120 s)
  GET  /ws       with `Upgrade`: answers 101 and then echoes every byte until the peer closes
  GET  /ws       without `Upgrade`: 200 and a JSON object of the `Upgrade` and `HTTP2-Settings` it received
  CONNECT h:p    a forward-proxy tunnel to h:p (200, then bytes both ways)

With --lenient it plays the origins that path rules must not be fooled by: every GET path is resolved the
most permissive way backends do (all percent-escapes decoded as Tomcat-behind-a-decoding-proxy and many
frameworks do, `\` as `/` as IIS does, `;params` dropped from each segment as servlet containers do, dot
segments resolved, case folded as IIS does); a path that resolves to /admin/... answers "secret admin panel",
/small answers "hello from lenient", anything else 404. With --tls CERT KEY it speaks TLS and, like many
servers, ignores the client's server name and ALPN.

Usage: http_origin.py HOST PORT [--lenient] [--tls CERT KEY]   (prints LISTENING when ready)
"""
import hashlib
import json
import select
import socket
import socketserver
import os
import ssl
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, unquote, urlparse

LENIENT = "--lenient" in sys.argv


def lenient_path(raw):
    path = raw.split("?", 1)[0]
    path = unquote(path, errors="replace").replace("\\", "/")
    out = []
    for seg in path.split("/"):
        seg = seg.split(";", 1)[0]
        if seg in ("", "."):
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    return "/" + "/".join(out).lower()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        h = hashlib.sha256()
        n = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                left = size
                while left:
                    b = self.rfile.read(min(left, 1 << 16))
                    if not b:
                        raise ConnectionError("body cut short")
                    h.update(b)
                    left -= len(b)
                    n += len(b)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length", "0"))
            while left:
                b = self.rfile.read(min(left, 1 << 16))
                if not b:
                    raise ConnectionError("body cut short")
                h.update(b)
                left -= len(b)
                n += len(b)
        return h.hexdigest(), n

    def do_CONNECT(self):
        host, _, port = self.path.rpartition(":")
        try:
            upstream = socket.create_connection((host, int(port)), timeout=10)
        except OSError:
            self.send_error(502)
            return
        self.send_response(200, "Connection established")
        self.end_headers()
        self.wfile.flush()
        socks = [self.connection, upstream]
        while True:
            ready, _, _ = select.select(socks, [], [], 60)
            if not ready:
                break
            done = False
            for s in ready:
                b = s.recv(65536)
                if not b:
                    done = True
                    break
                (upstream if s is self.connection else self.connection).sendall(b)
            if done:
                break
        upstream.close()
        self.close_connection = True

    def do_POST(self):
        digest, n = self.read_body()
        body = json.dumps({"sha256": digest, "bytes": n}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply(self, status, body, ctype="text/plain"):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if LENIENT:
            p = lenient_path(self.path)
            if p == "/admin" or p.startswith("/admin/"):
                self.reply(200, b"secret admin panel\n")
            elif p == "/small":
                self.reply(200, b"hello from lenient\n")
            else:
                self.reply(404, b"not found\n")
            return
        url = urlparse(self.path)
        if url.path == "/ws" and not self.headers.get("Upgrade"):
            seen = {"upgrade": self.headers.get("Upgrade"), "http2_settings": self.headers.get("HTTP2-Settings")}
            self.reply(200, json.dumps(seen).encode(), "application/json")
            return
        if url.path == "/ws" and self.headers.get("Upgrade"):
            self.send_response(101)
            self.send_header("Upgrade", self.headers["Upgrade"])
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            while True:
                b = self.connection.recv(65536)
                if not b:
                    break
                self.connection.sendall(b)
            self.close_connection = True
            return
        if url.path == "/chunked":
            n = int(parse_qs(url.query).get("n", ["50"])[0])
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            hold = parse_qs(url.query).get("hold", [None])[0]
            for i in range(n):
                line = ("line %d\n" % i).encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                self.wfile.flush()
                if hold and i == 0:
                    open(hold + ".held", "w").close()
                    deadline = time.time() + 120
                    while not os.path.exists(hold) and time.time() < deadline:
                        time.sleep(0.05)
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_error(404)


class Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    srv = Server((sys.argv[1], int(sys.argv[2])), Handler)
    if "--tls" in sys.argv:
        i = sys.argv.index("--tls")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(sys.argv[i + 1], sys.argv[i + 2])
        # The handshake runs in the handler's thread (first read), not in the accept loop.
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True, do_handshake_on_connect=False)
    print("LISTENING", flush=True)
    srv.serve_forever()
