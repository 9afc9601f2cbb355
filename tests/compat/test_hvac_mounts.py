"""Compatibility with a real Vault client on a custom mount point: Debian's python3-hvac (0.11.2)
against the real `p11kms server -dev`. The transit engine is mounted where the user likes
(`client.sys.enable_secrets_engine(backend_type="transit", path=...)`) and every transit method
hvac has and p11kms serves runs with `mount_point=...`; then mount isolation, unmount (which
destroys the keys' token objects, checked on the token with PyKCS11), restarts, and the
`sudo` policy on `sys/mounts/<path>` with a configured server.

hvac's JSONAdapter returns the decoded body for HTTP 200 and the requests.Response otherwise
(e.g. 204), and raises hvac.exceptions.InvalidRequest (400), Forbidden (403), InvalidPath (404).
"""

import base64
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, unb64, unique_name, describe  # noqa: E402
import configured_server as cs  # noqa: E402

import hvac  # noqa: E402
from hvac import exceptions as hvac_exc  # noqa: E402

PYTHON = "/usr/bin/python3"
CT_RE = re.compile(r"^vault:v(\d+):[A-Za-z0-9+/]+={0,2}$")


def mount_name(prefix="payments"):
    return "%s-%s" % (prefix, secrets.token_hex(4))


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


@pytest.fixture(scope="module")
def mp(client):
    """A transit engine mounted for the module's method tests."""
    path = mount_name()
    resp = client.sys.enable_secrets_engine(backend_type="transit", path=path,
                                            description="payments team engine")
    assert getattr(resp, "status_code", None) == 204, "enable should answer 204, got %r" % (resp,)
    return path


def version_of(ciphertext):
    m = CT_RE.match(ciphertext)
    assert m, "not a vault:v<N>:<base64> ciphertext: %r" % ciphertext
    return int(m.group(1))


def new_key(transit, mount_point, **kwargs):
    name = unique_name("hvm")
    resp = transit.create_key(name=name, mount_point=mount_point, **kwargs)
    assert isinstance(resp, dict), "create_key should answer 200 JSON, got %r" % (resp,)
    assert resp["data"]["name"] == name
    return name


def list_or_empty(transit, mount_point):
    try:
        return transit.list_keys(mount_point=mount_point)["data"]["keys"]
    except hvac_exc.InvalidPath:
        return []


# -- sys/mounts through hvac -----------------------------------------------------------------

def test_enable_list_and_read_the_mount(client, mp):
    mounts = client.sys.list_mounted_secrets_engines()
    # Vault's shape: the mounts under "data" and, for older clients, at the top level too
    for where, table in (("data", mounts["data"]), ("top level", mounts)):
        assert "transit/" in table, "transit/ missing at %s: %r" % (where, mounts)
        assert mp + "/" in table, "%s/ missing at %s: %r" % (mp, where, mounts)
        assert table["transit/"]["type"] == "transit"
        assert table[mp + "/"]["type"] == "transit"
        assert table[mp + "/"]["description"] == "payments team engine"
        assert isinstance(table[mp + "/"]["accessor"], str) and table[mp + "/"]["accessor"]
    assert mounts["data"][mp + "/"] == mounts[mp + "/"]
    assert mounts["data"][mp + "/"]["accessor"] != mounts["data"]["transit/"]["accessor"]
    # hvac reads a mount's options through the same list
    assert client.sys.retrieve_mount_option(mp, "version", "none") == "none"

    tune = client.sys.read_mount_configuration(path=mp)
    assert tune["data"]["description"] == "payments team engine"
    assert tune["data"]["default_lease_ttl"] == 0 and tune["data"]["max_lease_ttl"] == 0
    assert tune["description"] == "payments team engine"   # also at the top level, as Vault

    one = client.adapter.get("/v1/sys/mounts/" + mp)
    assert one["data"]["type"] == "transit"
    assert one["data"]["description"] == "payments team engine"
    assert one["data"]["uuid"] == mounts["data"][mp + "/"]["uuid"]

    with pytest.raises(hvac_exc.InvalidPath):
        client.sys.read_mount_configuration(path=mount_name("never"))


