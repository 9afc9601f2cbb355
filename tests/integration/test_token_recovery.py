"""Integration: the PKCS#11 token goes away and comes back while p11kms keeps running.

Requirement (DESIGN.md, "The PKCS#11 session pool"): a session or module failure drops the
session, reconnects with backoff, and surfaces as HTTP 503 with a clear message until the token
is back; the service recovers by itself without a restart. Health: 200 with sealed:false while
the token answers; 503 with sealed:true and hsm.reachable:false while it does not.

Set-up: a throwaway SoftHSM token served over p11-kit remoting (`p11-kit server`), and
`p11kms server -config FILE` loading p11-kit-client.so with P11_KIT_SERVER_ADDRESS. Killing the
p11-kit server (listener and its per-connection workers, by pid) is the outage; starting it
again on the same socket is the recovery. p11-kit remoting has no AES-GCM, so the probes are
health, /v1/transit/random (C_GenerateRandom) and key metadata; one key is created beforehand
by p11kms loading SoftHSM directly on the same token and store.
"""

import base64
import os
import threading
import time

import pytest

import configured_server as cs

POLL_LIMIT_S = 15.0
UNAVAILABLE_WORDS = ("unavailable",)


# -- fixture ---------------------------------------------------------------------------------

class Env:
    pass


@pytest.fixture(scope="module")
def env():
    e = Env()
    e.tmp = cs.make_tmpdir("p11kms-recovery-")
    e.server = None
    e.p11kit = None
    try:
        e.token = cs.SoftToken(e.tmp).init()
        e.token.write_pin_file(os.path.join(e.tmp, "user.pin"))
        e.api_token = "hvs." + os.urandom(12).hex()
        e.api_hash = cs.token_hash(e.api_token)

        # 1. p11kms on SoftHSM directly: create a key (p11-kit remoting cannot: no AES-GCM).
        port = cs.free_port()
        direct_cfg = os.path.join(e.tmp, "direct.yaml")
        with open(direct_cfg, "w") as f:
            f.write(cs.config_text(port, cs.SOFTHSM_MODULE, e.token.label, e.api_hash))
        direct = cs.ConfiguredServer(direct_cfg, e.token.env(), token=e.api_token, port=port,
                                     log_path=os.path.join(e.tmp, "direct.log"))
        try:
            direct.start()
            e.key = "pre-" + os.urandom(4).hex()
            r = direct.request("POST", "/v1/transit/keys/" + e.key, json={})
            assert r.status_code == 200, r.text
            r = direct.request("POST", "/v1/transit/keys/%s/rotate" % e.key)
            assert r.status_code == 200, r.text
        except BaseException:
            print("--- direct p11kms log ---\n" + direct.log_tail())
            raise
        finally:
            assert direct.stop() == 0, direct.log_tail()

        # 2. p11-kit server in front of the token.
        e.p11kit = cs.P11KitServer(e.token, os.path.join(e.tmp, "p11.sock"),
                                   os.path.join(e.tmp, "p11kit.log")).start()

        # 3. p11kms through p11-kit-client.so; its env has no SOFTHSM2_CONF, so every PKCS#11
        #    call really goes over the socket.
        server_env = dict(os.environ)
        for k in ("SOFTHSM2_CONF", "P11KMS_USER_PIN", "P11KMS_SO_PIN"):
            server_env.pop(k, None)
        server_env["P11_KIT_SERVER_ADDRESS"] = e.p11kit.address
        port = cs.free_port()
        cfg = os.path.join(e.tmp, "p11kms.yaml")
        with open(cfg, "w") as f:
            f.write(cs.config_text(port, cs.P11KIT_CLIENT_MODULE, e.token.label, e.api_hash,
                                   sessions=2))
        e.server = cs.ConfiguredServer(cfg, server_env, token=e.api_token, port=port)
        e.server.start()
        e.pid = e.server.pid
        yield e
    finally:
        try:
            if e.server is not None:
                e.server.stop()
        finally:
            try:
                if e.p11kit is not None:
                    e.p11kit.stop()
            finally:
                cs.remove_tmpdir(e.tmp)


@pytest.fixture(autouse=True)
def _logs_on_failure(request, env):
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        text = ("\n--- p11kms server log tail (%s) ---\n%s\n--- p11-kit server log ---\n%s\n"
                % (env.server.log_path, env.server.log_tail(80), env.p11kit.log()[-3000:]))
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(text)
        else:
            print(text)


