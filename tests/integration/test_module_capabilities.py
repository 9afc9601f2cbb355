"""Integration: a module that lacks mechanisms (DESIGN.md, issue 10 "Any module: mechanisms
known up front").

p11kms loads p11-kit-client.so in front of `p11-kit server` (0.24, Debian 12), whose remoting
drops CKM_AES_GCM, CKM_AES_KEY_WRAP(_PAD), CKM_EDDSA, CKM_EC_EDWARDS_KEY_PAIR_GEN,
CKM_AES_ECB_ENCRYPT_DATA, CKM_SHA256_RSA_PKCS_PSS, ... while CKM_ECDSA, CKM_RSA_PKCS(_PSS) and
the CKM_SHA*_HMAC family pass. Expected: HMAC, ECDSA and RSA keys work end to end (RSA-PSS
through CKM_RSA_PKCS_PSS over a digest computed by p11kms); exportable keys are sealed under the
master key with the aes-ctr-hmac scheme (AES-CTR keystream by CKM_AES_ECB in the token, then
HMAC-SHA-256 in the token) and stay readable when the same store is later served with SoftHSM
loaded directly; AES-GCM and ed25519 requests are refused with a 400 in the dialect's shape naming the operation and the missing mechanism (never
a 500, never done outside the token); `p11kms hsm info` and health list what is missing. The
same token loaded directly offers everything (the contrast that shows the table is read from
the module, not assumed).
"""

import base64
import hashlib
import hmac as pyhmac
import os
import sqlite3
import subprocess

import requests

import pytest

import configured_server as cs
import p11kms_testlib as tl


class Env:
    pass


def b64(s):
    return base64.b64encode(s if isinstance(s, bytes) else s.encode()).decode()


@pytest.fixture(scope="module")
def env():
    e = Env()
    e.tmp = cs.make_tmpdir("p11kms-caps-")
    e.server = None
    e.p11kit = None
    try:
        e.token = cs.SoftToken(e.tmp).init()
        e.token.write_pin_file(os.path.join(e.tmp, "user.pin"))
        e.api_token = "hvs." + os.urandom(12).hex()
        api_hash = cs.token_hash(e.api_token)
        e.direct_cfg = os.path.join(e.tmp, "direct.yaml")
        with open(e.direct_cfg, "w") as f:
            f.write(cs.config_text(cs.free_port(), cs.SOFTHSM_MODULE, e.token.label, api_hash))

        e.p11kit = cs.P11KitServer(e.token, os.path.join(e.tmp, "p11.sock"),
                                   os.path.join(e.tmp, "p11kit.log")).start()
        # No SOFTHSM2_CONF in p11kms's environment: every PKCS#11 call goes over the socket.
        e.remote_env = dict(os.environ)
        for k in ("SOFTHSM2_CONF", "P11KMS_USER_PIN", "P11KMS_SO_PIN"):
            e.remote_env.pop(k, None)
        e.remote_env["P11_KIT_SERVER_ADDRESS"] = e.p11kit.address
        port = cs.free_port()
        e.remote_cfg = os.path.join(e.tmp, "remote.yaml")
        with open(e.remote_cfg, "w") as f:
            f.write(cs.config_text(port, cs.P11KIT_CLIENT_MODULE, e.token.label, api_hash,
                                   store_path="remote.db"))
        e.server = cs.ConfiguredServer(e.remote_cfg, e.remote_env, token=e.api_token, port=port,
                                       log_path=os.path.join(e.tmp, "remote.log"))
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


@pytest.fixture(autouse=True)
def _logs_on_failure(request, env):
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before:
        print("\n--- p11kms log tail ---\n%s\n--- p11-kit server log ---\n%s"
              % (env.server.log_tail(80), env.p11kit.log()[-3000:]))


def req(env, method, path, **kw):
    return env.server.request(method, path, **kw)


def describe(r):
    return "%s %s -> %s %s" % (r.request.method, r.request.path_url, r.status_code, r.text[:600])


def assert_refused(r, *words):
    """A 400 in Vault's shape whose one message names each of `words`."""
    assert r.status_code == 400, describe(r)
    errors = r.json()["errors"]
    assert len(errors) == 1 and isinstance(errors[0], str), r.text
    for w in words:
        assert w in errors[0], (w, errors[0])
    assert "outside the token" in errors[0], errors[0]


def hsm_info(config, env_vars):
    return subprocess.run([tl.binary_path(), "hsm", "info", "-config", config],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env_vars, timeout=60)


