"""HTTP end to end against the real `p11kms server -dev`: the Vault Transit routes of
/work/contract/CONTRACT.md, their status codes, body shapes and error messages.

Messages are checked by case-insensitive substrings (the field, key or problem they must name),
never by Vault's exact wording.
"""

import base64
import hashlib
import json
import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, unb64, describe, errors_text, names, unique_name  # noqa: E402

CT_RE = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/]+={0,2})$")


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


# -- helpers ---------------------------------------------------------------------------------

def ok(resp, status=200):
    assert resp.status_code == status, describe(resp)
    return resp.json() if resp.content else None


def data_of(resp):
    body = ok(resp)
    return body["data"]


def create_key(server, name=None, **body):
    name = name or unique_name()
    r = server.request("POST", "/v1/transit/keys/" + name, json=body or None)
    assert r.status_code == 200, describe(r)
    return name


def read_key(server, name):
    return data_of(server.request("GET", "/v1/transit/keys/" + name))


def rotate(server, name):
    return data_of(server.request("POST", "/v1/transit/keys/%s/rotate" % name))


def configure(server, name, **body):
    return data_of(server.request("POST", "/v1/transit/keys/%s/config" % name, json=body))


def encrypt(server, name, plaintext, **extra):
    body = {"plaintext": b64(plaintext)}
    body.update(extra)
    return data_of(server.request("POST", "/v1/transit/encrypt/" + name, json=body))


def decrypt(server, name, ciphertext):
    d = data_of(server.request("POST", "/v1/transit/decrypt/" + name,
                               json={"ciphertext": ciphertext}))
    return unb64(d["plaintext"])


def list_keys(server):
    r = server.request("LIST", "/v1/transit/keys")
    if r.status_code == 404:
        return []
    return data_of(r)["keys"]


def ct_version(ciphertext):
    m = CT_RE.match(ciphertext)
    assert m, "ciphertext %r is not vault:v<N>:<base64>" % ciphertext
    return int(m.group(1))


def assert_error(resp, status, *needles):
    assert resp.status_code == status, describe(resp)
    body = resp.json()
    assert isinstance(body.get("errors"), list) and body["errors"], describe(resp)
    assert all(isinstance(e, str) for e in body["errors"]), describe(resp)
    for needle in needles:
        assert names(resp, needle), "error should name %r: %s" % (needle, describe(resp))
    assert resp.headers.get("X-Request-Id"), "no X-Request-Id on error: " + describe(resp)


def assert_success_shape(body):
    assert isinstance(body.get("request_id"), str) and body["request_id"]
    assert body["lease_id"] == ""
    assert body["renewable"] is False
    assert body["lease_duration"] == 0
    assert isinstance(body["data"], dict)
    assert body["wrap_info"] is None
    assert body["warnings"] is None or isinstance(body["warnings"], list)
    assert body["auth"] is None


def tamper(ciphertext, index=None):
    """Flip one bit of the decoded payload (default: in the middle) and re-encode."""
    m = CT_RE.match(ciphertext)
    raw = bytearray(base64.b64decode(m.group(2)))
    i = len(raw) // 2 if index is None else index
    raw[i] ^= 0x01
    return "vault:v%s:%s" % (m.group(1), base64.b64encode(bytes(raw)).decode())


# -- list on an empty server (must run first: keep it the first test of this module) --------

def test_list_with_no_keys_is_404_with_empty_errors(server):
    r = server.request("LIST", "/v1/transit/keys")
    assert r.status_code == 404, describe(r)
    assert r.json() == {"errors": []}
    r = server.request("GET", "/v1/transit/keys", params={"list": "true"})
    assert r.status_code == 404, describe(r)
    assert r.json() == {"errors": []}


# -- health, auth, request ids ---------------------------------------------------------------

def test_health_without_token(server):
    r = server.request("GET", "/v1/sys/health", token=False)
    assert r.status_code == 200, describe(r)
    h = r.json()
    assert h["initialized"] is True
    assert h["sealed"] is False
    assert h["standby"] is False
    assert isinstance(h["version"], str) and h["version"]
    assert isinstance(h["server_time_utc"], int)
    assert abs(h["server_time_utc"] - time.time()) < 600, "server clock far from ours"
    hsm = h["hsm"]
    assert hsm["token_label"] == tl.DEV_TOKEN_LABEL
    assert hsm["reachable"] is True
    assert isinstance(hsm["sessions_total"], int) and hsm["sessions_total"] >= 1
    assert isinstance(hsm["sessions_in_use"], int)
    assert 0 <= hsm["sessions_in_use"] <= hsm["sessions_total"]
    assert r.headers.get("X-Request-Id")


def test_health_with_wrong_token_still_200(server):
    r = server.request("GET", "/v1/sys/health", token="not-the-token")
    assert r.status_code == 200, describe(r)


PROTECTED = [
    ("GET", "/v1/transit/keys/somekey", None),
    ("POST", "/v1/transit/keys/somekey", {}),
    ("LIST", "/v1/transit/keys", None),
    ("POST", "/v1/transit/keys/somekey/rotate", None),
    ("POST", "/v1/transit/keys/somekey/config", {"deletion_allowed": True}),
    ("DELETE", "/v1/transit/keys/somekey", None),
    ("POST", "/v1/transit/encrypt/somekey", {"plaintext": "aGk="}),
    ("POST", "/v1/transit/decrypt/somekey", {"ciphertext": "vault:v1:AAAA"}),
    ("POST", "/v1/transit/rewrap/somekey", {"ciphertext": "vault:v1:AAAA"}),
    ("POST", "/v1/transit/datakey/plaintext/somekey", {}),
    ("POST", "/v1/transit/random", {}),
    ("POST", "/v1/transit/hash", {"input": "aGk="}),
    ("GET", "/v1/auth/token/lookup-self", None),
]


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[m + " " + p for m, p, _ in PROTECTED])
def test_no_token_is_403_permission_denied(server, method, path, body):
    r = server.request(method, path, json=body, token=False)
    assert_error(r, 403, "permission denied")


@pytest.mark.parametrize("method,path,body", PROTECTED, ids=[m + " " + p for m, p, _ in PROTECTED])
def test_wrong_token_is_403_permission_denied(server, method, path, body):
    r = server.request(method, path, json=body, token="hvs.wrongwrongwrongwrongwron")
    assert_error(r, 403, "permission denied")


