"""Compatibility with a real Vault client: Debian's python3-hvac (0.11.2) against the real
`p11kms server -dev`, through `client.secrets.transit.*` with the default mount point.

hvac's JSONAdapter returns the decoded body for HTTP 200 and the requests.Response otherwise
(e.g. 204), and raises hvac.exceptions.InvalidRequest (400), Forbidden (403), InvalidPath (404).
"""

import base64
import hashlib
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, unb64, unique_name  # noqa: E402

import hvac  # noqa: E402
from hvac import exceptions as hvac_exc  # noqa: E402

CT_RE = re.compile(r"^vault:v(\d+):[A-Za-z0-9+/]+={0,2}$")


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


@pytest.fixture(scope="module")
def client(server):
    c = hvac.Client(url=server.url, token=server.token)
    yield c
    c.adapter.close()


@pytest.fixture(scope="module")
def transit(client):
    return client.secrets.transit


def version_of(ciphertext):
    m = CT_RE.match(ciphertext)
    assert m, "not a vault:v<N>:<base64> ciphertext: %r" % ciphertext
    return int(m.group(1))


def new_key(transit, **kwargs):
    name = unique_name("hvac")
    resp = transit.create_key(name=name, **kwargs)
    # the contract answers 200 with the key info (hvac returns the decoded JSON for 200)
    assert isinstance(resp, dict), "create_key should answer 200 JSON, got %r" % (resp,)
    assert resp["data"]["name"] == name
    return name


# -- client / sys ----------------------------------------------------------------------------

def test_is_authenticated(server, client):
    assert client.is_authenticated() is True
    wrong = hvac.Client(url=server.url, token="hvs.definitelynottheroottoken")
    try:
        assert wrong.is_authenticated() is False
    finally:
        wrong.adapter.close()


def test_read_health_status_get(server):
    anonymous = hvac.Client(url=server.url)
    anonymous.token = None
    try:
        health = anonymous.sys.read_health_status(method="GET")
    finally:
        anonymous.adapter.close()
    assert isinstance(health, dict), "expected a 200 JSON health answer, got %r" % (health,)
    assert health["initialized"] is True
    assert health["sealed"] is False
    assert health["standby"] is False
    assert health["hsm"]["reachable"] is True


def test_lookup_self_through_hvac(client, server):
    info = client.lookup_token()
    assert info["data"]["policies"] == ["root"]
    assert server.token not in repr(info)


# -- keys ------------------------------------------------------------------------------------

def test_create_key_default_and_aes256(transit):
    for kwargs in ({}, {"key_type": "aes256-gcm96"}):
        name = new_key(transit, **kwargs)
        info = transit.read_key(name=name)["data"]
        assert info["type"] == "aes256-gcm96"
        assert info["latest_version"] == 1
        assert list(info["keys"]) == ["1"]
        assert info["exportable"] is False and info["deletion_allowed"] is False


def test_create_key_aes128(client, transit):
    # hvac 0.11.2's create_key validates key_type against its own list, which predates
    # aes128-gcm96; it refuses it before sending anything ...
    with pytest.raises(hvac_exc.ParamValidationError):
        transit.create_key(name=unique_name("hvac"), key_type="aes128-gcm96")
    # ... so an hvac user creates one through the generic write, which the server must honour.
    name = unique_name("hvac")
    resp = client.write("transit/keys/" + name, type="aes128-gcm96")
    assert isinstance(resp, dict) and resp["data"]["type"] == "aes128-gcm96"
    info = transit.read_key(name=name)["data"]
    assert info["type"] == "aes128-gcm96"
    ct = transit.encrypt_data(name=name, plaintext=b64("short key"))["data"]["ciphertext"]
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct)["data"]["plaintext"]) == b"short key"


def test_read_key_shape(transit):
    name = new_key(transit)
    resp = transit.read_key(name=name)
    assert resp["lease_id"] == "" and resp["renewable"] is False and resp["lease_duration"] == 0
    d = resp["data"]
    assert d["name"] == name
    assert d["min_decryption_version"] == 1 and d["min_encryption_version"] == 0
    assert d["supports_encryption"] is True and d["supports_decryption"] is True
    assert d["supports_signing"] is False and d["derived"] is False


def test_read_unknown_key_raises_invalid_path(transit):
    name = unique_name("missing")
    with pytest.raises(hvac_exc.InvalidPath) as ei:
        transit.read_key(name=name)
    assert name in str(ei.value)


