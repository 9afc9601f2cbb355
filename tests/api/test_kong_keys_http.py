"""Kong keys and key sets (/keys, /key-sets) end to end on `p11kms server -dev`: CRUD in each
body encoding (JSON, urlencoded and multipart forms with Kong's dotted names), JWK and PEM
imports and their 400s in Kong's schema-violation shape, pagination and tags, the JWKS (no
token, ETag), JWS signing verified by python3-jwcrypto against the JWKS, JWEs made by
python3-jwcrypto for every alg/enc pair decrypted here, and custody: every private key object
on the token is non-extractable and sensitive, and no private key byte (raw, base64,
base64url, PEM) from the inputs is in any file under the data directory or in the server log.
"""

import base64
import json
import os
import sys

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwcrypto import jwe, jwk, jws

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import p11kms_testlib as tl  # noqa: E402

SECRETS = []  # private key material given to the server, in every encoding


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def remember_private(key):
    """Records every encoding of a private key's secret parts (cryptography key)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    SECRETS.append(pem)
    SECRETS.append(der)
    SECRETS.append(base64.b64encode(der))
    j = json.loads(jwk.JWK.from_pem(pem).export_private())
    for m in ("d", "p", "q", "dp", "dq", "qi"):
        if m in j:
            raw = base64.urlsafe_b64decode(j[m] + "=" * (-len(j[m]) % 4))
            SECRETS.append(j[m].encode())
            SECRETS.append(raw)
            SECRETS.append(base64.b64encode(raw))
    return pem


def make_key(kind):
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa4096":
        return rsa.generate_private_key(public_exponent=65537, key_size=4096)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key({"p256": ec.SECP256R1(), "p384": ec.SECP384R1(),
                                    "p521": ec.SECP521R1()}[kind])


def private_jwk(key, kid, **extra):
    pem = remember_private(key)
    j = json.loads(jwk.JWK.from_pem(pem).export_private())
    j["kid"] = kid
    j.update(extra)
    return json.dumps(j)


def public_pem(key):
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def req(server, method, path, body=None, encoding="json", token=True, headers=None, params=None):
    h = dict(headers or {})
    if encoding == "json":
        return server.request(method, path, json=body, token=token, headers=h, params=params)
    if encoding == "form":
        return server.request(method, path, data=body, token=token, headers=h, params=params)
    # multipart: every field as a form part, as curl -F sends them
    hdrs = {"X-Vault-Token": server.token} if token is True else {}
    hdrs.update(h)
    files = [(k, (None, v)) for k, v in (body.items() if isinstance(body, dict) else body)]
    return requests.request(method, server.url + path, files=files, headers=hdrs, params=params, timeout=60)


def flat(body):
    """A JSON body as Kong's dotted form fields."""
    out = []
    for k, v in body.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                out.append(("%s.%s" % (k, k2), v2))
        elif isinstance(v, list):
            for e in v:
                out.append(("%s[]" % k, e))
        else:
            out.append((k, v))
    return out


ENCODINGS = ["json", "form", "multipart"]


def send(server, method, path, body, encoding):
    if encoding == "json":
        return req(server, method, path, body)
    return req(server, method, path, flat(body), encoding)


# -- key sets -------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding", ENCODINGS)
def test_key_set_crud(server, encoding):
    name = tl.unique_name("set")
    r = send(server, "POST", "/key-sets", {"name": name, "tags": ["a", "b"]}, encoding)
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["name"] == name and s["tags"] == ["a", "b"] and len(s["id"]) == 36
    assert isinstance(s["created_at"], int) and isinstance(s["updated_at"], int)
    assert req(server, "GET", "/key-sets/" + name).json()["id"] == s["id"]
    assert req(server, "GET", "/key-sets/" + s["id"]).json()["name"] == name
    r = send(server, "PATCH", "/key-sets/" + name, {"tags": ["c"]}, encoding)
    assert r.status_code == 200 and r.json()["tags"] == ["c"], r.text
    r = send(server, "PUT", "/key-sets/" + s["id"], {"name": name}, encoding)
    assert r.status_code == 200 and r.json()["tags"] is None and r.json()["id"] == s["id"], r.text
    r = send(server, "POST", "/key-sets", {"name": name}, encoding)
    assert r.status_code == 409, r.text
    assert req(server, "DELETE", "/key-sets/" + name).status_code == 204
    assert req(server, "GET", "/key-sets/" + name).status_code == 404
    assert req(server, "GET", "/key-sets/" + name).json() == {"message": "Not found"}
    assert req(server, "DELETE", "/key-sets/" + name).status_code == 204