def test_wrong_bearer_token_is_403(server):
    r = server.request("POST", "/v1/transit/random", json={}, token=False,
                       headers={"Authorization": "Bearer hvs.nottherightone"})
    assert_error(r, 403, "permission denied")


def test_bearer_token_works(server):
    r = server.request("POST", "/v1/transit/random", json={}, token=False,
                       headers={"Authorization": "Bearer " + server.token})
    assert r.status_code == 200, describe(r)
    assert len(unb64(r.json()["data"]["random_bytes"])) == 32


def test_forbidden_request_changes_nothing(server):
    name = unique_name("noauth")
    r = server.request("POST", "/v1/transit/keys/" + name, json={}, token=False)
    assert r.status_code == 403, describe(r)
    assert server.request("GET", "/v1/transit/keys/" + name).status_code == 404
    assert name not in list_keys(server)


def test_lookup_self(server):
    r = server.request("GET", "/v1/auth/token/lookup-self")
    body = ok(r)
    assert_success_shape(body)
    assert body["data"]["policies"] == ["root"]
    assert "display_name" in body["data"]
    assert server.token not in r.text, "lookup-self must never echo the token"


def test_the_benchmarks_floor_plus_sign_route_is_not_in_a_test_or_release_build(server):
    # Only scripts/bench's build (-DP11KMS_BENCH=ON) registers it; elsewhere a key's holder must
    # not be able to make the token sign through a route outside transit's policies.
    create_key(server, "bench-route-probe", type="ecdsa-p256")
    r = server.request("GET", "/v1/sys/bench/floor-sign/bench-route-probe")
    assert r.status_code == 404, r.text


def test_request_id_generated_on_success_and_unique(server):
    r1 = server.request("POST", "/v1/transit/random", json={})
    r2 = server.request("POST", "/v1/transit/random", json={})
    assert r1.status_code == r2.status_code == 200
    id1, id2 = r1.headers.get("X-Request-Id"), r2.headers.get("X-Request-Id")
    assert id1 and id2 and id1 != id2


@pytest.mark.parametrize("case", ["success", "400", "403", "404", "405", "204"])
def test_request_id_echoed(server, case):
    rid = "test-rid-" + case + "-" + unique_name("x")
    hdr = {"X-Request-Id": rid}
    if case == "success":
        r = server.request("POST", "/v1/transit/hash", json={"input": b64("x")}, headers=hdr)
        expected = 200
    elif case == "400":
        r = server.request("POST", "/v1/transit/hash", json={"input": "%%%"}, headers=hdr)
        expected = 400
    elif case == "403":
        r = server.request("POST", "/v1/transit/hash", json={"input": b64("x")}, headers=hdr,
                           token=False)
        expected = 403
    elif case == "404":
        r = server.request("GET", "/v1/transit/no-such-route", headers=hdr)
        expected = 404
    elif case == "405":
        r = server.request("DELETE", "/v1/transit/encrypt/whatever", headers=hdr)
        expected = 405
    else:
        name = create_key(server)
        configure(server, name, deletion_allowed=True)
        r = server.request("DELETE", "/v1/transit/keys/" + name, headers=hdr)
        expected = 204
    assert r.status_code == expected, describe(r)
    assert r.headers.get("X-Request-Id") == rid


def test_request_id_on_error_without_client_id(server):
    r = server.request("GET", "/v1/transit/keys/" + unique_name("missing"))
    assert r.status_code == 404, describe(r)
    assert r.headers.get("X-Request-Id")


# -- keys: create / read / list / rotate / config / delete -----------------------------------

KEY_INFO_FIELDS = {
    "name", "type", "keys", "latest_version", "min_decryption_version",
    "min_encryption_version", "min_available_version", "deletion_allowed", "derived",
    "exportable", "allow_plaintext_backup", "supports_encryption", "supports_decryption",
    "supports_derivation", "supports_signing", "imported_key", "auto_rotate_period",
    "convergent_encryption",
}


def assert_fresh_key_info(d, name, key_type):
    missing = KEY_INFO_FIELDS - set(d)
    assert not missing, "key info lacks %s" % sorted(missing)
    assert d["name"] == name
    assert d["type"] == key_type
    assert set(d["keys"]) == {"1"}
    assert isinstance(d["keys"]["1"], int)
    assert abs(d["keys"]["1"] - time.time()) < 600, "creation time is not now (unix seconds)"
    assert d["latest_version"] == 1
    assert d["min_decryption_version"] == 1
    assert d["min_encryption_version"] == 0
    assert d["min_available_version"] == 0
    assert d["deletion_allowed"] is False
    assert d["derived"] is False
    assert d["exportable"] is False
    assert d["allow_plaintext_backup"] is False
    assert d["supports_encryption"] is True
    assert d["supports_decryption"] is True
    assert d["supports_derivation"] is True
    assert d["supports_signing"] is False
    assert d["imported_key"] is False
    assert d["auto_rotate_period"] == 0
    assert d["convergent_encryption"] is False


def test_create_default_type(server):
    name = unique_name()
    r = server.request("POST", "/v1/transit/keys/" + name)
    body = ok(r)
    assert_success_shape(body)
    assert_fresh_key_info(body["data"], name, "aes256-gcm96")
    assert r.headers.get("X-Request-Id")


@pytest.mark.parametrize("key_type", ["aes256-gcm96", "aes128-gcm96"])
def test_create_each_type_and_read_matches(server, key_type):
    name = unique_name()
    created = data_of(server.request("POST", "/v1/transit/keys/" + name, json={"type": key_type}))
    assert_fresh_key_info(created, name, key_type)
    r = server.request("GET", "/v1/transit/keys/" + name)
    body = ok(r)
    assert_success_shape(body)
    assert body["data"] == created
    # and the key works
    assert decrypt(server, name, encrypt(server, name, b"hello")["ciphertext"]) == b"hello"


def test_create_existing_name_is_200_and_unchanged(server):
    name = create_key(server, type="aes128-gcm96")
    rotate(server, name)
    before = read_key(server, name)
    r = server.request("POST", "/v1/transit/keys/" + name, json={"type": "aes256-gcm96"})
    assert r.status_code == 200, describe(r)
    after = read_key(server, name)
    assert after == before
    assert after["type"] == "aes128-gcm96" and after["latest_version"] == 2


