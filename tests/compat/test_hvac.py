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


# -- signing (asymmetric keys in the token) ---------------------------------------------------

from cryptography.exceptions import InvalidSignature  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils  # noqa: E402

CRYPTO_HASHES = {"sha2-224": hashes.SHA224, "sha2-256": hashes.SHA256,
                 "sha2-384": hashes.SHA384, "sha2-512": hashes.SHA512}
SIG_RE = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/_=-]+)$")


def sig_bytes(sig, urlsafe=False):
    m = SIG_RE.match(sig)
    assert m, "not a vault:v<N>: signature: %r" % sig
    payload = m.group(2)
    if urlsafe:
        assert "=" not in payload and "+" not in payload and "/" not in payload, payload
        return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    return base64.b64decode(payload, validate=True)


def public_key(transit, name, version=1):
    info = transit.read_key(name=name)["data"]
    entry = info["keys"][str(version)]
    assert set(entry) >= {"public_key", "creation_time", "name"}, entry
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", entry["creation_time"]), entry
    return serialization.load_pem_public_key(entry["public_key"].encode())


@pytest.fixture(scope="module")
def signing_keys(transit):
    keys = {}
    for kt in ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048", "rsa-3072", "rsa-4096"):
        keys[kt] = new_key(transit, key_type=kt)
    return keys


@pytest.mark.parametrize("kt", ["ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048", "rsa-3072", "rsa-4096"])
def test_read_asymmetric_key_shape(transit, signing_keys, kt):
    info = transit.read_key(name=signing_keys[kt])["data"]
    assert info["type"] == kt
    assert info["supports_signing"] is True
    assert info["supports_encryption"] is False and info["supports_decryption"] is False
    assert info["exportable"] is False and info["derived"] is False
    assert info["convergent_encryption"] is False and info["auto_rotate_period"] == 0
    assert info["latest_version"] == 1
    pub = public_key(transit, signing_keys[kt])
    expected = {"ecdsa-p256": ec.EllipticCurvePublicKey, "ecdsa-p384": ec.EllipticCurvePublicKey,
                "ed25519": ed25519.Ed25519PublicKey}.get(kt, rsa.RSAPublicKey)
    assert isinstance(pub, expected)
    if kt.startswith("rsa"):
        assert pub.key_size == int(kt.split("-")[1])
    if kt.startswith("ecdsa"):
        assert pub.curve.name == {"ecdsa-p256": "secp256r1", "ecdsa-p384": "secp384r1"}[kt]
        assert info["keys"]["1"]["name"] == {"ecdsa-p256": "P-256", "ecdsa-p384": "P-384"}[kt]


@pytest.mark.parametrize("algo", sorted(CRYPTO_HASHES))
@pytest.mark.parametrize("kt", ["ecdsa-p256", "ecdsa-p384"])
def test_sign_ecdsa_asn1_and_jws_verify_with_cryptography(transit, signing_keys, kt, algo):
    name = signing_keys[kt]
    data = b"ecdsa input " + algo.encode()
    pub = public_key(transit, name)
    sig = transit.sign_data(name=name, hash_input=b64(data), hash_algorithm=algo)["data"]["signature"]
    pub.verify(sig_bytes(sig), data, ec.ECDSA(CRYPTO_HASHES[algo]()))
    assert transit.verify_signed_data(name=name, hash_input=b64(data), signature=sig,
                                      hash_algorithm=algo)["data"]["valid"] is True
    # jws: r || s, base64url without padding
    jws = transit.sign_data(name=name, hash_input=b64(data), hash_algorithm=algo,
                            marshaling_algorithm="jws")["data"]["signature"]
    raw = sig_bytes(jws, urlsafe=True)
    half = len(raw) // 2
    assert half == (48 if kt == "ecdsa-p384" else 32)
    der = utils.encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
    pub.verify(der, data, ec.ECDSA(CRYPTO_HASHES[algo]()))
    assert transit.verify_signed_data(name=name, hash_input=b64(data), signature=jws, hash_algorithm=algo,
                                      marshaling_algorithm="jws")["data"]["valid"] is True
    # an asn1 signature checked as jws never verifies: it is refused (not base64url) or invalid
    try:
        valid = transit.verify_signed_data(name=name, hash_input=b64(data), signature=sig,
                                           hash_algorithm=algo, marshaling_algorithm="jws")["data"]["valid"]
    except hvac_exc.InvalidRequest:
        valid = None
    assert valid is not True