def test_put_key_sets_collection_and_put_by_name(server):
    name = tl.unique_name("set")
    r = req(server, "PUT", "/key-sets", {"name": name}, "form")
    assert r.status_code == 200, r.text
    again = req(server, "PUT", "/key-sets", {"name": name}, "form")
    assert again.status_code == 200 and again.json()["id"] == r.json()["id"]
    other = tl.unique_name("set")
    r = req(server, "PUT", "/key-sets/" + other, {})
    assert r.status_code == 200 and r.json()["name"] == other, r.text


def test_auth_and_namespace(server):
    name = tl.unique_name("set")
    assert req(server, "GET", "/key-sets", token=False).status_code == 401
    r = req(server, "POST", "/key-sets", {"name": name}, headers={"X-Vault-Namespace": "team-k"})
    assert r.status_code == 201
    assert req(server, "GET", "/key-sets/" + name).status_code == 404
    assert req(server, "GET", "/key-sets/" + name, headers={"X-Vault-Namespace": "team-k"}).status_code == 200


# -- keys -----------------------------------------------------------------------------------

KINDS = ["rsa", "p256", "p384", "p521", "ed25519"]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("kind", KINDS)
def test_jwk_key_crud(server, kind, encoding):
    set_name = tl.unique_name("set")
    assert req(server, "POST", "/key-sets", {"name": set_name}).status_code == 201
    key = make_key(kind)
    name = tl.unique_name("jwk")
    body = {"name": name, "kid": "kid-" + name, "jwk": private_jwk(key, "kid-" + name),
            "set": {"name": set_name}, "tags": ["t1"]}
    r = send(server, "POST", "/keys", body, encoding)
    assert r.status_code == 201, r.text
    k = r.json()
    assert k["private_key"] == "hsm" and k["pem"] is None and k["set"]["id"]
    pub = json.loads(k["jwk"])
    assert "d" not in pub and pub["kid"] == "kid-" + name
    expected = json.loads(jwk.JWK.from_pem(public_pem(key).encode()).export_public())
    for m in ("kty", "crv", "n", "e", "x", "y"):
        assert pub.get(m) == expected.get(m), m
    assert req(server, "GET", "/keys/" + name).json() == k
    assert req(server, "GET", "/keys/" + k["id"]).json() == k
    # read-modify-write with the public JWK keeps the private key in the token
    r = send(server, "PUT", "/keys/" + name, {"name": name, "kid": k["kid"], "jwk": k["jwk"],
                                               "set": {"id": k["set"]["id"]}}, encoding)
    assert r.status_code == 200 and r.json()["private_key"] == "hsm", r.text
    r = send(server, "PATCH", "/keys/" + k["id"], {"tags": ["t2"]}, encoding)
    assert r.status_code == 200 and r.json()["tags"] == ["t2"] and r.json()["private_key"] == "hsm"
    keys_of_set = req(server, "GET", "/key-sets/%s/keys" % set_name).json()
    assert [x["id"] for x in keys_of_set["data"]] == [k["id"]]
    assert req(server, "DELETE", "/keys/" + name).status_code == 204
    assert req(server, "GET", "/keys/" + name).status_code == 404


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_pem_key_both_halves_and_public_only(server, encoding):
    key = make_key("p256")
    name = tl.unique_name("pem")
    pem = remember_private(key).decode()
    r = send(server, "POST", "/keys", {"name": name, "kid": "23",
                                       "pem": {"private_key": pem, "public_key": public_pem(key)}}, encoding)
    assert r.status_code == 201, r.text
    k = r.json()
    assert k["jwk"] is None and k["pem"] == {"public_key": public_pem(key), "private_key": None}
    assert k["private_key"] == "hsm"
    name2 = tl.unique_name("pub")
    r = send(server, "POST", "/keys", {"name": name2, "kid": "24", "pem": {"public_key": public_pem(key)}}, encoding)
    assert r.status_code == 201 and r.json()["private_key"] == "none", r.text


def schema_violation(r, field):
    assert r.status_code == 400, r.text
    b = r.json()
    assert b["name"] == "schema violation" and b["code"] == 2, b
    node = b["fields"]
    for part in field.split("."):
        assert part in node, (field, b)
        node = node[part]
    return b