def test_create_unsupported_type_is_400_and_creates_nothing(server):
    name = unique_name("badtype")
    r = server.request("POST", "/v1/transit/keys/" + name, json={"type": "aes512-gcm96"})
    assert_error(r, 400, "type")
    assert server.request("GET", "/v1/transit/keys/" + name).status_code == 404
    assert name not in list_keys(server)


def test_create_type_not_a_string_is_400(server):
    name = unique_name("badtype")
    r = server.request("POST", "/v1/transit/keys/" + name, json={"type": ["aes256-gcm96"]})
    assert_error(r, 400, "type")
    assert name not in list_keys(server)


@pytest.mark.parametrize("bad", ["a%20b", "a" * 129, "%C3%A4", "key%21", "a%2Bb", "k%3Ae"],
                         ids=["space", "129chars", "umlaut", "bang", "plus", "colon"])
def test_invalid_key_name_is_400(server, bad):
    r = server.request("POST", "/v1/transit/keys/" + bad, json={})
    assert_error(r, 400, "name")
    assert server.request("GET", "/v1/transit/keys/" + bad).status_code == 400


@pytest.mark.parametrize("bad", ["a%20b", "a" * 129, "%C3%A4"], ids=["space", "129chars", "umlaut"])
def test_invalid_key_name_on_encrypt_is_400(server, bad):
    r = server.request("POST", "/v1/transit/encrypt/" + bad, json={"plaintext": b64("x")})
    assert_error(r, 400, "name")


def test_invalid_key_names_create_nothing(server):
    before = list_keys(server)
    for bad in ["a%20b", "a" * 129, "%C3%A4"]:
        server.request("POST", "/v1/transit/keys/" + bad, json={})
    assert list_keys(server) == before


def test_key_name_with_slash_is_not_a_key(server):
    before = list_keys(server)
    r = server.request("POST", "/v1/transit/keys/sl/ash", json={})
    assert 400 <= r.status_code < 500, describe(r)
    after = list_keys(server)
    assert after == before
    assert "sl" not in after and "sl/ash" not in after


def test_key_name_128_chars_and_all_allowed_characters(server):
    long_name = ("Ab9._-" * 22)[:128]
    assert len(long_name) == 128
    d = data_of(server.request("POST", "/v1/transit/keys/" + long_name, json={}))
    assert d["name"] == long_name
    assert long_name in list_keys(server)
    assert decrypt(server, long_name, encrypt(server, long_name, b"x")["ciphertext"]) == b"x"


def test_read_unknown_key_is_404_naming_key(server):
    name = unique_name("nokey")
    assert_error(server.request("GET", "/v1/transit/keys/" + name), 404, name)


def test_rotate_unknown_key_is_404_naming_key(server):
    name = unique_name("nokey")
    assert_error(server.request("POST", "/v1/transit/keys/%s/rotate" % name), 404, name)
    assert name not in list_keys(server)


def test_config_unknown_key_is_404_naming_key(server):
    name = unique_name("nokey")
    r = server.request("POST", "/v1/transit/keys/%s/config" % name, json={"deletion_allowed": True})
    assert_error(r, 404, name)
    assert name not in list_keys(server)


def test_delete_unknown_key_is_404_naming_key(server):
    name = unique_name("nokey")
    assert_error(server.request("DELETE", "/v1/transit/keys/" + name), 404, name)


def test_list_and_get_list_agree_and_are_sorted(server):
    made = sorted(create_key(server, unique_name(p)) for p in ("zz", "aa", "mm"))
    r1 = server.request("LIST", "/v1/transit/keys")
    b1 = ok(r1)
    assert_success_shape(b1)
    r2 = server.request("GET", "/v1/transit/keys", params={"list": "true"})
    b2 = ok(r2)
    k1, k2 = b1["data"]["keys"], b2["data"]["keys"]
    assert k1 == k2
    assert k1 == sorted(k1)
    assert set(made) <= set(k1)
    assert len(k1) == len(set(k1))


def test_rotate(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/keys/%s/rotate" % name)
    body = ok(r)
    assert_success_shape(body)
    d = body["data"]
    assert d["latest_version"] == 2
    assert set(d["keys"]) == {"1", "2"}
    assert d["keys"]["2"] >= d["keys"]["1"]
    d3 = rotate(server, name)
    assert d3["latest_version"] == 3 and set(d3["keys"]) == {"1", "2", "3"}
    assert read_key(server, name) == d3
    # new encryptions use the newest version
    assert ct_version(encrypt(server, name, b"p")["ciphertext"]) == 3


def test_config_success_returns_key_info(server):
    name = create_key(server)
    rotate(server, name)
    rotate(server, name)
    r = server.request("POST", "/v1/transit/keys/%s/config" % name,
                       json={"min_decryption_version": 2, "min_encryption_version": 3,
                             "deletion_allowed": True})
    body = ok(r)
    assert_success_shape(body)
    d = body["data"]
    assert d["min_decryption_version"] == 2
    assert d["min_encryption_version"] == 3
    assert d["deletion_allowed"] is True
    assert d["latest_version"] == 3
    got = read_key(server, name)
    for f in ("min_decryption_version", "min_encryption_version", "deletion_allowed",
              "latest_version"):
        assert got[f] == d[f]


BAD_CONFIGS = [
    ({"min_decryption_version": 5}, "min_decryption_version"),           # above latest (2)
    ({"min_decryption_version": -1}, "min_decryption_version"),
    ({"min_decryption_version": "abc"}, "min_decryption_version"),
    ({"min_encryption_version": 5}, "min_encryption_version"),           # above latest
    ({"min_encryption_version": -1}, "min_encryption_version"),
    ({"min_encryption_version": "abc"}, "min_encryption_version"),
    ({"min_decryption_version": 2, "min_encryption_version": 1}, "min_encryption_version"),
    ({"deletion_allowed": "maybe"}, "deletion_allowed"),
]


@pytest.mark.parametrize("body,field", BAD_CONFIGS,
                         ids=["mindec-above-latest", "mindec-negative", "mindec-string",
                              "minenc-above-latest", "minenc-negative", "minenc-string",
                              "minenc-below-mindec", "deletion-not-bool"])
def test_bad_config_is_400_and_changes_nothing(server, body, field):
    name = create_key(server)
    rotate(server, name)
    before = read_key(server, name)
    r = server.request("POST", "/v1/transit/keys/%s/config" % name, json=body)
    assert_error(r, 400, field)
    assert read_key(server, name) == before


def test_delete_refused_without_deletion_allowed_then_allowed(server):
    name = create_key(server)
    ct = encrypt(server, name, b"keep")["ciphertext"]
    r = server.request("DELETE", "/v1/transit/keys/" + name)
    assert_error(r, 400, "deletion")
    # refused delete changed nothing
    assert read_key(server, name)["deletion_allowed"] is False
    assert name in list_keys(server)
    assert decrypt(server, name, ct) == b"keep"

    assert configure(server, name, deletion_allowed=True)["deletion_allowed"] is True
    r = server.request("DELETE", "/v1/transit/keys/" + name)
    assert r.status_code == 204, describe(r)
    assert r.content == b""
    assert r.headers.get("X-Request-Id")
    assert_error(server.request("GET", "/v1/transit/keys/" + name), 404, name)
    assert name not in list_keys(server)
    assert_error(server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": ct}),
                 400, name)
    # the name can be used again, for a brand new key
    d = data_of(server.request("POST", "/v1/transit/keys/" + name, json={}))
    assert d["latest_version"] == 1 and d["deletion_allowed"] is False
    assert server.request("POST", "/v1/transit/decrypt/" + name,
                          json={"ciphertext": ct}).status_code == 400


# -- encrypt / decrypt -----------------------------------------------------------------------

def test_encrypt_decrypt_roundtrip_and_envelope(server):
    name = create_key(server)
    pt = b"the quick brown fox"
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"plaintext": b64(pt)})
    body = ok(r)
    assert_success_shape(body)
    d = body["data"]
    assert ct_version(d["ciphertext"]) == 1
    assert d["key_version"] == 1
    raw = base64.b64decode(CT_RE.match(d["ciphertext"]).group(2))
    assert len(raw) == 12 + len(pt) + 16, "envelope is iv(12) || ciphertext || tag(16)"
    assert pt not in raw
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": d["ciphertext"]})
    body = ok(r)
    assert_success_shape(body)
    assert unb64(body["data"]["plaintext"]) == pt


