"""Integration: p11kms on PostgreSQL (a throwaway server from scripts/pg-scratch, password
authentication with store.password_file), and two instances sharing that database and one
SoftHSM token behaving as one service: what one writes, the other's next request sees.
Also: a wrong password refuses to start without showing the password, and PostgreSQL going
away gives 503s (health: store.reachable false) until it is back, without restarting p11kms.
"""

import base64
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import describe, unique_name  # noqa: E402
import configured_server as cs  # noqa: E402

PG_SCRATCH = os.path.join(tl.SOURCE_DIR, "scripts", "pg-scratch")
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


class Postgres:
    def __init__(self, root):
        self.dir = os.path.join(root, "pg")
        self.password = "pw-" + secrets.token_hex(8)
        self.password_file = os.path.join(root, "pg.pass")
        with open(self.password_file, "w") as f:
            f.write(self.password + "\n")
        os.chmod(self.password_file, 0o600)
        env = dict(os.environ, PG_SCRATCH_PASSWORD_FILE=self.password_file)
        out = subprocess.run([PG_SCRATCH, "start", self.dir], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        self.dsn = out.stdout.strip()

    def halt(self):
        subprocess.run([PG_SCRATCH, "halt", self.dir], check=True, timeout=60)

    def resume(self):
        subprocess.run([PG_SCRATCH, "resume", self.dir], check=True, timeout=60)

    def stop(self):
        subprocess.run([PG_SCRATCH, "stop", self.dir], timeout=60)


def write_config(root, name, port, token, pg, api_token, password_file=None, sessions=2, extra_yaml=""):
    """An instance's config file on the shared token and PostgreSQL, plus `extra_yaml`."""
    path = os.path.join(root, name + ".yaml")
    with open(path, "w") as f:
        f.write("listen:\n  address: 127.0.0.1:%d\n"
                "hsm:\n  module: %s\n  token_label: %s\n  pin_file: user.pin\n  sessions: %d\n"
                "store:\n  driver: postgres\n  dsn: \"%s\"\n  password_file: %s\n"
                "auth:\n  tokens:\n    - {name: admin, token_sha256: %s, policies: [root], namespaces: [\"*\"]}\n%s"
                % (port, SOFTHSM_MODULE, token.label, sessions, pg.dsn, password_file or pg.password_file,
                   cs.token_hash(api_token), extra_yaml))
    return path


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="p11kms-pg-it-")
    os.chmod(root, 0o755)
    pg = Postgres(root)
    token = cs.SoftToken(root).init()
    token.write_pin_file(os.path.join(root, "user.pin"))
    api_token = tl.random_token()
    servers = []
    for name in ("a", "b"):
        port = cs.free_port()
        path = write_config(root, name, port, token, pg, api_token)
        srv = cs.ConfiguredServer(path, token.env(), token=api_token, port=port,
                                  log_path=os.path.join(root, name + ".log"))
        servers.append(srv.start())
    yield {"a": servers[0], "b": servers[1], "pg": pg, "root": root, "token": token, "api_token": api_token}
    for s in servers:
        s.stop()
    pg.stop()
    if not os.environ.get("P11KMS_KEEP_TMP"):
        shutil.rmtree(root, ignore_errors=True)


def ok(r, status=200):
    assert r.status_code == status, describe(r)
    return r.json() if r.content else None


def b64(b):
    return base64.b64encode(b).decode()


def test_a_key_made_on_one_instance_serves_on_the_other(cluster):
    a, b = cluster["a"], cluster["b"]
    name = unique_name("pgk")
    ok(a.request("POST", "/v1/transit/keys/" + name, {}))
    ct = ok(b.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"shared")}))["data"]["ciphertext"]
    assert ok(a.request("POST", "/v1/transit/decrypt/" + name, {"ciphertext": ct}))["data"]["plaintext"] == b64(b"shared")


