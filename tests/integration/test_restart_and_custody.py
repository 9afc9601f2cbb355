"""Integration: (a) state survives a restart on the same data dir; (b) key custody: what the
dev token really holds (inspected with PyKCS11 in a separate process, after the server stopped)
and what the SQLite store and the server log must never hold.
"""

import base64
import json
import os
import re
import stat
import subprocess
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, unb64, describe, unique_name  # noqa: E402

PYTHON = "/usr/bin/python3"
VERSION_LABEL_RE = re.compile(r"^p11kms/root/([A-Za-z0-9._-]+)/v([0-9]+)(/hmac)?$")


# -- small HTTP helpers ----------------------------------------------------------------------

def call(srv, method, path, body=None, status=200, **kw):
    r = srv.request(method, path, json=body, **kw)
    assert r.status_code == status, describe(r)
    return r.json()["data"] if r.content and status == 200 else None


def create(srv, name, key_type=None):
    return call(srv, "POST", "/v1/transit/keys/" + name,
                {"type": key_type} if key_type else {})


def read(srv, name):
    return call(srv, "GET", "/v1/transit/keys/" + name)


def rotate(srv, name):
    return call(srv, "POST", "/v1/transit/keys/%s/rotate" % name)


def configure(srv, name, **body):
    return call(srv, "POST", "/v1/transit/keys/%s/config" % name, body)


def encrypt(srv, name, pt, **extra):
    body = {"plaintext": b64(pt)}
    body.update(extra)
    return call(srv, "POST", "/v1/transit/encrypt/" + name, body)


def decrypt(srv, name, ct):
    return unb64(call(srv, "POST", "/v1/transit/decrypt/" + name, {"ciphertext": ct})["plaintext"])


def kms(srv, method, path, body=None, status=200):
    r = srv.request(method, "/kms/api/v2/keys" + path, json=body, token=False,
                    headers={"Authorization": "Bearer " + srv.token})
    assert r.status_code == status, describe(r)
    return r.json() if r.content else None


def kms_create(srv, name, **resource):
    resource.update({"type": "application/vnd.ibm.kms.key+json", "name": name})
    body = {"metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
            "resources": [resource]}
    return kms(srv, "POST", "", body, status=201)["resources"][0]


def list_keys(srv):
    r = srv.request("LIST", "/v1/transit/keys")
    if r.status_code == 404:
        return []
    assert r.status_code == 200, describe(r)
    return r.json()["data"]["keys"]


# -- (a) restart -----------------------------------------------------------------------------

def test_dev_mode_banner_and_files():
    with tl.DevServer() as srv:
        log = srv.log()
        assert "Root Token: %s" % srv.token in log
        assert "export VAULT_ADDR='http://127.0.0.1:%d'" % srv.port in log
        assert "export VAULT_TOKEN='%s'" % srv.token in log
        assert "==> p11kms server started! Log data will stream in below:" in log
        for f in ("user.pin", "so.pin"):
            p = os.path.join(srv.data_dir, f)
            assert os.path.isfile(p), p
            assert stat.S_IMODE(os.stat(p).st_mode) == 0o600, "%s must be mode 0600" % p
        assert os.path.isfile(os.path.join(srv.data_dir, "softhsm2.conf"))
        assert os.path.isdir(os.path.join(srv.data_dir, "tokens"))
        assert os.path.isfile(os.path.join(srv.data_dir, "p11kms.db"))
        assert srv.stop() == 0, "SIGTERM must shut down cleanly with exit 0"