@pytest.mark.parametrize("key_type", ["aes128-gcm96", "aes256-gcm96"])
def test_binary_and_large_plaintext_roundtrip(server, key_type):
    name = create_key(server, type=key_type)
    for pt in (bytes(range(256)), os.urandom(100000), b"\x00"):
        assert decrypt(server, name, encrypt(server, name, pt)["ciphertext"]) == pt


def test_encrypting_twice_gives_different_ciphertexts(server):
    name = create_key(server)
    c1 = encrypt(server, name, b"same")["ciphertext"]
    c2 = encrypt(server, name, b"same")["ciphertext"]
    assert c1 != c2
    assert base64.b64decode(c1[9:])[:12] != base64.b64decode(c2[9:])[:12], "IV reused"


def test_encrypt_missing_plaintext_is_400(server):
    name = create_key(server)
    assert_error(server.request("POST", "/v1/transit/encrypt/" + name, json={}), 400, "plaintext")


def test_encrypt_empty_body_is_400(server):
    name = create_key(server)
    assert_error(server.request("POST", "/v1/transit/encrypt/" + name), 400, "plaintext")


@pytest.mark.parametrize("bad", ["not base64!!", "%%%%", "YWJj$", 12345],
                         ids=["spaces", "percent", "dollar", "number"])
def test_encrypt_non_base64_plaintext_is_400(server, bad):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"plaintext": bad})
    assert_error(r, 400, "plaintext")


def test_encrypt_unknown_key_creates_it_as_vault_does(server):
    name = unique_name("upsert")
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"plaintext": b64("x")})
    assert r.status_code == 200, describe(r)
    assert r.json()["data"]["ciphertext"].startswith("vault:v1:")
    info = server.request("GET", "/v1/transit/keys/" + name).json()["data"]
    assert info["type"] == "aes256-gcm96" and info["latest_version"] == 1
    named = unique_name("upsert128")
    r = server.request("POST", "/v1/transit/encrypt/" + named, json={"plaintext": b64("x"), "type": "aes128-gcm96"})
    assert r.status_code == 200, describe(r)
    assert server.request("GET", "/v1/transit/keys/" + named).json()["data"]["type"] == "aes128-gcm96"
    batch = unique_name("upsertbatch")
    r = server.request("POST", "/v1/transit/encrypt/" + batch, json={"batch_input": [{"plaintext": b64("a")}]})
    assert r.status_code == 200, describe(r)
    assert batch in list_keys(server)


@pytest.mark.parametrize("body,word", [
    ({"plaintext": "eA==", "type": "rsa-2048"}, "type"),
    ({"plaintext": "eA==", "type": "no-such-type"}, "type"),
    # convergent needs a derived key, which only a context makes (a context alone now creates one)
    ({"plaintext": "eA==", "convergent_encryption": True}, "context"),
    ({"plaintext": "eA==", "context": "Y3R4", "type": "ecdsa-p256"}, "type"),
])
def test_encrypt_upsert_that_cannot_create_is_400_and_creates_nothing(server, body, word):
    name = unique_name("noupsert")
    r = server.request("POST", "/v1/transit/encrypt/" + name, json=body)
    assert_error(r, 400, word)
    assert server.request("GET", "/v1/transit/keys/" + name).status_code == 404
    assert name not in list_keys(server)


def test_decrypt_unknown_key_is_400_naming_key(server):
    other = create_key(server)
    ct = encrypt(server, other, b"x")["ciphertext"]
    name = unique_name("nokey")
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": ct})
    assert_error(r, 400, name)


def test_decrypt_missing_ciphertext_is_400(server):
    name = create_key(server)
    assert_error(server.request("POST", "/v1/transit/decrypt/" + name, json={}), 400, "ciphertext")


BAD_CIPHERTEXTS = [
    "hello",
    "vault:v1",
    "vault:v1:",
    "vault:vX:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "vault:1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "vault:v1:!!!not-base64!!!",
    "other:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    "vault:v1:AAAA",                      # decodes, but far shorter than iv + tag
]


@pytest.mark.parametrize("bad", BAD_CIPHERTEXTS,
                         ids=["no-prefix", "no-payload", "empty-payload", "version-not-number",
                              "version-no-v", "payload-not-b64", "wrong-prefix", "too-short"])
def test_decrypt_malformed_ciphertext_is_400(server, bad):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": bad})
    assert_error(r, 400, "ciphertext")