def test_create_read_list_keys_on_the_mount(transit, mp):
    made = [new_key(transit, mp) for _ in range(3)]
    made.append(new_key(transit, mp, key_type="aes256-gcm96"))
    for name in made:
        info = transit.read_key(name=name, mount_point=mp)["data"]
        assert info["name"] == name
        assert info["type"] == "aes256-gcm96"
        assert info["latest_version"] == 1 and list(info["keys"]) == ["1"]
        # the key lives in the mount only
        with pytest.raises(hvac_exc.InvalidPath):
            transit.read_key(name=name)
    keys = transit.list_keys(mount_point=mp)["data"]["keys"]
    assert set(made) <= set(keys)
    assert keys == sorted(keys)
    assert not set(made) & set(list_or_empty(transit, "transit"))
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=unique_name("missing"), mount_point=mp)


def test_rotate_and_update_configuration_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    r = transit.rotate_key(name=name, mount_point=mp)
    assert isinstance(r, dict) and r["data"]["latest_version"] == 2
    transit.rotate_key(name=name, mount_point=mp)
    info = transit.read_key(name=name, mount_point=mp)["data"]
    assert info["latest_version"] == 3
    assert sorted(info["keys"], key=int) == ["1", "2", "3"]
    transit.update_key_configuration(name=name, mount_point=mp, min_decryption_version=2,
                                      min_encryption_version=3, deletion_allowed=True)
    info = transit.read_key(name=name, mount_point=mp)["data"]
    assert info["min_decryption_version"] == 2
    assert info["min_encryption_version"] == 3
    assert info["deletion_allowed"] is True
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.update_key_configuration(name=name, mount_point=mp, min_decryption_version=9)
    with pytest.raises(hvac_exc.InvalidPath):
        transit.rotate_key(name=unique_name("missing"), mount_point=mp)


def test_encrypt_decrypt_single_and_key_version_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    transit.rotate_key(name=name, mount_point=mp)
    pt = b"mounted round trip \x00\x01\xff"
    resp = transit.encrypt_data(name=name, plaintext=b64(pt), mount_point=mp)
    ct = resp["data"]["ciphertext"]
    assert version_of(ct) == 2 and resp["data"]["key_version"] == 2
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct, mount_point=mp)["data"]["plaintext"]) == pt
    old = transit.encrypt_data(name=name, plaintext=b64("old"), key_version=1,
                               mount_point=mp)["data"]["ciphertext"]
    assert version_of(old) == 1
    assert unb64(transit.decrypt_data(name=name, ciphertext=old, mount_point=mp)["data"]["plaintext"]) == b"old"
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=name, ciphertext="vault:v1:not-a-real-ciphertext", mount_point=mp)


def test_encrypt_decrypt_batch_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    pts = [b"one", b"two", os.urandom(64)]
    enc = transit.encrypt_data(name=name, plaintext=None, mount_point=mp,
                               batch_input=[{"plaintext": b64(p)} for p in pts])
    cts = [r["ciphertext"] for r in enc["data"]["batch_results"]]
    assert len(cts) == 3 and len(set(cts)) == 3
    assert all(version_of(c) == 1 for c in cts)
    dec = transit.decrypt_data(name=name, ciphertext=None, mount_point=mp,
                               batch_input=[{"ciphertext": c} for c in cts])
    assert [unb64(r["plaintext"]) for r in dec["data"]["batch_results"]] == pts


def test_encrypt_upserts_the_key_in_the_mount_only(transit, mp):
    name = unique_name("upsert")
    ct = transit.encrypt_data(name=name, plaintext=b64("x"), mount_point=mp)["data"]["ciphertext"]
    assert ct.startswith("vault:v1:")
    assert transit.read_key(name=name, mount_point=mp)["data"]["type"] == "aes256-gcm96"
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=name)


def test_rewrap_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    ct1 = transit.encrypt_data(name=name, plaintext=b64("rewrap me"), mount_point=mp)["data"]["ciphertext"]
    transit.rotate_key(name=name, mount_point=mp)
    transit.rotate_key(name=name, mount_point=mp)
    resp = transit.rewrap_data(name=name, ciphertext=ct1, mount_point=mp)
    ct3 = resp["data"]["ciphertext"]
    assert version_of(ct3) == 3 and resp["data"]["key_version"] == 3
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct3, mount_point=mp)["data"]["plaintext"]) == b"rewrap me"
    ct2 = transit.rewrap_data(name=name, ciphertext=ct1, key_version=2, mount_point=mp)["data"]["ciphertext"]
    assert version_of(ct2) == 2