def test_sign_ecdsa_prehashed_and_url_algorithm(client, transit, signing_keys):
    name = signing_keys["ecdsa-p256"]
    data = b"prehash me"
    digest = hashlib.sha384(data).digest()
    sig = transit.sign_data(name=name, hash_input=b64(digest), hash_algorithm="sha2-384",
                            prehashed=True)["data"]["signature"]
    public_key(transit, name).verify(sig_bytes(sig), digest, ec.ECDSA(utils.Prehashed(hashes.SHA384())))
    # the algorithm in the URL, as Vault's /sign/:name/:hash_algorithm
    sig2 = client.write("transit/sign/%s/sha2-512" % name, input=b64(data))["data"]["signature"]
    public_key(transit, name).verify(sig_bytes(sig2), data, ec.ECDSA(hashes.SHA512()))
    # a digest of the wrong size is refused
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.sign_data(name=name, hash_input=b64(b"short"), hash_algorithm="sha2-256", prehashed=True)
    assert "prehashed" in str(ei.value)


def test_sign_ed25519(transit, signing_keys):
    name = signing_keys["ed25519"]
    data = b"ed25519 message \x00\xff"
    sig = transit.sign_data(name=name, hash_input=b64(data))["data"]["signature"]
    raw = sig_bytes(sig)
    assert len(raw) == 64
    public_key(transit, name).verify(raw, data)
    assert transit.verify_signed_data(name=name, hash_input=b64(data), signature=sig)["data"]["valid"] is True
    assert transit.verify_signed_data(name=name, hash_input=b64(data + b"!"), signature=sig)["data"]["valid"] is False


@pytest.mark.parametrize("sigalg", ["pss", "pkcs1v15"])
@pytest.mark.parametrize("algo", sorted(CRYPTO_HASHES))
def test_sign_rsa_pss_and_pkcs1v15(transit, signing_keys, sigalg, algo):
    name = signing_keys["rsa-2048"]
    data = b"rsa input " + sigalg.encode()
    sig = transit.sign_data(name=name, hash_input=b64(data), hash_algorithm=algo,
                            signature_algorithm=sigalg)["data"]["signature"]
    raw = sig_bytes(sig)
    assert len(raw) == 256
    h = CRYPTO_HASHES[algo]()
    pad = (padding.PSS(mgf=padding.MGF1(CRYPTO_HASHES[algo]()), salt_length=padding.PSS.MAX_LENGTH)
           if sigalg == "pss" else padding.PKCS1v15())
    public_key(transit, name).verify(raw, data, pad, h)
    assert transit.verify_signed_data(name=name, hash_input=b64(data), signature=sig, hash_algorithm=algo,
                                      signature_algorithm=sigalg)["data"]["valid"] is True
    other = "pkcs1v15" if sigalg == "pss" else "pss"
    assert transit.verify_signed_data(name=name, hash_input=b64(data), signature=sig, hash_algorithm=algo,
                                      signature_algorithm=other)["data"]["valid"] is False


@pytest.mark.parametrize("kt", ["rsa-3072", "rsa-4096"])
def test_sign_rsa_larger_keys_default_is_pss(transit, signing_keys, kt):
    name = signing_keys[kt]
    sig = transit.sign_data(name=name, hash_input=b64("big"))["data"]["signature"]
    raw = sig_bytes(sig)
    assert len(raw) == int(kt.split("-")[1]) // 8
    public_key(transit, name).verify(raw, b"big", padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                              salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())