def test_decrypt_ciphertext_not_a_string_is_400(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": {"a": 1}})
    assert_error(r, 400, "ciphertext")


def test_decrypt_version_above_latest_is_400(server):
    name = create_key(server)
    ct = encrypt(server, name, b"x")["ciphertext"]
    bumped = "vault:v9" + ct[len("vault:v1"):]
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": bumped})
    assert_error(r, 400, "version")


@pytest.mark.parametrize("where", ["iv", "middle", "tag"])
def test_decrypt_tampered_ciphertext_is_400(server, where):
    name = create_key(server)
    ct = encrypt(server, name, b"integrity matters")["ciphertext"]
    index = {"iv": 0, "middle": None, "tag": -1}[where]
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": tamper(ct, index)})
    assert r.status_code == 400, describe(r)
    text = errors_text(r)
    assert any(w in text for w in ("ciphertext", "authenticat", "decrypt")), describe(r)
    assert decrypt(server, name, ct) == b"integrity matters"


def test_decrypt_with_another_key_is_400(server):
    a, b = create_key(server), create_key(server)
    ct = encrypt(server, a, b"for a only")["ciphertext"]
    r = server.request("POST", "/v1/transit/decrypt/" + b, json={"ciphertext": ct})
    assert r.status_code == 400, describe(r)


def test_decrypt_with_wrong_version_label_is_400(server):
    name = create_key(server)
    ct1 = encrypt(server, name, b"v1 data")["ciphertext"]
    rotate(server, name)
    relabeled = "vault:v2" + ct1[len("vault:v1"):]
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": relabeled})
    assert r.status_code == 400, describe(r)


def test_key_version_honoured_on_encrypt(server):
    name = create_key(server)
    rotate(server, name)
    rotate(server, name)
    for v in (1, 2, 3):
        d = encrypt(server, name, b"pinned %d" % v, key_version=v)
        assert ct_version(d["ciphertext"]) == v
        assert d["key_version"] == v
        assert decrypt(server, name, d["ciphertext"]) == b"pinned %d" % v
    d = encrypt(server, name, b"latest", key_version=0)   # 0 = latest, as Vault
    assert ct_version(d["ciphertext"]) == 3 and d["key_version"] == 3


def test_key_version_above_latest_on_encrypt_is_400(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"plaintext": b64("x"), "key_version": 2})
    assert_error(r, 400, "version")


def test_key_version_not_a_number_on_encrypt_is_400(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"plaintext": b64("x"), "key_version": "latest"})
    assert_error(r, 400, "key_version")


def test_min_decryption_version_enforced(server):
    name = create_key(server)
    ct1 = encrypt(server, name, b"one")["ciphertext"]
    rotate(server, name)
    ct2 = encrypt(server, name, b"two")["ciphertext"]
    rotate(server, name)
    ct3 = encrypt(server, name, b"three")["ciphertext"]
    assert decrypt(server, name, ct1) == b"one"
    configure(server, name, min_decryption_version=2)
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": ct1})
    assert_error(r, 400, "version")
    assert decrypt(server, name, ct2) == b"two"
    assert decrypt(server, name, ct3) == b"three"
    # rewrap of a too-old ciphertext is refused too
    r = server.request("POST", "/v1/transit/rewrap/" + name, json={"ciphertext": ct1})
    assert_error(r, 400, "version")
    # lowering it again makes v1 usable again (the old version was not destroyed)
    configure(server, name, min_decryption_version=1)
    assert decrypt(server, name, ct1) == b"one"


def test_min_encryption_version_enforced(server):
    name = create_key(server)
    rotate(server, name)
    rotate(server, name)
    configure(server, name, min_encryption_version=2)
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"plaintext": b64("x"), "key_version": 1})
    assert_error(r, 400, "version")
    d = encrypt(server, name, b"x", key_version=2)
    assert ct_version(d["ciphertext"]) == 2
    assert ct_version(encrypt(server, name, b"x")["ciphertext"]) == 3


# -- rewrap ----------------------------------------------------------------------------------

def test_rewrap_moves_v1_to_latest(server):
    name = create_key(server)
    ct1 = encrypt(server, name, b"rewrap me")["ciphertext"]
    rotate(server, name)
    rotate(server, name)
    r = server.request("POST", "/v1/transit/rewrap/" + name, json={"ciphertext": ct1})
    body = ok(r)
    assert_success_shape(body)
    d = body["data"]
    assert ct_version(d["ciphertext"]) == 3
    assert d["key_version"] == 3
    assert "plaintext" not in d
    assert d["ciphertext"] != ct1
    assert decrypt(server, name, d["ciphertext"]) == b"rewrap me"
    # after rewrap, v1 can be retired and the rewrapped ciphertext still decrypts
    configure(server, name, min_decryption_version=3)
    assert decrypt(server, name, d["ciphertext"]) == b"rewrap me"


def test_rewrap_key_version_honoured(server):
    name = create_key(server)
    ct1 = encrypt(server, name, b"pin")["ciphertext"]
    rotate(server, name)
    rotate(server, name)
    d = data_of(server.request("POST", "/v1/transit/rewrap/" + name,
                               json={"ciphertext": ct1, "key_version": 2}))
    assert ct_version(d["ciphertext"]) == 2 and d["key_version"] == 2
    assert decrypt(server, name, d["ciphertext"]) == b"pin"


def test_rewrap_bad_ciphertext_is_400(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/rewrap/" + name, json={"ciphertext": "garbage"})
    assert_error(r, 400, "ciphertext")
    assert_error(server.request("POST", "/v1/transit/rewrap/" + name, json={}), 400, "ciphertext")


def test_rewrap_tampered_ciphertext_is_400(server):
    name = create_key(server)
    ct = encrypt(server, name, b"x")["ciphertext"]
    rotate(server, name)
    r = server.request("POST", "/v1/transit/rewrap/" + name, json={"ciphertext": tamper(ct)})
    assert r.status_code == 400, describe(r)


def test_rewrap_unknown_key_is_400_naming_key(server):
    other = create_key(server)
    ct = encrypt(server, other, b"x")["ciphertext"]
    name = unique_name("nokey")
    assert_error(server.request("POST", "/v1/transit/rewrap/" + name, json={"ciphertext": ct}),
                 400, name)


# -- batches ---------------------------------------------------------------------------------

def test_batch_encrypt_and_decrypt(server):
    name = create_key(server)
    pts = [b"alpha", b"beta", bytes(range(40))]
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"batch_input": [{"plaintext": b64(p)} for p in pts]})
    body = ok(r)
    assert_success_shape(body)
    results = body["data"]["batch_results"]
    assert len(results) == 3
    for item in results:
        assert ct_version(item["ciphertext"]) == 1
        assert item.get("key_version") == 1
        assert not item.get("error")
    r = server.request("POST", "/v1/transit/decrypt/" + name,
                       json={"batch_input": [{"ciphertext": i["ciphertext"]} for i in results]})
    out = ok(r)["data"]["batch_results"]
    assert [unb64(i["plaintext"]) for i in out] == pts


