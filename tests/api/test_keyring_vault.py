"""Kong keyring, `vault` strategy, end to end on `p11kms server -config` (own SoftHSM token and
SQLite store): the root namespace's keyring is read from a Vault KV version 2 secret in Kong's
layout (each version holds `id` and `key`, every live version is a key, the latest is active)
at start-up and on `POST /keyring/vault/sync`.

Vault itself cannot be installed here, so this test starts a small KV v2 responder of its own
(python http.server in a thread) that serves what p11kms reads, as Vault answers it:
`GET /v1/secret/metadata/<path>` (versions with deletion_time/destroyed) and
`GET /v1/secret/data/<path>?version=N`, checks the `X-Vault-Token` header (403
`{"errors": ["permission denied"]}` otherwise, as Vault does), and 404 for anything else. It is
a stand-in for Vault's documented KV v2 API, not Vault.

Checked: start-up read; a new version becomes active on sync; deleted (past deletion_time) and
destroyed versions are removed, a future deletion_time is still live; wrong token (502),
responder down (503), a hanging responder (503 after the client timeout), and malformed
secrets (502) leave the keyring unchanged; the cluster-only routes answer 400 and change
nothing; sync from another namespace is 400; sync needs `update`; start-up with Vault down
still starts; the Vault token is never in the server log; no key byte reaches any file.
"""

import base64
import json
import os
import re
import secrets
import string
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import p11kms_testlib as tl  # noqa: E402
import configured_server as cs  # noqa: E402

SECRET_PATH = "kong/keyring"
KEYS = []  # every key the responder served: none may reach a file


def new_id():
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))


def rfc3339(dt):
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


class KvV2Responder:
    """A KV v2 secret at secret/<SECRET_PATH>, served the way Vault's HTTP API serves it."""

    def __init__(self, token):
        self.token = token
        self.port = cs.free_port()
        self.versions = {}  # n -> {"data", "created_time", "deletion_time", "destroyed"}
        self.requests = []  # (path, X-Vault-Token)
        self.hang = threading.Event()  # set: requests hang until released
        self.release = threading.Event()
        self.httpd = None
        self.thread = None

    def put(self, data):
        n = max(self.versions, default=0) + 1
        self.versions[n] = {"data": data, "created_time": rfc3339(datetime.now(timezone.utc)),
                            "deletion_time": "", "destroyed": False}
        if "key" in data and isinstance(data["key"], str):
            try:
                KEYS.append(base64.b64decode(data["key"]))
            except ValueError:
                pass
        return n

    def put_key(self):
        kid, key = new_id(), secrets.token_bytes(32)
        KEYS.append(key)
        self.put({"id": kid, "key": base64.b64encode(key).decode()})
        return kid

    def delete(self, n, when=None):
        when = when or datetime.now(timezone.utc) - timedelta(seconds=1)
        self.versions[n]["deletion_time"] = rfc3339(when)
        self.versions[n]["deleted_at"] = when

    def destroy(self, n):
        self.versions[n]["destroyed"] = True
        self.versions[n]["data"] = None

    def handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status, body):
                raw = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                u = urlsplit(self.path)
                outer.requests.append((self.path, self.headers.get("X-Vault-Token")))
                if outer.hang.is_set():
                    outer.release.wait(30)
                if self.headers.get("X-Vault-Token") != outer.token:
                    return self.answer(403, {"errors": ["permission denied"]})
                if not outer.versions:
                    return self.answer(404, {"errors": []})
                if u.path == "/v1/secret/metadata/" + SECRET_PATH:
                    vs = {str(n): {k: v[k] for k in ("created_time", "deletion_time", "destroyed")}
                          for n, v in outer.versions.items()}
                    return self.answer(200, {"request_id": "r", "data": {
                        "current_version": max(outer.versions), "oldest_version": 0, "max_versions": 0,
                        "versions": vs}})
                if u.path == "/v1/secret/data/" + SECRET_PATH:
                    n = int(parse_qs(u.query).get("version", [max(outer.versions)])[0])
                    v = outer.versions.get(n)
                    if v is None:
                        return self.answer(404, {"errors": []})
                    meta = {"created_time": v["created_time"], "deletion_time": v["deletion_time"],
                            "destroyed": v["destroyed"], "version": n, "custom_metadata": None}
                    if v["destroyed"] or v.get("deleted_at", datetime.max.replace(tzinfo=timezone.utc)) <= \
                            datetime.now(timezone.utc):
                        return self.answer(404, {"data": None, "metadata": meta})
                    return self.answer(200, {"request_id": "r", "data": {"data": v["data"], "metadata": meta}})
                return self.answer(404, {"errors": []})

        return Handler

    def start(self):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        if self.httpd:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(10)
            self.httpd = None