def test_restart_keeps_keys_versions_config_and_ciphertexts():
    with tl.DevServer() as srv:
        a, b = unique_name("rs"), unique_name("rs")
        create(srv, a)
        create(srv, b, "aes128-gcm96")
        ct_a1 = encrypt(srv, a, b"before rotate")["ciphertext"]
        assert ct_a1.startswith("vault:v1:")
        rotate(srv, a)
        ct_a2 = encrypt(srv, a, b"after rotate")["ciphertext"]
        assert ct_a2.startswith("vault:v2:")
        rotate(srv, a)
        configure(srv, a, min_decryption_version=1, min_encryption_version=2,
                  deletion_allowed=True)
        ct_b1 = encrypt(srv, b, b"aes128 data")["ciphertext"]
        dk = call(srv, "POST", "/v1/transit/datakey/plaintext/" + b, {"bits": 512})
        info_before = {n: read(srv, n) for n in (a, b)}
        list_before = list_keys(srv)

        srv.restart()
        assert srv.exit_codes[-1] == 0, "SIGTERM must shut down cleanly with exit 0"

        assert list_keys(srv) == list_before
        for n in (a, b):
            assert read(srv, n) == info_before[n], "key info of %s changed across restart" % n
        assert decrypt(srv, a, ct_a1) == b"before rotate"
        assert decrypt(srv, a, ct_a2) == b"after rotate"
        assert decrypt(srv, b, ct_b1) == b"aes128 data"
        assert decrypt(srv, b, dk["ciphertext"]) == unb64(dk["plaintext"])
        # config still enforced, versions keep counting from where they were
        r = srv.request("POST", "/v1/transit/encrypt/" + a,
                        json={"plaintext": b64("x"), "key_version": 1})
        assert r.status_code == 400, describe(r)
        assert encrypt(srv, a, b"latest")["ciphertext"].startswith("vault:v3:")
        assert rotate(srv, a)["latest_version"] == 4
        ct_a4 = encrypt(srv, a, b"v4")["ciphertext"]
        assert ct_a4.startswith("vault:v4:")
        rewrapped = call(srv, "POST", "/v1/transit/rewrap/" + a, {"ciphertext": ct_a1})
        assert rewrapped["ciphertext"].startswith("vault:v4:")
        assert decrypt(srv, a, rewrapped["ciphertext"]) == b"before rotate"

        # a second restart sees what was done after the first
        srv.restart()
        assert srv.exit_codes[-1] == 0
        assert read(srv, a)["latest_version"] == 4
        assert decrypt(srv, a, ct_a4) == b"v4"
        assert decrypt(srv, a, ct_a1) == b"before rotate"


# -- (b) custody -----------------------------------------------------------------------------

# Runs in its own /usr/bin/python3 so SOFTHSM2_CONF applies before libsofthsm2 is loaded.
# argv: module, token label. The user PIN comes from the environment, never argv.
INSPECT_TOKEN = r'''
import json, os, sys
import PyKCS11
from PyKCS11 import LowLevel as LL

module, label = sys.argv[1], sys.argv[2]
pin = os.environ["P11KMS_TEST_USER_PIN"]
lib = PyKCS11.PyKCS11Lib()
lib.load(module)
labels, slot = [], None
for s in lib.getSlotList(tokenPresent=True):
    tl = lib.getTokenInfo(s).label.strip()
    labels.append(tl)
    if tl == label:
        slot = s
if slot is None:
    print(json.dumps({"error": "token %r not found; tokens: %r" % (label, labels)}))
    sys.exit(0)
session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
session.login(pin)

BOOLS = ["CKA_TOKEN", "CKA_PRIVATE", "CKA_SENSITIVE", "CKA_EXTRACTABLE", "CKA_ENCRYPT",
         "CKA_DECRYPT", "CKA_WRAP", "CKA_UNWRAP", "CKA_SIGN", "CKA_VERIFY", "CKA_DERIVE",
         "CKA_ALWAYS_SENSITIVE", "CKA_NEVER_EXTRACTABLE", "CKA_LOCAL", "CKA_SIGN_RECOVER",
         "CKA_VERIFY_RECOVER"]

def one(obj, name):
    try:
        v = session.getAttributeValue(obj, [getattr(PyKCS11, name)])[0]
    except PyKCS11.PyKCS11Error:
        return None
    return v

out = []
for obj in session.findObjects([]):
    rec = {}
    cls = one(obj, "CKA_CLASS")
    rec["class"] = PyKCS11.CKO[cls] if cls is not None else None
    kt = one(obj, "CKA_KEY_TYPE")
    rec["key_type"] = PyKCS11.CKK[kt] if kt is not None else None
    rec["label"] = one(obj, "CKA_LABEL")
    cid = one(obj, "CKA_ID")
    rec["id"] = bytes(cid).hex() if cid is not None else None
    rec["value_len"] = one(obj, "CKA_VALUE_LEN")
    for b in BOOLS:
        rec[b] = one(obj, b)
    value = one(obj, "CKA_VALUE")
    rec["value_readable"] = value is not None and len(value) > 0
    out.append(rec)
session.logout()
session.closeSession()
print(json.dumps({"token_labels": labels, "objects": out}))
'''