def test_batch_encrypt_items_pick_their_versions(server):
    # Items of one batch under several versions, one version too new, one not an object: each
    # slot answers for its own item, in order, with its reference.
    name = create_key(server)
    ok(server.request("POST", "/v1/transit/keys/%s/rotate" % name))
    batch = [{"plaintext": b64("latest"), "reference": "a"},
             {"plaintext": b64("one"), "key_version": 1, "reference": "b"},
             {"plaintext": b64("three"), "key_version": 3, "reference": "c"},
             "not an object",
             {"plaintext": b64("two"), "key_version": "2", "associated_data": b64("aad")},
             {"plaintext": b64("aad"), "associated_data": "!!", "reference": "e"}]
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"batch_input": batch})
    assert r.status_code == 400, describe(r)
    results = r.json()["data"]["batch_results"]
    assert len(results) == len(batch)
    assert [i.get("reference") for i in results] == ["a", "b", "c", None, None, "e"]
    assert [i.get("key_version") for i in results] == [2, 1, None, None, 2, None]
    assert "higher than the latest key version" in results[2]["error"]
    assert "JSON objects" in results[3]["error"]
    assert "associated_data" in results[5]["error"] and "ciphertext" not in results[5]
    assert ct_version(results[0]["ciphertext"]) == 2 and ct_version(results[1]["ciphertext"]) == 1
    assert decrypt(server, name, results[0]["ciphertext"]) == b"latest"
    assert decrypt(server, name, results[1]["ciphertext"]) == b"one"
    r = server.request("POST", "/v1/transit/decrypt/" + name,
                       json={"ciphertext": results[4]["ciphertext"], "associated_data": b64("aad")})
    assert unb64(ok(r)["data"]["plaintext"]) == b"two"


def test_batch_encrypt_with_a_derived_key_uses_each_items_context(server):
    name = create_key(server, derived=True)
    batch = [{"plaintext": b64("p1"), "context": b64("ctx-1")},
             {"plaintext": b64("p2"), "context": b64("ctx-2")},
             {"plaintext": b64("p3")}]
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"batch_input": batch})
    assert r.status_code == 400, describe(r)
    results = r.json()["data"]["batch_results"]
    assert "context" in results[2]["error"]
    for i, ctx in ((0, "ctx-1"), (1, "ctx-2")):
        r = server.request("POST", "/v1/transit/decrypt/" + name,
                           json={"ciphertext": results[i]["ciphertext"], "context": b64(ctx)})
        assert unb64(ok(r)["data"]["plaintext"]) == b"p%d" % (i + 1)
    r = server.request("POST", "/v1/transit/decrypt/" + name,
                       json={"ciphertext": results[0]["ciphertext"], "context": b64("ctx-2")})
    assert r.status_code == 400, describe(r)


def test_batch_encrypt_on_a_non_aes_key_fails_each_item(server):
    name = create_key(server, type="ecdsa-p256")
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"batch_input": [{"plaintext": b64("x")}, {"plaintext": b64("y")}]})
    assert r.status_code == 400, describe(r)
    results = r.json()["data"]["batch_results"]
    assert len(results) == 2 and all("does not support encryption" in i["error"] for i in results)


def test_batch_ignores_top_level_plaintext(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"plaintext": b64("top"), "batch_input": [{"plaintext": b64("in")}]})
    d = ok(r)["data"]
    assert "ciphertext" not in d
    assert len(d["batch_results"]) == 1
    assert decrypt(server, name, d["batch_results"][0]["ciphertext"]) == b"in"


def test_batch_encrypt_one_bad_item_is_400_with_results(server):
    name = create_key(server)
    batch = [{"plaintext": b64("good0")}, {"plaintext": "***not base64***"},
             {"plaintext": b64("good2")}]
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"batch_input": batch})
    assert r.status_code == 400, describe(r)
    results = r.json()["data"]["batch_results"]
    assert len(results) == 3
    assert results[1].get("error") and "plaintext" in results[1]["error"].lower()
    assert not results[1].get("ciphertext")
    for i in (0, 2):
        assert not results[i].get("error")
        assert decrypt(server, name, results[i]["ciphertext"]) == b"good%d" % i


def test_batch_encrypt_missing_plaintext_in_item(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"batch_input": [{"plaintext": b64("ok")}, {}]})
    assert r.status_code == 400, describe(r)
    results = r.json()["data"]["batch_results"]
    assert results[0].get("ciphertext") and not results[0].get("error")
    assert "plaintext" in results[1]["error"].lower()


def test_batch_partial_failure_response_code_207(server):
    name = create_key(server)
    batch = [{"plaintext": b64("good")}, {"plaintext": "@@@"}]
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"batch_input": batch, "partial_failure_response_code": 207})
    assert r.status_code == 207, describe(r)
    results = r.json()["data"]["batch_results"]
    assert results[0]["ciphertext"].startswith("vault:v1:") and results[1]["error"]
    assert r.headers.get("X-Request-Id")


def test_batch_all_failed_ignores_partial_failure_code(server):
    name = create_key(server)
    batch = [{"plaintext": "@@@"}, {"plaintext": "###"}]
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"batch_input": batch, "partial_failure_response_code": 207})
    assert r.status_code == 400, describe(r)
    results = r.json()["data"]["batch_results"]
    assert len(results) == 2 and all(i.get("error") for i in results)