@pytest.mark.parametrize("bits", [None, 128, 512])
def test_generate_data_key_plaintext_on_the_mount(transit, mp, bits):
    name = new_key(transit, mp)
    kwargs = {} if bits is None else {"bits": bits}
    d = transit.generate_data_key(name=name, key_type="plaintext", mount_point=mp, **kwargs)["data"]
    key = unb64(d["plaintext"])
    assert len(key) == (bits or 256) // 8
    assert version_of(d["ciphertext"]) == 1
    assert unb64(transit.decrypt_data(name=name, ciphertext=d["ciphertext"], mount_point=mp)["data"]["plaintext"]) == key


def test_generate_data_key_wrapped_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    d = transit.generate_data_key(name=name, key_type="wrapped", bits=256, mount_point=mp)["data"]
    assert "plaintext" not in d
    back = transit.decrypt_data(name=name, ciphertext=d["ciphertext"], mount_point=mp)["data"]["plaintext"]
    assert len(unb64(back)) == 32
    # the data key's ciphertext belongs to the mount: the same name on transit/ cannot open it
    transit.create_key(name=name)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=name, ciphertext=d["ciphertext"])


@pytest.mark.parametrize("fmt", [None, "base64", "hex"])
def test_generate_random_bytes_on_the_mount(transit, mp, fmt):
    kwargs = {} if fmt is None else {"output_format": fmt}
    a = transit.generate_random_bytes(n_bytes=40, mount_point=mp, **kwargs)["data"]["random_bytes"]
    b = transit.generate_random_bytes(n_bytes=40, mount_point=mp, **kwargs)["data"]["random_bytes"]
    assert a != b
    if fmt == "hex":
        assert re.fullmatch(r"[0-9a-f]{80}", a)
    else:
        assert len(unb64(a)) == 40


HASHES = {"sha2-224": hashlib.sha224, "sha2-256": hashlib.sha256,
          "sha2-384": hashlib.sha384, "sha2-512": hashlib.sha512}


@pytest.mark.parametrize("fmt", [None, "base64"])
@pytest.mark.parametrize("algo", [None, "sha2-224", "sha2-512"])
def test_hash_data_on_the_mount(transit, mp, algo, fmt):
    data = b"hash on a mount \x00\xff"
    kwargs = {}
    if algo:
        kwargs["algorithm"] = algo
    if fmt:
        kwargs["output_format"] = fmt
    got = transit.hash_data(hash_input=b64(data), mount_point=mp, **kwargs)["data"]["sum"]
    digest = HASHES[algo or "sha2-256"](data).digest()
    assert got == (base64.b64encode(digest).decode() if fmt == "base64" else digest.hex())


def test_delete_key_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    transit.create_key(name=name)                  # same name on transit/: must survive
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        transit.delete_key(name=name, mount_point=mp)
    assert "deletion" in str(ei.value).lower()
    transit.update_key_configuration(name=name, deletion_allowed=True, mount_point=mp)
    resp = transit.delete_key(name=name, mount_point=mp)
    assert getattr(resp, "status_code", None) == 204, "delete should answer 204, got %r" % (resp,)
    with pytest.raises(hvac_exc.InvalidPath):
        transit.read_key(name=name, mount_point=mp)
    assert name not in list_or_empty(transit, mp)
    assert transit.read_key(name=name)["data"]["name"] == name
    with pytest.raises(hvac_exc.InvalidPath):
        transit.delete_key(name=unique_name("missing"), mount_point=mp)