def inspect_token(data_dir, pin):
    env = dict(os.environ)
    env["SOFTHSM2_CONF"] = os.path.join(data_dir, "softhsm2.conf")
    env["P11KMS_TEST_USER_PIN"] = pin
    p = subprocess.run([PYTHON, "-c", INSPECT_TOKEN, tl.SOFTHSM_MODULE, tl.DEV_TOKEN_LABEL],
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=300)
    assert p.returncode == 0, "token inspection failed:\n%s" % p.stderr.decode(errors="replace")
    result = json.loads(p.stdout.decode())
    assert "error" not in result, result.get("error")
    return result["objects"]


def store_bytes(data_dir):
    """Every SQLite file of the store: the database, its -wal, -shm and -journal if present."""
    blobs = {}
    for f in sorted(os.listdir(data_dir)):
        if f.startswith("p11kms.db"):
            with open(os.path.join(data_dir, f), "rb") as fh:
                blobs[f] = fh.read()
    assert "p11kms.db" in blobs, "no SQLite store at %s/p11kms.db" % data_dir
    return blobs


def forms(secret):
    """The ways a secret could be written down: raw, base64, hex (both cases)."""
    return [secret, base64.b64encode(secret), secret.hex().encode(), secret.hex().upper().encode()]


def assert_absent(secrets, blobs, what):
    for label, secret in secrets:
        for form in forms(secret):
            for fname, blob in blobs.items():
                assert form not in blob, "%s: %s (%r...) found in %s" % (
                    what, label, form[:12], fname)


def test_key_custody_token_objects_store_and_log():
    srv = tl.DevServer()
    srv.start()
    try:
        _custody_scenario(srv)
    except BaseException:
        srv.stop()
        sys.__stderr__.write("\n--- p11kms server log tail (%s) ---\n%s\n"
                             % (srv.log_path, srv.log_tail()))
        raise
    finally:
        srv.cleanup()