# -- helpers ---------------------------------------------------------------------------------

def describe(r):
    return "%s %s -> %s %s" % (r.request.method, r.request.path_url, r.status_code, r.text[:600])


def health(env):
    return env.server.request("GET", "/v1/sys/health", token=False)


def random16(env, **kw):
    return env.server.request("POST", "/v1/transit/random/16", json={}, **kw)


def wait_for(env, what, predicate, limit=POLL_LIMIT_S, interval=0.2):
    """Poll health until predicate(response) holds; returns (response, seconds waited)."""
    start = time.monotonic()
    last = None
    while time.monotonic() - start < limit:
        assert env.server.alive(), "p11kms exited (code %s) while waiting for %s" % (
            env.server.proc.poll() if env.server.proc else None, what)
        last = health(env)
        if predicate(last):
            return last, time.monotonic() - start
        time.sleep(interval)
    raise AssertionError("no %s within %.0fs; last health: %s" % (what, limit, describe(last)))


def assert_no_secrets(env, text, where):
    for secret in (env.token.user_pin, env.token.so_pin, env.api_token):
        assert secret not in text, "%s contains a secret: %s" % (where, text[:600])


def assert_healthy_body(env, r):
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert body["sealed"] is False, describe(r)
    assert body["initialized"] is True, describe(r)
    assert body["hsm"]["reachable"] is True, describe(r)
    assert body["hsm"]["token_label"] == env.token.label, describe(r)


def assert_unavailable_body(env, r):
    assert r.status_code == 503, describe(r)
    body = r.json()
    assert set(body) == {"errors"}, "not a Vault error body: " + describe(r)
    errs = body["errors"]
    assert isinstance(errs, list) and len(errs) == 1 and isinstance(errs[0], str), describe(r)
    msg = errs[0].lower()
    assert "unavailable" in msg, "503 message does not say the token is unavailable: " + msg
    assert "token" in msg or "hsm" in msg, "503 message does not name the token/HSM: " + msg
    assert_no_secrets(env, r.text, "503 body")


def assert_random_works(env):
    r = random16(env)
    assert r.status_code == 200, describe(r)
    assert len(base64.b64decode(r.json()["data"]["random_bytes"], validate=True)) == 16


def assert_key_metadata(env, r):
    assert r.status_code == 200, describe(r)
    data = r.json()["data"]
    assert data["name"] == env.key and data["latest_version"] == 2, describe(r)


def assert_list(env, r):
    assert r.status_code == 200, describe(r)
    assert env.key in r.json()["data"]["keys"], describe(r)


def ensure_healthy(env):
    if env.p11kit.proc is None:
        env.p11kit.start()
    wait_for(env, "health 200", lambda r: r.status_code == 200)


# -- tests -----------------------------------------------------------------------------------

def test_healthy_through_p11kit_remoting(env):
    r = health(env)
    assert_healthy_body(env, r)
    assert_random_works(env)
    assert_key_metadata(env, env.server.request("GET", "/v1/transit/keys/" + env.key))
    assert_list(env, env.server.request("LIST", "/v1/transit/keys"))
    # The connection really goes through p11-kit: its server has a worker for p11kms.
    assert env.p11kit.workers(), "p11-kit server has no per-connection worker; is p11kms " \
                                 "really using the p11-kit client?"


