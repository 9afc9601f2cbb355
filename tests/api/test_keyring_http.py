"""Kong keyring dialect (/keyring, cluster strategy) end to end, on `p11kms server -config`
instances with their own SoftHSM tokens and SQLite stores:

- B: its keyring import key made by `p11kms keyring init`; its export recipient is an RSA key
  this test holds (so the export format is checked byte by byte here).
- A: its export recipient is B's import key, so A's exports import on B (the round trip).

Also: every route's statuses and Kong's error shape, namespaces, policy (export needs sudo),
and custody (no keyring key, raw or base64, in any file under either instance's folder).
"""

import base64
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
import requests
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import p11kms_testlib as tl  # noqa: E402
import configured_server as cs  # noqa: E402

ID_RE = re.compile(r"^[A-Za-z0-9]{8}$")
SECRETS = []  # every keyring key (raw bytes) the suite has seen: none may reach disk or logs


def remember(b64text):
    raw = base64.b64decode(b64text)
    SECRETS.append(raw)
    return raw


def write_config(root, token_label, port, admin_sha, ops_sha, extra=""):
    path = os.path.join(root, "p11kms.yaml")
    with open(path, "w") as f:
        f.write("listen:\n  address: 127.0.0.1:%d\n"
                "hsm:\n  module: %s\n  token_label: %s\n  pin_file: user.pin\n  sessions: 2\n"
                "store:\n  path: p11kms.db\n"
                "auth:\n  tokens:\n"
                "    - {name: admin, token_sha256: %s, policies: [root], namespaces: ['*']}\n"
                "    - {name: ops, token_sha256: %s, policies: [keyring-ops]}\n"
                "policies:\n  keyring-ops:\n    - path: keyring*\n      capabilities: [read, update]\n"
                "%s" % (port, cs.SOFTHSM_MODULE, token_label, admin_sha, ops_sha, extra))
    return path


