#!/usr/bin/env python3
"""Hostile input for a WireGuard responder (python3 standard library only).

Modes (both bounded; run from a test namespace only):
  junk   one pass over malformed datagrams: empty, tiny, random bytes, every message type with
         wrong lengths, truncated and oversized handshake initiations (with and without a valid
         mac1), data packets with random receiver indices.
  flood  handshake initiations with a VALID mac1 and random contents at --rate per second for
         --duration seconds; counts the cookie replies (type 3, 64 bytes) that come back.
  forge  data messages (type 4) with garbage ciphertext for every receiver index of the first
         --slots peer slots (index layout (slot << 16) | (worker << 8) | counter8), then listens
         --listen seconds: anything the gateway sends here would be another peer's traffic
         redirected by an unauthenticated packet. Prints "SENT" once the forgeries are out.

mac1 (WireGuard whitepaper 5.4.4): key = BLAKE2s-256("mac1----" || responder static public key);
mac1 = keyed BLAKE2s-128 over the first 116 bytes of the 148-byte initiation; mac2 left zero.

Prints one JSON line with what was sent and received.
"""

import argparse
import base64
import hashlib
import json
import os
import socket
import struct
import sys
import time

INIT_LEN = 148
MAC1_OFFSET = 116


def mac1_key(server_pub):
    return hashlib.blake2s(b"mac1----" + server_pub, digest_size=32).digest()


def initiation(key, sender):
    """A 148-byte type-1 message with random ephemeral/static/timestamp and a valid mac1."""
    body = struct.pack("<I", 1) + struct.pack("<I", sender) + os.urandom(32 + 48 + 28)
    mac1 = hashlib.blake2s(body, key=key, digest_size=16).digest()
    return body + mac1 + bytes(16)


def junk_datagrams(key):
    out = [b"", b"\x01", b"\x04", b"\xff" * 3]
    out += [os.urandom(n) for n in (1, 2, 3, 4, 15, 16, 31, 32, 47, 63, 64, 65, 91, 92, 93, 147, 148, 149, 1200)]
    good = initiation(key, 0x01020304)
    bad_mac = bytearray(initiation(key, 0x05060708))
    bad_mac[MAC1_OFFSET] ^= 0xFF
    out += [
        good[:4],  # type only
        good[:8],  # type + sender
        good[:MAC1_OFFSET],  # cut before mac1
        good[:147],  # one byte short
        good + b"\x00",  # one byte long
        good + os.urandom(52),  # 200 bytes
        good + os.urandom(1400 - INIT_LEN),
        good + os.urandom(65000 - INIT_LEN),  # oversized: fragmented on the underlay
        bytes(bad_mac),  # right size, wrong mac1
        good,  # valid mac1, garbage crypto: costs the responder a DH, then fails
    ]
    # wrong lengths for the other message types, random receiver indices
    for typ, n in ((2, 92), (2, 91), (2, 93), (3, 64), (3, 63), (3, 65), (4, 16), (4, 32), (4, 48), (4, 1452)):
        out.append(struct.pack("<I", typ) + os.urandom(n - 4))
    # data packets with receiver index 0 and all-ones, counter 0
    out.append(struct.pack("<IIQ", 4, 0, 0) + os.urandom(32))
    out.append(struct.pack("<IIQ", 4, 0xFFFFFFFF, 0) + os.urandom(32))
    # unknown message types and a set reserved field
    for typ in (0, 5, 255, 0x0101):
        out.append(struct.pack("<I", typ) + os.urandom(144))
    # random garbage of many sizes
    out += [os.urandom(n) for n in range(0, 1500, 37)]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["junk", "flood", "forge"])
    p.add_argument("--target", required=True, help="HOST:PORT of the gateway")
    p.add_argument("--pubkey", required=True, help="gateway public key, base64")
    p.add_argument("--rate", type=int, default=3000, help="flood: initiations per second")
    p.add_argument("--duration", type=float, default=5.0, help="flood: seconds (hard limit 30)")
    p.add_argument("--repeat", type=int, default=3, help="junk: passes over the corpus")
    p.add_argument("--slots", type=int, default=4, help="forge: peer slots to cover")
    p.add_argument("--workers", type=int, default=4, help="forge: worker ids to cover")
    p.add_argument("--listen", type=float, default=5.0, help="forge: seconds to listen after")
    a = p.parse_args()

    host, port = a.target.rsplit(":", 1)
    target = (host, int(port))
    pub = base64.b64decode(a.pubkey)
    if len(pub) != 32:
        print("public key must be 32 bytes", file=sys.stderr)
        return 2
    key = mac1_key(pub)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.setblocking(False)

    sent = 0
    send_errors = 0
    cookie_replies = 0
    cookie_matching = 0
    other_replies = 0
    senders = set()

    def drain():
        nonlocal cookie_replies, cookie_matching, other_replies
        while True:
            try:
                data, _ = s.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(data) == 64 and data[0] == 3:
                cookie_replies += 1
                if struct.unpack_from("<I", data, 4)[0] in senders:
                    cookie_matching += 1
            else:
                other_replies += 1

    def send(d):
        nonlocal sent, send_errors
        try:
            s.sendto(d, target)
            sent += 1
        except (BlockingIOError, InterruptedError):
            send_errors += 1
        except OSError:
            send_errors += 1

    start = time.monotonic()
    if a.mode == "junk":
        corpus = junk_datagrams(key)
        for _ in range(a.repeat):
            for d in corpus:
                send(d)
                time.sleep(0.001)
                drain()
    elif a.mode == "forge":
        for slot in range(a.slots):
            for worker in range(a.workers):
                for counter in range(256):
                    idx = (slot << 16) | (worker << 8) | counter
                    # type 4, receiver index, a high counter, garbage "ciphertext" + tag
                    send(struct.pack("<IIQ", 4, idx, 1 << 40) + os.urandom(48))
                    if sent % 64 == 0:
                        time.sleep(0.002)
                        drain()
        print("SENT", flush=True)
        end = time.monotonic() + min(a.listen, 30.0)
        while time.monotonic() < end:
            drain()
            time.sleep(0.02)
    else:
        duration = min(a.duration, 30.0)
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= duration:
                break
            due = min(int(elapsed * a.rate) - sent, 200)
            for _ in range(due):
                sender = int.from_bytes(os.urandom(4), "little")
                senders.add(sender)
                send(initiation(key, sender))
            drain()
            time.sleep(0.001)
    # replies still in flight
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        drain()
        time.sleep(0.05)
    print(
        json.dumps(
            {
                "mode": a.mode,
                "sent": sent,
                "send_errors": send_errors,
                "seconds": round(time.monotonic() - start, 3),
                "cookie_replies": cookie_replies,
                "cookie_replies_matching": cookie_matching,
                "other_replies": other_replies,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