def test_list_keys(transit):
    made = [new_key(transit) for _ in range(3)]
    keys = transit.list_keys()["data"]["keys"]
    assert set(made) <= set(keys)
    assert keys == sorted(keys)


def test_rotate_and_update_configuration(transit):
    name = new_key(transit)
    r = transit.rotate_key(name=name)
    assert isinstance(r, dict) and r["data"]["latest_version"] == 2
    transit.rotate_key(name=name)
    info = transit.read_key(name=name)["data"]
    assert info["latest_version"] == 3
    assert sorted(info["keys"], key=int) == ["1", "2", "3"]

    transit.update_key_configuration(name=name, min_decryption_version=2,
                                      min_encryption_version=3, deletion_allowed=True)
    info = transit.read_key(name=name)["data"]
    assert info["min_decryption_version"] == 2
    assert info["min_encryption_version"] == 3
    assert info["deletion_allowed"] is True


def test_update_configuration_bad_value_raises_invalid_request(transit):
    name = new_key(transit)
    before = transit.read_key(name=name)["data"]
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.update_key_configuration(name=name, min_decryption_version=7)
    assert "min" in str(ei.value).lower() and "decryption" in str(ei.value).lower()
    assert transit.read_key(name=name)["data"] == before


def test_rotate_unknown_key_raises_invalid_path(transit):
    with pytest.raises(hvac_exc.InvalidPath):
        transit.rotate_key(name=unique_name("missing"))


# -- encrypt / decrypt / rewrap --------------------------------------------------------------

def test_encrypt_decrypt_single(transit):
    name = new_key(transit)
    transit.rotate_key(name=name)
    pt = b"hvac round trip \x00\x01\xff"
    resp = transit.encrypt_data(name=name, plaintext=b64(pt))
    ct = resp["data"]["ciphertext"]
    assert version_of(ct) == 2
    assert resp["data"]["key_version"] == 2
    out = transit.decrypt_data(name=name, ciphertext=ct)
    assert unb64(out["data"]["plaintext"]) == pt


def test_encrypt_with_key_version(transit):
    name = new_key(transit)
    transit.rotate_key(name=name)
    transit.rotate_key(name=name)
    ct = transit.encrypt_data(name=name, plaintext=b64("old"), key_version=1)["data"]["ciphertext"]
    assert version_of(ct) == 1
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct)["data"]["plaintext"]) == b"old"


def test_encrypt_decrypt_batch(transit):
    name = new_key(transit)
    pts = [b"one", b"two", os.urandom(64)]
    enc = transit.encrypt_data(name=name, plaintext=None,
                               batch_input=[{"plaintext": b64(p)} for p in pts])
    results = enc["data"]["batch_results"]
    assert len(results) == 3
    cts = [r["ciphertext"] for r in results]
    assert all(version_of(c) == 1 for c in cts)
    assert len(set(cts)) == 3
    dec = transit.decrypt_data(name=name, ciphertext=None,
                               batch_input=[{"ciphertext": c} for c in cts])
    assert [unb64(r["plaintext"]) for r in dec["data"]["batch_results"]] == pts


def test_encrypt_batch_with_bad_item_raises_invalid_request(transit):
    name = new_key(transit)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.encrypt_data(name=name, plaintext=None,
                             batch_input=[{"plaintext": b64("ok")}, {"plaintext": "!!bad!!"}])


def test_decrypt_garbage_raises_invalid_request(transit):
    name = new_key(transit)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.decrypt_data(name=name, ciphertext="vault:v1:not-a-real-ciphertext")
    assert "ciphertext" in str(ei.value).lower()


def test_encrypt_on_a_missing_key_creates_it_like_vault(transit):
    name = unique_name("upsert")
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=name)
    ct = transit.encrypt_data(name=name, plaintext=b64("x"))["data"]["ciphertext"]
    assert ct.startswith("vault:v1:")
    assert transit.read_key(name=name)["data"]["type"] == "aes256-gcm96"
    assert transit.decrypt_data(name=name, ciphertext=ct)["data"]["plaintext"] == b64("x")


def test_decrypt_with_a_missing_key_raises_invalid_request(transit):
    name = unique_name("missing")
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.decrypt_data(name=name, ciphertext="vault:v1:" + b64("x" * 40))
    assert name in str(ei.value)
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=name)


def test_wrong_token_raises_forbidden(server):
    bad = hvac.Client(url=server.url, token="hvs.wrongwrongwrongwrongwron")
    try:
        with pytest.raises(hvac_exc.Forbidden):
            bad.secrets.transit.list_keys()
        with pytest.raises(hvac_exc.Forbidden):
            bad.secrets.transit.encrypt_data(name="whatever", plaintext=b64("x"))
    finally:
        bad.adapter.close()