def test_rotation_on_one_is_seen_by_the_next_request_on_the_other(cluster):
    a, b = cluster["a"], cluster["b"]
    name = unique_name("pgr")
    ok(a.request("POST", "/v1/transit/keys/" + name, {}))
    # Warm a's view of the key, then rotate on b.
    assert ok(a.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"x")}))["data"]["ciphertext"].startswith("vault:v1:")
    for expected in (2, 3):
        ok(b.request("POST", "/v1/transit/keys/%s/rotate" % name))
        ct = ok(a.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"x")}))["data"]["ciphertext"]
        assert ct.startswith("vault:v%d:" % expected), ct
    # Config on a (min_decryption_version) binds b at once.
    ok(a.request("POST", "/v1/transit/keys/%s/config" % name, {"min_decryption_version": 3}))
    old = ok(b.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"y"), "key_version": 3}))
    assert ok(b.request("GET", "/v1/transit/keys/" + name))["data"]["min_decryption_version"] == 3
    assert old["data"]["ciphertext"].startswith("vault:v3:")


def test_rotating_on_one_while_the_other_encrypts_and_wraps_at_once(cluster):
    """Rotations of a transit key and of a KMS root key on a, while b encrypts, decrypts, wraps
    and unwraps with them at the same moment: every answer is 200, every ciphertext and wrapped
    key opens afterwards on either instance, and the versions b used only ever grow."""
    import concurrent.futures
    import threading
    a, b = cluster["a"], cluster["b"]
    name = unique_name("pgrotwhile")
    ok(a.request("POST", "/v1/transit/keys/" + name, {}))
    hdr = {"Authorization": "Bearer " + cluster["api_token"]}
    body = {"metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
            "resources": [{"type": "application/vnd.ibm.kms.key+json", "name": unique_name("pgrotkms")}]}
    kms_id = ok(a.request("POST", "/kms/api/v2/keys", body, token=False, headers=hdr), 201)["resources"][0]["id"]
    done = threading.Event()

    def rotator():
        answers = []
        for _ in range(15):
            answers.append(a.request("POST", "/v1/transit/keys/%s/rotate" % name).status_code)
            answers.append(a.request("POST", "/kms/api/v2/keys/%s/actions/rotate" % kms_id, {}, token=False,
                                     headers=hdr).status_code)
        done.set()
        return answers

    def user():
        made, versions = [], []
        while not done.is_set():
            pt = os.urandom(16)
            r = b.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(pt)})
            assert r.status_code == 200, describe(r)
            ct = r.json()["data"]["ciphertext"]
            versions.append(int(ct.split(":")[1][1:]))
            r = b.request("POST", "/v1/transit/decrypt/" + name, {"ciphertext": ct})
            assert r.status_code == 200 and r.json()["data"]["plaintext"] == b64(pt), describe(r)
            w = b.request("POST", "/kms/api/v2/keys/%s/actions/wrap" % kms_id, {}, token=False, headers=hdr)
            assert w.status_code == 200, describe(w)
            made.append((ct, pt, w.json()["ciphertext"], w.json()["plaintext"]))
        return made, versions

    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        rot = pool.submit(rotator)
        users = [pool.submit(user) for _ in range(2)]
        assert all(s == 200 or s == 204 for s in rot.result()), rot.result()
        results = [u.result() for u in users]
    assert ok(a.request("GET", "/v1/transit/keys/" + name))["data"]["latest_version"] == 16
    for made, versions in results:
        assert made, "b served nothing while a rotated"
        assert versions == sorted(versions), versions  # never an older version after a newer one
        for i, (ct, pt, wrapped, dek) in enumerate(made):
            srv = a if i % 2 else b
            r = srv.request("POST", "/v1/transit/decrypt/" + name, {"ciphertext": ct})
            assert r.status_code == 200 and r.json()["data"]["plaintext"] == b64(pt), describe(r)
            u = srv.request("POST", "/kms/api/v2/keys/%s/actions/unwrap" % kms_id, {"ciphertext": wrapped},
                            token=False, headers=hdr)
            assert u.status_code == 200 and u.json()["plaintext"] == dek, describe(u)