@pytest.mark.parametrize("key_type", ["ecdsa-p256", "ed25519", "rsa-2048"])
def test_sign_and_verify_on_the_mount(transit, mp, key_type):
    from cryptography.hazmat.primitives import serialization
    name = new_key(transit, mp, key_type=key_type)
    data = b64(b"signed on a mounted engine")
    sig = transit.sign_data(name=name, hash_input=data, mount_point=mp)["data"]["signature"]
    assert sig.startswith("vault:v1:")
    assert transit.verify_signed_data(name=name, hash_input=data, signature=sig, mount_point=mp)["data"]["valid"]
    assert not transit.verify_signed_data(name=name, hash_input=b64(b"other"), signature=sig,
                                          mount_point=mp)["data"]["valid"]
    pem = transit.read_key(name=name, mount_point=mp)["data"]["keys"]["1"]["public_key"]
    assert serialization.load_pem_public_key(pem.encode()) is not None
    # The same name on transit/ is another key (or none): the signature does not verify there.
    transit.create_key(name=name, key_type=key_type)
    assert not transit.verify_signed_data(name=name, hash_input=data, signature=sig)["data"]["valid"]


def test_hmac_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    data = b64(b"mac me")
    mac = transit.generate_hmac(name=name, hash_input=data, mount_point=mp)["data"]["hmac"]
    assert mac.startswith("vault:v1:")
    assert transit.verify_signed_data(name=name, hash_input=data, hmac=mac, mount_point=mp)["data"]["valid"]
    transit.create_key(name=name)
    assert transit.generate_hmac(name=name, hash_input=data)["data"]["hmac"] != mac


def test_export_on_the_mount(transit, mp):
    name = new_key(transit, mp, exportable=True)
    keys = transit.export_key(name=name, key_type="encryption-key", mount_point=mp)["data"]["keys"]
    assert len(unb64(keys["1"])) == 32
    with pytest.raises(hvac_exc.InvalidPath):
        transit.export_key(name=name, key_type="encryption-key")   # not on transit/


def test_derived_and_convergent_keys_on_the_mount(transit, mp):
    name = new_key(transit, mp, derived=True, convergent_encryption=True)
    ctx = b64(b"tenant-7")
    pt = b64(b"same input")
    c1 = transit.encrypt_data(name=name, plaintext=pt, context=ctx, mount_point=mp)["data"]["ciphertext"]
    c2 = transit.encrypt_data(name=name, plaintext=pt, context=ctx, mount_point=mp)["data"]["ciphertext"]
    assert c1 == c2                                   # convergent: same input, same ciphertext
    assert transit.decrypt_data(name=name, ciphertext=c1, context=ctx, mount_point=mp)["data"]["plaintext"] == pt
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=name, ciphertext=c1, context=b64(b"tenant-8"), mount_point=mp)


def test_trim_on_the_mount(transit, mp):
    name = new_key(transit, mp)
    for _ in range(3):
        transit.rotate_key(name=name, mount_point=mp)
    transit.update_key_configuration(name=name, min_decryption_version=3, min_encryption_version=4, mount_point=mp)
    transit.trim_key(name=name, min_version=3, mount_point=mp)
    keys = transit.read_key(name=name, mount_point=mp)["data"]["keys"]
    assert sorted(keys) == ["3", "4"]


# -- isolation -------------------------------------------------------------------------------

def test_same_name_in_two_mounts_is_two_keys(transit, mp):
    name = unique_name("twin")
    transit.create_key(name=name)
    transit.create_key(name=name, mount_point=mp)
    transit.rotate_key(name=name, mount_point=mp)
    assert transit.read_key(name=name)["data"]["latest_version"] == 1
    assert transit.read_key(name=name, mount_point=mp)["data"]["latest_version"] == 2

    # convergent-free AES-GCM differs per call anyway; use version 1 of both so only the key
    # differs, and check each side opens its own and refuses the other's
    pt = b"same name, different keys"
    ct_default = transit.encrypt_data(name=name, plaintext=b64(pt))["data"]["ciphertext"]
    ct_mount = transit.encrypt_data(name=name, plaintext=b64(pt), key_version=1,
                                    mount_point=mp)["data"]["ciphertext"]
    assert version_of(ct_default) == 1 and version_of(ct_mount) == 1
    assert ct_default != ct_mount
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct_default)["data"]["plaintext"]) == pt
    assert unb64(transit.decrypt_data(name=name, ciphertext=ct_mount, mount_point=mp)["data"]["plaintext"]) == pt
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=name, ciphertext=ct_mount)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=name, ciphertext=ct_default, mount_point=mp)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.rewrap_data(name=name, ciphertext=ct_default, mount_point=mp)