def test_rewrap(transit):
    name = new_key(transit)
    ct1 = transit.encrypt_data(name=name, plaintext=b64("rewrap via hvac"))["data"]["ciphertext"]
    assert version_of(ct1) == 1
    transit.rotate_key(name=name)
    transit.rotate_key(name=name)
    resp = transit.rewrap_data(name=name, ciphertext=ct1)
    ct3 = resp["data"]["ciphertext"]
    assert version_of(ct3) == 3
    assert resp["data"]["key_version"] == 3
    out = transit.decrypt_data(name=name, ciphertext=ct3)["data"]["plaintext"]
    assert unb64(out) == b"rewrap via hvac"
    ct2 = transit.rewrap_data(name=name, ciphertext=ct1, key_version=2)["data"]["ciphertext"]
    assert version_of(ct2) == 2


# -- data keys, random, hash -----------------------------------------------------------------

@pytest.mark.parametrize("bits", [None, 128, 256, 512])
def test_generate_data_key_plaintext(transit, bits):
    name = new_key(transit)
    kwargs = {} if bits is None else {"bits": bits}
    d = transit.generate_data_key(name=name, key_type="plaintext", **kwargs)["data"]
    key = unb64(d["plaintext"])
    assert len(key) == (bits or 256) // 8
    assert version_of(d["ciphertext"]) == 1
    back = transit.decrypt_data(name=name, ciphertext=d["ciphertext"])["data"]["plaintext"]
    assert unb64(back) == key


@pytest.mark.parametrize("bits", [128, 512])
def test_generate_data_key_wrapped(transit, bits):
    name = new_key(transit)
    d = transit.generate_data_key(name=name, key_type="wrapped", bits=bits)["data"]
    assert "plaintext" not in d
    back = transit.decrypt_data(name=name, ciphertext=d["ciphertext"])["data"]["plaintext"]
    assert len(unb64(back)) == bits // 8


@pytest.mark.parametrize("fmt", [None, "base64", "hex"])
def test_generate_random_bytes(transit, fmt):
    kwargs = {} if fmt is None else {"output_format": fmt}
    a = transit.generate_random_bytes(n_bytes=48, **kwargs)["data"]["random_bytes"]
    b = transit.generate_random_bytes(n_bytes=48, **kwargs)["data"]["random_bytes"]
    assert a != b
    if fmt == "hex":
        assert re.fullmatch(r"[0-9a-f]{96}", a)
    else:
        assert len(unb64(a)) == 48
    default = transit.generate_random_bytes()["data"]["random_bytes"]
    assert len(unb64(default)) == 32


HASHES = {"sha2-224": hashlib.sha224, "sha2-256": hashlib.sha256,
          "sha2-384": hashlib.sha384, "sha2-512": hashlib.sha512}


@pytest.mark.parametrize("fmt", [None, "hex", "base64"])
@pytest.mark.parametrize("algo", [None] + sorted(HASHES))
def test_hash_data(transit, algo, fmt):
    data = b"hash me through hvac \x00\xff"
    kwargs = {}
    if algo:
        kwargs["algorithm"] = algo
    if fmt:
        kwargs["output_format"] = fmt
    got = transit.hash_data(hash_input=b64(data), **kwargs)["data"]["sum"]
    digest = HASHES[algo or "sha2-256"](data).digest()
    expected = base64.b64encode(digest).decode() if fmt == "base64" else digest.hex()
    assert got == expected


# -- delete ----------------------------------------------------------------------------------

def test_delete_key_refused_then_allowed(transit):
    name = new_key(transit)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.delete_key(name=name)
    assert "deletion" in str(ei.value).lower()
    assert transit.read_key(name=name)["data"]["name"] == name

    transit.update_key_configuration(name=name, deletion_allowed=True)
    resp = transit.delete_key(name=name)
    assert getattr(resp, "status_code", None) == 204, "delete should answer 204, got %r" % (resp,)
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=name)
    listed = transit.list_keys()["data"]["keys"] if _any_keys(transit) else []
    assert name not in listed


def test_delete_unknown_key_raises_invalid_path(transit):
    with pytest.raises(hvac_exc.InvalidPath):
        transit.delete_key(name=unique_name("missing"))


def _any_keys(transit):
    try:
        transit.list_keys()
        return True
    except hvac_exc.InvalidPath:
        return False