def test_disable_and_delete_on_one_bind_the_other(cluster):
    a, b = cluster["a"], cluster["b"]
    body = {"metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
            "resources": [{"type": "application/vnd.ibm.kms.key+json", "name": unique_name("pgkms")}]}
    hdr = {"Authorization": "Bearer " + cluster["api_token"]}
    key = ok(a.request("POST", "/kms/api/v2/keys", body, token=False, headers=hdr), 201)["resources"][0]
    w = ok(b.request("POST", "/kms/api/v2/keys/%s/actions/wrap" % key["id"], {}, token=False, headers=hdr))
    ok(a.request("POST", "/kms/api/v2/keys/%s/actions/disable" % key["id"], {}, token=False, headers=hdr), 204)
    ok(b.request("POST", "/kms/api/v2/keys/%s/actions/unwrap" % key["id"], {"ciphertext": w["ciphertext"]},
                 token=False, headers=hdr), 409)
    ok(b.request("POST", "/kms/api/v2/keys/%s/actions/enable" % key["id"], {}, token=False, headers=hdr), 204)
    u = ok(a.request("POST", "/kms/api/v2/keys/%s/actions/unwrap" % key["id"], {"ciphertext": w["ciphertext"]},
                     token=False, headers=hdr))
    assert u["plaintext"] == w["plaintext"]
    ok(b.request("DELETE", "/kms/api/v2/keys/" + key["id"], token=False, headers=hdr), 204)
    ok(a.request("POST", "/kms/api/v2/keys/%s/actions/wrap" % key["id"], {}, token=False, headers=hdr), 410)


def test_exportable_material_is_sealed_under_one_master_key(cluster):
    a, b = cluster["a"], cluster["b"]
    hdr = {"Authorization": "Bearer " + cluster["api_token"]}
    body = {"metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
            "resources": [{"type": "application/vnd.ibm.kms.key+json", "name": unique_name("pgstd"),
                           "extractable": True, "payload": b64(b"\x07" * 32)}]}
    key = ok(b.request("POST", "/kms/api/v2/keys", body, token=False, headers=hdr), 201)["resources"][0]
    got = ok(a.request("GET", "/kms/api/v2/keys/" + key["id"], token=False, headers=hdr))["resources"][0]
    assert got["payload"] == b64(b"\x07" * 32)


def test_concurrent_creates_of_one_name_give_one_key(cluster):
    import concurrent.futures
    a, b = cluster["a"], cluster["b"]
    name = unique_name("pgrace")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda s: s.request("POST", "/v1/transit/keys/" + name, {}), [a, b]))
    # Vault's create of an existing name is a no-op 200; the loser of the race may also see the
    # store's conflict as a 409, never a 500.
    assert sorted(r.status_code for r in results)[0] == 200, [describe(r) for r in results]
    assert all(r.status_code in (200, 409) for r in results), [describe(r) for r in results]
    assert ok(a.request("GET", "/v1/transit/keys/" + name))["data"]["latest_version"] == 1


def test_postgres_outage_is_503_and_recovers_without_restart(cluster):
    a = cluster["a"]
    name = unique_name("pgout")
    ok(a.request("POST", "/v1/transit/keys/" + name, {}))
    cluster["pg"].halt()
    try:
        r = a.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"x")})
        assert r.status_code == 503, describe(r)
        assert "store" in r.json()["errors"][0]
        h = a.request("GET", "/v1/sys/health", token=False)
        assert h.status_code == 503, describe(h)
        assert h.json()["store"]["reachable"] is False
        r = a.request("POST", "/v1/transit/keys/" + unique_name("pgout"), {})
        assert r.status_code == 503, describe(r)
    finally:
        cluster["pg"].resume()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = a.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"back")})
        if r.status_code == 200:
            break
        time.sleep(0.3)
    assert r.status_code == 200, describe(r)
    h = a.request("GET", "/v1/sys/health", token=False)
    assert h.status_code == 200 and h.json()["store"]["reachable"] is True
    assert a.alive(), "p11kms must keep running through the outage"
    # The other instance sat idle through the outage: its dead connection is noticed before
    # use, so its very first request after the restart succeeds.
    b = cluster["b"]
    ok(b.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"first")}))


def test_wrong_password_refuses_to_start_without_showing_it(cluster):
    root = cluster["root"]
    wrong = os.path.join(root, "wrong.pass")
    secret = "wrong-" + secrets.token_hex(6)
    with open(wrong, "w") as f:
        f.write(secret + "\n")
    port = cs.free_port()
    path = write_config(root, "wrong", port, cluster["token"], cluster["pg"], cluster["api_token"],
                        password_file=wrong)
    srv = cs.ConfiguredServer(path, cluster["token"].env(), token=cluster["api_token"], port=port,
                              log_path=os.path.join(root, "wrong.log"))
    with pytest.raises(AssertionError):
        srv.start()
    log = srv.log()
    assert "password authentication failed" in log
    assert secret not in log and cluster["pg"].password not in log