class Instance:
    def __init__(self, root, extra=""):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.soft = cs.SoftToken(root).init()
        self.soft.write_pin_file(os.path.join(root, "user.pin"))
        self.admin, self.ops = tl.random_token(), tl.random_token()
        self.port = cs.free_port()
        self.config = write_config(root, self.soft.label, self.port, cs.token_hash(self.admin),
                                   cs.token_hash(self.ops), extra)
        self.server = cs.ConfiguredServer(self.config, self.soft.env(), token=self.admin, port=self.port)

    def keyring_init(self, *flags):
        out = subprocess.run([tl.binary_path(), "keyring", "init", "-config", self.config] + list(flags),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=self.soft.env(), timeout=120)
        return out.returncode, out.stdout.decode(), out.stderr.decode()

    def keyring_init_cmd(self, *args):
        out = subprocess.run([tl.binary_path(), "keyring", args[0], "-config", self.config] + list(args[1:]),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=self.soft.env(), timeout=120)
        return out.returncode, out.stdout.decode(), out.stderr.decode()

    def req(self, method, path, body=None, token=None, ns=None):
        headers = {"X-Vault-Token": token or self.admin}
        if token == "":
            headers = {}
        if ns:
            headers["X-Vault-Namespace"] = ns
        return requests.request(method, self.server.url + path, json=body, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def world():
    tmp = tempfile.mkdtemp(prefix="p11kms-keyring-")
    # The recipient key B exports to: held by this test.
    test_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    b = Instance(os.path.join(tmp, "b"), "keyring:\n  strategy: cluster\n  recipient_public_key_file: test.pem\n")
    with open(os.path.join(b.root, "test.pem"), "wb") as f:
        f.write(test_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    rc, pem, err = b.keyring_init()
    assert rc == 0, err
    assert "created the keyring import key" in err, err
    rc2, pem2, err2 = b.keyring_init()
    assert rc2 == 0 and pem2 == pem, (err2, pem2)
    assert "nothing changed" in err2, err2
    b_pub = serialization.load_pem_public_key(pem.encode())
    assert isinstance(b_pub, rsa.RSAPublicKey) and b_pub.key_size >= 2048
    a = Instance(os.path.join(tmp, "a"), "keyring:\n  recipient_public_key_file: peer.pem\n")
    with open(os.path.join(a.root, "peer.pem"), "w") as f:
        f.write(pem)
    a.server.start()
    b.server.start()
    try:
        yield {"a": a, "b": b, "test_key": test_key, "b_pem": pem, "tmp": tmp}
    finally:
        a.server.stop()
        b.server.stop()
        if not os.environ.get("P11KMS_KEEP_TMP"):
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


def kong_error(resp, status, needle):
    assert resp.status_code == status, tl.describe(resp)
    body = resp.json()
    assert isinstance(body.get("message"), str), body
    assert needle.lower() in body["message"].lower(), body


def test_empty_keyring(world):
    a = world["a"]
    r = a.req("GET", "/keyring", ns="empty-ns")
    assert r.status_code == 200 and r.json() == {"active": None, "ids": []}, tl.describe(r)
    kong_error(a.req("GET", "/keyring/active", ns="empty-ns"), 404, "no active key")


def test_generate_becomes_active_and_lists_in_order(world):
    a = world["a"]
    ns = "gen"
    first = a.req("POST", "/keyring/generate", ns=ns)
    assert first.status_code == 201, tl.describe(first)
    body = first.json()
    assert set(body) == {"id", "key"} and ID_RE.match(body["id"]), body
    assert len(remember(body["key"])) == 32
    second = a.req("POST", "/keyring/generate", ns=ns).json()
    remember(second["key"])
    assert second["key"] != body["key"] and second["id"] != body["id"]
    r = a.req("GET", "/keyring", ns=ns).json()
    assert r == {"active": second["id"], "ids": [body["id"], second["id"]]}, r
    assert a.req("GET", "/keyring/active", ns=ns).json() == {"id": second["id"]}


def test_remove_rules(world):
    a = world["a"]
    ns = "rm"
    old = a.req("POST", "/keyring/generate", ns=ns).json()
    new = a.req("POST", "/keyring/generate", ns=ns).json()
    remember(old["key"]), remember(new["key"])
    kong_error(a.req("POST", "/keyring/remove", {"key": new["id"]}, ns=ns), 409, "active")
    kong_error(a.req("POST", "/keyring/remove", {"key": "zzzzzzzz"}, ns=ns), 404, "not found")
    kong_error(a.req("POST", "/keyring/remove", {}, ns=ns), 400, "key")
    r = a.req("POST", "/keyring/remove", {"key": old["id"]}, ns=ns)
    assert r.status_code == 204 and r.content == b"", tl.describe(r)
    assert a.req("GET", "/keyring", ns=ns).json() == {"active": new["id"], "ids": [new["id"]]}
    kong_error(a.req("POST", "/keyring/remove", {"key": old["id"]}, ns=ns), 404, "not found")


def test_import_raw_rules(world):
    a = world["a"]
    ns = "raw"
    k1, k2 = os.urandom(32), os.urandom(32)
    SECRETS.extend([k1, k2])
    r = a.req("POST", "/keyring/import/raw", {"id": "Raw00001", "data": tl.b64(k1)}, ns=ns)
    assert r.status_code == 201, tl.describe(r)
    assert a.req("GET", "/keyring", ns=ns).json() == {"active": "Raw00001", "ids": ["Raw00001"]}
    # Not empty any more: the next import is not made active.
    assert a.req("POST", "/keyring/import/raw", {"id": "Raw00002", "data": tl.b64(k2)}, ns=ns).status_code == 201
    before = a.req("GET", "/keyring", ns=ns).json()
    assert before == {"active": "Raw00001", "ids": ["Raw00001", "Raw00002"]}, before
    bad_id = a.req("POST", "/keyring/import/raw", {"id": "bad-id!!", "data": tl.b64(k1)}, ns=ns)
    kong_error(bad_id, 400, "id")
    assert bad_id.json()["name"] == "schema violation" and "id" in bad_id.json()["fields"], bad_id.json()
    kong_error(a.req("POST", "/keyring/import/raw", {"id": "Short", "data": tl.b64(k1)}, ns=ns), 400, "id")
    kong_error(a.req("POST", "/keyring/import/raw", {"id": "Raw00003", "data": tl.b64(k1[:16])}, ns=ns),
               400, "32-byte")
    kong_error(a.req("POST", "/keyring/import/raw", {"id": "Raw00003", "data": "%%%"}, ns=ns), 400, "base64")
    kong_error(a.req("POST", "/keyring/import/raw", {"id": "Raw00002", "data": tl.b64(os.urandom(32))}, ns=ns),
               409, "already exists")
    assert a.req("GET", "/keyring", ns=ns).json() == before  # nothing changed


def test_namespaces_have_separate_keyrings(world):
    a = world["a"]
    g = a.req("POST", "/keyring/generate", ns="team-x").json()
    remember(g["key"])
    assert g["id"] in a.req("GET", "/keyring", ns="team-x").json()["ids"]
    assert g["id"] not in a.req("GET", "/keyring", ns="team-y").json()["ids"]
    assert g["id"] not in a.req("GET", "/keyring").json()["ids"]


def test_auth_and_policy(world):
    a = world["a"]
    kong_error(a.req("GET", "/keyring", token=""), 401, "token")
    kong_error(a.req("GET", "/keyring", token="hvs.wrong"), 401, "token")
    # ops has read and update on keyring*, not sudo: export (sudo) is refused.
    g = a.req("POST", "/keyring/generate", token=a.ops)
    assert g.status_code == 201, tl.describe(g)
    remember(g.json()["key"])
    kong_error(a.req("POST", "/keyring/export", token=a.ops), 403, "permission denied")
    kong_error(a.req("GET", "/keyring", token=a.ops, ns="other"), 403, "namespace")


def test_vault_sync_refused_under_cluster(world):
    kong_error(world["a"].req("POST", "/keyring/vault/sync"), 400, "only available with the vault keyring strategy")


def test_import_needs_an_import_key(world):
    # A never ran `keyring init`.
    kong_error(world["a"].req("POST", "/keyring/import", {"data": tl.b64(b"x" * 600)}), 400, "keyring init")


def test_export_format_byte_by_byte(world):
    """B exports to the test's own RSA key: RSA-OAEP-SHA256(k=256 bytes) || IV(12) || GCM ct || tag(16)."""
    b, test_key = world["b"], world["test_key"]
    ns = "fmt"
    g = b.req("POST", "/keyring/generate", ns=ns).json()
    remember(g["key"])
    r = b.req("POST", "/keyring/export", ns=ns)
    assert r.status_code == 200 and set(r.json()) == {"data"}, tl.describe(r)
    blob = base64.b64decode(r.json()["data"], validate=True)
    cek = test_key.decrypt(blob[:256], padding.OAEP(mgf=padding.MGF1(hashes.SHA256()),
                                                    algorithm=hashes.SHA256(), label=None))
    assert len(cek) == 32
    doc = json.loads(AESGCM(cek).decrypt(blob[256:268], blob[268:], None))
    assert doc == {"version": 1, "active": g["id"], "keys": [{"id": g["id"], "key": g["key"]}]}, doc


def test_export_import_round_trip(world):
    a, b = world["a"], world["b"]
    ns = "rt"
    k1 = a.req("POST", "/keyring/generate", ns=ns).json()
    raw = os.urandom(32)
    SECRETS.append(raw)
    assert a.req("POST", "/keyring/import/raw", {"id": "Import01", "data": tl.b64(raw)}, ns=ns).status_code == 201
    k2 = a.req("POST", "/keyring/generate", ns=ns).json()
    remember(k1["key"]), remember(k2["key"])
    exp = a.req("POST", "/keyring/export", ns=ns)
    assert exp.status_code == 200, tl.describe(exp)
    data = exp.json()["data"]
    blob = base64.b64decode(data)
    assert len(blob) > 384 + 12 + 16  # B's import key is RSA-3072
    # B's keyring in that namespace already has a key of its own.
    own = b.req("POST", "/keyring/generate", ns=ns).json()
    remember(own["key"])
    r = b.req("POST", "/keyring/import", {"data": data}, ns=ns)
    assert r.status_code == 201, tl.describe(r)
    a_view = a.req("GET", "/keyring", ns=ns).json()
    b_view = b.req("GET", "/keyring", ns=ns).json()
    assert b_view["active"] == a_view["active"] == k2["id"], (a_view, b_view)
    assert set(b_view["ids"]) == set(a_view["ids"]) | {own["id"]}, (a_view, b_view)
    # The same export again: same ids with the same keys, 201 and nothing changes.
    again = b.req("POST", "/keyring/import", {"data": data}, ns=ns)
    assert again.status_code == 201, tl.describe(again)
    assert b.req("GET", "/keyring", ns=ns).json() == b_view
    # Tampered: a flipped byte in the GCM part, or in the RSA part: 400, nothing changes.
    for pos in (len(blob) - 5, 10):
        bad = bytearray(blob)
        bad[pos] ^= 0x01
        kong_error(b.req("POST", "/keyring/import", {"data": tl.b64(bytes(bad))}, ns=ns), 400, "does not open")
    kong_error(b.req("POST", "/keyring/import", {"data": tl.b64(blob[:100])}, ns=ns), 400, "too short")
    kong_error(b.req("POST", "/keyring/import", {"data": "%%%"}, ns=ns), 400, "base64")
    assert b.req("GET", "/keyring", ns=ns).json() == b_view


def test_import_conflict_imports_nothing(world):
    a, b = world["a"], world["b"]
    ns = "conflict"
    k = a.req("POST", "/keyring/generate", ns=ns).json()
    extra = a.req("POST", "/keyring/generate", ns=ns).json()
    remember(k["key"]), remember(extra["key"])
    data = a.req("POST", "/keyring/export", ns=ns).json()["data"]
    other = os.urandom(32)
    SECRETS.append(other)
    assert b.req("POST", "/keyring/import/raw", {"id": k["id"], "data": tl.b64(other)}, ns=ns).status_code == 201
    before = b.req("GET", "/keyring", ns=ns).json()
    kong_error(b.req("POST", "/keyring/import", {"data": data}, ns=ns), 409, "another key")
    assert b.req("GET", "/keyring", ns=ns).json() == before == {"active": k["id"], "ids": [k["id"]]}


def test_export_refused_without_recipient_on_other_instance(world, tmp_path):
    # A dev server has no keyring.recipient_public_key_file.
    with tl.DevServer() as dev:  # entering starts it
        r = requests.post(dev.url + "/keyring/export", headers={"X-Vault-Token": dev.token}, timeout=30)
        kong_error(r, 400, "keyring.recipient_public_key_file")


def test_keyring_init_force_makes_a_new_pair(world):
    # Runs last among the B tests that need B's key: a new pair means old exports no longer open.
    b = world["b"]
    b.server.stop()
    try:
        rc, pem, err = b.keyring_init("-force")
        assert rc == 0, err
        assert pem != world["b_pem"] and "BEGIN PUBLIC KEY" in pem, pem
        rc, pem2, _ = b.keyring_init()
        assert rc == 0 and pem2 == pem
    finally:
        b.server.start()


def test_import_key_from_pem_then_import_an_export_of_b(world):
    """`keyring import-key` on A with the test's RSA key (B's export recipient): B's export now
    imports on A. The CLI refuses a second key without -force, and a bad PEM."""
    a, b, test_key = world["a"], world["b"], world["test_key"]
    ns = "b-to-a"
    g = b.req("POST", "/keyring/generate", ns=ns).json()
    remember(g["key"])
    data = b.req("POST", "/keyring/export", ns=ns).json()["data"]
    pem_path = os.path.join(a.root, "import-key.pem")
    with open(pem_path, "wb") as f:
        f.write(test_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    bad_path = os.path.join(a.root, "bad.pem")
    with open(bad_path, "w") as f:
        f.write("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    a.server.stop()
    try:
        rc, _, err = a.keyring_init_cmd("import-key", bad_path)
        assert rc == 1 and "not a PEM private key" in err, err
        rc, pem, err = a.keyring_init_cmd("import-key", pem_path)
        assert rc == 0, err
        assert "shred" in err, err
        pub = serialization.load_pem_public_key(pem.encode())
        assert pub.public_numbers() == test_key.public_key().public_numbers()
        rc, _, err = a.keyring_init_cmd("import-key", pem_path)
        assert rc == 1 and "-force" in err, err
        rc, pem2, err = a.keyring_init()  # init prints the existing (imported) key
        assert rc == 0 and pem2 == pem and "nothing changed" in err, err
    finally:
        os.remove(pem_path)
        a.server.start()
    r = a.req("POST", "/keyring/import", {"data": data}, ns=ns)
    assert r.status_code == 201, tl.describe(r)
    assert a.req("GET", "/keyring", ns=ns).json() == {"active": g["id"], "ids": [g["id"]]}


def test_import_key_objects_are_non_extractable(world):
    """The keyring import keys (made by init on B, imported from PEM on A) are token objects:
    private, sensitive, non-extractable, decrypt/unwrap only."""
    for inst in (world["a"], world["b"]):
        inst.server.stop()
        try:
            env_conf = inst.soft.conf
            out = subprocess.run([sys.executable, "-c", CHECK_OBJECTS, env_conf, inst.soft.label, inst.soft.user_pin],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            assert out.returncode == 0, out.stderr.decode()
            found = json.loads(out.stdout)
            assert len(found) == 1, found
            assert found[0] == {"extractable": False, "sensitive": True, "decrypt": True, "sign": False,
                                "token": True}, found
        finally:
            inst.server.start()


CHECK_OBJECTS = r"""
import json, os, sys
os.environ["SOFTHSM2_CONF"] = sys.argv[1]
import PyKCS11
from PyKCS11 import *
lib = PyKCS11Lib(); lib.load("/usr/lib/softhsm/libsofthsm2.so")
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == sys.argv[2]][0]
s = lib.openSession(slot, CKF_SERIAL_SESSION); s.login(sys.argv[3])
out = []
for o in s.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_LABEL, "p11kms-system/keyring-import-key")]):
    v = s.getAttributeValue(o, [CKA_EXTRACTABLE, CKA_SENSITIVE, CKA_DECRYPT, CKA_SIGN, CKA_TOKEN])
    out.append(dict(zip(["extractable", "sensitive", "decrypt", "sign", "token"], [bool(x) for x in v])))
print(json.dumps(out))
"""


def test_zz_custody_no_keyring_key_on_disk_or_in_logs(world):
    """Every keyring key seen by the suite, raw or base64, is absent from every file under both
    instances' folders (SQLite store, token files, server logs)."""
    assert len(SECRETS) >= 10
    needles = []
    for raw in SECRETS:
        needles += [raw, base64.b64encode(raw), base64.urlsafe_b64encode(raw).rstrip(b"="), raw.hex().encode()]
    # The imported import key's private exponent (its PEM file was deleted by the test).
    d = world["test_key"].private_numbers().d
    d_bytes = d.to_bytes((d.bit_length() + 7) // 8, "big")
    needles += [d_bytes, base64.b64encode(d_bytes), d_bytes.hex().encode()]
    checked = 0
    for inst in (world["a"], world["b"]):
        for dirpath, _, files in os.walk(inst.root):
            for name in files:
                with open(os.path.join(dirpath, name), "rb") as f:
                    content = f.read()
                checked += 1
                for n in needles:
                    assert n not in content, "keyring key material found in %s" % os.path.join(dirpath, name)
    assert checked >= 6


# The vault strategy itself is tested in test_keyring_vault.py; here, its config refusals.
@pytest.mark.parametrize("extra, needle", [
    ("keyring:\n  strategy: vault\n", "keyring.vault"),
    ("keyring:\n  vault: {address: 'https://vault:8200', path: k, token_file: t}\n", "keyring.vault"),
    ("keyring:\n  strategy: vault\n  vault: {address: 'https://vault:8200', path: k}\n", "keyring.vault.token_file"),
    ("keyring:\n  strategy: other\n", "keyring.strategy"),
])
def test_bad_keyring_config_refused_at_start(tmp_path, extra, needle):
    inst = Instance(str(tmp_path / "v"), extra)
    out = subprocess.run([tl.binary_path(), "server", "-config", inst.config], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=inst.soft.env(), timeout=60)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert needle in out.stderr.decode(), out.stderr