class VaultInstance:
    """A p11kms server with keyring.strategy vault reading the responder's secret. Tokens: admin
    (root policy, every namespace) and reader (read on keyring*, namespace root)."""

    def __init__(self, root, responder, vault_token):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.vault_token = vault_token
        with open(os.path.join(root, "vault.token"), "w") as f:
            f.write(vault_token + "\n")
        self.admin, self.reader = tl.random_token(), tl.random_token()
        extra = ("    - {name: reader, token_sha256: %s, policies: [keyring-reader]}\n"
                 "    - {name: any-ns, token_sha256: %s, policies: [root], namespaces: ['*']}\n"
                 "policies:\n  keyring-reader:\n    - path: keyring*\n      capabilities: [read]\n"
                 "keyring:\n  strategy: vault\n  vault:\n    address: http://127.0.0.1:%d\n"
                 "    path: %s\n    token_file: vault.token\n"
                 % (cs.token_hash(self.reader), cs.token_hash(self.admin), responder.port, SECRET_PATH))
        self.server, self.config, self.soft = cs.configured(root, [("admin", tl.random_token())], extra)
        self.server.token = self.admin

    def req(self, method, path, body=None, token=None, ns=None, timeout=60):
        headers = {"X-Vault-Token": token or self.admin}
        if ns:
            headers["X-Vault-Namespace"] = ns
        return requests.request(method, self.server.url + path, json=body, headers=headers, timeout=timeout)

    def keyring(self):
        r = self.req("GET", "/keyring")
        assert r.status_code == 200, tl.describe(r)
        return r.json()

    def sync(self):
        return self.req("POST", "/keyring/vault/sync")


def kong_error(resp, status, needle):
    assert resp.status_code == status, tl.describe(resp)
    body = resp.json()
    assert isinstance(body.get("message"), str), body
    assert needle.lower() in body["message"].lower(), body
    return body["message"]


@pytest.fixture(scope="module")
def world():
    tmp = tempfile.mkdtemp(prefix="p11kms-keyring-vault-")
    vault_token = "hvs." + secrets.token_urlsafe(24)
    kv = KvV2Responder(vault_token).start()
    first, second = kv.put_key(), kv.put_key()
    inst = VaultInstance(os.path.join(tmp, "v"), kv, vault_token)
    inst.server.start()
    try:
        yield {"kv": kv, "inst": inst, "tmp": tmp, "first": first, "second": second}
    finally:
        inst.server.stop()
        kv.release.set()
        kv.stop()
        if not os.environ.get("P11KMS_KEEP_TMP"):
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, world):
    yield from tl.log_tail_on_failure(request, world["inst"].server)


@pytest.fixture
def unchanged(world):
    """The keyring before the test body equals the keyring after it."""
    before = world["inst"].keyring()
    yield before
    assert world["inst"].keyring() == before


def test_startup_read(world):
    inst, kv = world["inst"], world["kv"]
    assert inst.keyring() == {"active": world["second"], "ids": [world["first"], world["second"]]}
    r = inst.req("GET", "/keyring/active")
    assert r.status_code == 200 and r.json() == {"id": world["second"]}, tl.describe(r)
    # KV v2's two reads, with the token from the file in X-Vault-Token.
    paths = [p for p, _ in kv.requests]
    assert "/v1/secret/metadata/" + SECRET_PATH in paths, paths
    assert "/v1/secret/data/%s?version=1" % SECRET_PATH in paths, paths
    assert all(t == inst.vault_token for _, t in kv.requests)
    assert "synced namespace root from Vault secret secret/%s" % SECRET_PATH in inst.server.log()


