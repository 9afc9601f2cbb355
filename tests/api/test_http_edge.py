"""The HTTP edge under awkward clients: more slow clients than listener threads, oversized
headers, the 413 limit. Handlers run on a fixed number of threads (the listener's, and under
load the handler pool's: one per core each by default); a handler that blocked on a body read
would let slow clients starve them and hang the listener."""
import os
import re
import socket
import sys

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, describe  # noqa: E402

SLOW_CLIENTS = 64  # more than the listener's and the handler pool's threads together


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def open_slow_client(server, path, declared_length, sent_body):
    s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    head = ("POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Vault-Token: %s\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (path, server.token, declared_length))
    s.sendall(head.encode() + sent_body)
    return s


def test_more_slow_clients_than_listener_threads_do_not_stall_the_server(server):
    r = server.request("POST", "/v1/transit/keys/edge")
    assert r.status_code == 200, describe(r)
    slow = []
    try:
        # Each of these has sent its headers and part of its body, then stalls.
        for _ in range(SLOW_CLIENTS):
            slow.append(open_slow_client(server, "/v1/transit/encrypt/edge", 1000, b'{"plaintext":"'))
        for _ in range(8):  # and some that connected and said nothing at all
            slow.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        # Fresh connections (no keep-alive reuse): a stalled listener could not accept them.
        fresh = {"X-Vault-Token": server.token, "Connection": "close"}
        health = requests.get(server.url + "/v1/sys/health", headers={"Connection": "close"}, timeout=15)
        assert health.status_code == 200, describe(health)
        enc = requests.post(server.url + "/v1/transit/encrypt/edge", headers=fresh,
                            json={"plaintext": b64(b"still here")}, timeout=15)
        assert enc.status_code == 200, describe(enc)
        ct = enc.json()["data"]["ciphertext"]
        dec = requests.post(server.url + "/v1/transit/decrypt/edge", headers=fresh,
                            json={"ciphertext": ct}, timeout=15)
        assert tl.unb64(dec.json()["data"]["plaintext"]) == b"still here"
    finally:
        for s in slow:
            s.close()


def test_a_stalled_client_that_finishes_gets_its_answer(server):
    server.request("POST", "/v1/transit/keys/edge2")
    body = ('{"plaintext":"%s"}' % b64(b"late")).encode()
    s = open_slow_client(server, "/v1/transit/encrypt/edge2", len(body), body[:5])
    try:
        # Another request is served while this one is incomplete ...
        assert server.request("GET", "/v1/sys/health", token=False).status_code == 200
        s.sendall(body[5:])
        s.settimeout(15)
        reply = b""
        while b"\r\n\r\n" not in reply or b"vault:v1:" not in reply:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
        # ... and the incomplete one is answered once its body arrives.
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert b"vault:v1:" in reply
    finally:
        s.close()


def test_oversized_headers_are_431_in_vault_shape(server):
    r = server.request("GET", "/v1/transit/keys?list=true", headers={"X-Padding": "a" * 20000},
                       timeout=15)
    assert r.status_code == 431, describe(r)
    assert "header" in " ".join(r.json()["errors"]).lower()
    assert r.headers.get("X-Request-Id")


def test_body_over_the_limit_is_413_and_creates_nothing(server):
    big = '{"plaintext":"%s"}' % ("A" * (1024 * 1024 + 16))
    r = server.request("POST", "/v1/transit/encrypt/never-created", data=big,
                       headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 413, describe(r)
    assert "1048576" in " ".join(r.json()["errors"])
    assert server.request("GET", "/v1/transit/keys/never-created").status_code == 404


def test_a_path_cannot_forge_server_log_lines(server):
    forged = "2026-01-01T00:00:00.000Z [info] FORGED-LINE"
    r = requests.get(server.url + "/v1/transit/keys/x%0A" + forged.replace(" ", "%20"),
                     headers={"X-Vault-Token": server.token}, timeout=15)
    assert r.status_code in (400, 404), describe(r)
    log = server.log()
    assert "FORGED-LINE" in log  # the request was logged ...
    assert ("\n" + forged) not in log  # ... but not as a line of its own
    assert "\\x0a" in log


def test_each_request_gets_one_access_line_with_its_id_status_and_duration(server):
    r = server.request("GET", "/v1/transit/keys/no-such-key-for-the-access-line")
    assert r.status_code == 404, describe(r)
    rid = r.headers["X-Request-Id"]
    lines = [l for l in server.log().splitlines() if "request_id=" + rid in l]
    assert len(lines) == 1, lines
    # As docs/OPERATIONS.md shows it: "... [info] request_id=... GET /path 404 0.052ms"
    assert re.search(r" \[info\] request_id=%s GET /v1/transit/keys/no-such-key-for-the-access-line 404 "
                     r"\d+\.\d{3}ms$" % re.escape(rid), lines[0]), lines[0]
