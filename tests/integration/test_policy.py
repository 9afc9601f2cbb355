"""Access control as a user configures it: tokens with policies (Vault path semantics),
namespaces, expiry, and SIGHUP reload, against a real server with a config file."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64  # noqa: E402
import configured_server as cs  # noqa: E402

TOKENS = {name: "tok-%s-%s" % (name, os.urandom(6).hex())
          for name in ("root", "app", "denier", "narrow", "viewer", "expired", "creator")}

POLICIES = """
policies:
  app:
    - path: transit/encrypt/app-*
      capabilities: [update]
    - path: transit/decrypt/app-*
      capabilities: [update]
    - path: transit/keys/+
      capabilities: [read]
    - path: transit/keys
      capabilities: [list]
  deny-orders:
    - path: transit/encrypt/app-orders
      capabilities: [deny]
  encrypt-all-but-app:
    - path: transit/encrypt/*
      capabilities: [deny]
    - path: transit/encrypt/app-*
      capabilities: [update]
  creator:
    - path: transit/keys/app-*
      capabilities: [create]
    - path: transit/encrypt/up-*
      capabilities: [create, update]
%s"""

ROTATE_GRANT = """  rotator:
    - path: transit/keys/+/rotate
      capabilities: [update]
"""


def config(port, extra_policies="", app_policies="[app]"):
    def tok(name, policies, namespaces, extra=""):
        return ("    - name: %s\n      token_sha256: %s\n      policies: %s\n      namespaces: %s\n%s"
                % (name, cs.token_hash(TOKENS[name]), policies, namespaces, extra))
    return (
        "listen:\n  address: 127.0.0.1:%d\n"
        "hsm:\n  module: %s\n  token_label: %s\n  pin_file: user.pin\n  sessions: 2\n"
        "store:\n  path: p11kms.db\n"
        "auth:\n  tokens:\n" % (port, cs.SOFTHSM_MODULE, LABEL[0])
        + tok("root", "[root]", '["*"]')
        + tok("app", app_policies, "[root, team-a]")
        + tok("denier", "[app, deny-orders]", "[root]")
        + tok("narrow", "[encrypt-all-but-app]", "[root]")
        + tok("viewer", "[kms-viewer]", "[root]")
        + tok("creator", "[creator, app]", "[root]")
        + tok("expired", "[root]", '["*"]', "      expires: 2020-01-01T00:00:00Z\n")
        + POLICIES % extra_policies)


LABEL = [None]


@pytest.fixture(scope="module")
def env():
    root = tempfile_dir()
    token = cs.SoftToken(root).init()
    LABEL[0] = token.label
    token.write_pin_file(os.path.join(root, "user.pin"))
    port = cs.free_port()
    path = os.path.join(root, "p11kms.yaml")
    with open(path, "w") as f:
        f.write(config(port))
    srv = cs.ConfiguredServer(path, token.env(), token=TOKENS["root"], port=port)
    srv.start()
    try:
        yield {"srv": srv, "path": path, "port": port, "root": root}
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def tempfile_dir():
    import tempfile
    return tempfile.mkdtemp(prefix="p11kms-policy-")


def call(env, who, method, path, body=None, ns=None):
    headers = {"X-Vault-Token": TOKENS[who]}
    if ns:
        headers["X-Vault-Namespace"] = ns
    return env["srv"].session.request(method, env["srv"].url + path, json=body, headers=headers, timeout=15)


def make_key(env, name, ns=None):
    r = call(env, "root", "POST", "/v1/transit/keys/" + name, {}, ns)
    assert r.status_code == 200, r.text


def encrypt(env, who, name, ns=None):
    return call(env, who, "POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"x")}, ns)


def test_policy_grants_exactly_its_paths_and_capabilities(env):
    make_key(env, "app-1")
    make_key(env, "other-1")
    assert encrypt(env, "app", "app-1").status_code == 200
    ct = encrypt(env, "app", "app-1").json()["data"]["ciphertext"]
    assert call(env, "app", "POST", "/v1/transit/decrypt/app-1", {"ciphertext": ct}).status_code == 200
    assert call(env, "app", "GET", "/v1/transit/keys/app-1").status_code == 200        # + matches one segment
    assert call(env, "app", "LIST", "/v1/transit/keys").status_code == 200
    assert call(env, "app", "GET", "/v1/transit/keys?list=true").status_code == 200
    for method, path, body in [
        ("POST", "/v1/transit/encrypt/other-1", {"plaintext": b64(b"x")}),  # outside app-*
        ("POST", "/v1/transit/keys/app-1/rotate", {}),                       # + is one segment only
        ("POST", "/v1/transit/keys/app-1/config", {"deletion_allowed": True}),
        ("DELETE", "/v1/transit/keys/app-1", None),
        ("POST", "/v1/transit/keys/app-new", {}),                           # no create
        ("POST", "/v1/transit/random/8", {}),
    ]:
        r = call(env, "app", method, path, body)
        assert r.status_code == 403, (method, path, r.status_code, r.text)
        assert r.json() == {"errors": ["permission denied"]}
    # Nothing changed behind the refusals.
    info = call(env, "root", "GET", "/v1/transit/keys/app-1").json()["data"]
    assert info["latest_version"] == 1 and info["deletion_allowed"] is False
    assert call(env, "root", "GET", "/v1/transit/keys/app-new").status_code == 404


def test_refusals_do_not_tell_whether_a_key_exists(env):
    make_key(env, "other-2")
    exists = encrypt(env, "app", "other-2")
    missing = encrypt(env, "app", "other-never-created")
    assert exists.status_code == missing.status_code == 403
    assert exists.json() == missing.json()


def test_deny_wins_and_most_specific_path_decides(env):
    make_key(env, "app-orders")
    make_key(env, "app-2")
    assert encrypt(env, "denier", "app-orders").status_code == 403   # deny on the exact path
    assert encrypt(env, "denier", "app-2").status_code == 200        # app-* still applies
    make_key(env, "zeta")
    assert encrypt(env, "narrow", "zeta").status_code == 403         # transit/encrypt/* deny
    assert encrypt(env, "narrow", "app-2").status_code == 200        # the longer prefix wins


def test_create_capability_on_the_key_path(env):
    r = call(env, "creator", "POST", "/v1/transit/keys/app-made", {})
    assert r.status_code == 200, r.text
    assert call(env, "creator", "POST", "/v1/transit/keys/not-app", {}).status_code == 403


def test_encrypt_that_would_create_the_key_also_needs_create(env):
    # update alone: an existing key encrypts, a missing one is refused and not created.
    r = encrypt(env, "app", "app-brand-new")
    assert r.status_code == 403 and r.json() == {"errors": ["permission denied"]}
    assert call(env, "root", "GET", "/v1/transit/keys/app-brand-new").status_code == 404
    # create + update on the encrypt path: the key is created on first use (Vault's upsert).
    assert encrypt(env, "creator", "up-new").status_code == 200
    assert call(env, "root", "GET", "/v1/transit/keys/up-new").status_code == 200


def test_namespaces_isolate_keys_and_tokens(env):
    make_key(env, "app-ns", ns="team-a")
    assert encrypt(env, "app", "app-ns", ns="team-a").status_code == 200
    # The same name does not exist in root: the namespace hides it (404 for a reader).
    assert call(env, "root", "GET", "/v1/transit/keys/app-ns").status_code == 404
    assert call(env, "root", "GET", "/v1/transit/keys/app-ns", ns="team-a").status_code == 200
    # A token used in a namespace it does not list: 403.
    r = encrypt(env, "denier", "app-ns", ns="team-a")
    assert r.status_code == 403 and "namespace" in r.json()["errors"][0]
    assert encrypt(env, "app", "app-ns", ns="team-b").status_code == 403
    # A root ("*") token reaches any namespace, which then exists.
    make_key(env, "fresh", ns="team-z")
    names = call(env, "root", "LIST", "/v1/transit/keys", ns="team-z").json()["data"]["keys"]
    assert names == ["fresh"]
    r = call(env, "root", "GET", "/v1/transit/keys/fresh", ns="bad/../ns")
    assert r.status_code == 400 and "namespace" in r.json()["errors"][0].lower()


def test_expired_and_unknown_tokens_are_refused(env):
    assert call(env, "expired", "GET", "/v1/auth/token/lookup-self").status_code == 403
    r = env["srv"].session.get(env["srv"].url + "/v1/auth/token/lookup-self",
                               headers={"X-Vault-Token": "nope"}, timeout=15)
    assert r.status_code == 403


def test_lookup_self_is_open_to_every_valid_token(env):
    r = call(env, "viewer", "GET", "/v1/auth/token/lookup-self")
    assert r.status_code == 200
    assert r.json()["data"]["policies"] == ["kms-viewer"]
    assert TOKENS["viewer"] not in r.text
    assert encrypt(env, "viewer", "app-1").status_code == 403  # kms-viewer grants no transit path


def test_sighup_reloads_policies_and_keeps_old_rules_on_a_bad_file(env):
    make_key(env, "app-rot")
    assert call(env, "app", "POST", "/v1/transit/keys/app-rot/rotate", {}).status_code == 403
    with open(env["path"], "w") as f:
        f.write(config(env["port"], extra_policies=ROTATE_GRANT, app_policies="[app, rotator]"))
    os.kill(env["srv"].pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    status = None
    while time.monotonic() < deadline:
        status = call(env, "app", "POST", "/v1/transit/keys/app-rot/rotate", {}).status_code
        if status == 200:
            break
        time.sleep(0.1)
    assert status == 200, "rotate still refused after SIGHUP"
    # A broken file on the next SIGHUP changes nothing: the running rules stay.
    with open(env["path"], "w") as f:
        f.write("listen: {adress: nowhere}\n")
    os.kill(env["srv"].pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and "not reloaded" not in env["srv"].log():
        time.sleep(0.1)
    assert "not reloaded" in env["srv"].log()
    assert env["srv"].alive()
    assert call(env, "app", "POST", "/v1/transit/keys/app-rot/rotate", {}).status_code == 200
    assert encrypt(env, "app", "app-rot").status_code == 200


@pytest.mark.parametrize("policies_yaml,key", [
    ("policies:\n  p:\n    - path: transit/*\n      capabilities: [fly]\n", "policies.p[0].capabilities"),
    ("policies:\n  root:\n    - path: x\n      capabilities: [read]\n", "policies.root"),
    ("policies:\n  p:\n    - pth: x\n      capabilities: [read]\n", "policies.p[0].pth"),
])
def test_bad_policies_stop_the_server_naming_the_key(policies_yaml, key, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("hsm: {pin_env: NOPE}\nauth:\n  tokens:\n    - token_sha256: %s\n" % ("ab" * 32)
                    + policies_yaml)
    out = subprocess.run([tl.binary_path(), "server", "-config", str(path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 2, out.stderr
    assert key in out.stderr.decode(), out.stderr


def test_a_token_naming_an_unknown_policy_stops_the_server(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("hsm: {pin_env: NOPE}\nauth:\n  tokens:\n    - token_sha256: %s\n      policies: [ghost]\n"
                    % ("ab" * 32))
    out = subprocess.run([tl.binary_path(), "server", "-config", str(path)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert out.returncode == 2
    assert "auth.tokens[0].policies" in out.stderr.decode() and "ghost" in out.stderr.decode()