def test_token_outage_gives_503_and_recovers_without_restart(env):
    ensure_healthy(env)
    assert_random_works(env)

    # -- the token goes away ------------------------------------------------------------------
    killed = env.p11kit.stop()
    assert killed, "expected to kill p11-kit's per-connection worker serving p11kms"

    r, waited = wait_for(env, "health 503", lambda r: r.status_code == 503)
    body = r.json()
    assert body.get("sealed") is True, describe(r)
    assert body.get("hsm", {}).get("reachable") is False, describe(r)
    assert body["hsm"].get("token_label") == env.token.label, describe(r)
    assert_no_secrets(env, r.text, "health body")

    r = random16(env)
    assert_unavailable_body(env, r)

    # Requests keep failing fast (backoff, not a hang or a crash) while the token is away.
    for _ in range(20):
        t0 = time.monotonic()
        r = random16(env)
        assert time.monotonic() - t0 < 5.0, "request took %.1fs during the outage" % (
            time.monotonic() - t0)
        assert_unavailable_body(env, r)
    # Auth does not depend on the token: a bad or missing token is still 403, not 503.
    r = random16(env, token="hvs.wrong-token")
    assert r.status_code == 403, describe(r)
    r = random16(env, token=False)
    assert r.status_code == 403, describe(r)
    # Metadata reads may be served from the store or refused with 503; never 500.
    for r in (env.server.request("GET", "/v1/transit/keys/" + env.key),
              env.server.request("LIST", "/v1/transit/keys")):
        if r.status_code == 503:
            assert_unavailable_body(env, r)
        else:
            assert r.status_code == 200, "metadata read during the outage: " + describe(r)

    # Still down a few seconds later (backoff grows); the process is alive, the same pid.
    time.sleep(3)
    r = health(env)
    assert r.status_code == 503 and r.json()["sealed"] is True, describe(r)
    assert_unavailable_body(env, random16(env))
    assert env.server.alive() and env.server.pid == env.pid, "p11kms died or was restarted"

    # -- the token comes back on the same socket ---------------------------------------------
    env.p11kit.start()
    r, waited = wait_for(env, "health 200 after the token came back",
                         lambda r: r.status_code == 200)
    assert_healthy_body(env, r)
    assert_random_works(env)
    assert_key_metadata(env, env.server.request("GET", "/v1/transit/keys/" + env.key))
    assert_list(env, env.server.request("LIST", "/v1/transit/keys"))
    assert env.server.alive() and env.server.pid == env.pid, "p11kms was restarted"
    assert env.p11kit.workers(), "p11kms did not reconnect through the new p11-kit server"
    assert_no_secrets(env, env.server.log(), "server log")


def test_outage_and_recovery_under_concurrent_load(env):
    """A second outage while 6 clients hammer random and health: every answer is 200 or 503
    (no 500, no dropped connection, no hang), and the service comes back by itself."""
    ensure_healthy(env)
    stop = threading.Event()
    results = []          # (monotonic time, kind, status, body)
    failures = []         # exceptions from the client threads
    lock = threading.Lock()

    def client(i):
        import requests
        s = requests.Session()
        n = 0
        while not stop.is_set():
            n += 1
            try:
                if n % 4 == 0:
                    r = s.get(env.server.url + "/v1/sys/health", timeout=10)
                    kind = "health"
                else:
                    r = s.post(env.server.url + "/v1/transit/random/16", json={},
                               headers={"X-Vault-Token": env.api_token}, timeout=10)
                    kind = "random"
                with lock:
                    results.append((time.monotonic(), kind, r.status_code, r.text))
            except Exception as ex:  # noqa: BLE001 - every failure is reported
                with lock:
                    failures.append("client %d: %r" % (i, ex))
                time.sleep(0.05)
        s.close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        env.p11kit.stop()
        wait_for(env, "health 503 under load", lambda r: r.status_code == 503)
        time.sleep(2.0)
        env.p11kit.start()
        wait_for(env, "health 200 under load after the token came back",
                 lambda r: r.status_code == 200)
        recovered_at = time.monotonic()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    assert not failures, "client errors during outage/recovery: %s" % failures[:5]
    bad = [(k, s, b[:200]) for (_, k, s, b) in results if s not in (200, 503)]
    assert not bad, "answers other than 200/503: %s" % bad[:5]
    unavailable = [(k, b) for (_, k, s, b) in results if s == 503 and k == "random"]
    assert unavailable, "no random request saw the outage"
    for _, b in unavailable:
        assert "unavailable" in b.lower(), "unclear 503 message: " + b[:300]
        assert env.token.user_pin not in b and env.token.so_pin not in b
    after = [(k, s, b[:200]) for (t, k, s, b) in results if t > recovered_at + 0.5 and s != 200]
    assert not after, "still failing after recovery: %s" % after[:5]
    assert [1 for (t, k, s, _) in results if t > recovered_at + 0.5 and k == "random" and s == 200], \
        "no successful random request after recovery"
    assert env.server.alive() and env.server.pid == env.pid, "p11kms died or was restarted"
    assert_random_works(env)
