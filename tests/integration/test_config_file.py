"""Integration: `p11kms server -config FILE` (the production entry point, not -dev).

- a misspelled key stops the server with exit 2 and a message naming the key's full path;
- a token label that does not exist stops it with a non-zero exit naming the label;
- a valid config on SoftHSM serves: create, encrypt, decrypt with the configured API token via
  both `X-Vault-Token` and `Authorization: Bearer`; a wrong or missing token gets 403;
- relative paths in the file are relative to the file's folder, not the working directory.
"""

import base64
import os
import subprocess

import pytest

import configured_server as cs
import p11kms_testlib as tl

EXIT_TIMEOUT_S = 30


@pytest.fixture(scope="module")
def setup():
    """One SoftHSM token, a config folder (conf/) and a different working directory (cwd/)."""
    class S:
        pass
    s = S()
    s.tmp = cs.make_tmpdir("p11kms-config-")
    try:
        s.token = cs.SoftToken(s.tmp).init()
        s.conf_dir = os.path.join(s.tmp, "conf")
        s.cwd = os.path.join(s.tmp, "cwd")
        os.makedirs(s.conf_dir)
        os.makedirs(s.cwd)
        s.token.write_pin_file(os.path.join(s.conf_dir, "user.pin"))
        s.api_token = "hvs." + os.urandom(12).hex()
        s.api_hash = cs.token_hash(s.api_token)
        yield s
    finally:
        cs.remove_tmpdir(s.tmp)


def valid_config(s, port=None, label=None):
    return cs.config_text(port or cs.free_port(), cs.SOFTHSM_MODULE, label or s.token.label,
                          s.api_hash)


def run_expecting_exit(s, text, name):
    """Run the server on a config that must make it exit; returns (rc, stdout, stderr)."""
    path = os.path.join(s.conf_dir, name)
    with open(path, "w") as f:
        f.write(text)
    try:
        out = subprocess.run([tl.binary_path(), "server", "-config", path],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=s.cwd, env=s.token.env(),
                             timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        # subprocess.run kills the child (by its pid) before raising.
        raise AssertionError("p11kms did not exit within %ds on config:\n%s\nstdout: %s\n"
                             "stderr: %s" % (EXIT_TIMEOUT_S, text, e.stdout, e.stderr))
    return out.returncode, out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")


# -- unknown keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("good,bad,named", [
    ("  address:", "  adress:", "listen.adress"),
    ("  pin_file:", "  pin_fiel:", "hsm.pin_fiel"),
    ("  driver:", "  drivr:", "store.drivr"),
    ("      policies:", "      polices:", "auth.tokens[0].polices"),
])
def test_misspelled_key_exits_2_naming_the_key(setup, good, bad, named):
    text = valid_config(setup)
    assert text.count(good) == 1
    rc, out, err = run_expecting_exit(setup, text.replace(good, bad), "misspelled.yaml")
    assert rc == 2, "exit %d, stdout %r, stderr %r" % (rc, out, err)
    assert named in err, "stderr does not name %r: %r" % (named, err)


def test_flow_style_misspelling_is_named(setup):
    """The brief's example, written in YAML flow style: listen: {adress: ...}."""
    text = valid_config(setup)
    lines = text.splitlines()
    i = lines.index("listen:")
    addr = lines[i + 1].split(":", 1)[1].strip()
    lines[i:i + 2] = ["listen: {adress: %s}" % addr]
    rc, out, err = run_expecting_exit(setup, "\n".join(lines) + "\n", "flow.yaml")
    assert rc == 2, "exit %d, stderr %r" % (rc, err)
    assert "listen.adress" in err, err


@pytest.mark.parametrize("section,named,message", [
    ("cluster: {intent_lease: 5s, heartbeat: 5s}", "cluster.intent_lease", "longer than cluster.heartbeat"),
    ("cluster: {heartbeat: 0}", "cluster.heartbeat", "between 1 and"),
    ("cluster: {sweep_interval: soon}", "cluster.sweep_interval", "duration"),
    ("cluster: {intent_leese: 60}", "cluster.intent_leese", "unknown key"),
])
def test_cluster_section_errors_name_the_field(setup, section, named, message):
    rc, out, err = run_expecting_exit(setup, valid_config(setup) + section + "\n", "cluster.yaml")
    assert rc == 2, "exit %d, stderr %r" % (rc, err)
    assert named in err and message in err, err


# -- token that is not there -------------------------------------------------------------------

def test_unknown_token_label_exits_nonzero_naming_the_label(setup):
    missing = "no-such-token-" + os.urandom(3).hex()
    rc, out, err = run_expecting_exit(setup, valid_config(setup, label=missing), "nolabel.yaml")
    assert rc != 0, "p11kms exited 0 on a missing token; stderr %r" % err
    assert missing in err, "stderr does not name the label %r: %r" % (missing, err)
    assert setup.token.user_pin not in out + err


def test_wrong_pin_exits_nonzero_without_printing_it(setup):
    wrong = "wrong-" + os.urandom(6).hex()
    with open(os.path.join(setup.conf_dir, "wrong.pin"), "w") as f:
        f.write(wrong)
    text = valid_config(setup).replace("pin_file: user.pin", "pin_file: wrong.pin")
    rc, out, err = run_expecting_exit(setup, text, "wrongpin.yaml")
    assert rc != 0, "p11kms exited 0 with a wrong PIN; stderr %r" % err
    assert "pin" in err.lower(), "stderr does not say the PIN was refused: %r" % err
    assert wrong not in out + err, "the wrong PIN was printed"
    assert setup.token.user_pin not in out + err