def test_import_refusals(server):
    key = make_key("rsa")
    other = make_key("rsa")
    n = tl.unique_name("bad")
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1", "jwk": private_jwk(key, "2")}), "kid")
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1",
                                                   "pem": {"private_key": "-----BEGIN PRIVATE KEY-----\nnope\n"}}),
                     "pem.private_key")
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1",
                                                   "pem": {"private_key": remember_private(key).decode(),
                                                           "public_key": public_pem(other)}}), "pem.private_key")
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1",
                                                   "jwk": json.dumps({"kty": "oct", "k": "AAAA", "kid": "1"})}), "jwk")
    x25519 = json.dumps({"kty": "OKP", "crv": "X25519", "x": "A" * 43, "kid": "1"})
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1", "jwk": x25519}), "jwk")
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1", "jwk": json.dumps({"kty": "DSA"})}), "jwk")
    # a JWK whose d belongs to another key
    j = json.loads(private_jwk(key, "1"))
    j["d"] = json.loads(private_jwk(other, "1"))["d"]
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1", "jwk": json.dumps(j)}), "jwk")
    ecj = json.loads(private_jwk(make_key("p256"), "1"))
    ecj["d"] = json.loads(private_jwk(make_key("p256"), "1"))["d"]
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1", "jwk": json.dumps(ecj)}), "jwk")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    schema_violation(req(server, "POST", "/keys", {"name": n, "kid": "1",
                                                   "pem": {"public_key": public_pem(small)}}), "pem.public_key")
    schema_violation(req(server, "POST", "/keys", {"kid": "1", "pem": {"public_key": public_pem(key)}}), "name")
    schema_violation(req(server, "POST", "/keys", {"name": n, "pem": {"public_key": public_pem(key)}}), "kid")
    assert req(server, "GET", "/keys/" + n).status_code == 404


def test_names_unique_across_dialects(server):
    name = tl.unique_name("shared")
    assert req(server, "POST", "/v1/transit/keys/" + name, {}).status_code in (200, 204)
    key = make_key("p256")
    r = req(server, "POST", "/keys", {"name": name, "kid": "1", "pem": {"public_key": public_pem(key)}})
    assert r.status_code == 409, r.text
    name2 = tl.unique_name("kong")
    assert req(server, "POST", "/keys", {"name": name2, "kid": "1",
                                         "pem": {"public_key": public_pem(key)}}).status_code == 201
    r = req(server, "POST", "/v1/transit/keys/" + name2, {})
    assert r.status_code >= 400, r.text


def test_replacing_the_key_destroys_the_old_object(server):
    name = tl.unique_name("rep")
    a, b = make_key("p256"), make_key("p256")
    r = req(server, "POST", "/keys", {"name": name, "kid": "1", "jwk": private_jwk(a, "1")})
    assert r.status_code == 201
    jws_a = req(server, "POST", "/keys/%s/sign" % name, {"payload": "aGk"}).json()["jws"]
    r = req(server, "PUT", "/keys/" + name, {"name": name, "kid": "1", "jwk": private_jwk(b, "1")})
    assert r.status_code == 200 and r.json()["private_key"] == "hsm"
    jws_b = req(server, "POST", "/keys/%s/sign" % name, {"payload": "aGk"}).json()["jws"]
    pb = jwk.JWK.from_pem(public_pem(b).encode())
    t = jws.JWS()
    t.deserialize(jws_b)
    t.verify(pb)
    t = jws.JWS()
    t.deserialize(jws_a)
    with pytest.raises(Exception):
        t.verify(pb)
    # a public-only replacement of another key leaves no private key
    c = make_key("p256")
    r = req(server, "PATCH", "/keys/" + name, {"pem": {"public_key": public_pem(c)}})
    assert r.status_code == 200 and r.json()["private_key"] == "none", r.text


