"""Per-token rate limits from limits.rate_limit: headers on every limited response, 429 with
Retry-After when the bucket is empty, separate buckets per token, none without a limit."""
import os
import shutil
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import p11kms_testlib as tl  # noqa: E402
import configured_server as cs  # noqa: E402

A, B = "tok-a-" + os.urandom(6).hex(), "tok-b-" + os.urandom(6).hex()


@pytest.fixture(scope="module")
def srv():
    root = tempfile.mkdtemp(prefix="p11kms-rl-")
    server, _, _ = cs.configured(root, [("a", A), ("b", B)],
                                 "limits:\n  rate_limit:\n    requests_per_second: 1\n    burst: 3\n")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def lookup(srv, token):
    return srv.session.get(srv.url + "/v1/auth/token/lookup-self", headers={"X-Vault-Token": token}, timeout=15)


def test_headers_then_429_with_retry_after_then_refill(srv):
    seen = [lookup(srv, A) for _ in range(3)]
    assert [r.status_code for r in seen] == [200, 200, 200]
    assert [r.headers["X-RateLimit-Limit"] for r in seen] == ["3", "3", "3"]
    assert [r.headers["X-RateLimit-Remaining"] for r in seen] == ["2", "1", "0"]
    assert all(int(r.headers["X-RateLimit-Reset"]) >= 1 for r in seen)
    refused = lookup(srv, A)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert "rate limit" in refused.json()["errors"][0]
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    # Another token has its own bucket.
    assert lookup(srv, B).status_code == 200
    # The bucket refills at requests_per_second.
    time.sleep(int(refused.headers["Retry-After"]) + 0.2)
    assert lookup(srv, A).status_code == 200


def test_health_and_bad_tokens_are_not_limited_and_carry_no_headers(srv):
    h = srv.session.get(srv.url + "/v1/sys/health", timeout=15)
    assert h.status_code == 200 and "X-RateLimit-Limit" not in h.headers
    bad = lookup(srv, "nope")
    assert bad.status_code == 403 and "X-RateLimit-Limit" not in bad.headers


def test_no_limit_configured_means_no_headers():
    with tl.DevServer() as dev:
        r = dev.request("GET", "/v1/auth/token/lookup-self")
        assert r.status_code == 200
        assert "X-RateLimit-Limit" not in r.headers and "Retry-After" not in r.headers