# -- what works through remoting -------------------------------------------------------------

def test_hmac_key_end_to_end(env):
    r = req(env, "POST", "/v1/transit/keys/mac", json={"type": "hmac"})
    assert r.status_code in (200, 204), describe(r)
    for alg in ("sha2-256", "sha2-512"):
        r = req(env, "POST", "/v1/transit/hmac/mac/" + alg, json={"input": b64("hello")})
        assert r.status_code == 200, describe(r)
        mac = r.json()["data"]["hmac"]
        assert mac.startswith("vault:v1:"), mac
        r = req(env, "POST", "/v1/transit/verify/mac/" + alg, json={"input": b64("hello"), "hmac": mac})
        assert r.status_code == 200 and r.json()["data"]["valid"] is True, describe(r)
        r = req(env, "POST", "/v1/transit/verify/mac/" + alg, json={"input": b64("hellO"), "hmac": mac})
        assert r.status_code == 200 and r.json()["data"]["valid"] is False, describe(r)


@pytest.mark.parametrize("key_type,extra", [
    ("ecdsa-p256", {}),
    ("ecdsa-p384", {}),
    ("rsa-2048", {"signature_algorithm": "pss"}),         # CKM_RSA_PKCS_PSS over our digest
    ("rsa-2048", {"signature_algorithm": "pkcs1v15"}),
])
def test_signing_keys_end_to_end(env, key_type, extra):
    name = "sig-%s-%s" % (key_type, extra.get("signature_algorithm", "default"))
    r = req(env, "POST", "/v1/transit/keys/" + name, json={"type": key_type})
    assert r.status_code in (200, 204), describe(r)
    body = dict(extra, input=b64("message"))
    r = req(env, "POST", "/v1/transit/sign/" + name + "/sha2-256", json=body)
    assert r.status_code == 200, describe(r)
    sig = r.json()["data"]["signature"]
    assert sig.startswith("vault:v1:"), sig
    r = req(env, "POST", "/v1/transit/verify/" + name + "/sha2-256", json=dict(body, signature=sig))
    assert r.status_code == 200 and r.json()["data"]["valid"] is True, describe(r)
    r = req(env, "POST", "/v1/transit/verify/" + name + "/sha2-256",
            json=dict(extra, input=b64("messagE"), signature=sig))
    assert r.status_code == 200 and r.json()["data"]["valid"] is False, describe(r)


def sealed_blobs(env, name):
    """{version: (sealed, hmac_sealed)} of a key in the remoting instance's SQLite store."""
    db = sqlite3.connect("file:%s?mode=ro" % os.path.join(env.tmp, "remote.db"), uri=True)
    try:
        rows = db.execute("SELECT v.version, v.sealed, v.hmac_sealed FROM keys k JOIN key_versions v "
                          "ON v.key_id = k.id WHERE k.name = ?", (name,)).fetchall()
    finally:
        db.close()
    return {v: (sealed, hmac_sealed) for v, sealed, hmac_sealed in rows}


def exported(server, kind, name):
    r = server.request("GET", "/v1/transit/export/%s/%s" % (kind, name))
    assert r.status_code == 200, describe(r)
    return r.json()["data"]["keys"]["1"]