def test_batch_decrypt_one_bad_item(server):
    name = create_key(server)
    good = encrypt(server, name, b"fine")["ciphertext"]
    batch = [{"ciphertext": good}, {"ciphertext": "vault:v1:broken"}, {"ciphertext": tamper(good)}]
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"batch_input": batch})
    assert r.status_code == 400, describe(r)
    results = r.json()["data"]["batch_results"]
    assert len(results) == 3
    assert unb64(results[0]["plaintext"]) == b"fine" and not results[0].get("error")
    assert results[1]["error"] and results[2]["error"]
    assert not results[1].get("plaintext") and not results[2].get("plaintext")
    r = server.request("POST", "/v1/transit/decrypt/" + name,
                       json={"batch_input": batch, "partial_failure_response_code": 207})
    assert r.status_code == 207, describe(r)


def test_batch_rewrap(server):
    name = create_key(server)
    cts = [encrypt(server, name, b"r%d" % i)["ciphertext"] for i in range(3)]
    rotate(server, name)
    r = server.request("POST", "/v1/transit/rewrap/" + name,
                       json={"batch_input": [{"ciphertext": c} for c in cts]})
    results = ok(r)["data"]["batch_results"]
    assert len(results) == 3
    for i, item in enumerate(results):
        assert ct_version(item["ciphertext"]) == 2
        assert decrypt(server, name, item["ciphertext"]) == b"r%d" % i


def test_batch_input_not_a_list_is_400(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"batch_input": "nope"})
    assert_error(r, 400, "batch_input")


def test_batch_over_max_items_is_400(server):
    name = create_key(server)
    batch = [{"plaintext": "AA=="}] * 1001
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"batch_input": batch})
    assert_error(r, 400, "batch")
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"batch_input": batch[:1000]})
    assert r.status_code == 200, describe(r)
    assert len(r.json()["data"]["batch_results"]) == 1000


# -- data keys -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [None, 128, 256, 512])
def test_datakey_plaintext(server, bits):
    name = create_key(server)
    body = {} if bits is None else {"bits": bits}
    r = server.request("POST", "/v1/transit/datakey/plaintext/" + name, json=body)
    b = ok(r)
    assert_success_shape(b)
    d = b["data"]
    key = unb64(d["plaintext"])
    assert len(key) == (bits or 256) // 8
    assert ct_version(d["ciphertext"]) == 1 and d["key_version"] == 1
    assert decrypt(server, name, d["ciphertext"]) == key


def test_datakeys_differ(server):
    name = create_key(server)
    k = [data_of(server.request("POST", "/v1/transit/datakey/plaintext/" + name, json={}))
         ["plaintext"] for _ in range(2)]
    assert k[0] != k[1]


@pytest.mark.parametrize("bits", [128, 256, 512])
def test_datakey_wrapped(server, bits):
    name = create_key(server, type="aes128-gcm96")
    rotate(server, name)
    r = server.request("POST", "/v1/transit/datakey/wrapped/" + name, json={"bits": bits})
    d = ok(r)["data"]
    assert "plaintext" not in d, "wrapped datakey must not return the plaintext"
    assert ct_version(d["ciphertext"]) == 2 and d["key_version"] == 2
    assert len(decrypt(server, name, d["ciphertext"])) == bits // 8


@pytest.mark.parametrize("bits", [0, 64, 100, 1024, -256, "abc"])
def test_datakey_bad_bits_is_400(server, bits):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/datakey/plaintext/" + name, json={"bits": bits})
    assert_error(r, 400, "bits")


def test_datakey_unknown_key_is_400_naming_key(server):
    name = unique_name("nokey")
    for kind in ("plaintext", "wrapped"):
        r = server.request("POST", "/v1/transit/datakey/%s/%s" % (kind, name), json={})
        assert_error(r, 400, name)
    assert name not in list_keys(server)