def _custody_scenario(srv):
    k128, k256, krot, kgone = (unique_name(p) for p in ("c128", "c256", "crot", "cgone"))
    types = {k128: "aes128-gcm96", k256: "aes256-gcm96", krot: "aes256-gcm96"}
    create(srv, k128, "aes128-gcm96")
    create(srv, k256)                      # default type aes256-gcm96
    create(srv, krot, "aes256-gcm96")
    rotate(srv, krot)
    rotate(srv, krot)
    rotate(srv, k128)
    create(srv, kgone, "aes128-gcm96")
    rotate(srv, kgone)

    secrets = []                           # (description, bytes) that must never be stored
    for name in (k128, k256, krot, kgone):
        for bits in (256, 512, 128):
            # use the Bearer header for some requests, so both auth paths are exercised
            hdr = {"Authorization": "Bearer " + srv.token} if bits == 512 else None
            d = call(srv, "POST", "/v1/transit/datakey/plaintext/" + name, {"bits": bits},
                     token=hdr is None, headers=hdr)
            key = unb64(d["plaintext"])
            assert len(key) == bits // 8
            secrets.append(("datakey %s/%d" % (name, bits), key))
            assert decrypt(srv, name, d["ciphertext"]) == key
        marker = os.urandom(24)
        ct = encrypt(srv, name, marker)["ciphertext"]
        assert decrypt(srv, name, ct) == marker
        secrets.append(("plaintext sent to encrypt %s" % name, marker))

    # Key Protect dialect: a generated root key (rotated), an imported root key and a standard
    # key; the imported material, the standard key and every DEK must stay out of store and log.
    kroot, kimp, kstd = (unique_name(p) for p in ("kroot", "kimp", "kstd"))
    imported, std_material = os.urandom(32), os.urandom(64)
    root_id = kms_create(srv, kroot)["id"]
    kms_create(srv, kimp, payload=b64(imported))
    std_id = kms_create(srv, kstd, extractable=True, payload=b64(std_material))["id"]
    secrets += [("imported root key", imported), ("standard key material", std_material)]
    types.update({kroot: "aes256-gcm96", kimp: "aes256-gcm96", kstd: "standard"})
    assert unb64(kms(srv, "GET", "/" + std_id)["resources"][0]["payload"]) == std_material
    wrapped = []
    for i in range(3):
        dek = os.urandom(32)
        secrets.append(("DEK %d" % i, dek))
        w = kms(srv, "POST", "/%s?action=wrap" % root_id, {"plaintext": b64(dek), "aad": ["custody"]})
        wrapped.append((dek, w["ciphertext"]))
        if i == 1:
            kms(srv, "POST", "/%s?action=rotate" % root_id, status=204)
    generated = kms(srv, "POST", "/%s?action=wrap" % kimp, {})
    secrets.append(("generated DEK", unb64(generated["plaintext"])))
    wrapped_imp = generated["ciphertext"]
    for dek, ct in wrapped:
        u = kms(srv, "POST", "/%s?action=unwrap" % root_id, {"ciphertext": ct, "aad": ["custody"]})
        assert unb64(u["plaintext"]) == dek
    assert unb64(kms(srv, "POST", "/%s?action=unwrap" % kimp, {"ciphertext": wrapped_imp})["plaintext"]) \
        == unb64(generated["plaintext"])

    # Transit signing and HMAC keys: key pairs and generic secrets in the token; an HMAC on an
    # AES key makes that version's HMAC key object (label .../v1/hmac). Exportable keys stay
    # sealed in the store: what export returns must appear nowhere in the store or the log.
    kec, ked, krsa, khm, kexp_ec, kexp_aes = (unique_name(p) for p in ("cec", "ced", "crsa", "chm", "cxec", "cxaes"))
    create(srv, kec, "ecdsa-p384")
    create(srv, ked, "ed25519")
    create(srv, krsa, "rsa-2048")
    call(srv, "POST", "/v1/transit/keys/" + khm, {"type": "hmac", "key_size": 48})
    rotate(srv, kec)
    types.update({kec: "ecdsa-p384", ked: "ed25519", krsa: "rsa-2048", khm: "hmac",
                  kexp_ec: "ecdsa-p256", kexp_aes: "aes256-gcm96"})
    for name in (kec, ked, krsa):
        sig = call(srv, "POST", "/v1/transit/sign/" + name, {"input": b64("custody")})["signature"]
        assert call(srv, "POST", "/v1/transit/verify/" + name,
                    {"input": b64("custody"), "signature": sig})["valid"] is True
    for name in (khm, k256):
        mac = call(srv, "POST", "/v1/transit/hmac/" + name, {"input": b64("custody")})["hmac"]
        assert call(srv, "POST", "/v1/transit/verify/" + name,
                    {"input": b64("custody"), "hmac": mac})["valid"] is True
    call(srv, "POST", "/v1/transit/keys/" + kexp_ec, {"type": "ecdsa-p256", "exportable": True})
    call(srv, "POST", "/v1/transit/keys/" + kexp_aes, {"exportable": True})
    call(srv, "POST", "/v1/transit/sign/" + kexp_ec, {"input": b64("x")})
    call(srv, "POST", "/v1/transit/hmac/" + kexp_aes, {"input": b64("x")})
    exp_ct = encrypt(srv, kexp_aes, b"exportable")["ciphertext"]
    assert decrypt(srv, kexp_aes, exp_ct) == b"exportable"
    pem = call(srv, "GET", "/v1/transit/export/signing-key/%s/1" % kexp_ec)["keys"]["1"]
    from cryptography.hazmat.primitives import serialization
    priv = serialization.load_pem_private_key(pem.encode(), password=None)
    d = priv.private_numbers().private_value.to_bytes(32, "big")
    aes = unb64(call(srv, "GET", "/v1/transit/export/encryption-key/%s/latest" % kexp_aes)["keys"]["1"])
    hk = unb64(call(srv, "GET", "/v1/transit/export/hmac-key/%s/1" % kexp_aes)["keys"]["1"])
    secrets += [("exported EC private scalar", d), ("exported AES key", aes), ("exported HMAC key", hk),
                ("exported PEM body", pem.encode().split(b"\n")[1])]
    r = srv.request("GET", "/v1/transit/export/encryption-key/" + k256)
    assert r.status_code == 400, describe(r)

    # Derived keys (the version object only derives; derived keys are session objects) and
    # imported keys (unwrapped inside the token from Vault's BYOK format), plus a bad import
    # that must leave nothing behind, and a trim that must destroy the trimmed versions' objects.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
    kder, kconv, kimp_aes, kimp_ec, kbad, ktrim = (unique_name(p) for p in ("cder", "cconv", "cimpa", "cimpe", "cbad", "ctrim"))
    call(srv, "POST", "/v1/transit/keys/" + kder, {"derived": True})
    call(srv, "POST", "/v1/transit/keys/" + kconv, {"derived": True, "convergent_encryption": True})
    for name in (kder, kconv):
        marker = os.urandom(24)
        ct = encrypt(srv, name, marker, context=b64("ctx"))["ciphertext"]
        assert unb64(call(srv, "POST", "/v1/transit/decrypt/" + name,
                          {"ciphertext": ct, "context": b64("ctx")})["plaintext"]) == marker
        secrets.append(("plaintext sent to derived %s" % name, marker))
    pub = serialization.load_pem_public_key(call(srv, "GET", "/v1/transit/wrapping_key")["public_key"].encode())

    def wrapped(material, h=hashes.SHA256):
        eph = os.urandom(32)
        secrets.append(("ephemeral import key", eph))
        rsa_part = pub.encrypt(eph, padding.OAEP(mgf=padding.MGF1(h()), algorithm=h(), label=None))
        return base64.b64encode(rsa_part + aes_key_wrap_with_padding(eph, material)).decode()
    imp_aes = os.urandom(32)
    ec_priv = ec.generate_private_key(ec.SECP256R1())
    ec_der = ec_priv.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption())
    secrets += [("imported transit AES key", imp_aes),
                ("imported EC scalar", ec_priv.private_numbers().private_value.to_bytes(32, "big"))]
    call(srv, "POST", "/v1/transit/keys/%s/import" % kimp_aes, {"ciphertext": wrapped(imp_aes)}, status=204)
    call(srv, "POST", "/v1/transit/keys/%s/import" % kimp_ec,
         {"ciphertext": wrapped(ec_der, hashes.SHA1), "hash_function": "SHA1", "type": "ecdsa-p256"}, status=204)
    assert decrypt(srv, kimp_aes, encrypt(srv, kimp_aes, b"imp")["ciphertext"]) == b"imp"
    sig = call(srv, "POST", "/v1/transit/sign/" + kimp_ec, {"input": b64("imp")})["signature"]
    assert call(srv, "POST", "/v1/transit/verify/" + kimp_ec, {"input": b64("imp"), "signature": sig})["valid"] is True
    bad = base64.b64decode(wrapped(os.urandom(32)))
    r = srv.request("POST", "/v1/transit/keys/%s/import" % kbad,
                    json={"ciphertext": base64.b64encode(bad[:-1] + bytes([bad[-1] ^ 1])).decode()})
    assert r.status_code == 400, describe(r)
    create(srv, ktrim)
    rotate(srv, ktrim)
    rotate(srv, ktrim)
    call(srv, "POST", "/v1/transit/hmac/" + ktrim, {"input": b64("x"), "key_version": 1})
    configure(srv, ktrim, min_decryption_version=3, min_encryption_version=3)
    assert call(srv, "POST", "/v1/transit/keys/%s/trim" % ktrim, {"min_available_version": 3})["min_available_version"] == 3
    types.update({kder: "aes256-gcm96", kconv: "aes256-gcm96", kimp_aes: "aes256-gcm96", kimp_ec: "ecdsa-p256",
                  ktrim: "aes256-gcm96"})

    configure(srv, kgone, deletion_allowed=True)
    r = srv.request("DELETE", "/v1/transit/keys/" + kgone)
    assert r.status_code == 204, describe(r)

    wrong_token = tl.random_token()
    r = srv.request("GET", "/v1/transit/keys/" + k128, token=wrong_token)
    assert r.status_code == 403, describe(r)

    live = sorted(list_keys(srv))
    assert kgone not in live
    assert set(live) == {k128, k256, krot, kroot, kimp, kstd, kec, ked, krsa, khm, kexp_ec, kexp_aes,
                         kder, kconv, kimp_aes, kimp_ec, ktrim}, live
    expected = set()
    for name in live:
        info = read(srv, name)
        assert info["type"] == types[name]
        # standard and exportable keys are sealed in the store, not token objects
        if info["type"] != "standard" and not info["exportable"]:
            expected |= {(name, int(v), False) for v in info["keys"]}
    expected |= {(k256, 1, True)}   # the HMAC key made by /hmac on an AES key
    assert expected == {(k128, 1, False), (k128, 2, False), (k256, 1, False), (krot, 1, False),
                        (krot, 2, False), (krot, 3, False), (kroot, 1, False), (kroot, 2, False),
                        (kimp, 1, False), (kec, 1, False), (kec, 2, False), (ked, 1, False),
                        (krsa, 1, False), (khm, 1, False), (k256, 1, True),
                        (kder, 1, False), (kconv, 1, False), (kimp_aes, 1, False), (kimp_ec, 1, False),
                        (ktrim, 3, False)}

    # the store, while the server runs (recent writes sit in the WAL)
    assert_absent(secrets + [("root token", srv.token.encode())], store_bytes(srv.data_dir),
                  "store (running)")

    rc = srv.stop()
    assert rc == 0, "SIGTERM must shut down cleanly with exit 0"

    # the store after a clean shutdown (WAL checkpointed or not)
    blobs = store_bytes(srv.data_dir)
    assert_absent(secrets + [("root token", srv.token.encode())], blobs, "store (stopped)")

    # the log: no key material, no plaintext, no tokens except the dev banner, no PIN
    log_blob = {"server log": srv.log_bytes()}
    assert_absent(secrets + [("wrong token", wrong_token.encode())], log_blob, "log")
    for line in srv.log().splitlines():
        if srv.token in line:
            banner = line.strip()
            assert banner.startswith("Root Token: ") or banner.startswith("export VAULT_TOKEN="), \
                "root token appears in a log line other than the dev banner: %r" % line
    pin = srv.user_pin()
    assert pin, "empty user PIN in user.pin"
    log_text = srv.log()
    if len(pin) >= 8:
        assert pin not in log_text, "user PIN appears in the server log"
    else:
        assert not re.search(r"pin\W{0,3}" + re.escape(pin) + r"(?![0-9A-Za-z])", log_text, re.I), \
            "user PIN appears in the server log"

    # the token itself, opened with PyKCS11 while the server is down
    objects = inspect_token(srv.data_dir, pin)
    assert objects, "no objects on the dev token"
    keys = [o for o in objects if o["class"] in ("CKO_SECRET_KEY", "CKO_PRIVATE_KEY")]
    assert keys, "no secret or private key objects on the dev token"
    for o in keys:
        what = "%s %r" % (o["class"], o["label"])
        assert o["CKA_EXTRACTABLE"] is False, what + " is extractable"
        assert o["CKA_SENSITIVE"] is True, what + " is not sensitive"
        assert o["CKA_TOKEN"] is True, what + " is not a token object"
        assert o["CKA_PRIVATE"] is True, what + " is not private"
        assert o["value_readable"] is False, what + " lets CKA_VALUE be read"

    versions = {}
    for o in objects:
        label = o["label"] or ""
        m = VERSION_LABEL_RE.match(label)
        if not m:
            assert not label.startswith("p11kms/root/"), "odd key-version label %r" % label
            continue
        key = (m.group(1), int(m.group(2)), m.group(3) is not None)
        assert key not in versions, "two token objects labelled %r" % label
        versions[key] = o
    assert set(versions) == expected, (
        "token key versions differ from the API's: only on token %s, missing on token %s"
        % (sorted(set(versions) - expected), sorted(expected - set(versions))))

    # the system keys: the master key and the transit wrapping key (its private half unwraps;
    # CKA_DECRYPT for raw RSA, as SoftHSM's OAEP takes only SHA-1), both non-extractable
    wrapping = [o for o in keys if o["label"] == "p11kms-system/transit-wrapping-key"]
    assert len(wrapping) == 1 and wrapping[0]["class"] == "CKO_PRIVATE_KEY", wrapping
    assert wrapping[0]["CKA_UNWRAP"] is True and wrapping[0]["CKA_SIGN"] is False, wrapping
    ids = set()
    for (name, v, is_hmac), o in sorted(versions.items()):
        what = "p11kms/root/%s/v%d%s" % (name, v, "/hmac" if is_hmac else "")
        kind = "hmac" if is_hmac else types[name]
        if name in (kder, kconv):
            # a derived key's version object only derives (C_DeriveKey); it never encrypts itself
            assert o["class"] == "CKO_SECRET_KEY" and o["key_type"] == "CKK_AES", what
            assert o["CKA_DERIVE"] is True, what
            for attr in ("CKA_ENCRYPT", "CKA_DECRYPT", "CKA_WRAP", "CKA_UNWRAP", "CKA_SIGN", "CKA_VERIFY"):
                assert o[attr] is False, "%s has %s true" % (what, attr)
            kind = "derived"
        if kind in ("ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"):
            # a private key that can only sign; its public half is not kept on the token
            assert o["class"] == "CKO_PRIVATE_KEY", what
            assert o["key_type"] == {"ecdsa-p256": "CKK_EC", "ecdsa-p384": "CKK_EC", "ed25519": "CKK_EC_EDWARDS",
                                     "rsa-2048": "CKK_RSA"}[kind], what
            assert o["CKA_SIGN"] is True, what
            for attr in ("CKA_DECRYPT", "CKA_UNWRAP", "CKA_DERIVE"):
                assert o[attr] is False, "%s has %s true" % (what, attr)
            if kind == "rsa-2048":
                assert o["CKA_SIGN_RECOVER"] is False, what
        elif kind == "derived":
            pass
        elif kind == "hmac":
            # a generic secret usable only for HMAC, at least 64 bytes (SoftHSM's minimum for sha2-512)
            assert o["class"] == "CKO_SECRET_KEY", what
            assert o["key_type"] == "CKK_GENERIC_SECRET", what
            assert o["value_len"] >= 64, "%s: CKA_VALUE_LEN %r" % (what, o["value_len"])
            assert o["CKA_SIGN"] is True and o["CKA_VERIFY"] is True, what
            for attr in ("CKA_ENCRYPT", "CKA_DECRYPT", "CKA_WRAP", "CKA_UNWRAP", "CKA_DERIVE"):
                assert o[attr] is False, "%s has %s true" % (what, attr)
        else:
            assert o["class"] == "CKO_SECRET_KEY", what
            assert o["key_type"] == "CKK_AES", what
            # SoftHSM records no CKA_VALUE_LEN for an unwrapped key (the import checks the size)
            assert o["value_len"] == (0 if name == kimp_aes else 16 if types[name] == "aes128-gcm96" else 32), \
                "%s: CKA_VALUE_LEN %r for %s" % (what, o["value_len"], types[name])
            assert o["CKA_ENCRYPT"] is True and o["CKA_DECRYPT"] is True, what
            for attr in ("CKA_WRAP", "CKA_UNWRAP", "CKA_SIGN", "CKA_VERIFY", "CKA_DERIVE"):
                assert o[attr] is False, "%s has %s true" % (what, attr)
        if name not in (kimp, kimp_aes, kimp_ec):   # an imported key's value came from outside, by definition
            assert o["CKA_ALWAYS_SENSITIVE"] is True, what + " was not always sensitive"
            assert o["CKA_NEVER_EXTRACTABLE"] is True, what + " was extractable at some point"
        assert o["id"] and len(bytes.fromhex(o["id"])) == 16, "%s: CKA_ID %r" % (what, o["id"])
        assert o["id"] not in ids, what + " shares its CKA_ID"
        ids.add(o["id"])
        # the store records each version's CKA_ID (in some encoding)
        raw = bytes.fromhex(o["id"])
        as_uuid = "%s-%s-%s-%s-%s" % (o["id"][:8], o["id"][8:12], o["id"][12:16],
                                      o["id"][16:20], o["id"][20:])
        candidates = forms(raw) + [as_uuid.encode(), as_uuid.upper().encode()]
        assert any(c in blob for c in candidates for blob in blobs.values()), \
            what + ": its CKA_ID is not recorded in the store"