def test_sign_rsa_prehashed_and_salt_length(client, transit, signing_keys):
    name = signing_keys["rsa-2048"]
    digest = hashlib.sha256(b"pre").digest()
    sig = transit.sign_data(name=name, hash_input=b64(digest), prehashed=True,
                            signature_algorithm="pkcs1v15")["data"]["signature"]
    public_key(transit, name).verify(sig_bytes(sig), digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
    r = client.write("transit/sign/" + name, input=b64("salted"), salt_length="hash")
    public_key(transit, name).verify(sig_bytes(r["data"]["signature"]), b"salted",
                                     padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    assert client.write("transit/verify/" + name, input=b64("salted"), salt_length="hash",
                        signature=r["data"]["signature"])["data"]["valid"] is True


def test_sign_with_key_version_and_verify_refuses_old_versions(transit):
    name = new_key(transit, key_type="ecdsa-p256")
    transit.rotate_key(name=name)
    transit.rotate_key(name=name)
    info = transit.read_key(name=name)["data"]
    assert sorted(info["keys"], key=int) == ["1", "2", "3"]
    assert len({info["keys"][v]["public_key"] for v in info["keys"]}) == 3
    sig1 = transit.sign_data(name=name, hash_input=b64("v1"), key_version=1)["data"]["signature"]
    assert sig1.startswith("vault:v1:")
    public_key(transit, name, 1).verify(sig_bytes(sig1), b"v1", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public_key(transit, name, 2).verify(sig_bytes(sig1), b"v1", ec.ECDSA(hashes.SHA256()))
    assert transit.sign_data(name=name, hash_input=b64("x"))["data"]["signature"].startswith("vault:v3:")
    assert transit.verify_signed_data(name=name, hash_input=b64("v1"), signature=sig1)["data"]["valid"] is True
    transit.update_key_configuration(name=name, min_decryption_version=2)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.verify_signed_data(name=name, hash_input=b64("v1"), signature=sig1)
    assert "min_decryption_version" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.verify_signed_data(name=name, hash_input=b64("v1"), signature="vault:v9:" + sig1.split(":")[2])


def test_verify_tampered_and_undecodable_signatures(transit, signing_keys):
    name = signing_keys["ecdsa-p256"]
    sig = transit.sign_data(name=name, hash_input=b64("orig"))["data"]["signature"]
    raw = bytearray(sig_bytes(sig))
    raw[-1] ^= 1
    tampered = "vault:v1:" + base64.b64encode(bytes(raw)).decode()
    assert transit.verify_signed_data(name=name, hash_input=b64("orig"), signature=tampered)["data"]["valid"] is False
    for bad in ("vault:v1:***", "not-a-signature", "vault:vX:AAAA"):
        with pytest.raises(hvac_exc.InvalidRequest):
            transit.verify_signed_data(name=name, hash_input=b64("orig"), signature=bad)


def test_sign_and_verify_batch(client, signing_keys):
    name = signing_keys["ecdsa-p256"]
    items = [{"input": b64("a"), "reference": "r1"}, {"input": b64("b"), "reference": "r2"}]
    out = client.write("transit/sign/" + name, batch_input=items)["data"]["batch_results"]
    assert [o["reference"] for o in out] == ["r1", "r2"]
    assert all(o["signature"].startswith("vault:v1:") for o in out)
    checks = [{"input": b64("a"), "signature": out[0]["signature"]},
              {"input": b64("a"), "signature": out[1]["signature"]}]
    res = client.write("transit/verify/" + name, batch_input=checks)["data"]["batch_results"]
    assert [r["valid"] for r in res] == [True, False]


def test_wrong_key_type_for_the_operation_is_a_400(transit, signing_keys):
    aes = new_key(transit)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.sign_data(name=aes, hash_input=b64("x"))
    assert "signing" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.encrypt_data(name=signing_keys["ed25519"], plaintext=b64("x"))
    assert "encryption" in str(ei.value)
    # RSA-PSS with SHA-3: the module's PSS has no SHA-3 (hvac's own list stops at sha2-*)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit._adapter.post("/v1/transit/sign/%s" % signing_keys["rsa-2048"],
                             json={"input": b64("x"), "hash_algorithm": "sha3-256"})
    assert "sha3-256" in str(ei.value)


def test_upsert_with_a_type_that_cannot_encrypt_creates_nothing(transit):
    name = unique_name("upsert-ec")
    with pytest.raises(hvac_exc.InvalidRequest):
        transit._adapter.post("/v1/transit/encrypt/" + name, json={"plaintext": b64("x"), "type": "ecdsa-p256"})
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=name)


# -- hmac --------------------------------------------------------------------------------------

HMAC_ALGOS = {"sha2-224": hashlib.sha224, "sha2-256": hashlib.sha256,
              "sha2-384": hashlib.sha384, "sha2-512": hashlib.sha512}


@pytest.mark.parametrize("kt", ["aes256-gcm96", "ecdsa-p256", "hmac"])
def test_generate_hmac_and_verify(transit, client, kt):
    name = unique_name("hmac")
    client.write("transit/keys/" + name, type=kt)
    for algo in HMAC_ALGOS:
        mac = transit.generate_hmac(name=name, hash_input=b64("hmac me"), algorithm=algo)["data"]["hmac"]
        assert mac.startswith("vault:v1:")
        assert len(sig_bytes(mac)) == HMAC_ALGOS[algo]().digest_size
        assert transit.verify_signed_data(name=name, hash_input=b64("hmac me"), hmac=mac,
                                          hash_algorithm=algo)["data"]["valid"] is True
        assert transit.verify_signed_data(name=name, hash_input=b64("hmac me!"), hmac=mac,
                                          hash_algorithm=algo)["data"]["valid"] is False
    # same key version, same input: same HMAC; the URL form agrees with the body form
    a = transit.generate_hmac(name=name, hash_input=b64("x"))["data"]["hmac"]
    b = client.write("transit/hmac/%s/sha2-256" % name, input=b64("x"))["data"]["hmac"]
    assert a == b
    transit.rotate_key(name=name)
    c = transit.generate_hmac(name=name, hash_input=b64("x"))["data"]["hmac"]
    assert c.startswith("vault:v2:") and sig_bytes(c) != sig_bytes(a)
    assert transit.generate_hmac(name=name, hash_input=b64("x"), key_version=1)["data"]["hmac"] == a
    assert transit.verify_signed_data(name=name, hash_input=b64("x"), hmac=a)["data"]["valid"] is True
    transit.update_key_configuration(name=name, min_decryption_version=2)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.verify_signed_data(name=name, hash_input=b64("x"), hmac=a)


def test_hmac_batch_and_bad_algorithm(client, transit):
    name = new_key(transit)
    out = client.write("transit/hmac/" + name, batch_input=[{"input": b64("1")}, {"input": b64("2")}])
    res = out["data"]["batch_results"]
    assert len(res) == 2 and res[0]["hmac"] != res[1]["hmac"]
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.write("transit/hmac/" + name, input=b64("1"), algorithm="md5")
    assert "md5" in str(ei.value)


def test_hmac_key_size(client, transit):
    name = unique_name("hmac-size")
    client.write("transit/keys/" + name, type="hmac", key_size=64)
    assert transit.read_key(name=name)["data"]["key_size"] == 64
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.write("transit/keys/" + unique_name("hmac-size"), type="hmac", key_size=8)
    assert "key_size" in str(ei.value)


# -- export ------------------------------------------------------------------------------------

def test_export_refused_for_non_exportable_keys(transit, signing_keys):
    name = new_key(transit)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.export_key(name=name, key_type="encryption-key")
    assert "exportable" in str(ei.value)
    # and it cannot be made exportable afterwards (custody); it stays non-exportable
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.update_key_configuration(name=name, exportable=True)
    assert "exportable" in str(ei.value)
    assert transit.read_key(name=name)["data"]["exportable"] is False
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.export_key(name=signing_keys["ecdsa-p256"], key_type="signing-key")


def test_export_aes_key_decrypts_ciphertexts(transit):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    name = new_key(transit, exportable=True)
    transit.rotate_key(name=name)
    info = transit.read_key(name=name)["data"]
    assert info["exportable"] is True
    ct = transit.encrypt_data(name=name, plaintext=b64("exported secret"))["data"]["ciphertext"]
    assert version_of(ct) == 2
    keys = transit.export_key(name=name, key_type="encryption-key")["data"]["keys"]
    assert sorted(keys) == ["1", "2"]
    latest = transit.export_key(name=name, key_type="encryption-key", version="latest")["data"]["keys"]
    assert latest == {"2": keys["2"]}
    one = transit.export_key(name=name, key_type="encryption-key", version=1)["data"]["keys"]
    assert one == {"1": keys["1"]}
    blob = base64.b64decode(ct.split(":")[2])
    assert AESGCM(base64.b64decode(keys["2"])).decrypt(blob[:12], blob[12:], None) == b"exported secret"
    assert transit.decrypt_data(name=name, ciphertext=ct)["data"]["plaintext"] == b64("exported secret")
    # setting exportable again is a no-op; turning it off is refused
    transit.update_key_configuration(name=name, exportable=True)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit._adapter.post("/v1/transit/keys/%s/config" % name, json={"exportable": False})
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.export_key(name=name, key_type="signing-key")
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.export_key(name=name, key_type="encryption-key", version=7)


@pytest.mark.parametrize("kt", ["ecdsa-p256", "ecdsa-p384", "rsa-2048", "ed25519"])
def test_export_signing_key_matches_public_key_and_signatures(transit, kt):
    name = new_key(transit, key_type=kt, exportable=True)
    pub = public_key(transit, name)
    exported = transit.export_key(name=name, key_type="signing-key", version=1)["data"]
    assert exported["name"] == name and exported["type"] == kt
    value = exported["keys"]["1"]
    if kt == "ed25519":
        both = base64.b64decode(value)
        assert len(both) == 64
        priv = ed25519.Ed25519PrivateKey.from_private_bytes(both[:32])
        raw_pub = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        assert raw_pub == both[32:]
    else:
        assert value.startswith("-----BEGIN EC PRIVATE KEY-----" if kt.startswith("ecdsa")
                                else "-----BEGIN RSA PRIVATE KEY-----"), value[:40]
        priv = serialization.load_pem_private_key(value.encode(), password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert priv.public_key().public_bytes(der, spki) == pub.public_bytes(der, spki)
    # the token signs with the same (session-loaded) key: the public key checks it
    sig = sig_bytes(transit.sign_data(name=name, hash_input=b64("exportable signs"))["data"]["signature"])
    if kt == "ed25519":
        pub.verify(sig, b"exportable signs")
    elif kt.startswith("ecdsa"):
        pub.verify(sig, b"exportable signs", ec.ECDSA(hashes.SHA256()))
    else:
        pub.verify(sig, b"exportable signs", padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                         salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())


@pytest.mark.parametrize("kt", ["aes256-gcm96", "ecdsa-p256", "hmac"])
def test_export_hmac_key_computes_the_same_hmac(client, transit, kt):
    import hmac as pyhmac
    name = unique_name("exp-hmac")
    client.write("transit/keys/" + name, type=kt, exportable=True)
    mac = transit.generate_hmac(name=name, hash_input=b64("data"), algorithm="sha2-512")["data"]["hmac"]
    keys = transit.export_key(name=name, key_type="hmac-key")["data"]["keys"]
    key = base64.b64decode(keys["1"])
    assert len(key) == 32
    assert pyhmac.new(key, b"data", hashlib.sha512).digest() == sig_bytes(mac)
    if kt != "aes256-gcm96":
        with pytest.raises(hvac_exc.InvalidRequest):
            transit.export_key(name=name, key_type="encryption-key")


# -- derived and convergent keys (derivation in the token) ------------------------------------

def test_derived_key_requires_context_and_binds_it(transit):
    name = new_key(transit, derived=True)
    info = transit.read_key(name=name)["data"]
    assert info["derived"] is True and info["convergent_encryption"] is False
    ctx_a, ctx_b = b64("tenant-a"), b64("tenant-b")
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.encrypt_data(name=name, plaintext=b64("x"))
    assert "context" in str(ei.value)
    ct = transit.encrypt_data(name=name, plaintext=b64("derived secret"), context=ctx_a)["data"]["ciphertext"]
    assert version_of(ct) == 1
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct, context=ctx_a)["data"]["plaintext"]) == b"derived secret"
    # the wrong context derives another key: authentication fails; no context is refused
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.decrypt_data(name=name, ciphertext=ct, context=ctx_b)
    assert "ciphertext" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.decrypt_data(name=name, ciphertext=ct)
    assert "context" in str(ei.value)
    # not convergent: the same plaintext and context give different ciphertexts
    again = transit.encrypt_data(name=name, plaintext=b64("derived secret"), context=ctx_a)["data"]["ciphertext"]
    assert again != ct
    # rotate, rewrap and datakey with the context
    transit.rotate_key(name=name)
    rewrapped = transit.rewrap_data(name=name, ciphertext=ct, context=ctx_a)["data"]["ciphertext"]
    assert version_of(rewrapped) == 2
    assert unb64(transit.decrypt_data(name=name, ciphertext=rewrapped, context=ctx_a)["data"]["plaintext"]) \
        == b"derived secret"
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.rewrap_data(name=name, ciphertext=ct)
    dk = transit.generate_data_key(name=name, key_type="plaintext", context=ctx_b)["data"]
    assert unb64(transit.decrypt_data(name=name, ciphertext=dk["ciphertext"], context=ctx_b)["data"]["plaintext"]) \
        == unb64(dk["plaintext"])
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.generate_data_key(name=name, key_type="wrapped")


