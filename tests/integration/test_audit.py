"""The audit log as an operator uses it: one line per request with the documented fields,
secrets only as token-computed HMACs, `p11kms audit verify` naming the first tampered line,
rotation that keeps one chain, and fail-closed refusal when the log cannot be written."""
import base64
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import p11kms_testlib as tl  # noqa: E402
import configured_server as cs  # noqa: E402

FIELDS = ["time", "seq", "request_id", "token", "namespace", "method", "path", "capability",
          "status", "latency_ms", "prev", "mac"]
HMAC_RE = re.compile(r"^hmac-sha256:[0-9a-f]{64}$")


def start(root, audit_yaml, token_value):
    return cs.configured(root, [("ops", token_value)], audit_yaml)


def verify(cfg, env, *files):
    out = subprocess.run([tl.binary_path(), "audit", "verify", "-config", cfg] + list(files),
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=env, timeout=120)
    return out.returncode, out.stdout.decode() + out.stderr.decode()


@pytest.fixture(scope="module")
def audited():
    root = tempfile.mkdtemp(prefix="p11kms-audit-")
    secret = "tok-" + os.urandom(8).hex()
    srv, cfg, token = start(root, "audit:\n  path: audit.log\n", secret)
    srv.start()
    h = {"X-Vault-Token": secret}
    s = srv.session
    plaintext = base64.b64encode(b"audit me not " + os.urandom(8)).decode()
    assert s.post(srv.url + "/v1/transit/keys/payroll", json={}, headers=h).status_code == 200
    enc = s.post(srv.url + "/v1/transit/encrypt/payroll", json={"plaintext": plaintext}, headers=h)
    ct = enc.json()["data"]["ciphertext"]
    assert s.post(srv.url + "/v1/transit/decrypt/payroll", json={"ciphertext": ct}, headers=h).status_code == 200
    assert s.get(srv.url + "/v1/transit/keys/payroll", headers={"X-Vault-Token": "wrong"}).status_code == 403
    assert s.get(srv.url + "/v1/transit/keys/missing", headers=h).status_code == 404
    for _ in range(5):
        s.post(srv.url + "/v1/transit/random/8", json={}, headers=h)
    try:
        yield {"srv": srv, "cfg": cfg, "env": token.env(), "root": root, "secret": secret,
               "plaintext": plaintext, "ciphertext": ct, "log": os.path.join(root, "audit.log")}
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def lines_of(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def test_one_line_per_request_with_the_documented_fields(audited):
    lines = lines_of(audited["log"])
    assert [l["seq"] for l in lines] == list(range(1, len(lines) + 1))
    for l in lines:
        for field in FIELDS:
            assert field in l, (field, l)
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", l["time"])
    enc = [l for l in lines if l["path"] == "/v1/transit/encrypt/payroll"][0]
    assert enc["token"] == "ops" and enc["namespace"] == "root" and enc["method"] == "POST"
    assert enc["capability"] == "update" and enc["status"] == 200
    assert enc["key"] == "payroll" and enc["key_version"] == 1
    assert HMAC_RE.match(enc["request"]["plaintext"]) and HMAC_RE.match(enc["response"]["ciphertext"])
    denied = [l for l in lines if l["status"] == 403][0]
    assert denied["token"] is None
    missing = [l for l in lines if l["status"] == 404][0]
    assert missing["key"] == "missing"
    health = [l for l in lines if l["path"] == "/v1/sys/health"]
    assert health and all("key" not in l for l in health)  # no key named, no key fields


def test_secrets_never_appear_in_clear(audited):
    text = open(audited["log"]).read()
    for secret in (audited["plaintext"], audited["ciphertext"], audited["ciphertext"].split(":")[-1],
                   audited["secret"]):
        assert secret not in text
    # The same plaintext gives the same HMAC on encrypt's request and decrypt's response, so a
    # known value can be looked up without being stored.
    lines = lines_of(audited["log"])
    enc = [l for l in lines if l["path"].endswith("encrypt/payroll")][0]
    dec = [l for l in lines if l["path"].endswith("decrypt/payroll")][0]
    assert enc["request"]["plaintext"] == dec["response"]["plaintext"]
    assert enc["response"]["ciphertext"] == dec["request"]["ciphertext"]


def test_verify_reports_intact(audited):
    rc, out = verify(audited["cfg"], audited["env"], audited["log"])
    assert rc == 0, out
    assert "intact" in out


def tampered_copy(audited, name, change):
    raw = open(audited["log"]).read().splitlines()
    changed = change(list(raw))
    path = os.path.join(audited["root"], name)
    with open(path, "w") as f:
        f.write("\n".join(changed) + "\n")
    return path


@pytest.mark.parametrize("name,change,line", [
    ("edited.log", lambda ls: ls[:3] + [ls[3].replace('"status":200', '"status":201')] + ls[4:], 4),
    ("dropped.log", lambda ls: ls[:4] + ls[5:], 5),
    ("reordered.log", lambda ls: ls[:2] + [ls[3], ls[2]] + ls[4:], 3),
    ("inserted.log", lambda ls: ls[:6] + [ls[6].replace('"request_id":"', '"request_id":"forged-')] + ls[6:], 7),
    ("replayed.log", lambda ls: ls[:6] + [ls[6]] + ls[6:], 8),
])
def test_verify_names_the_first_tampered_line(audited, name, change, line):
    path = tampered_copy(audited, name, change)
    rc, out = verify(audited["cfg"], audited["env"], path)
    assert rc == 1, out
    assert "%s:%d" % (path, line) in out, out


def test_verify_reports_a_cut_tail(audited):
    path = tampered_copy(audited, "cut.log", lambda ls: ls[:-2])
    rc, out = verify(audited["cfg"], audited["env"], path)
    assert rc == 1, out
    assert "tail" in out


def test_verify_usage_errors_exit_2(audited):
    rc, out = verify(audited["cfg"], audited["env"])
    assert rc == 2
    rc, _ = verify(audited["cfg"], audited["env"], os.path.join(audited["root"], "nope.log"))
    assert rc == 2


def test_rotation_keeps_one_chain_verified_in_any_order():
    root = tempfile.mkdtemp(prefix="p11kms-audit-rot-")
    secret = "tok-" + os.urandom(8).hex()
    srv, cfg, token = start(root, "audit:\n  path: audit.log\n  max_bytes: 2048\n", secret)
    try:
        srv.start()
        for _ in range(20):
            srv.session.post(srv.url + "/v1/transit/random/4", json={}, headers={"X-Vault-Token": secret})
        srv.stop()
        files = sorted(f for f in os.listdir(root) if f.startswith("audit.log"))
        assert len(files) >= 3, files
        assert all(os.path.getsize(os.path.join(root, f)) <= 2048 for f in files)
        seqs = [lines_of(os.path.join(root, f))[0]["seq"] for f in ["audit.log.2", "audit.log.1", "audit.log"]]
        assert seqs == sorted(seqs)  # .1 is the newest rotated file
        paths = [os.path.join(root, f) for f in files]
        random.shuffle(paths)
        rc, out = verify(cfg, token.env(), *paths)
        assert rc == 0, out
        missing = [p for p in paths if not p.endswith("audit.log.1")]
        rc, out = verify(cfg, token.env(), *missing)
        assert rc == 1 and "missing" in out, out
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def second_instance(root, cfg_a, token, secret, log_path=None):
    """A second server (not started) on the first one's token and store, on its own port and
    writing b.log instead of a.log. Returns (server, config path)."""
    port_b = cs.free_port()
    with open(cfg_a) as f:
        text = f.read()
    cfg_b = os.path.join(root, "b.yaml")
    with open(cfg_b, "w") as f:
        f.write(re.sub(r"address: 127\.0\.0\.1:\d+", "address: 127.0.0.1:%d" % port_b, text)
                .replace("path: a.log", "path: b.log"))
    return cs.ConfiguredServer(cfg_b, token.env(), token=secret, port=port_b, log_path=log_path), cfg_b


def test_two_instances_on_one_store_keep_separate_verified_chains():
    """Several instances share one store (here one SQLite file and one token); each writes its
    own audit file, and each file's chain ends at its own head in the store."""
    root = tempfile.mkdtemp(prefix="p11kms-audit-two-")
    secret = "tok-" + os.urandom(8).hex()
    a, cfg_a, token = start(root, "audit:\n  path: a.log\n", secret)
    b, cfg_b = second_instance(root, cfg_a, token, secret)
    h = {"X-Vault-Token": secret}
    try:
        a.start()
        b.start()
        for i in range(12):  # interleaved: every write to the store's heads alternates
            srv = a if i % 2 == 0 else b
            assert srv.session.post(srv.url + "/v1/transit/random/4", json={}, headers=h).status_code == 200
        a.stop()
        b.stop()
        for cfg, name in ((cfg_a, "a.log"), (cfg_b, "b.log")):
            rc, out = verify(cfg, token.env(), os.path.join(root, name))
            assert rc == 0 and "intact" in out, (name, out)
        # Each chain is its own: a's file checked against b's head is not intact.
        rc, out = verify(cfg_b, token.env(), os.path.join(root, "a.log"))
        assert rc == 1, out
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_a_chain_has_one_writer_at_a_time_and_moves_on_when_it_dies():
    """The writer of a chain holds a store lease renewed with the heartbeat: a second instance
    configured with the same chain while the first runs refuses to start (two writers would fork
    it); once the first is killed, the second waits for the lease to run out, continues the chain
    from the store's head, and the two files verify as one chain."""
    root = tempfile.mkdtemp(prefix="p11kms-audit-lease-")
    secret = "tok-" + os.urandom(8).hex()
    yaml = "audit:\n  path: a.log\n  chain: payments\ncluster:\n  heartbeat: 1\n  intent_lease: 3s\n"
    a, cfg_a, token = start(root, yaml, secret)
    b, cfg_b = second_instance(root, cfg_a, token, secret, log_path=os.path.join(root, "b.out"))
    h = {"X-Vault-Token": secret}
    try:
        a.start()
        for _ in range(4):
            assert a.session.post(a.url + "/v1/transit/random/4", json={}, headers=h).status_code == 200
        # A second writer of "payments" while a renews its lease: refused, with the reason.
        b.spawn()
        assert b.proc.wait(30) != 0
        out = open(b.log_path).read()
        assert "audit chain 'payments' is being written by another running instance" in out, out[-2000:]
        assert not os.path.exists(os.path.join(root, "b.log")) or os.path.getsize(os.path.join(root, "b.log")) == 0
        b.proc = None
        # a dies without letting go: b waits for the lease to run out, then takes the chain over.
        os.kill(a.pid, signal.SIGKILL)
        a.proc.wait(10)
        a.proc = None
        b.start()
        assert "waiting up to 3 s for the previous writer of chain 'payments'" in b.log()
        for _ in range(3):
            assert b.session.post(b.url + "/v1/transit/random/4", json={}, headers=h).status_code == 200
        b.stop()
        a_lines, b_lines = lines_of(os.path.join(root, "a.log")), lines_of(os.path.join(root, "b.log"))
        assert [l["seq"] for l in b_lines][0] == a_lines[-1]["seq"] + 1
        assert b_lines[0]["prev"] == sha256_hex_of_last_line(os.path.join(root, "a.log"))
        rc, out = verify(cfg_b, token.env(), os.path.join(root, "a.log"), os.path.join(root, "b.log"))
        assert rc == 0 and "intact" in out, out
        rc, out = verify(cfg_a, token.env(), os.path.join(root, "a.log"))
        assert rc == 1, out  # the chain's head in the store moved on past a's last line
        # A clean stop lets go at once: a restarts on the chain without waiting.
        a.log_path = os.path.join(root, "a2.out")
        a.start()
        assert "waiting up to" not in a.log()
    finally:
        a.stop()
        b.stop()
        shutil.rmtree(root, ignore_errors=True)


def sha256_hex_of_last_line(path):
    import hashlib
    with open(path, "rb") as f:
        last = f.read().splitlines()[-1]
    return hashlib.sha256(last).hexdigest()


def test_fail_closed_refuses_before_running_when_the_disk_is_full_and_recovers():
    root = tempfile.mkdtemp(prefix="p11kms-audit-full-")
    fs = os.path.join(root, "auditfs")
    os.makedirs(fs)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", fs],
                      stderr=subprocess.PIPE).returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip("cannot mount a small tmpfs here (needs root) to make a full disk")
    secret = "tok-" + os.urandom(8).hex()
    srv, cfg, token = start(root, "audit:\n  path: auditfs/audit.log\n", secret)
    try:
        open(os.path.join(fs, "audit.log"), "w").close()
        filler = os.path.join(fs, "filler")
        with open(filler, "wb", buffering=0) as f:  # fill the file system to the last block
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        srv.start()  # health answers even though the log cannot take a line
        h = {"X-Vault-Token": secret}
        r = srv.session.post(srv.url + "/v1/transit/keys/never", json={}, headers=h, timeout=15)
        assert r.status_code == 503, r.text
        assert "audit" in r.json()["errors"][0]
        r = srv.session.post(srv.url + "/v1/transit/keys/never", json={}, headers=h, timeout=15)
        assert r.status_code == 503
        db = sqlite3.connect(os.path.join(root, "p11kms.db"))
        assert db.execute("SELECT count(*) FROM keys").fetchone()[0] == 0  # nothing ran
        db.close()
        os.remove(filler)  # space is back: the service recovers by itself
        r = srv.session.post(srv.url + "/v1/transit/keys/now", json={}, headers=h, timeout=15)
        assert r.status_code == 200, r.text
        srv.stop()
        rc, out = verify(cfg, token.env(), os.path.join(fs, "audit.log"))
        assert rc == 0, out
    finally:
        srv.stop()
        subprocess.run(["umount", fs], stderr=subprocess.PIPE)
        shutil.rmtree(root, ignore_errors=True)


def test_fail_open_serves_when_the_log_cannot_be_written():
    root = tempfile.mkdtemp(prefix="p11kms-audit-open-")
    secret = "tok-" + os.urandom(8).hex()
    srv, cfg, token = start(root, "audit:\n  path: /dev/full\n  fail_closed: false\n", secret)
    try:
        srv.start()
        r = srv.session.post(srv.url + "/v1/transit/keys/k", json={}, headers={"X-Vault-Token": secret})
        assert r.status_code == 200, r.text
        assert "audit" in srv.log()
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_an_audit_file_that_cannot_be_opened_stops_the_start():
    root = tempfile.mkdtemp(prefix="p11kms-audit-bad-")
    secret = "tok-" + os.urandom(8).hex()
    srv, cfg, token = start(root, "audit:\n  path: no/such/dir/audit.log\n", secret)
    try:
        srv.spawn()
        rc = srv.proc.wait(timeout=60)
        assert rc != 0
        assert "audit" in srv.log() and "no/such/dir/audit.log" in srv.log()
    finally:
        srv.stop()
        shutil.rmtree(root, ignore_errors=True)
