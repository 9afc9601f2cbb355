"""Integration: two p11kms instances on one PostgreSQL and one SoftHSM token see each other's
token objects at once, even when SoftHSM's own bookkeeping hides them.

SoftHSM 2.6.1 keeps a per-process index of its token directory and re-reads it only when the
token's generation counter moved since the process last looked; a process that commits an object
of its own moves the counter itself and so absorbs another process's bump without re-reading. The
sequence here makes that happen on purpose: instance A makes a key, then instance B (which has
not looked at the token since) makes one of its own, then B uses A's key. B must serve it (it
re-opens the module when an object the store names is not found), and a key deleted on B must
leave no object behind on the token.

Sweeps are set far apart so that no background listing re-reads the token in between.
"""

import base64
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from p11kms_testlib import describe, unique_name  # noqa: E402
from test_cluster_crash import psql, token_object_ids, two_instances  # noqa: E402

CLUSTER_YAML = "cluster:\n  intent_lease: 60s\n  heartbeat: 5\n  sweep_interval: 600s\n"
REOPEN_LOG = "re-opening the module to see objects other processes made"


def b64(b):
    return base64.b64encode(b).decode()


@pytest.fixture(scope="module")
def env():
    yield from two_instances("p11kms-visibility-it-", CLUSTER_YAML)


def ok(r):
    assert r.status_code in (200, 204), describe(r)
    return r.json() if r.status_code == 200 else None


def create(srv, name):
    ok(srv.request("POST", "/v1/transit/keys/" + name, {}))


def encrypt(srv, name, pt):
    return ok(srv.request("POST", "/v1/transit/encrypt/" + name, {"plaintext": b64(pt)}))["data"]["ciphertext"]


def decrypt(srv, name, ct):
    return base64.b64decode(ok(srv.request("POST", "/v1/transit/decrypt/" + name, {"ciphertext": ct}))["data"]["plaintext"])


def object_ids_of(env, name):
    rows = psql(env, "SELECT v.object_id FROM key_versions v JOIN keys k ON k.id = v.key_id"
                     " WHERE k.name = '%s' ORDER BY v.version" % name)
    return [r[0] for r in rows]


def reopens(srv):
    return srv.log().count(REOPEN_LOG)


def test_a_key_made_on_one_instance_serves_on_the_other_after_that_one_wrote(env):
    a, b = env["servers"]["a"], env["servers"]["b"]
    x, y = unique_name("made-on-a"), unique_name("made-on-b")
    before = reopens(b)
    create(a, x)
    create(b, y)  # b commits an object of its own: SoftHSM in b absorbs a's bump
    pt = os.urandom(32)
    ct = encrypt(b, x, pt)
    assert decrypt(a, x, ct) == pt
    assert decrypt(b, x, encrypt(a, x, pt)) == pt
    # b had to re-read the token to find x (else this test did not reproduce what it is about).
    assert reopens(b) == before + 1, b.log_tail()
    # A version made on b, used on a after a wrote an object of its own.
    ok(b.request("POST", "/v1/transit/keys/%s/rotate" % x))
    create(a, unique_name("made-on-a-again"))
    ct2 = encrypt(a, x, pt)
    assert ct2.startswith("vault:v2:"), ct2
    assert decrypt(b, x, ct2) == pt
    # Nothing is reported missing, and every request of the other instance still works.
    for srv in (a, b):
        h = srv.request("GET", "/v1/sys/health", token=False)
        assert h.status_code == 200, describe(h)
        assert decrypt(srv, y, encrypt(srv, y, pt)) == pt


def test_a_key_deleted_on_the_other_instance_leaves_no_object(env):
    a, b = env["servers"]["a"], env["servers"]["b"]
    w, v = unique_name("delete-me"), unique_name("bystander")
    create(a, w)
    create(b, v)  # again b absorbs a's bump before it ever looks for w's object
    objects = object_ids_of(env, w)
    assert len(objects) == 1
    on_token, _ = token_object_ids(env)
    assert objects[0] in on_token
    ok(b.request("POST", "/v1/transit/keys/%s/config" % w, {"deletion_allowed": True}))
    ok(b.request("DELETE", "/v1/transit/keys/" + w))
    assert a.request("GET", "/v1/transit/keys/" + w).status_code == 404
    on_token, _ = token_object_ids(env)
    assert objects[0] not in on_token, "the deleted key's object was left on the token"
    assert not psql(env, "SELECT object_id FROM intents WHERE object_id = '%s'" % objects[0])


def test_an_object_really_missing_is_reported_and_not_searched_for_on_every_request(env):
    a, b = env["servers"]["a"], env["servers"]["b"]
    gone = unique_name("really-gone")
    create(a, gone)
    object_id = object_ids_of(env, gone)[0]
    # Point the key's version at an object that exists nowhere (as after a token restored from an
    # older backup): the store names it, the token does not have it.
    psql(env, "UPDATE key_versions SET object_id = '%s' WHERE object_id = '%s'" % ("00" * 16, object_id))
    before = reopens(b)
    answers = [b.request("POST", "/v1/transit/encrypt/" + gone, {"plaintext": b64(b"x")}) for _ in range(5)]
    for r in answers:
        assert r.status_code == 503, describe(r)
        assert "token object is missing" in r.text, describe(r)
    # One re-read of the token for the first request; the others trust it for a while.
    assert reopens(b) - before <= 1
    # The instance keeps serving every other key.
    pt = os.urandom(8)
    other = unique_name("still-fine")
    create(b, other)
    assert decrypt(a, other, encrypt(b, other, pt)) == pt
