"""Key Protect rotation policies (`/kms/api/v2/keys/{id}/policies`) over HTTP against the dev
server: read, write, validation, removal, which keys may have one, and that a policy goes with
its key. (The rotation job itself is tested in tests/integration/keys/key_rotation_test.cpp,
where time can be moved forward.)"""

import os
import sys

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, describe, unique_name  # noqa: E402

BASE = "/kms/api/v2/keys"
KEY_TYPE = "application/vnd.ibm.kms.key+json"
POLICY_TYPE = "application/vnd.ibm.kms.policy+json"


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


def kms(server, method, path, body=None, status=200, instance="pol"):
    r = requests.request(method, server.url + BASE + path, json=body, timeout=30,
                         headers={"Authorization": "Bearer " + server.token, "bluemix-instance": instance})
    assert r.status_code == status, describe(r)
    return r.json() if r.content else None


def create(server, **resource):
    resource.setdefault("name", unique_name("pk"))
    resource["type"] = KEY_TYPE
    body = {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1}, "resources": [resource]}
    return kms(server, "POST", "", body, status=201)["resources"][0]


def policy_body(rotation):
    return {"metadata": {"collectionType": POLICY_TYPE, "collectionTotal": 1},
            "resources": [{"type": POLICY_TYPE, "rotation": rotation}]}


def test_a_key_starts_without_a_policy(server):
    key = create(server)
    got = kms(server, "GET", "/%s/policies" % key["id"])
    assert got["metadata"] == {"collectionType": POLICY_TYPE, "collectionTotal": 0}
    assert got["resources"] == []


def test_put_then_get_by_id_and_by_name(server):
    key = create(server)
    put = kms(server, "PUT", "/%s/policies" % key["id"], policy_body({"interval_month": 3}))
    assert put["metadata"]["collectionTotal"] == 1
    p = put["resources"][0]
    assert p["type"] == POLICY_TYPE
    assert p["rotation"]["interval_month"] == 3
    assert p["createdBy"] == "root" and p["lastUpdateDate"]
    got = kms(server, "GET", "/%s/policies" % key["name"])
    assert got["resources"][0]["rotation"]["interval_month"] == 3
    kms(server, "PUT", "/%s/policies" % key["id"], policy_body({"interval_month": 12}))
    assert kms(server, "GET", "/%s/policies" % key["id"])["resources"][0]["rotation"]["interval_month"] == 12


@pytest.mark.parametrize("rotation", [{"interval_month": 0}, {"interval_month": 13}, {"interval_month": "3"},
                                      {"interval_month": 2.5}, {}, {"enabled": "yes"}])
def test_bad_intervals_are_400_and_change_nothing(server, rotation):
    key = create(server)
    kms(server, "PUT", "/%s/policies" % key["id"], policy_body({"interval_month": 2}))
    r = kms(server, "PUT", "/%s/policies" % key["id"], policy_body(rotation), status=400)
    assert r["resources"][0]["reasons"][0]["status"] == 400
    assert "interval_month" in r["resources"][0]["errorMsg"] or "enabled" in r["resources"][0]["errorMsg"]
    assert kms(server, "GET", "/%s/policies" % key["id"])["resources"][0]["rotation"]["interval_month"] == 2


def test_missing_rotation_is_400(server):
    key = create(server)
    body = {"metadata": {"collectionType": POLICY_TYPE, "collectionTotal": 1}, "resources": [{"type": POLICY_TYPE}]}
    r = kms(server, "PUT", "/%s/policies" % key["id"], body, status=400)
    assert "rotation" in r["resources"][0]["errorMsg"]


def test_enabled_false_removes_the_policy(server):
    key = create(server)
    kms(server, "PUT", "/%s/policies" % key["id"], policy_body({"interval_month": 1}))
    got = kms(server, "PUT", "/%s/policies" % key["id"], policy_body({"enabled": False}))
    assert got["resources"] == []
    assert kms(server, "GET", "/%s/policies" % key["id"])["resources"] == []


def test_imported_and_standard_keys_cannot_rotate_themselves(server):
    imported = create(server, payload=b64(os.urandom(32)))
    r = kms(server, "PUT", "/%s/policies" % imported["id"], policy_body({"interval_month": 1}), status=400)
    assert "imported" in r["resources"][0]["errorMsg"]
    standard = create(server, extractable=True)
    kms(server, "PUT", "/%s/policies" % standard["id"], policy_body({"interval_month": 1}), status=400)
    assert kms(server, "GET", "/%s/policies" % imported["id"])["resources"] == []


def test_policy_goes_with_its_key(server):
    key = create(server)
    kms(server, "PUT", "/%s/policies" % key["id"], policy_body({"interval_month": 6}))
    kms(server, "DELETE", "/%s" % key["id"], status=204)
    kms(server, "GET", "/%s/policies" % key["id"], status=410)
    kms(server, "PUT", "/%s/policies" % key["id"], policy_body({"interval_month": 6}), status=410)
    again = create(server, name=key["name"])
    assert kms(server, "GET", "/%s/policies" % again["id"])["resources"] == []


def test_unknown_key_is_404(server):
    kms(server, "GET", "/%s/policies" % unique_name("nokey"), status=404)