def test_datakey_unknown_kind_is_client_error(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/datakey/cleartext/" + name, json={})
    assert r.status_code in (400, 404), describe(r)


# -- random ----------------------------------------------------------------------------------

def test_random_default_is_32_bytes_base64_and_differs(server):
    r = server.request("POST", "/v1/transit/random", json={})
    body = ok(r)
    assert_success_shape(body)
    a = unb64(body["data"]["random_bytes"])
    b = unb64(data_of(server.request("POST", "/v1/transit/random", json={}))["random_bytes"])
    assert len(a) == 32 and len(b) == 32
    assert a != b


def test_random_no_body(server):
    d = data_of(server.request("POST", "/v1/transit/random"))
    assert len(unb64(d["random_bytes"])) == 32


def test_random_64_hex_in_url(server):
    outs = []
    for _ in range(2):
        d = data_of(server.request("POST", "/v1/transit/random/64", json={"format": "hex"}))
        s = d["random_bytes"]
        assert re.fullmatch(r"[0-9a-f]{128}", s), s
        outs.append(s)
    assert outs[0] != outs[1]


def test_random_bytes_in_body(server):
    d = data_of(server.request("POST", "/v1/transit/random", json={"bytes": 16, "format": "base64"}))
    assert len(unb64(d["random_bytes"])) == 16
    d = data_of(server.request("POST", "/v1/transit/random", json={"bytes": 7, "format": "hex"}))
    assert re.fullmatch(r"[0-9a-f]{14}", d["random_bytes"])


def test_random_bad_format_is_400(server):
    r = server.request("POST", "/v1/transit/random", json={"format": "base32"})
    assert_error(r, 400, "format")


@pytest.mark.parametrize("n", [0, -1, "lots"])
def test_random_bad_bytes_is_400(server, n):
    r = server.request("POST", "/v1/transit/random", json={"bytes": n})
    assert_error(r, 400, "bytes")


# -- hash ------------------------------------------------------------------------------------

HASHES = {"sha2-224": hashlib.sha224, "sha2-256": hashlib.sha256,
          "sha2-384": hashlib.sha384, "sha2-512": hashlib.sha512}
HASH_INPUT = b"p11kms hashes \x00\xff in the token"


def expected_sum(algo, fmt, data=HASH_INPUT):
    digest = HASHES[algo](data).digest()
    return digest.hex() if fmt == "hex" else base64.b64encode(digest).decode()


@pytest.mark.parametrize("fmt", ["hex", "base64"])
@pytest.mark.parametrize("algo", sorted(HASHES))
def test_hash_algorithm_in_body(server, algo, fmt):
    r = server.request("POST", "/v1/transit/hash",
                       json={"input": b64(HASH_INPUT), "algorithm": algo, "format": fmt})
    body = ok(r)
    assert_success_shape(body)
    assert body["data"]["sum"] == expected_sum(algo, fmt)


@pytest.mark.parametrize("fmt", ["hex", "base64"])
@pytest.mark.parametrize("algo", sorted(HASHES))
def test_hash_algorithm_in_url(server, algo, fmt):
    r = server.request("POST", "/v1/transit/hash/" + algo,
                       json={"input": b64(HASH_INPUT), "format": fmt})
    assert data_of(r)["sum"] == expected_sum(algo, fmt)


def test_hash_defaults_sha2_256_hex(server):
    d = data_of(server.request("POST", "/v1/transit/hash", json={"input": b64(HASH_INPUT)}))
    assert d["sum"] == hashlib.sha256(HASH_INPUT).hexdigest()


def test_hash_bad_algorithm_is_400(server):
    r = server.request("POST", "/v1/transit/hash",
                       json={"input": b64("x"), "algorithm": "md5"})
    assert_error(r, 400, "algorithm")
    r = server.request("POST", "/v1/transit/hash/sha1", json={"input": b64("x")})
    assert r.status_code in (400, 404), describe(r)
    if r.status_code == 400:
        assert names(r, "algorithm"), describe(r)


def test_hash_bad_format_is_400(server):
    r = server.request("POST", "/v1/transit/hash", json={"input": b64("x"), "format": "base32"})
    assert_error(r, 400, "format")


def test_hash_non_base64_input_is_400(server):
    r = server.request("POST", "/v1/transit/hash", json={"input": "@@not b64@@"})
    assert_error(r, 400, "input")


# -- HTTP edge: size, JSON, routes, methods --------------------------------------------------

def test_body_over_1mib_is_413(server):
    name = create_key(server)
    payload = json.dumps({"plaintext": "A" * (1024 * 1024 + 16)}).encode()
    r = server.request("POST", "/v1/transit/encrypt/" + name, data=payload,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 413, describe(r)
    assert r.headers.get("X-Request-Id")
    # and the server keeps serving
    assert server.request("GET", "/v1/sys/health", token=False).status_code == 200
    assert read_key(server, name)["latest_version"] == 1


def test_body_just_under_limit_is_accepted(server):
    name = create_key(server)
    pt = os.urandom(700 * 1024)          # base64 ~ 933 KiB, JSON body < 1 MiB
    body = json.dumps({"plaintext": b64(pt)}).encode()
    assert len(body) < 1024 * 1024
    r = server.request("POST", "/v1/transit/encrypt/" + name, data=body,
                       headers={"Content-Type": "application/json"})
    ct = data_of(r)["ciphertext"]
    assert decrypt(server, name, ct) == pt


@pytest.mark.parametrize("raw", [b'{"plaintext": ', b"{not json}", b'{"plaintext": "aGk="} x',
                                 b"\xff\xfe\x00", b'{"plaintext": "\xff"}'],
                         ids=["truncated", "garbage", "trailing", "binary", "bad-utf8-in-string"])
def test_malformed_json_is_400(server, raw):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name, data=raw,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 400, describe(r)
    assert r.json()["errors"], describe(r)
    assert r.headers.get("X-Request-Id")


def test_malformed_json_on_config_changes_nothing(server):
    name = create_key(server)
    before = read_key(server, name)
    r = server.request("POST", "/v1/transit/keys/%s/config" % name,
                       data=b'{"deletion_allowed": true', headers={"Content-Type": "application/json"})
    assert r.status_code == 400, describe(r)
    assert read_key(server, name) == before


def test_json_not_an_object_is_400(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name, data=b'["aGk="]',
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 400, describe(r)


def test_json_too_deep_is_400(server):
    name = create_key(server)
    deep = "[" * 200 + "]" * 200
    raw = ('{"plaintext": "aGk=", "x": %s}' % deep).encode()
    r = server.request("POST", "/v1/transit/encrypt/" + name, data=raw,
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 400, describe(r)
    assert server.request("GET", "/v1/sys/health", token=False).status_code == 200


@pytest.mark.parametrize("method,path", [
    ("GET", "/v1/transit/nope"),
    ("POST", "/v1/transit/nope/x"),
    ("GET", "/v1/nothing/here"),
    ("GET", "/v2/transit/keys/x"),
    ("POST", "/v1/transit/keys/a/b/c/d"),
])
def test_unknown_route_is_404(server, method, path):
    r = server.request(method, path, json={} if method == "POST" else None)
    assert r.status_code == 404, describe(r)
    assert r.headers.get("X-Request-Id")
    assert isinstance(r.json().get("errors"), list)


@pytest.mark.parametrize("method,path", [
    ("DELETE", "/v1/transit/encrypt/x"),
    ("GET", "/v1/transit/encrypt/x"),
    ("PATCH", "/v1/transit/decrypt/x"),
    ("DELETE", "/v1/transit/keys/x/rotate"),
    ("GET", "/v1/transit/keys/x/rotate"),
    ("DELETE", "/v1/transit/random"),
    ("GET", "/v1/transit/hash"),
    ("POST", "/v1/sys/health"),
    ("DELETE", "/v1/transit/keys"),
])
def test_wrong_method_is_405(server, method, path):
    r = server.request(method, path)
    assert r.status_code == 405, describe(r)
    assert r.headers.get("X-Request-Id")


def test_put_is_treated_like_post_as_vault_does(server):
    # Vault makes no distinction between PUT and POST; `vault write` (the Vault CLI and Go API
    # client) sends PUT. A Vault-compatible server must therefore accept PUT on write paths.
    name = create_key(server)
    r = server.request("PUT", "/v1/transit/encrypt/" + name, json={"plaintext": b64("put")})
    assert r.status_code == 200, describe(r)
    assert decrypt(server, name, r.json()["data"]["ciphertext"]) == b"put"


# -- regressions found by the fuzzers ---------------------------------------------------------

def test_empty_plaintext_encrypts_and_decrypts_as_in_vault(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name, json={"plaintext": ""})
    assert r.status_code == 200, describe(r)
    ct = r.json()["data"]["ciphertext"]
    d = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": ct})
    assert d.status_code == 200, describe(d)
    assert d.json()["data"]["plaintext"] == ""


def test_out_of_range_number_is_a_400_not_a_500(server):
    name = create_key(server)
    r = server.request("POST", "/v1/transit/encrypt/" + name, data='{"plaintext":"eA==","key_version":1e400}',
                       headers={"Content-Type": "application/json"})
    assert r.status_code == 400, describe(r)
    assert "range" in errors_text(r)