def test_derived_key_batch_items_carry_their_own_context(transit):
    name = new_key(transit, derived=True)
    items = [{"plaintext": b64("one"), "context": b64("c1")}, {"plaintext": b64("two"), "context": b64("c2")}]
    cts = [r["ciphertext"] for r in
           transit.encrypt_data(name=name, plaintext=None, batch_input=items)["data"]["batch_results"]]
    ok = transit.decrypt_data(name=name, ciphertext=None, batch_input=[
        {"ciphertext": cts[0], "context": b64("c1")}, {"ciphertext": cts[1], "context": b64("c2")}])
    assert [unb64(r["plaintext"]) for r in ok["data"]["batch_results"]] == [b"one", b"two"]
    # a partly failed batch is a 400 carrying every result (hvac raises it with the body)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.decrypt_data(name=name, ciphertext=None, batch_input=[
            {"ciphertext": cts[0], "context": b64("c1")}, {"ciphertext": cts[1], "context": b64("c1")}])
    import json as _json
    results = _json.loads(str(ei.value).split(", on post")[0])["data"]["batch_results"]
    assert unb64(results[0]["plaintext"]) == b"one"
    assert "error" in results[1] and "plaintext" not in results[1]


def test_convergent_encryption_is_deterministic_per_context(transit):
    name = new_key(transit, derived=True, convergent_encryption=True)
    info = transit.read_key(name=name)["data"]
    assert info["derived"] is True and info["convergent_encryption"] is True
    ctx = b64("convergent context")
    a = transit.encrypt_data(name=name, plaintext=b64("same plaintext"), context=ctx)["data"]["ciphertext"]
    b = transit.encrypt_data(name=name, plaintext=b64("same plaintext"), context=ctx)["data"]["ciphertext"]
    assert a == b
    other_pt = transit.encrypt_data(name=name, plaintext=b64("other plaintext"), context=ctx)["data"]["ciphertext"]
    other_ctx = transit.encrypt_data(name=name, plaintext=b64("same plaintext"), context=b64("x"))["data"]["ciphertext"]
    assert len({a, other_pt, other_ctx}) == 3
    # the nonce differs with the plaintext (no GCM nonce reuse across plaintexts)
    assert base64.b64decode(a.split(":")[2])[:12] != base64.b64decode(other_pt.split(":")[2])[:12]
    assert unb64(transit.decrypt_data(name=name, ciphertext=a, context=ctx)["data"]["plaintext"]) == b"same plaintext"
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=name, ciphertext=a, context=b64("x"))
    # after rotation the latest version encrypts, still deterministically
    transit.rotate_key(name=name)
    c = transit.encrypt_data(name=name, plaintext=b64("same plaintext"), context=ctx)["data"]["ciphertext"]
    assert version_of(c) == 2 and c != a
    assert c == transit.encrypt_data(name=name, plaintext=b64("same plaintext"), context=ctx)["data"]["ciphertext"]
    # a caller nonce is refused: the token computes it
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.encrypt_data(name=name, plaintext=b64("x"), context=ctx, nonce=b64("123456789012"))
    assert "nonce" in str(ei.value)