def test_pagination_and_tags(server):
    ns = {"X-Vault-Namespace": "paging"}
    ids = []
    for i in range(5):
        tags = ["all"] + (["even"] if i % 2 == 0 else ["odd"])
        r = req(server, "POST", "/key-sets", {"name": "ps%d" % i, "tags": tags}, headers=ns)
        assert r.status_code == 201
        ids.append(r.json()["id"])
    seen, path, params = [], "/key-sets", {"size": "2"}
    while True:
        r = req(server, "GET", path, headers=ns, params=params)
        assert r.status_code == 200, r.text
        b = r.json()
        seen += [s["id"] for s in b["data"]]
        if b["next"] is None:
            break
        assert "size=2" in b["next"] and b["offset"]
        path, params = b["next"], None
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    r = req(server, "GET", "/key-sets", headers=ns, params={"tags": "all,even"})
    assert len(r.json()["data"]) == 3
    r = req(server, "GET", "/key-sets", headers=ns, params={"tags": "even/odd", "size": "4"})
    assert len(r.json()["data"]) == 4 and "tags=even%2Fodd" in r.json()["next"]
    schema_violation(req(server, "GET", "/key-sets", headers=ns, params={"size": "1001"}), "size")
    schema_violation(req(server, "GET", "/key-sets", headers=ns, params={"offset": "!!"}), "offset")
    assert req(server, "GET", "/key-sets", headers=ns).json()["next"] is None


def test_deleting_a_set_deletes_its_keys(server):
    s = tl.unique_name("set")
    assert req(server, "POST", "/key-sets", {"name": s}).status_code == 201
    k = tl.unique_name("k")
    assert req(server, "POST", "/keys", {"name": k, "kid": "1", "jwk": private_jwk(make_key("p384"), "1"),
                                         "set": {"name": s}}).status_code == 201
    dup = req(server, "POST", "/keys", {"name": k + "x", "kid": "1", "pem": {"public_key": public_pem(make_key("p256"))},
                                        "set": {"name": s}})
    assert dup.status_code == 409, dup.text
    assert req(server, "DELETE", "/key-sets/" + s).status_code == 204
    assert req(server, "GET", "/keys/" + k).status_code == 404


# -- JWKS, JWS, JWE -------------------------------------------------------------------------

SIGN_ALGS = {"rsa": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"], "p256": ["ES256"],
             "p384": ["ES384"], "p521": ["ES512"], "ed25519": ["EdDSA"]}
DEFAULT_ALG = {"rsa": "RS256", "p256": "ES256", "p384": "ES384", "p521": "ES512", "ed25519": "EdDSA"}


@pytest.fixture(scope="module")
def signing_set(server):
    s = tl.unique_name("sig")
    assert req(server, "POST", "/key-sets", {"name": s}).status_code == 201
    for kind in SIGN_ALGS:
        r = req(server, "POST", "/keys", {"name": "%s-%s" % (s, kind), "kid": kind,
                                          "jwk": private_jwk(make_key(kind), kind), "set": {"name": s}})
        assert r.status_code == 201, r.text
    return s


