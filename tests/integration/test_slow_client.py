"""limits.read_timeout_s: a slow client cannot pin a worker. With read_timeout_s: 2, a request
whose headers and body are not complete 2 s after its first byte is closed, however steadily it
trickles (an absolute deadline, not an idle one); an idle keep-alive connection is closed after
the same time; and while such clients hang on, with more of them than listener threads, a normal
client is answered at once."""
import os
import select
import shutil
import socket
import sys
import tempfile
import threading
import time

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import p11kms_testlib as tl  # noqa: E402
import configured_server as cs  # noqa: E402

TIMEOUT_S = 2
EARLIEST_S = 1.5   # closed no sooner than this after the request (or the idle time) began ...
LATEST_S = 8.0     # ... and no later than this
THREADS = 2        # listen.threads, the smallest allowed: fewer than the slow clients below


@pytest.fixture(scope="module")
def server():
    root = tempfile.mkdtemp(prefix="p11kms-slow-")
    secret = tl.random_token()
    srv, path, _ = cs.configured(root, [("ops", secret)],
                                 extra_yaml="limits:\n  read_timeout_s: %d\n" % TIMEOUT_S)
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("listen:\n", "listen:\n  threads: %d\n" % THREADS, 1))
    srv.start()
    try:
        r = srv.request("POST", "/v1/transit/keys/slow")
        assert r.status_code == 200, r.text
        yield srv
    finally:
        srv.stop()
        if not os.environ.get("P11KMS_KEEP_TMP"):
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def connect(server):
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def head(server, length):
    return ("POST /v1/transit/encrypt/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Vault-Token: %s\r\n"
            "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (server.token, length)).encode()


def body():
    return ('{"plaintext":"%s"}' % tl.b64(b"slow but steady")).encode()


def seconds_until_closed(sock, started, trickle=b"", limit=LATEST_S + 4):
    """Seconds from `started` until the server closes sock (recv gives b'' or a reset), sending
    one byte of `trickle` per second meanwhile. None if it is still open after `limit`. Any
    answer from the server instead is a failure."""
    next_send = time.monotonic() + 1
    while time.monotonic() - started < limit:
        wait = min(0.1, max(0.0, next_send - time.monotonic()))
        readable, _, _ = select.select([sock], [], [], wait)
        if readable:
            try:
                data = sock.recv(4096)
            except (ConnectionResetError, ConnectionAbortedError):
                return time.monotonic() - started
            if not data:
                return time.monotonic() - started
            raise AssertionError("the server answered instead of closing: %r" % data[:200])
        if trickle and time.monotonic() >= next_send:
            try:
                sock.send(trickle[:1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started
            trickle = trickle[1:]
            next_send += 1
    return None


def read_response(sock):
    """One HTTP/1.1 response with a Content-Length: (status line, raw bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before a response: %r" % data
        data += chunk
    headers, rest = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in headers.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside a response body"
        rest += chunk
    return headers.split(b"\r\n")[0].decode(), data


@pytest.mark.parametrize("sent", ["half the headers", "headers and half the body"])
def test_a_trickling_request_is_closed_at_its_deadline(server, sent):
    b = body()
    whole = head(server, len(b)) + b
    cut = whole.index(b"X-Vault-Token") if sent == "half the headers" else len(whole) - len(b) // 2
    with connect(server) as s:
        started = time.monotonic()
        s.sendall(whole[:cut])
        # One more byte every second would take ~len(rest) seconds: far beyond the deadline.
        took = seconds_until_closed(s, started, trickle=whole[cut:])
    assert took is not None, "a trickling client was still connected after %ss" % (LATEST_S + 4)
    assert EARLIEST_S <= took <= LATEST_S, "closed after %.2fs (read_timeout_s: %d)" % (took, TIMEOUT_S)


def test_a_client_that_connects_and_says_nothing_is_closed(server):
    with connect(server) as s:
        started = time.monotonic()
        took = seconds_until_closed(s, started)
    assert took is not None and EARLIEST_S <= took <= LATEST_S, took


def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(server):
    with connect(server) as s:
        for _ in range(2):  # the connection is reused while it is used ...
            s.sendall(b"GET /v1/sys/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, raw = read_response(s)
            assert status.startswith("HTTP/1.1 200"), raw[:300]
            assert b"connection: close" not in raw.lower()
        idle_from = time.monotonic()
        took = seconds_until_closed(s, idle_from)  # ... and closed once it sits idle
    assert took is not None and EARLIEST_S <= took <= LATEST_S, took


def test_a_slow_request_that_completes_in_time_is_answered(server):
    b = body()
    whole = head(server, len(b)) + b
    with connect(server) as s:
        s.sendall(whole[:40])
        time.sleep(0.7)
        s.sendall(whole[40:-5])
        time.sleep(0.7)
        s.sendall(whole[-5:])
        status, raw = read_response(s)
    assert status.startswith("HTTP/1.1 200"), raw[:300]
    assert b"vault:v1:" in raw


def test_slow_clients_do_not_keep_a_normal_client_waiting(server):
    b = body()
    whole = head(server, len(b)) + b
    slow = []
    stop = threading.Event()

    def trickle(sock, rest):
        while rest and not stop.wait(0.5):
            try:
                sock.send(rest[:1])
            except OSError:
                return
            rest = rest[1:]

    threads = []
    try:
        for i in range(4 * THREADS + 4):
            s = connect(server)
            s.sendall(whole[:len(whole) - len(b) // 2] if i % 2 else whole[:30])
            slow.append(s)
            t = threading.Thread(target=trickle, args=(s, whole[len(whole) - len(b) // 2:] if i % 2 else whole[30:]),
                                 daemon=True)
            t.start()
            threads.append(t)
        time.sleep(0.3)
        for _ in range(3):
            started = time.monotonic()
            r = requests.post(server.url + "/v1/transit/encrypt/slow", json={"plaintext": tl.b64(b"quick")},
                              headers={"X-Vault-Token": server.token, "Connection": "close"}, timeout=10)
            assert r.status_code == 200, r.text
            assert time.monotonic() - started < 1.0, "a normal request took %.2fs" % (time.monotonic() - started)
        # And the slow ones are gone after the deadline, without an answer.
        deadline = time.monotonic() + LATEST_S
        for s in slow:
            took = seconds_until_closed(s, time.monotonic(), limit=max(0.5, deadline - time.monotonic()))
            assert took is not None, "a slow client was still connected %ss later" % LATEST_S
    finally:
        stop.set()
        for s in slow:
            s.close()
        for t in threads:
            t.join(timeout=5)
    assert server.alive()