def test_cross_mount_decrypt_is_400_over_http(server, transit, mp):
    name = unique_name("twin")
    transit.create_key(name=name)
    transit.create_key(name=name, mount_point=mp)
    ct = transit.encrypt_data(name=name, plaintext=b64("x"), mount_point=mp)["data"]["ciphertext"]
    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": ct})
    assert r.status_code == 400, describe(r)
    r = server.request("POST", "/v1/%s/decrypt/%s" % (mp, name), json={"ciphertext": ct})
    assert r.status_code == 200, describe(r)


# -- mount management errors -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kv", "pki", "database"])
def test_enabling_another_engine_type_is_400_naming_it(client, kind):
    path = mount_name(kind)
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.sys.enable_secrets_engine(backend_type=kind, path=path)
    assert '"%s"' % kind in str(ei.value) or " %s" % kind in str(ei.value), str(ei.value)
    assert path + "/" not in client.sys.list_mounted_secrets_engines()["data"]


def test_enabling_an_existing_path_or_transit_is_400(client, transit):
    path = mount_name()
    client.sys.enable_secrets_engine(backend_type="transit", path=path, description="first")
    name = new_key(transit, path)
    for again in (path, "transit"):
        with pytest.raises(hvac_exc.InvalidRequest) as ei:
            client.sys.enable_secrets_engine(backend_type="transit", path=again, description="second")
        assert again in str(ei.value), str(ei.value)
    mounts = client.sys.list_mounted_secrets_engines()["data"]
    assert mounts[path + "/"]["description"] == "first"
    assert transit.read_key(name=name, mount_point=path)["data"]["name"] == name


def test_disabling_transit_is_400_and_keeps_its_keys(client, transit):
    name = new_key(transit, "transit")
    with pytest.raises(hvac_exc.InvalidRequest) as ei:
        client.sys.disable_secrets_engine(path="transit")
    assert "transit" in str(ei.value)
    assert "transit/" in client.sys.list_mounted_secrets_engines()["data"]
    assert transit.read_key(name=name)["data"]["name"] == name


def test_disable_removes_the_engine_and_its_keys(server, client, transit):
    path = mount_name()
    client.sys.enable_secrets_engine(backend_type="transit", path=path)
    names = [new_key(transit, path) for _ in range(2)]
    transit.rotate_key(name=names[0], mount_point=path)
    ct = transit.encrypt_data(name=names[0], plaintext=b64("gone"), mount_point=path)["data"]["ciphertext"]
    transit.create_key(name=names[0])                       # a twin on transit/ stays

    resp = client.sys.disable_secrets_engine(path=path)
    assert getattr(resp, "status_code", None) == 204, "disable should answer 204, got %r" % (resp,)
    assert path + "/" not in client.sys.list_mounted_secrets_engines()["data"]
    assert path + "/" not in client.sys.list_mounted_secrets_engines()
    for method, route, body in [("GET", "keys/" + names[0], None),
                                ("LIST", "keys", None),
                                ("POST", "encrypt/" + names[1], {"plaintext": b64("x")}),
                                ("POST", "decrypt/" + names[0], {"ciphertext": ct}),
                                ("POST", "keys/" + unique_name("new"), {}),
                                ("POST", "random/8", {})]:
        r = server.request(method, "/v1/%s/%s" % (path, route), json=body)
        assert r.status_code == 404, describe(r)
    with pytest.raises(hvac_exc.InvalidPath):
        client.sys.read_mount_configuration(path=path)
    # unmounting it again: Vault answers 204 ("if it existed"), p11kms may say 404; never an error
    # that would suggest something is still there
    try:
        again = client.sys.disable_secrets_engine(path=path)
        assert getattr(again, "status_code", None) == 204, again
    except hvac_exc.InvalidPath:
        pass
    assert path + "/" not in client.sys.list_mounted_secrets_engines()["data"]
    assert transit.read_key(name=names[0])["data"]["latest_version"] == 1

    # re-enabling the path gives an empty engine: the old keys are gone for good
    client.sys.enable_secrets_engine(backend_type="transit", path=path)
    assert list_or_empty(transit, path) == []
    for n in names:
        with pytest.raises(hvac_exc.InvalidPath):
            transit.read_key(name=n, mount_point=path)
    with pytest.raises(hvac_exc.InvalidRequest):
        transit.decrypt_data(name=names[0], ciphertext=ct, mount_point=path)
    fresh = transit.create_key(name=names[0], mount_point=path)["data"]
    assert fresh["latest_version"] == 1