# -- a valid config serves ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(setup):
    port = cs.free_port()
    path = os.path.join(setup.conf_dir, "p11kms.yaml")
    with open(path, "w") as f:
        f.write(valid_config(setup, port=port))
    srv = cs.ConfiguredServer(path, setup.token.env(), token=setup.api_token, port=port,
                              cwd=setup.cwd, log_path=os.path.join(setup.tmp, "server.log"))
    try:
        srv.start()
        yield srv
    except BaseException:
        print("--- p11kms server log tail ---\n" + srv.log_tail())
        raise
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _log_on_failure(request):
    failed_before = request.session.testsfailed
    yield
    if request.session.testsfailed > failed_before and "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        text = "\n--- p11kms server log tail (%s) ---\n%s\n" % (srv.log_path, srv.log_tail())
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(text)
        else:
            print(text)


def describe(r):
    return "%s %s -> %s %s" % (r.request.method, r.request.path_url, r.status_code, r.text[:600])


def bearer(token):
    return {"Authorization": "Bearer " + token}


def test_health_without_token(server, setup):
    r = server.request("GET", "/v1/sys/health", token=False)
    assert r.status_code == 200, describe(r)
    body = r.json()
    assert body["sealed"] is False and body["hsm"]["reachable"] is True, describe(r)
    assert body["hsm"]["token_label"] == setup.token.label, describe(r)


def test_relative_paths_are_relative_to_the_config_folder(server, setup):
    # The server runs with cwd=cwd/ but its config lives in conf/: pin_file (user.pin) was read
    # from conf/ (the server started), and the SQLite store (p11kms.db) is created in conf/.
    assert os.path.exists(os.path.join(setup.conf_dir, "p11kms.db")), os.listdir(setup.conf_dir)
    assert not os.path.exists(os.path.join(setup.cwd, "p11kms.db")), os.listdir(setup.cwd)


@pytest.mark.parametrize("enc_hdr,dec_hdr", [("vault", "bearer"), ("bearer", "vault")])
def test_create_encrypt_decrypt_with_both_auth_headers(server, setup, enc_hdr, dec_hdr):
    def auth(kind):
        if kind == "vault":
            return dict(token=setup.api_token)
        return dict(token=False, headers=bearer(setup.api_token))

    name = "cfg-%s-%s" % (enc_hdr, os.urandom(3).hex())
    r = server.request("POST", "/v1/transit/keys/" + name, json={}, **auth(enc_hdr))
    assert r.status_code == 200, describe(r)
    assert r.json()["data"]["name"] == name, describe(r)

    plaintext = b"config-file test " + os.urandom(8)
    r = server.request("POST", "/v1/transit/encrypt/" + name,
                       json={"plaintext": base64.b64encode(plaintext).decode()}, **auth(enc_hdr))
    assert r.status_code == 200, describe(r)
    ct = r.json()["data"]["ciphertext"]
    assert ct.startswith("vault:v1:"), describe(r)

    r = server.request("POST", "/v1/transit/decrypt/" + name, json={"ciphertext": ct},
                       **auth(dec_hdr))
    assert r.status_code == 200, describe(r)
    assert base64.b64decode(r.json()["data"]["plaintext"]) == plaintext

    r = server.request("GET", "/v1/transit/keys/" + name, **auth(dec_hdr))
    assert r.status_code == 200 and r.json()["data"]["latest_version"] == 1, describe(r)


@pytest.mark.parametrize("how", ["x-vault-token", "bearer", "none", "bearer-prefix-only"])
def test_wrong_or_missing_token_is_403(server, setup, how):
    name = "cfg-denied-" + os.urandom(3).hex()
    wrong = "hvs." + os.urandom(12).hex()
    if how == "x-vault-token":
        kw = dict(token=wrong)
    elif how == "bearer":
        kw = dict(token=False, headers=bearer(wrong))
    elif how == "bearer-prefix-only":
        kw = dict(token=False, headers={"Authorization": "Bearer"})
    else:
        kw = dict(token=False)
    for method, path, body in (
            ("POST", "/v1/transit/keys/" + name, {}),
            ("POST", "/v1/transit/encrypt/" + name, {"plaintext": "aGk="}),
            ("LIST", "/v1/transit/keys", None),
            ("POST", "/v1/transit/random/16", {})):
        r = server.request(method, path, json=body, **kw)
        assert r.status_code == 403, describe(r)
        assert r.json() == {"errors": ["permission denied"]}, describe(r)
    # Nothing was created by the refused requests.
    r = server.request("GET", "/v1/transit/keys/" + name)
    assert r.status_code == 404, describe(r)


def test_hash_of_token_is_what_authenticates(server, setup):
    """The config holds only the token's SHA-256: sending the hash itself must not work."""
    r = server.request("POST", "/v1/transit/random/16", json={}, token=setup.api_hash)
    assert r.status_code == 403, describe(r)


def test_no_secrets_in_log_and_clean_sigterm(server, setup):
    r = server.request("POST", "/v1/transit/random/16", json={})
    assert r.status_code == 200, describe(r)
    rc = server.stop()
    assert rc == 0, "exit %s after SIGTERM\n%s" % (rc, server.log_tail())
    log = server.log()
    for secret in (setup.token.user_pin, setup.token.so_pin, setup.api_token):
        assert secret not in log, "server log contains a secret"