def test_derived_and_convergent_refusals(client, transit):
    # hvac refuses convergent without derived before sending; the server refuses it too
    with pytest.raises(hvac_exc.ParamValidationError):
        transit.create_key(name=unique_name("conv"), convergent_encryption=True)
    conv = unique_name("conv")
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.write("transit/keys/" + conv, convergent_encryption=True)
    assert "derived" in str(ei.value) or "derivation" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.create_key(name=unique_name("ded"), key_type="ed25519", derived=True)
    assert "ed25519" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidRequest):
        client.write("transit/keys/" + unique_name("dec"), type="ecdsa-p256", derived=True)
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=conv)
    # a non-derived key ignores a context, as Vault does
    name = new_key(transit)
    ct = transit.encrypt_data(name=name, plaintext=b64("plain"), context=b64("ignored"))["data"]["ciphertext"]
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct)["data"]["plaintext"]) == b"plain"


def test_encrypt_upsert_with_context_creates_a_derived_key(transit):
    name = unique_name("upsert-derived")
    ct = transit.encrypt_data(name=name, plaintext=b64("up"), context=b64("ctx"))["data"]["ciphertext"]
    info = transit.read_key(name=name)["data"]
    assert info["derived"] is True and info["convergent_encryption"] is False
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct, context=b64("ctx"))["data"]["plaintext"]) == b"up"
    conv = unique_name("upsert-conv")
    a = transit.encrypt_data(name=conv, plaintext=b64("up"), context=b64("ctx"),
                             convergent_encryption=True)["data"]["ciphertext"]
    assert transit.read_key(name=conv)["data"]["convergent_encryption"] is True
    assert a == transit.encrypt_data(name=conv, plaintext=b64("up"), context=b64("ctx"))["data"]["ciphertext"]