# -- restarts and the token ------------------------------------------------------------------

def test_mounts_and_their_keys_survive_a_restart():
    with tl.DevServer() as srv:
        c = hvac.Client(url=srv.url, token=srv.token)
        try:
            path = mount_name()
            c.sys.enable_secrets_engine(backend_type="transit", path=path, description="kept")
            t = c.secrets.transit
            t.create_key(name="k1", mount_point=path)
            t.rotate_key(name="k1", mount_point=path)
            t.create_key(name="k1")
            ct = t.encrypt_data(name="k1", plaintext=b64("persist"), mount_point=path)["data"]["ciphertext"]
            before = c.sys.list_mounted_secrets_engines()["data"][path + "/"]
        finally:
            c.adapter.close()
        srv.restart()
        assert srv.exit_codes[-1] == 0
        c = hvac.Client(url=srv.url, token=srv.token)
        try:
            t = c.secrets.transit
            mounts = c.sys.list_mounted_secrets_engines()["data"]
            assert mounts[path + "/"] == before
            assert c.sys.read_mount_configuration(path=path)["data"]["description"] == "kept"
            assert t.read_key(name="k1", mount_point=path)["data"]["latest_version"] == 2
            assert t.read_key(name="k1")["data"]["latest_version"] == 1
            assert unb64(t.decrypt_data(name="k1", ciphertext=ct, mount_point=path)["data"]["plaintext"]) == b"persist"
            with pytest.raises(hvac_exc.InvalidRequest):
                t.decrypt_data(name="k1", ciphertext=ct)
            # an unmount after the restart is remembered across the next one
            c.sys.disable_secrets_engine(path=path)
        finally:
            c.adapter.close()
        srv.restart()
        r = srv.request("GET", "/v1/sys/mounts")
        assert r.status_code == 200, describe(r)
        assert path + "/" not in r.json()["data"] and "transit/" in r.json()["data"]
        r = srv.request("GET", "/v1/%s/keys/k1" % path)
        assert r.status_code == 404, describe(r)


# Runs in its own /usr/bin/python3 so SOFTHSM2_CONF applies before libsofthsm2 is loaded (as in
# tests/integration/test_restart_and_custody.py). argv: module, token label; PIN from the env.
LIST_LABELS = r'''
import json, os, sys
import PyKCS11
module, label = sys.argv[1], sys.argv[2]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
slot = None
for s in lib.getSlotList(tokenPresent=True):
    if lib.getTokenInfo(s).label.strip() == label:
        slot = s
if slot is None:
    print(json.dumps({"error": "token %r not found" % label}))
    sys.exit(0)
session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
session.login(os.environ["P11KMS_TEST_USER_PIN"])
out = []
for obj in session.findObjects([]):
    try:
        v = session.getAttributeValue(obj, [PyKCS11.CKA_LABEL])[0]
    except PyKCS11.PyKCS11Error:
        v = None
    out.append(v)
session.logout()
session.closeSession()
print(json.dumps({"labels": out}))
'''