def test_jwks_public_with_etag(server, signing_set):
    r = req(server, "GET", "/key-sets/%s/jwks" % signing_set, token=False)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert sorted(k["kid"] for k in doc["keys"]) == sorted(SIGN_ALGS)
    assert all("d" not in k for k in doc["keys"])
    assert r.headers["ETag"] and "max-age" in r.headers["Cache-Control"]
    again = req(server, "GET", "/key-sets/%s/jwks" % signing_set, token=False,
                headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""
    jwk.JWKSet.from_json(r.text)
    assert req(server, "GET", "/key-sets/nope-none/jwks", token=False).status_code == 404


@pytest.mark.parametrize("kind", list(SIGN_ALGS))
def test_sign_verified_against_jwks(server, signing_set, kind):
    keyset = jwk.JWKSet.from_json(req(server, "GET", "/key-sets/%s/jwks" % signing_set, token=False).text)
    name = "%s-%s" % (signing_set, kind)
    payload = base64.urlsafe_b64encode(b'{"sub":"alice"}').rstrip(b"=").decode()
    for alg in SIGN_ALGS[kind] + [None]:
        body = {"payload": payload, "header": {"typ": "JWT"}}
        if alg:
            body["alg"] = alg
        r = req(server, "POST", "/keys/%s/sign" % name, body)
        assert r.status_code == 200, r.text
        token = r.json()["jws"]
        t = jws.JWS()
        t.deserialize(token)
        t.verify(keyset.get_key(kind))
        hdr = t.jose_header
        assert hdr["alg"] == (alg or DEFAULT_ALG[kind]) and hdr["kid"] == kind and hdr["typ"] == "JWT"
        assert t.payload == b'{"sub":"alice"}'
    wrong = "ES256" if kind != "p256" else "RS256"
    schema_violation(req(server, "POST", "/keys/%s/sign" % name, {"payload": payload, "alg": wrong}), "alg")


JWE_PAIRS = [(a, e) for a in ["RSA-OAEP", "RSA-OAEP-256"] for e in ["A128GCM", "A192GCM", "A256GCM"]] + \
            [(a, e) for a in ["ECDH-ES", "ECDH-ES+A128KW", "ECDH-ES+A256KW"] for e in ["A128GCM", "A192GCM", "A256GCM"]]


@pytest.fixture(scope="module")
def enc_keys(server):
    out = {}
    for kind in ("rsa", "p256", "p384", "p521"):
        key = make_key(kind)
        name = tl.unique_name("enc-" + kind)
        r = req(server, "POST", "/keys", {"name": name, "kid": name, "jwk": private_jwk(key, name, use="enc")})
        assert r.status_code == 201, r.text
        out[kind] = (name, jwk.JWK.from_json(r.json()["jwk"]))
    return out


@pytest.mark.parametrize("alg,enc", JWE_PAIRS)
def test_decrypt_jwcrypto_jwe(server, enc_keys, alg, enc):
    kinds = ["rsa"] if alg.startswith("RSA") else ["p256", "p384", "p521"]
    for kind in kinds:
        name, pub = enc_keys[kind]
        plaintext = os.urandom(40)
        e = jwe.JWE(plaintext, protected=json.dumps({"alg": alg, "enc": enc, "kid": name}))
        e.add_recipient(pub)
        compact = e.serialize(compact=True)
        r = req(server, "POST", "/keys/%s/decrypt" % name, {"jwe": compact})
        assert r.status_code == 200, r.text
        got = r.json()
        assert base64.urlsafe_b64decode(got["plaintext"] + "=" * (-len(got["plaintext"]) % 4)) == plaintext
        assert got["header"]["alg"] == alg and got["header"]["enc"] == enc
        parts = compact.split(".")
        tampered = parts[:]
        ct = bytearray(base64.urlsafe_b64decode(parts[3] + "=" * (-len(parts[3]) % 4)))
        ct[0] ^= 1
        tampered[3] = base64.urlsafe_b64encode(bytes(ct)).rstrip(b"=").decode()
        r = req(server, "POST", "/keys/%s/decrypt" % name, {"jwe": ".".join(tampered)})
        assert r.status_code == 400, r.text
        tampered = parts[:]
        tampered[4] = "A" * len(parts[4])
        assert req(server, "POST", "/keys/%s/decrypt" % name, {"jwe": ".".join(tampered)}).status_code == 400


def test_decrypt_garbage_is_400(server, enc_keys):
    name = enc_keys["rsa"][0]
    for bad in ["x", "a.b.c.d.e", "....", ""]:
        assert req(server, "POST", "/keys/%s/decrypt" % name, {"jwe": bad}).status_code == 400


# -- custody (last: it looks at everything the module did) ----------------------------------

def test_zz_custody(server):
    from test_restart_and_custody import inspect_token  # the shared PyKCS11 inspection
    data_dir = server.data_dir
    log_before = server.log_bytes()
    server.stop()
    try:
        objects = inspect_token(data_dir, server.user_pin())
        kong = [o for o in objects if (o["label"] or "").startswith("p11kms-kong/")]
        assert kong, "no Kong key objects on the token"
        for o in objects:
            if o["class"] in ("CKO_PRIVATE_KEY", "CKO_SECRET_KEY"):
                assert o["CKA_EXTRACTABLE"] is False, o
                assert o["CKA_SENSITIVE"] is True, o
                assert not o["value_readable"], o
        for o in kong:
            assert o["class"] == "CKO_PRIVATE_KEY" and o["CKA_TOKEN"] is True and o["CKA_UNWRAP"] is False, o
            assert o["CKA_SIGN"] is True, o
        blobs = {}
        for root, _, files in os.walk(data_dir):
            for f in files:
                if "tokens" in root.split(os.sep):
                    continue  # the token's own object files hold the keys (sensitive, by design)
                with open(os.path.join(root, f), "rb") as fh:
                    blobs[os.path.join(root, f)] = fh.read()
        blobs["server.log"] = log_before + server.log_bytes()
        assert len(SECRETS) > 50
        for secret in SECRETS:
            for path, data in blobs.items():
                assert secret not in data, "private key material found in %s" % path
    finally:
        server.start()