def test_new_version_becomes_active(world):
    inst, kv = world["inst"], world["kv"]
    third = kv.put_key()
    r = inst.sync()
    assert r.status_code == 204 and r.content == b"", tl.describe(r)
    assert inst.keyring() == {"active": third, "ids": [world["first"], world["second"], third]}
    assert inst.req("GET", "/keyring/active").json() == {"id": third}
    # A second sync with nothing new changes nothing.
    assert inst.sync().status_code == 204
    assert inst.keyring()["ids"] == [world["first"], world["second"], third]


def test_deleted_and_destroyed_versions_removed(world):
    inst, kv = world["inst"], world["kv"]
    ids = inst.keyring()["ids"]
    kv.delete(2)  # soft delete: deletion_time in the past
    assert inst.sync().status_code == 204
    assert inst.keyring()["ids"] == [i for i in ids if i != world["second"]]
    kv.destroy(1)
    assert inst.sync().status_code == 204
    assert world["first"] not in inst.keyring()["ids"]
    # delete_version_after: a deletion_time in the future is still live.
    fourth = kv.put_key()
    kv.delete(max(kv.versions), when=datetime.now(timezone.utc) + timedelta(hours=1))
    assert inst.sync().status_code == 204
    assert inst.keyring()["active"] == fourth
    # Deleting the latest live version makes the previous live one active.
    kv.delete(max(kv.versions))
    assert inst.sync().status_code == 204
    k = inst.keyring()
    assert fourth not in k["ids"] and k["active"] == k["ids"][-1], k


def test_wrong_token_leaves_keyring_unchanged(world, unchanged):
    inst, kv = world["inst"], world["kv"]
    kv.put_key()  # would change the keyring if it were read
    right, kv.token = kv.token, "hvs.another"
    try:
        msg = kong_error(inst.sync(), 502, "403")
        assert "permission denied" in msg and "keyring.vault.token_file" in msg, msg
    finally:
        kv.token = right
        kv.delete(max(kv.versions))


def test_vault_down_is_503_and_unchanged(world, unchanged):
    inst, kv = world["inst"], world["kv"]
    kv.stop()
    try:
        msg = kong_error(inst.sync(), 503, "cannot be reached")
        assert "127.0.0.1:%d" % kv.port in msg, msg
    finally:
        kv.start()
    assert inst.sync().status_code == 204


def test_vault_hanging_is_503_after_the_client_timeout(world, unchanged):
    inst, kv = world["inst"], world["kv"]
    kv.release.clear()
    kv.hang.set()
    try:
        t0 = time.monotonic()
        kong_error(inst.sync(), 503, "cannot be reached")
        assert time.monotonic() - t0 < 40
    finally:
        kv.hang.clear()
        kv.release.set()
    assert inst.sync().status_code == 204


@pytest.mark.parametrize("data, needle", [
    ({"id": "AAAAbbbb", "key": "not base64!"}, "not valid base64"),
    ({"id": "AAAAcccc", "key": base64.b64encode(b"k" * 16).decode()}, "32-byte"),
    ({"key": base64.b64encode(b"k" * 32).decode()}, "id"),
    ({"id": "short", "key": base64.b64encode(b"k" * 32).decode()}, "8 characters"),
    ({"id": "AAAAdddd"}, "key"),
    ({"id": "AAAAeeee", "key": 12}, "key"),
])
def test_malformed_secret_is_502_and_unchanged(world, unchanged, data, needle):
    inst, kv = world["inst"], world["kv"]
    n = kv.put(data)
    try:
        msg = kong_error(inst.sync(), 502, needle)
        assert "version %d" % n in msg, msg
    finally:
        kv.delete(n)
    assert inst.sync().status_code == 204


def test_same_id_with_two_keys_is_502(world, unchanged):
    inst, kv = world["inst"], world["kv"]
    kid = inst.keyring()["active"]
    n = kv.put({"id": kid, "key": base64.b64encode(secrets.token_bytes(32)).decode()})
    try:
        kong_error(inst.sync(), 502, "different keys")
    finally:
        kv.delete(n)


