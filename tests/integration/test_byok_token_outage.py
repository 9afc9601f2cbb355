"""Integration: BYOK validation when the token goes away and comes back (docs/api/byok.md).

Two ways a token goes away, both real:
- SoftHSM loaded directly, and its token directory moved away under the running server (a
  volume unmounted): SoftHSM keeps its sessions but loses every object and answers
  CKR_GENERAL_ERROR to C_GetTokenInfo; p11kms takes that as an outage, reconnects, and finds
  the token again once the directory is back. This is the VALID -> INVALID -> VALID path.
- SoftHSM behind p11-kit remoting (as tests/integration/test_token_recovery.py), the p11-kit
  server killed by pid and restarted. Remoting carries no AES-GCM, so a root key can never be
  VALID through it (wraps are refused): the key says so, then "token is unreachable", then
  says so again.
"""

import os
import time

import pytest
import requests

import configured_server as cs

BASE = "/byok/v1/keys"
POLL_S = 20.0


def make_root_key(server):
    r = server.request("POST", "/kms/api/v2/keys", json={"resources": [
        {"type": "application/vnd.ibm.kms.key+json", "name": "outage-root"}]})
    assert r.status_code == 201, r.text
    return r.json()["resources"][0]["id"]


class Env:
    pass


@pytest.fixture(scope="module")
def direct():
    """SoftHSM loaded directly; the test moves the token directory away and back."""
    e = Env()
    e.tmp = cs.make_tmpdir("p11kms-byok-gone-")
    e.server = None
    try:
        e.token = cs.SoftToken(e.tmp).init()
        e.token.write_pin_file(os.path.join(e.tmp, "user.pin"))
        e.api = "hvs." + os.urandom(12).hex()
        port = cs.free_port()
        cfg = os.path.join(e.tmp, "p11kms.yaml")
        with open(cfg, "w") as f:
            f.write(cs.config_text(port, cs.SOFTHSM_MODULE, e.token.label, cs.token_hash(e.api)) +
                    "byok:\n  validation_interval: 1h\n")
        e.server = cs.ConfiguredServer(cfg, e.token.env(), token=e.api, port=port,
                                       log_path=os.path.join(e.tmp, "p11kms.log"))
        e.server.start()
        e.root_id = make_root_key(e.server)
        yield e
    finally:
        try:
            if e.server is not None:
                e.server.stop()
        finally:
            cs.remove_tmpdir(e.tmp)


@pytest.fixture(scope="module")
def env():
    """SoftHSM behind p11-kit remoting; the test kills and restarts the p11-kit server."""
    e = Env()
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
        # Root keys are AES-GCM keys: made by a server that loads SoftHSM directly.
        direct = cs.ConfiguredServer(cfg, e.token.env(), token=e.api, port=port,
                                     log_path=os.path.join(e.tmp, "direct.log"))
        try:
            direct.start()
            e.root_id = make_root_key(direct)
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


def wait_for(env, kid, pred, what):
    deadline = time.monotonic() + POLL_S
    while True:
        v = validated(env, kid)
        if pred(v):
            return v
        assert time.monotonic() < deadline, "%s never came: %s" % (what, v)
        time.sleep(0.3)


def create(env, display_name):
    r = call(env, "POST", BASE, json={"display_name": display_name,
                                      "key": {"kind": "P11kmsKey", "key_id": env.root_id}})
    assert r.status_code == 201, r.text
    return r.json()


def test_token_directory_gone_makes_the_key_invalid_and_back_valid(direct):
    k = create(direct, "gone")
    assert k["validation"]["phase"] == "VALID", k
    assert not k["validation"].get("message"), k
    for _ in range(2):   # more keys, so a list has a next page
        create(direct, "more")
    wrap = "/kms/api/v2/keys/%s/actions/wrap" % direct.root_id
    assert call(direct, "POST", wrap, json={}).status_code == 200

    [uuid_dir] = os.listdir(direct.token.tokendir)
    inside = os.path.join(direct.token.tokendir, uuid_dir)
    away = os.path.join(direct.tmp, "away")
    os.rename(inside, away)
    try:
        v = wait_for(direct, k["id"], lambda v: v["phase"] == "INVALID", "INVALID")
        assert v["message"] == "the token is unreachable", v
        since = v["since"]
        time.sleep(1.1)
        v2 = validated(direct, k["id"])
        assert v2 == v and v2["since"] == since, "since moved while nothing changed"
        # An outage, not a missing object: KMS answers 503 and health says so.
        r = call(direct, "POST", wrap, json={})
        assert r.status_code == 503, r.text
        h = direct.server.session.get(direct.server.url + "/v1/sys/health", timeout=10)
        assert h.status_code == 503, h.text
        r = call(direct, "GET", BASE + "?page_size=1")
        assert r.status_code == 503, r.text
        assert r.json()["errors"][0]["status"] == "503"
        assert direct.token.user_pin not in r.text
    finally:
        os.rename(away, inside)

    v = wait_for(direct, k["id"], lambda v: v["phase"] == "VALID", "VALID again")
    assert v["since"] > since and not v.get("message"), v
    assert call(direct, "POST", wrap, json={}).status_code == 200
    assert call(direct, "GET", BASE + "?page_size=1").status_code == 200


def test_through_remoting_a_root_key_is_invalid_and_outages_say_so(env):
    k = create(env, "remote")
    v = k["validation"]
    assert v["phase"] == "INVALID", k   # wraps are AES-GCM, which remoting does not carry
    assert "CKM_AES_GCM" in v["message"] and "this PKCS#11 module" in v["message"], v
    no_gcm = v["message"]
    for _ in range(2):
        create(env, "more")

    assert env.p11kit.stop(), "expected to kill p11-kit's worker"
    v = wait_for(env, k["id"], lambda v: v["message"] != no_gcm, "the outage")
    assert v["phase"] == "INVALID" and v["message"] == "the token is unreachable", v
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
    v = wait_for(env, k["id"], lambda v: v["message"] == no_gcm, "the token back")
    assert v["phase"] == "INVALID" and v["since"] > since, v
    assert call(env, "GET", BASE + "?page_size=1").status_code == 200