def test_exportable_derived_key_exports_its_base_key(transit):
    name = new_key(transit, derived=True, exportable=True)
    ct = transit.encrypt_data(name=name, plaintext=b64("exp derived"), context=b64("c"))["data"]["ciphertext"]
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct, context=b64("c"))["data"]["plaintext"]) == b"exp derived"
    keys = transit.export_key(name=name, key_type="encryption-key")["data"]["keys"]
    base = base64.b64decode(keys["1"])
    assert len(base) == 32
    # the derived key is AES-ECB(base, SHA-256(label || 0 || context)), computed in the token
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    data = hashlib.sha256(b"p11kms transit derived key v1\x00c").digest()
    enc = Cipher(algorithms.AES(base), modes.ECB()).encryptor()
    derived = enc.update(data) + enc.finalize()
    blob = base64.b64decode(ct.split(":")[2])
    assert AESGCM(derived).decrypt(blob[:12], blob[12:], None) == b"exp derived"


# -- secure import (BYOK, Vault 1.11+): the ciphertext is built with python3-cryptography ------

from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding  # noqa: E402

OAEP_HASHES = {"SHA1": hashes.SHA1, "SHA224": hashes.SHA224, "SHA256": hashes.SHA256,
               "SHA384": hashes.SHA384, "SHA512": hashes.SHA512}


@pytest.fixture(scope="module")
def wrapping_pem(client):
    # hvac 0.11.2 has no helper for transit/wrapping_key: the generic read
    pem = client.read("transit/wrapping_key")["data"]["public_key"]
    return pem


def wrap_for_import(pem, material, hash_function="SHA256"):
    pub = serialization.load_pem_public_key(pem.encode())
    eph = os.urandom(32)
    h = OAEP_HASHES[hash_function]()
    rsa_part = pub.encrypt(eph, padding.OAEP(mgf=padding.MGF1(h), algorithm=h, label=None))
    return base64.b64encode(rsa_part + aes_key_wrap_with_padding(eph, material)).decode()


def pkcs8(private_key):
    return private_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def status_of(resp):
    return getattr(resp, "status_code", None)


def test_wrapping_key_is_a_stable_rsa_4096_public_key(client, wrapping_pem):
    pub = serialization.load_pem_public_key(wrapping_pem.encode())
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 4096
    assert client.read("transit/wrapping_key")["data"]["public_key"] == wrapping_pem
    assert "PRIVATE" not in wrapping_pem