@pytest.mark.parametrize("path, body", [
    ("/keyring/generate", None),
    ("/keyring/remove", {"key": "AAAAAAAA"}),
    ("/keyring/import/raw", {"id": "AAAAAAAA", "data": base64.b64encode(b"k" * 32).decode()}),
    ("/keyring/import", {"data": base64.b64encode(b"x" * 600).decode()}),
    ("/keyring/export", None),
])
def test_cluster_routes_refused_under_vault(world, unchanged, path, body):
    r = world["inst"].req("POST", path, body)
    assert r.status_code == 400, tl.describe(r)
    assert r.json()["message"] == "only available with the cluster keyring strategy", r.json()


def test_remove_of_the_active_key_refused_too(world, unchanged):
    inst = world["inst"]
    kong_error(inst.req("POST", "/keyring/remove", {"key": inst.keyring()["active"]}), 400, "cluster keyring strategy")


def test_sync_in_another_namespace_is_400(world, unchanged):
    kong_error(world["inst"].req("POST", "/keyring/vault/sync", ns="team-a"), 400, "root")
    r = world["inst"].req("GET", "/keyring", ns="team-a")
    assert r.json() == {"active": None, "ids": []}, tl.describe(r)


def test_sync_needs_update(world, unchanged):
    inst = world["inst"]
    kong_error(inst.req("POST", "/keyring/vault/sync", token=inst.reader), 403, "permission denied")
    assert inst.req("GET", "/keyring", token=inst.reader).status_code == 200


def test_startup_with_vault_down_still_starts(tmp_path):
    vault_token = "hvs." + secrets.token_urlsafe(24)
    kv = KvV2Responder(vault_token)  # not started: connection refused
    inst = VaultInstance(str(tmp_path / "down"), kv, vault_token)
    inst.server.start()
    try:
        assert inst.keyring() == {"active": None, "ids": []}
        assert "start-up sync from Vault failed" in inst.server.log()
        kong_error(inst.sync(), 503, "cannot be reached")
        kv.start()
        kid = kv.put_key()
        assert inst.sync().status_code == 204
        assert inst.keyring() == {"active": kid, "ids": [kid]}
        # Vault says the secret does not exist: 502, keyring unchanged.
        kv.versions.clear()
        kong_error(inst.sync(), 502, "no secret")
        assert inst.keyring() == {"active": kid, "ids": [kid]}
    finally:
        inst.server.stop()
        kv.stop()
    assert vault_token not in inst.server.log()


def test_empty_or_missing_token_file_refused_at_start(tmp_path):
    kv = KvV2Responder("x")
    inst = VaultInstance(str(tmp_path / "empty"), kv, "")
    out = subprocess.run([tl.binary_path(), "server", "-config", inst.config], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=inst.soft.env(), timeout=60)
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "keyring.vault.token_file" in out.stderr.decode(), out.stderr
    os.remove(os.path.join(inst.root, "vault.token"))
    out = subprocess.run([tl.binary_path(), "server", "-config", inst.config], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=inst.soft.env(), timeout=60)
    assert out.returncode == 2 and b"keyring.vault.token_file" in out.stderr, (out.returncode, out.stderr)


def test_zz_token_and_keys_never_written(world):
    """Runs last (module order): the Vault token is in no file but its own token file, and no key
    the responder served (raw, base64, hex) is in any file under the instance's folder."""
    inst = world["inst"]
    token = inst.vault_token.encode()
    assert token not in inst.server.log().encode()
    needles = []
    for raw in KEYS:
        needles += [raw, base64.b64encode(raw), raw.hex().encode()]
    assert len(KEYS) >= 4
    checked = 0
    for dirpath, _, files in os.walk(inst.root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                content = f.read()
            checked += 1
            if name != "vault.token":
                assert token not in content, "the Vault token found in %s" % path
            for n in needles:
                assert n not in content, "keyring key material found in %s" % path
    assert checked >= 3