def check_exportable_keys(server, mac_name, ec_name, want=None):
    """HMAC, signature and export through `server`; returns what was exported (and checks it
    equals `want` when given). The exported material is checked against what the token computed."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    got = {}
    r = server.request("POST", "/v1/transit/hmac/%s/sha2-256" % mac_name, json={"input": b64("hello")})
    assert r.status_code == 200, describe(r)
    mac = base64.b64decode(r.json()["data"]["hmac"].split(":", 2)[2])
    got["hmac-key"] = exported(server, "hmac-key", mac_name)
    assert pyhmac.new(base64.b64decode(got["hmac-key"]), b"hello", hashlib.sha256).digest() == mac

    r = server.request("POST", "/v1/transit/sign/%s/sha2-256" % ec_name, json={"input": b64("message")})
    assert r.status_code == 200, describe(r)
    sig = base64.b64decode(r.json()["data"]["signature"].split(":", 2)[2])
    got["signing-key"] = exported(server, "signing-key", ec_name)
    private = serialization.load_pem_private_key(got["signing-key"].encode(), password=None)
    private.public_key().verify(sig, b"message", ec.ECDSA(hashes.SHA256()))  # raises if not its key
    # The per-version HMAC key of a non-HMAC key is sealed the same way.
    r = server.request("POST", "/v1/transit/hmac/%s/sha2-256" % ec_name, json={"input": b64("hello")})
    assert r.status_code == 200, describe(r)
    ec_mac = base64.b64decode(r.json()["data"]["hmac"].split(":", 2)[2])
    got["ec-hmac-key"] = exported(server, "hmac-key", ec_name)
    assert pyhmac.new(base64.b64decode(got["ec-hmac-key"]), b"hello", hashlib.sha256).digest() == ec_mac
    if want is not None:
        assert got == want
    return got


def test_exportable_keys_through_remoting_and_after_a_direct_restart(env):
    # Through remoting (no CKM_AES_GCM): the master key seals with aes-ctr-hmac.
    for name, key_type in (("exp-mac", "hmac"), ("exp-ec", "ecdsa-p256")):
        r = req(env, "POST", "/v1/transit/keys/" + name, json={"type": key_type, "exportable": True})
        assert r.status_code in (200, 204), describe(r)
    before = check_exportable_keys(env.server, "exp-mac", "exp-ec")
    mac_blobs, ec_blobs = sealed_blobs(env, "exp-mac"), sealed_blobs(env, "exp-ec")
    assert mac_blobs[1][0].startswith("aes-ctr-hmac:"), mac_blobs
    assert ec_blobs[1][0].startswith("aes-ctr-hmac:"), ec_blobs
    assert ec_blobs[1][1].startswith("aes-ctr-hmac:"), ec_blobs   # its per-version HMAC key
    for secret in before.values():
        for blobs in (mac_blobs, ec_blobs):
            assert secret not in str(blobs)

    # The same store served with SoftHSM loaded directly (AES-GCM available): the blobs open and
    # the keys work and export the same material.
    assert env.server.stop() == 0, env.server.log_tail()
    port = cs.free_port()
    cfg = os.path.join(env.tmp, "direct-restart.yaml")
    with open(cfg, "w") as f:
        f.write(cs.config_text(port, cs.SOFTHSM_MODULE, env.token.label,
                               cs.token_hash(env.api_token), store_path="remote.db"))
    direct = cs.ConfiguredServer(cfg, env.token.env(), token=env.api_token, port=port,
                                 log_path=os.path.join(env.tmp, "direct-restart.log"))
    try:
        direct.start()
        check_exportable_keys(direct, "exp-mac", "exp-ec", want=before)
        # New blobs made directly are AES-GCM, with their scheme recorded.
        r = direct.request("POST", "/v1/transit/keys/exp-direct", json={"type": "hmac", "exportable": True})
        assert r.status_code in (200, 204), describe(r)
        assert sealed_blobs(env, "exp-direct")[1][0].startswith("aes-gcm:")
    finally:
        try:
            assert direct.stop() == 0, direct.log_tail()
        finally:
            env.server.session = requests.Session()
            env.server.start()
    # Back through remoting: its own blobs still open; the AES-GCM one is a clear 400.
    check_exportable_keys(env.server, "exp-mac", "exp-ec", want=before)
    r = req(env, "POST", "/v1/transit/hmac/exp-direct/sha2-256", json={"input": b64("x")})
    assert_refused(r, "CKM_AES_GCM")


def test_random_still_works(env):
    r = req(env, "POST", "/v1/transit/random/16", json={})
    assert r.status_code == 200, describe(r)
    assert len(base64.b64decode(r.json()["data"]["random_bytes"])) == 16


# -- what is refused, by name ----------------------------------------------------------------

def test_aes_key_creation_is_refused_naming_aes_gcm(env):
    r = req(env, "POST", "/v1/transit/keys/aes", json={"type": "aes256-gcm96"})
    assert_refused(r, "creating an aes256-gcm96 key", "CKM_AES_GCM")
    r = req(env, "GET", "/v1/transit/keys/aes")
    assert r.status_code == 404, describe(r)   # nothing half-made


def test_ed25519_key_creation_is_refused_naming_eddsa(env):
    r = req(env, "POST", "/v1/transit/keys/ed", json={"type": "ed25519"})
    assert_refused(r, "ed25519", "CKM_EC_EDWARDS_KEY_PAIR_GEN", "CKM_EDDSA")


def test_derived_keys_are_refused(env):
    r = req(env, "POST", "/v1/transit/keys/der", json={"type": "aes256-gcm96", "derived": True})
    assert r.status_code == 400, describe(r)
    assert "CKM_AES_GCM" in r.json()["errors"][0], r.text


def test_encrypt_with_an_aes_key_made_directly_is_refused_not_500(env):
    # An AES key made by an instance loading SoftHSM directly (which has AES-GCM), on the same
    # token and the same store file as the remoting instance: using it through remoting is a 400
    # naming CKM_AES_GCM, not a 500 or a 503 from a failed C_EncryptInit.
    port = cs.free_port()
    cfg = os.path.join(env.tmp, "direct-shared.yaml")
    with open(cfg, "w") as f:
        f.write(cs.config_text(port, cs.SOFTHSM_MODULE, env.token.label,
                               cs.token_hash(env.api_token), store_path="remote.db"))
    direct = cs.ConfiguredServer(cfg, env.token.env(), token=env.api_token, port=port,
                                 log_path=os.path.join(env.tmp, "direct-shared.log"))
    try:
        direct.start()
        r = direct.request("POST", "/v1/transit/keys/made-direct", json={"type": "aes256-gcm96"})
        assert r.status_code in (200, 204), describe(r)
    finally:
        assert direct.stop() == 0, direct.log_tail()
    r = req(env, "POST", "/v1/transit/encrypt/made-direct", json={"plaintext": b64("secret")})
    assert_refused(r, "made-direct", "CKM_AES_GCM (encrypt,decrypt)")
    r = req(env, "POST", "/v1/transit/decrypt/made-direct",
            json={"ciphertext": "vault:v1:" + b64(bytes(40))})
    assert_refused(r, "CKM_AES_GCM")


def test_kms_root_key_is_refused_in_ibm_shape(env):
    body = {"metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
            "resources": [{"type": "application/vnd.ibm.kms.key+json", "name": "root-k"}]}
    r = req(env, "POST", "/kms/api/v2/keys", json=body, headers={"bluemix-instance": "root"})
    assert r.status_code == 400, describe(r)
    errs = r.json()["resources"][0]["errorMsg"] if "resources" in r.json() else r.text
    assert "CKM_AES_GCM" in r.text and "outside the token" in r.text, errs


# -- what is reported ------------------------------------------------------------------------

def test_health_lists_unavailable_operations(env):
    r = req(env, "GET", "/v1/sys/health", token=False)
    assert r.status_code == 200, describe(r)
    hsm = r.json()["hsm"]
    missing = hsm["unavailable_operations"]
    for op in ("key type aes256-gcm96", "key type ed25519",
               "operation encrypt/decrypt", "operation wrap/unwrap", "operation sign ed25519"):
        assert op in missing, (op, missing)
    for op in ("key type hmac", "key type ecdsa-p256", "key type rsa-2048", "key type exportable",
               "operation sign rsa-pss", "operation sign ecdsa", "operation hmac"):
        assert op not in missing, (op, missing)
    assert any("CKM_EDDSA" in m for m in hsm["missing_mechanisms"]["key type ed25519"]), hsm


def test_hsm_info_through_remoting_shows_what_is_missing(env):
    out = hsm_info(env.remote_cfg, env.remote_env)
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "p11-kit-client.so" in text
    assert "label " + env.token.label in text
    assert "CKM_ECDSA" in text and "sign" in text
    assert "CKM_AES_GCM " not in text.split("key types in the token:")[0]   # not in the mechanism list
    unavailable = text.split("\nunavailable (")[1]
    assert "key type ed25519" in unavailable and "operation encrypt/decrypt" in unavailable, text
    assert "key type hmac" not in unavailable, text
    assert "key type exportable" not in unavailable, text   # sealed with aes-ctr-hmac instead


def test_hsm_info_direct_has_everything(env):
    out = hsm_info(env.direct_cfg, env.token.env())
    assert out.returncode == 0, out.stderr
    text = out.stdout.decode()
    assert "model SoftHSM v2" in text and "serial " in text
    assert "CKM_AES_GCM" in text
    assert "unavailable (0): none" in text, text


def test_hsm_info_names_a_missing_token(env):
    bad = os.path.join(env.tmp, "bad.yaml")
    with open(bad, "w") as f:
        f.write(cs.config_text(cs.free_port(), cs.SOFTHSM_MODULE, "no-such-token",
                               cs.token_hash(env.api_token)))
    out = hsm_info(bad, env.token.env())
    assert out.returncode == 1
    assert b"no-such-token" in out.stderr