def token_labels(srv):
    assert not srv.running(), "inspect the token only while the server is stopped"
    env = dict(os.environ)
    env["SOFTHSM2_CONF"] = os.path.join(srv.data_dir, "softhsm2.conf")
    env["P11KMS_TEST_USER_PIN"] = srv.user_pin()
    p = subprocess.run([PYTHON, "-c", LIST_LABELS, tl.SOFTHSM_MODULE, tl.DEV_TOKEN_LABEL],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert p.returncode == 0, "token inspection failed:\n%s" % p.stderr.decode(errors="replace")
    result = json.loads(p.stdout.decode())
    assert "error" not in result, result.get("error")
    return [l for l in result["labels"] if l]


def test_unmount_destroys_the_token_objects():
    with tl.DevServer() as srv:
        path = mount_name()
        other = mount_name("other")

        def ok(method, route, body=None, status=200):
            r = srv.request(method, route, json=body)
            assert r.status_code == status, describe(r)

        ok("POST", "/v1/sys/mounts/" + path, {"type": "transit"}, 204)
        ok("POST", "/v1/sys/mounts/" + other, {"type": "transit"}, 204)
        for name in ("k1", "k2"):
            for mount in (path, other, "transit"):
                ok("POST", "/v1/%s/keys/%s" % (mount, name), {})
        for _ in range(2):
            ok("POST", "/v1/%s/keys/k1/rotate" % path)
            ok("POST", "/v1/transit/keys/k1/rotate")
        ok("POST", "/v1/%s/keys/k2/rotate" % path)
        mounted = {"p11kms/root/%s/%s" % (path, s) for s in ("k1/v1", "k1/v2", "k1/v3", "k2/v1", "k2/v2")}
        kept = {"p11kms/root/%s" % s for s in ("k1/v1", "k1/v2", "k1/v3", "k2/v1")}
        kept |= {"p11kms/root/%s/%s" % (other, s) for s in ("k1/v1", "k2/v1")}

        srv.stop()
        labels = token_labels(srv)
        assert mounted <= set(labels), "mounted keys' objects missing before the unmount: %s" % sorted(labels)
        assert kept <= set(labels), sorted(labels)
        assert len(labels) == len(set(labels)), "duplicate labels: %s" % sorted(labels)

        srv.start()
        ok("DELETE", "/v1/sys/mounts/" + path, None, 204)
        ok("GET", "/v1/transit/keys/k1")
        ok("GET", "/v1/%s/keys/k2" % other)
        srv.stop()
        after = set(token_labels(srv))
        assert not mounted & after, "token objects left after the unmount: %s" % sorted(mounted & after)
        assert not [l for l in after if l.startswith("p11kms/root/%s/" % path)], sorted(after)
        assert kept <= after, "unmount destroyed another mount's objects: %s" % sorted(kept - after)

        # the store agrees with the token: the remaining keys still work after a restart
        srv.start()
        r = srv.request("POST", "/v1/transit/encrypt/k1", json={"plaintext": b64("x")})
        assert r.status_code == 200 and r.json()["data"]["key_version"] == 3, describe(r)
        r = srv.request("GET", "/v1/sys/health")
        assert r.json()["store"]["missing_objects"] == [], describe(r)


# -- policy: sudo on sys/mounts/<path>, and the mount's own policy paths -----------------------

POLICY_TOKENS = {name: "tok-%s-%s" % (name, secrets.token_hex(8))
                 for name in ("boss", "transitonly", "mounter", "payer", "lister")}

MOUNT_POLICIES = """policies:
  transit-all:
    - path: transit/*
      capabilities: [create, read, update, delete, list]
    - path: sys/mounts
      capabilities: [read]
    - path: sys/mounts/*
      capabilities: [create, read, update, delete, list]
  mounter:
    - path: sys/mounts/payments
      capabilities: [sudo]
  lister:
    - path: sys/mounts
      capabilities: [read]
  payer:
    - path: payments/encrypt/*
      capabilities: [update]
"""


@pytest.fixture(scope="module")
def policy_server():
    yield from cs.serve_with_tokens("p11kms-mount-policy-", [
        (name, POLICY_TOKENS[name], policies, "[root]")
        for name, policies in (("boss", "[root]"), ("transitonly", "[transit-all]"), ("mounter", "[mounter]"),
                               ("payer", "[payer]"), ("lister", "[lister]"))
    ], MOUNT_POLICIES)


def as_token(srv, who, method, path, body=None):
    return srv.request(method, path, json=body, token=POLICY_TOKENS[who])


def test_mount_management_needs_sudo_on_its_path(policy_server):
    srv = policy_server
    # transit/* rights and everything but sudo on sys/mounts/*: no mount management
    r = as_token(srv, "transitonly", "POST", "/v1/sys/mounts/payments", {"type": "transit"})
    assert r.status_code == 403, describe(r)
    assert as_token(srv, "transitonly", "POST", "/v1/transit/keys/t1", {}).status_code == 200
    r = as_token(srv, "boss", "GET", "/v1/sys/mounts")
    assert "payments/" not in r.json()["data"], describe(r)

    # sudo on sys/mounts/payments: that path only
    r = as_token(srv, "mounter", "POST", "/v1/sys/mounts/payments", {"type": "transit", "description": "p"})
    assert r.status_code == 204, describe(r)
    r = as_token(srv, "mounter", "POST", "/v1/sys/mounts/payroll", {"type": "transit"})
    assert r.status_code == 403, describe(r)
    r = as_token(srv, "boss", "POST", "/v1/sys/mounts/payroll", {"type": "transit"})
    assert r.status_code == 204, describe(r)

    # disabling needs it too
    r = as_token(srv, "transitonly", "DELETE", "/v1/sys/mounts/payments")
    assert r.status_code == 403, describe(r)
    r = as_token(srv, "mounter", "DELETE", "/v1/sys/mounts/payroll")
    assert r.status_code == 403, describe(r)
    mounts = as_token(srv, "boss", "GET", "/v1/sys/mounts").json()["data"]
    assert "payments/" in mounts and "payroll/" in mounts
    r = as_token(srv, "mounter", "DELETE", "/v1/sys/mounts/payments")
    assert r.status_code == 204, describe(r)
    mounts = as_token(srv, "boss", "GET", "/v1/sys/mounts").json()["data"]
    assert "payments/" not in mounts and "payroll/" in mounts


def test_reading_mounts_needs_read_on_their_paths(policy_server):
    srv = policy_server
    r = as_token(srv, "boss", "POST", "/v1/sys/mounts/readme", {"type": "transit", "description": "r"})
    assert r.status_code == 204, describe(r)
    r = as_token(srv, "lister", "GET", "/v1/sys/mounts")
    assert r.status_code == 200 and "readme/" in r.json()["data"], describe(r)
    for path in ("/v1/sys/mounts/readme", "/v1/sys/mounts/readme/tune"):
        r = as_token(srv, "lister", "GET", path)
        assert r.status_code == 403, describe(r)
        r = as_token(srv, "transitonly", "GET", path)       # read on sys/mounts/*
        assert r.status_code == 200 and r.json()["data"]["description"] == "r", describe(r)
    for who in ("lister", "payer", "mounter"):
        r = as_token(srv, who, "DELETE", "/v1/sys/mounts/readme")
        assert r.status_code == 403, describe(r)
    r = as_token(srv, "payer", "GET", "/v1/sys/mounts")
    assert r.status_code == 403, describe(r)


def test_policy_paths_of_a_mount_use_its_path(policy_server):
    srv = policy_server
    for mount in ("payments", "payroll"):   # 400: already mounted by the test above
        r = as_token(srv, "boss", "POST", "/v1/sys/mounts/" + mount, {"type": "transit"})
        assert r.status_code in (204, 400), describe(r)
    for mount in ("payments", "transit"):
        r = as_token(srv, "boss", "POST", "/v1/%s/keys/k1" % mount, {})
        assert r.status_code == 200, describe(r)
    r = as_token(srv, "payer", "POST", "/v1/payments/encrypt/k1", {"plaintext": b64("pay")})
    assert r.status_code == 200, describe(r)
    ct = r.json()["data"]["ciphertext"]
    r = as_token(srv, "boss", "POST", "/v1/payments/decrypt/k1", {"ciphertext": ct})
    assert r.status_code == 200 and unb64(r.json()["data"]["plaintext"]) == b"pay", describe(r)
    for method, path, body in [("POST", "/v1/transit/encrypt/k1", {"plaintext": b64("x")}),
                               ("POST", "/v1/payments/decrypt/k1", {"ciphertext": ct}),
                               ("GET", "/v1/payments/keys/k1", None),
                               ("POST", "/v1/payroll/encrypt/k1", {"plaintext": b64("x")})]:
        r = as_token(srv, "payer", method, path, body)
        assert r.status_code == 403, describe(r)
    # transit/* does not reach a mounted engine either
    r = as_token(srv, "transitonly", "POST", "/v1/payments/encrypt/k1", {"plaintext": b64("x")})
    assert r.status_code == 403, describe(r)
    r = as_token(srv, "transitonly", "POST", "/v1/transit/encrypt/k1", {"plaintext": b64("x")})
    assert r.status_code == 200, describe(r)