@pytest.mark.parametrize("hash_function", sorted(OAEP_HASHES))
def test_import_aes_key_every_hash_function(client, transit, wrapping_pem, hash_function):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    name = unique_name("imp-aes")
    material = os.urandom(32)
    r = client.write("transit/keys/%s/import" % name, ciphertext=wrap_for_import(wrapping_pem, material, hash_function),
                     hash_function=hash_function, type="aes256-gcm96")
    assert status_of(r) == 204, r
    info = transit.read_key(name=name)["data"]
    assert info["imported_key"] is True and info["exportable"] is False and info["latest_version"] == 1
    # the token holds exactly the caller's key: its ciphertext opens with the material
    ct = transit.encrypt_data(name=name, plaintext=b64("imported"))["data"]["ciphertext"]
    blob = base64.b64decode(ct.split(":")[2])
    assert AESGCM(material).decrypt(blob[:12], blob[12:], None) == b"imported"


def test_import_default_hash_aes128_and_import_version(client, transit, wrapping_pem):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    name = unique_name("imp-v")
    m1, m2 = os.urandom(16), os.urandom(16)
    assert status_of(client.write("transit/keys/%s/import" % name, ciphertext=wrap_for_import(wrapping_pem, m1),
                                  type="aes128-gcm96")) == 204
    ct1 = transit.encrypt_data(name=name, plaintext=b64("one"))["data"]["ciphertext"]
    # rotate on an imported key is a 400; new versions come through import_version
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.rotate_key(name=name)
    assert "import_version" in str(ei.value)
    assert status_of(client.write("transit/keys/%s/import_version" % name,
                                  ciphertext=wrap_for_import(wrapping_pem, m2, "SHA512"),
                                  hash_function="SHA512")) == 204
    info = transit.read_key(name=name)["data"]
    assert info["latest_version"] == 2 and info["type"] == "aes128-gcm96"
    ct2 = transit.encrypt_data(name=name, plaintext=b64("two"))["data"]["ciphertext"]
    assert version_of(ct2) == 2
    blob = base64.b64decode(ct2.split(":")[2])
    assert AESGCM(m2).decrypt(blob[:12], blob[12:], None) == b"two"
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct1)["data"]["plaintext"]) == b"one"
    # importing again under a taken name is a 400 and changes nothing
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.write("transit/keys/%s/import" % name, ciphertext=wrap_for_import(wrapping_pem, m1), type="aes128-gcm96")
    assert "import_version" in str(ei.value)
    assert transit.read_key(name=name)["data"]["latest_version"] == 2
    # import_version is only for imported keys
    generated = new_key(transit)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.write("transit/keys/%s/import_version" % generated, ciphertext=wrap_for_import(wrapping_pem, os.urandom(32)))
    assert "imported" in str(ei.value)
    assert transit.read_key(name=generated)["data"]["latest_version"] == 1


@pytest.mark.parametrize("kt", ["ecdsa-p256", "ecdsa-p384", "rsa-2048"])
def test_import_signing_keys_pkcs8(client, transit, wrapping_pem, kt):
    if kt.startswith("ecdsa"):
        priv = ec.generate_private_key(ec.SECP256R1() if kt == "ecdsa-p256" else ec.SECP384R1())
    else:
        priv = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = unique_name("imp-sig")
    assert status_of(client.write("transit/keys/%s/import" % name, type=kt,
                                  ciphertext=wrap_for_import(wrapping_pem, pkcs8(priv)))) == 204
    info = transit.read_key(name=name)["data"]
    assert info["type"] == kt and info["imported_key"] is True
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert public_key(transit, name).public_bytes(der, spki) == priv.public_key().public_bytes(der, spki)
    sig = sig_bytes(transit.sign_data(name=name, hash_input=b64("imported signs"))["data"]["signature"])
    if kt.startswith("ecdsa"):
        priv.public_key().verify(sig, b"imported signs", ec.ECDSA(hashes.SHA256()))
    else:
        priv.public_key().verify(sig, b"imported signs", padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                                     salt_length=padding.PSS.MAX_LENGTH), hashes.SHA256())
    # the private key is never echoed back
    assert "PRIVATE" not in repr(info)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.export_key(name=name, key_type="signing-key")


def test_import_hmac_key(client, transit, wrapping_pem):
    import hmac as pyhmac
    name = unique_name("imp-hmac")
    material = os.urandom(64)
    assert status_of(client.write("transit/keys/%s/import" % name, type="hmac",
                                  ciphertext=wrap_for_import(wrapping_pem, material))) == 204
    for algo, fn in (("sha2-256", hashlib.sha256), ("sha2-512", hashlib.sha512)):
        mac = transit.generate_hmac(name=name, hash_input=b64("data"), algorithm=algo)["data"]["hmac"]
        assert sig_bytes(mac) == pyhmac.new(material, b"data", fn).digest()