def run_cli(*args, env=None):
    return subprocess.run([tl.binary_path()] + list(args), capture_output=True, text=True, timeout=120, env=env)


def test_store_copy_sqlite_to_postgres_and_back(cluster):
    root = tempfile.mkdtemp(prefix="p11kms-copy-", dir=cluster["root"])
    token = cluster["token"]
    api_token = cluster["api_token"]
    # A: a SQLite-backed server on the same token; make keys there.
    port = cs.free_port()
    a_path = os.path.join(root, "a.yaml")
    with open(a_path, "w") as f:
        f.write("listen:\n  address: 127.0.0.1:%d\nhsm:\n  module: %s\n  token_label: %s\n  pin_file: %s\n"
                "store:\n  driver: sqlite\n  path: a.db\nauth:\n  tokens:\n"
                "    - {name: admin, token_sha256: %s, policies: [root]}\n"
                % (port, SOFTHSM_MODULE, token.label, os.path.join(cluster["root"], "user.pin"), cs.token_hash(api_token)))
    a = cs.ConfiguredServer(a_path, token.env(), token=api_token, port=port).start()
    name = unique_name("copy")
    ok(a.request("POST", "/v1/transit/keys/" + name, {}))
    ok(a.request("POST", "/v1/transit/keys/%s/rotate" % name))
    ct = ok(a.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"moved")}))["data"]["ciphertext"]
    hdr = {"Authorization": "Bearer " + api_token}
    body = {"metadata": {"collectionType": "application/vnd.ibm.kms.key+json", "collectionTotal": 1},
            "resources": [{"type": "application/vnd.ibm.kms.key+json", "name": unique_name("copystd"),
                           "extractable": True, "payload": b64(b"\x05" * 48)}]}
    std_id = ok(a.request("POST", "/kms/api/v2/keys", body, token=False, headers=hdr), 201)["resources"][0]["id"]
    assert a.stop() == 0

    # B: a fresh PostgreSQL database on the cluster's server.
    pg = cluster["pg"]
    env = dict(os.environ, PGPASSWORD=pg.password)
    dbname = "copy_" + secrets.token_hex(4)
    out = subprocess.run(["psql", pg.dsn, "-Atc", "CREATE DATABASE " + dbname], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    b_dsn = pg.dsn.replace("dbname=postgres", "dbname=" + dbname)
    b_port = cs.free_port()
    b_path = os.path.join(root, "b.yaml")
    with open(b_path, "w") as f:
        f.write("listen:\n  address: 127.0.0.1:%d\nhsm:\n  module: %s\n  token_label: %s\n  pin_file: %s\n"
                "store:\n  driver: postgres\n  dsn: \"%s\"\n  password_file: %s\nauth:\n  tokens:\n"
                "    - {name: admin, token_sha256: %s, policies: [root]}\n"
                % (b_port, SOFTHSM_MODULE, token.label, os.path.join(cluster["root"], "user.pin"), b_dsn,
                   pg.password_file, cs.token_hash(api_token)))
    copied = run_cli("store", "copy", "-from", a_path, "-to", b_path, env=token.env())
    assert copied.returncode == 0, copied.stderr
    assert "keys: 2 copied, 2 in the target" in copied.stdout
    assert "key versions: 3 copied, 3 in the target" in copied.stdout
    again = run_cli("store", "copy", "-from", a_path, "-to", b_path, env=token.env())
    assert again.returncode == 1 and "not empty" in again.stderr and "-force" in again.stderr
    forced = run_cli("store", "copy", "-from", a_path, "-to", b_path, "-force", env=token.env())
    assert forced.returncode == 0, forced.stderr

    # The PostgreSQL-backed server serves what was made on SQLite.
    b = cs.ConfiguredServer(b_path, token.env(), token=api_token, port=b_port).start()
    try:
        assert ok(b.request("POST", "/v1/transit/decrypt/" + name, {"ciphertext": ct}))["data"]["plaintext"] == b64(b"moved")
        got = ok(b.request("GET", "/kms/api/v2/keys/" + std_id, token=False, headers=hdr))["resources"][0]
        assert got["payload"] == b64(b"\x05" * 48)
    finally:
        b.stop()

    # And back into a new SQLite file.
    c_path = os.path.join(root, "c.yaml")
    with open(a_path) as src, open(c_path, "w") as dst:
        dst.write(src.read().replace("path: a.db", "path: c.db"))
    back = run_cli("store", "copy", "-from", b_path, "-to", c_path, env=token.env())
    assert back.returncode == 0, back.stderr
    assert "keys: 2 copied, 2 in the target" in back.stdout

    # Configs naming different tokens are refused: the metadata points at one token's objects.
    d_path = os.path.join(root, "d.yaml")
    with open(c_path) as src, open(d_path, "w") as dst:
        dst.write(src.read().replace("token_label: %s" % token.label, "token_label: another").replace("c.db", "d.db"))
    refused = run_cli("store", "copy", "-from", c_path, "-to", d_path, env=token.env())
    assert refused.returncode == 2 and "different tokens" in refused.stderr


# Lists (label, CKA_ID hex) of every key object on a token, in its own /usr/bin/python3 so
# SOFTHSM2_CONF applies before libsofthsm2 loads. The PIN comes from the environment.
LIST_OBJECTS = r'''
import json, os, sys
import PyKCS11
lib = PyKCS11.PyKCS11Lib()
lib.load(sys.argv[1])
slot = [s for s in lib.getSlotList(tokenPresent=True) if lib.getTokenInfo(s).label.strip() == sys.argv[2]][0]
session = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION)
session.login(os.environ["P11KMS_TEST_USER_PIN"])
out = []
for obj in session.findObjects([]):
    label, cid = session.getAttributeValue(obj, [PyKCS11.CKA_LABEL, PyKCS11.CKA_ID])
    out.append([label, bytes(cid).hex()])
session.logout()
print(json.dumps(out))
'''


def token_objects(cluster):
    token = cluster["token"]
    out = subprocess.run(["/usr/bin/python3", "-c", LIST_OBJECTS, SOFTHSM_MODULE, token.label],
                         env=token.env(P11KMS_TEST_USER_PIN=token.user_pin), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    return json.loads(out.stdout)


def test_a_hundred_rotations_over_two_instances_land_once_each(cluster):
    import concurrent.futures
    a, b = cluster["a"], cluster["b"]
    name = unique_name("pgrot")
    ok(a.request("POST", "/v1/transit/keys/" + name, {}))

    def rotate(i):
        srv = a if i % 2 else b
        return srv.request("POST", "/v1/transit/keys/%s/rotate" % name, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(rotate, range(100)))
    assert all(r.status_code == 200 for r in results), [describe(r) for r in results if r.status_code != 200][:3]
    info = ok(b.request("GET", "/v1/transit/keys/" + name))["data"]
    assert info["latest_version"] == 101
    assert sorted(int(v) for v in info["keys"]) == list(range(1, 102))
    # Each version is its own token object, and no object was left behind by a lost race.
    prefix = "p11kms/root/%s/v" % name
    labels = [label for label, _ in token_objects(cluster) if label.startswith(prefix)]
    assert sorted(labels, key=lambda l: int(l[len(prefix):])) == [prefix + str(v) for v in range(1, 102)]
    # Every version serves: encrypt with each through the other instance.
    for v in (1, 50, 101):
        ct = ok(a.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(b"v"), "key_version": v}))
        assert ct["data"]["ciphertext"].startswith("vault:v%d:" % v)


def test_concurrent_creates_of_one_name_leave_no_orphan_object(cluster):
    import concurrent.futures
    a, b = cluster["a"], cluster["b"]
    names = [unique_name("pgcr") for _ in range(10)]

    def create(args):
        srv, name = args
        return srv.request("POST", "/v1/transit/keys/" + name, {"type": "aes256-gcm96"})

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(create, [(s, n) for n in names for s in (a, b)]))
    assert all(r.status_code == 200 for r in results), [describe(r) for r in results if r.status_code != 200][:3]
    objects = token_objects(cluster)
    for n in names:
        assert len([l for l, _ in objects if l == "p11kms/root/%s/v1" % n]) == 1, n
