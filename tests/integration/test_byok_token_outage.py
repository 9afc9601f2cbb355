"""Integration: BYOK validation when the token goes away and comes back (docs/api/byok.md).

Set-up as tests/integration/test_token_recovery.py: a SoftHSM token served over p11-kit
remoting; a root key is made first by p11kms loading SoftHSM directly (remoting has no AES-GCM);
then p11kms runs through p11-kit-client.so, and killing the p11-kit server (by pid) takes the
token away. Through remoting the validation round trip is AES-ECB (the doc says so).
"""

import os
import time

import pytest
import requests

import configured_server as cs

BASE = "/byok/v1/keys"
POLL_S = 20.0


@pytest.fixture(scope="module")
def env():
    class E:
        pass
    e = E()
    e.tmp = cs.make_tmpdir("p11kms-byok-outage-")
    e.server = e.p11kit = None
    try:
        e.token = cs.SoftToken(e.tmp).init()
        e.token.write_pin_file(os.path.join(e.tmp, "user.pin"))
        e.api = "hvs." + os.urandom(12).hex()
        h = cs.token_hash(e.api)
        port = cs.free_port()
        cfg = os.path.join(e.tmp, "direct.yaml")
        with open(cfg, "w") as f:
            f.write(cs.config_text(port, cs.SOFTHSM_MODULE, e.token.label, h))
        direct = cs.ConfiguredServer(cfg, e.token.env(), token=e.api, port=port,
                                     log_path=os.path.join(e.tmp, "direct.log"))
        try:
            direct.start()
            r = direct.request("POST", "/kms/api/v2/keys", json={"resources": [
                {"type": "application/vnd.ibm.kms.key+json", "name": "outage-root"}]})
            assert r.status_code == 201, r.text
            e.root_id = r.json()["resources"][0]["id"]
        finally:
            assert direct.stop() == 0, direct.log_tail()
        e.p11kit = cs.P11KitServer(e.token, os.path.join(e.tmp, "p11.sock"), os.path.join(e.tmp, "p11kit.log")).start()
        env = dict(os.environ)
        for k in ("SOFTHSM2_CONF", "P11KMS_USER_PIN", "P11KMS_SO_PIN"):
            env.pop(k, None)
        env["P11_KIT_SERVER_ADDRESS"] = e.p11kit.address
        port = cs.free_port()
        cfg = os.path.join(e.tmp, "p11kms.yaml")
        with open(cfg, "w") as f:
            f.write(cs.config_text(port, cs.P11KIT_CLIENT_MODULE, e.token.label, h, sessions=2) +
                    "byok:\n  validation_interval: 1h\n")
        e.server = cs.ConfiguredServer(cfg, env, token=e.api, port=port)
        e.server.start()
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


def call(env, method, path, **kw):
    return env.server.session.request(method, env.server.url + path, headers={"Authorization": "Bearer " + env.api},
                                      timeout=30, **kw)


def validated(env, kid):
    r = call(env, "GET", BASE + "/" + kid + "?validate=true")
    assert r.status_code == 200, r.text
    return r.json()["validation"]


def test_token_unreachable_makes_the_key_invalid_and_back_valid(env):
    r = call(env, "POST", BASE, json={"key": {"kind": "P11kmsKey", "key_id": env.root_id}})
    assert r.status_code == 201, r.text
    k = r.json()
    assert k["validation"]["phase"] == "VALID", k
    assert "AES-ECB" in k["validation"]["message"]   # through remoting, and said so
    for _ in range(2):   # a second key, so a list has a next page
        assert call(env, "POST", BASE, json={"key": {"kind": "P11kmsKey", "key_id": env.root_id}}).status_code == 201

    assert env.p11kit.stop(), "expected to kill p11-kit's worker"
    deadline = time.monotonic() + POLL_S
    while True:
        v = validated(env, k["id"])
        if v["phase"] == "INVALID":
            break
        assert time.monotonic() < deadline, v
        time.sleep(0.3)
    assert "token is unreachable" in v["message"], v
    since = v["since"]
    time.sleep(1.1)
    v2 = validated(env, k["id"])
    assert v2 == v and v2["since"] == since, "since moved while nothing changed"
    # The registry itself still reads from the store; a new page token needs the token: 503.
    r = call(env, "GET", BASE + "?page_size=1")
    assert r.status_code == 503, r.text
    err = r.json()["errors"][0]
    assert err["status"] == "503" and "unavailable" in err["detail"], r.text
    assert env.token.user_pin not in r.text

    env.p11kit.start()
    deadline = time.monotonic() + POLL_S
    while True:
        v = validated(env, k["id"])
        if v["phase"] == "VALID":
            break
        assert time.monotonic() < deadline, "never VALID again: %s" % v
        time.sleep(0.3)
    assert v["since"] > since
    assert call(env, "GET", BASE + "?page_size=1").status_code == 200