def test_import_exportable_keys_export_what_was_imported(client, transit, wrapping_pem):
    name = unique_name("imp-exp")
    material = os.urandom(32)
    assert status_of(client.write("transit/keys/%s/import" % name, exportable=True,
                                  ciphertext=wrap_for_import(wrapping_pem, material, "SHA1"), hash_function="SHA1")) == 204
    assert transit.read_key(name=name)["data"]["exportable"] is True
    assert base64.b64decode(transit.export_key(name=name, key_type="encryption-key")["data"]["keys"]["1"]) == material
    # ed25519: only as exportable (the module cannot unwrap Ed25519 private keys)
    priv = ed25519.Ed25519PrivateKey.generate()
    refused = unique_name("imp-ed")
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.write("transit/keys/%s/import" % refused, type="ed25519", ciphertext=wrap_for_import(wrapping_pem, pkcs8(priv)))
    assert "ed25519" in str(ei.value).lower() or "Ed25519" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=refused)
    ed = unique_name("imp-ed")
    assert status_of(client.write("transit/keys/%s/import" % ed, type="ed25519", exportable=True,
                                  ciphertext=wrap_for_import(wrapping_pem, pkcs8(priv)))) == 204
    raw = priv.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    assert base64.b64decode(transit.export_key(name=ed, key_type="signing-key")["data"]["keys"]["1"])[:32] == raw
    sig = sig_bytes(transit.sign_data(name=ed, hash_input=b64("ed"))["data"]["signature"])
    priv.public_key().verify(sig, b"ed")


@pytest.mark.parametrize("case", ["tampered_kwp", "tampered_rsa", "wrong_hash", "wrong_type", "wrong_size", "short"])
def test_bad_wrapped_import_is_a_400_and_creates_nothing(client, transit, wrapping_pem, case):
    name = unique_name("imp-bad")
    body = {"type": "aes256-gcm96"}
    good = base64.b64decode(wrap_for_import(wrapping_pem, os.urandom(32)))
    if case == "tampered_kwp":
        blob = good[:-1] + bytes([good[-1] ^ 1])
    elif case == "tampered_rsa":
        blob = bytes([good[0] ^ 1]) + good[1:]
    elif case == "wrong_hash":
        blob = good
        body["hash_function"] = "SHA384"
    elif case == "wrong_type":
        blob = base64.b64decode(wrap_for_import(wrapping_pem, pkcs8(ec.generate_private_key(ec.SECP256R1()))))
        body["type"] = "rsa-2048"
    elif case == "wrong_size":
        blob = base64.b64decode(wrap_for_import(wrapping_pem, os.urandom(24)))
    else:
        blob = good[:100]
    body["ciphertext"] = base64.b64encode(blob).decode()
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.write("transit/keys/%s/import" % name, **body)
    assert "ciphertext" in str(ei.value) or "import" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=name)


# -- trim ------------------------------------------------------------------------------------------

def test_trim_key_destroys_old_versions_with_vaults_preconditions(transit):
    name = new_key(transit)
    cts = {}
    for v in range(1, 5):
        if v > 1:
            transit.rotate_key(name=name)
        cts[v] = transit.encrypt_data(name=name, plaintext=b64("v%d" % v))["data"]["ciphertext"]
    # min_encryption_version must be set first
    transit.update_key_configuration(name=name, min_decryption_version=3)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.trim_key(name=name, min_version=2)
    assert "min_encryption_version" in str(ei.value)
    transit.update_key_configuration(name=name, min_encryption_version=3)
    for bad in (4, 0):   # above min_decryption_version; not positive
        with pytest.raises(hvac_exc.InvalidRequest) as ei:
            transit.trim_key(name=name, min_version=bad)
        assert "min_available_version" in str(ei.value)
    assert sorted(transit.read_key(name=name)["data"]["keys"], key=int) == ["1", "2", "3", "4"]
    r = transit.trim_key(name=name, min_version=3)
    assert isinstance(r, dict) and r["data"]["min_available_version"] == 3
    info = transit.read_key(name=name)["data"]
    assert sorted(info["keys"], key=int) == ["3", "4"] and info["min_available_version"] == 3
    assert info["latest_version"] == 4
    # the trimmed versions are gone for good, even if min_decryption_version were lowered
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.update_key_configuration(name=name, min_decryption_version=1)
    assert "min_available_version" in str(ei.value)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=name, ciphertext=cts[2])
    assert unb64(transit.decrypt_data(name=name, ciphertext=cts[3])["data"]["plaintext"]) == b"v3"
    # never decreased; the same value again is accepted
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.trim_key(name=name, min_version=2)
    assert transit.trim_key(name=name, min_version=3)["data"]["min_available_version"] == 3
    transit.rotate_key(name=name)
    assert transit.read_key(name=name)["data"]["latest_version"] == 5
