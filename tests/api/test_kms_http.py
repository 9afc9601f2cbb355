"""HTTP end to end against the real `p11kms server -dev` (and, for the roles, a configured
server): the Key Protect-style KMS dialect at /kms/api/v2/keys, documented in docs/api/kms.md.

Black-box: only HTTP requests (requests, curl, hvac), status codes, headers and bodies.
"""

import concurrent.futures
import datetime
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "integration"))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, unb64, unique_name  # noqa: E402
import configured_server as cs  # noqa: E402

KEY_TYPE = "application/vnd.ibm.kms.key+json"
ERR_TYPE = "application/vnd.ibm.kms.error+json"
BASE = "/kms/api/v2/keys"
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
ACTIONS = ("wrap", "unwrap", "rewrap", "rotate", "disable", "enable")
DEV_ROOT_TOKEN_NAME = "root"   # app/dev_mode.cpp names the -dev root token "root"


@pytest.fixture(scope="module")
def server():
    yield from tl.serve()


@pytest.fixture(autouse=True)
def _server_log_on_failure(request, server):
    yield from tl.log_tail_on_failure(request, server)


@pytest.fixture(scope="module")
def http():
    s = requests.Session()
    yield s
    s.close()


# -- helpers ---------------------------------------------------------------------------------

def new_instance():
    return "inst-" + secrets.token_hex(5)


def call(server, http, method, path="", body=None, instance=None, token=True, headers=None,
         params=None, raw=None, timeout=60):
    """One KMS request. token=True sends the root token as `Authorization: Bearer`, a string
    sends that one, None/False none. instance names the bluemix-instance header."""
    hdrs = {}
    if token is True:
        hdrs["Authorization"] = "Bearer " + server.token
    elif token:
        hdrs["Authorization"] = "Bearer " + token
    if instance is not None:
        hdrs["bluemix-instance"] = instance
    if body is not None or raw is not None:
        hdrs["Content-Type"] = KEY_TYPE
    if headers:
        hdrs.update(headers)
    data = raw if raw is not None else (None if body is None else json.dumps(body))
    return http.request(method, server.url + BASE + path, data=data, headers=hdrs,
                        params=params, timeout=timeout)


def describe(resp):
    return tl.describe(resp)


def media_type(resp):
    return resp.headers.get("Content-Type", "").split(";")[0].strip()


def ok(resp, status=200):
    """Assert a success status; bodies (not 204) are JSON in the key media type."""
    assert resp.status_code == status, describe(resp)
    if status == 204:
        assert resp.content == b"", describe(resp)
        return None
    assert media_type(resp) == KEY_TYPE, "Content-Type %r: %s" % (resp.headers.get("Content-Type"),
                                                                   describe(resp))
    return resp.json()


def err(resp, status, *needles):
    """Assert a KMS error: status, media type, the error collection, and that the message
    mentions each needle (case-insensitive)."""
    assert resp.status_code == status, describe(resp)
    assert media_type(resp) == ERR_TYPE, "Content-Type %r: %s" % (resp.headers.get("Content-Type"),
                                                                   describe(resp))
    body = resp.json()
    assert body["metadata"] == {"collectionType": ERR_TYPE, "collectionTotal": 1}, body
    assert isinstance(body["resources"], list) and len(body["resources"]) == 1, body
    res = body["resources"][0]
    assert isinstance(res["errorMsg"], str) and res["errorMsg"], body
    assert isinstance(res["reasons"], list) and len(res["reasons"]) >= 1, body
    reason = res["reasons"][0]
    for field in ("code", "message", "status", "moreInfo"):
        assert field in reason, body
    assert reason["status"] == status, body
    assert isinstance(reason["code"], str) and reason["code"], body
    assert isinstance(reason["message"], str) and reason["message"], body
    text = (res["errorMsg"] + " " + reason["message"]).lower()
    for n in needles:
        assert n.lower() in text, "error message should mention %r: %s" % (n, body)
    return body


def envelope_key(body):
    assert body["metadata"] == {"collectionType": KEY_TYPE, "collectionTotal": 1}, body
    assert isinstance(body["resources"], list) and len(body["resources"]) == 1, body
    return body["resources"][0]


def create_body(name, **fields):
    res = {"type": KEY_TYPE, "name": name}
    res.update(fields)
    return {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1}, "resources": [res]}


def create(server, http, name=None, instance=None, status=201, **fields):
    name = name or unique_name("kms")
    r = call(server, http, "POST", body=create_body(name, **fields), instance=instance)
    if status != 201:
        return r
    return envelope_key(ok(r, 201))


def get_key(server, http, ref, instance=None):
    return envelope_key(ok(call(server, http, "GET", "/" + ref, instance=instance)))


def action(server, http, ref, name, body=None, instance=None, headers=None, token=True):
    return call(server, http, "POST", "/" + ref, body=body if body is not None else {},
                instance=instance, params={"action": name}, headers=headers, token=token)


def wrap(server, http, ref, plaintext=None, aad=None, instance=None):
    body = {}
    if plaintext is not None:
        body["plaintext"] = b64(plaintext)
    if aad is not None:
        body["aad"] = aad
    return ok(action(server, http, ref, "wrap", body, instance))


def unwrap(server, http, ref, ciphertext, aad=None, instance=None):
    body = {"ciphertext": ciphertext}
    if aad is not None:
        body["aad"] = aad
    return ok(action(server, http, ref, "unwrap", body, instance))


def list_keys(server, http, instance, **params):
    body = ok(call(server, http, "GET", instance=instance, params=params or None))
    assert body["metadata"]["collectionType"] == KEY_TYPE, body
    assert body["metadata"]["collectionTotal"] == len(body["resources"]), body
    return body["resources"]


def parse_time(text):
    assert isinstance(text, str) and RFC3339_RE.match(text), "not RFC 3339: %r" % (text,)
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def rfc3339(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- create ----------------------------------------------------------------------------------

def test_create_root_key_returns_201_and_the_key_in_the_envelope(server, http):
    inst = new_instance()
    name = unique_name("root")
    before = time.time()
    r = call(server, http, "POST", body=create_body(name, description="orders DEKs",
                                                    expirationDate="2099-01-01T00:00:00Z",
                                                    extractable=False), instance=inst)
    key = envelope_key(ok(r, 201))
    assert key["type"] == KEY_TYPE
    assert UUID4_RE.match(key["id"]), key
    assert key["name"] == name
    assert key["state"] == 1
    assert key["extractable"] is False
    assert key["imported"] is False
    assert key["deleted"] is False
    assert key["algorithmType"] == "AES"
    assert key["description"] == "orders DEKs"
    assert parse_time(key["expirationDate"]) == datetime.datetime(2099, 1, 1, tzinfo=datetime.timezone.utc)
    assert key["createdBy"] == DEV_ROOT_TOKEN_NAME
    created = parse_time(key["creationDate"]).timestamp()
    assert before - 5 <= created <= time.time() + 5, key
    parse_time(key["lastUpdateDate"])
    assert set(key["keyVersion"]) >= {"id", "creationDate"}, key
    assert isinstance(key["keyVersion"]["id"], str) and key["keyVersion"]["id"], key
    parse_time(key["keyVersion"]["creationDate"])
    assert "payload" not in key


def test_create_defaults_to_a_root_key_without_optional_fields(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    assert key["extractable"] is False
    assert key["state"] == 1
    assert "description" not in key
    assert "expirationDate" not in key
    got = get_key(server, http, key["id"], inst)
    assert "payload" not in got
    assert got["id"] == key["id"]


def test_root_key_is_never_shown_with_material(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst, extractable=False)
    for ref in (key["id"], key["name"]):
        assert "payload" not in get_key(server, http, ref, inst)
    for k in list_keys(server, http, inst):
        assert "payload" not in k


def test_generated_standard_key_shows_its_payload(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst, extractable=True)
    assert key["extractable"] is True
    assert key["imported"] is False
    assert "payload" not in key
    got = get_key(server, http, key["id"], inst)
    material = unb64(got["payload"])
    assert len(material) == 32
    again = get_key(server, http, key["name"], inst)
    assert unb64(again["payload"]) == material
    other = get_key(server, http, create(server, http, instance=inst, extractable=True)["id"], inst)
    assert unb64(other["payload"]) != material


@pytest.mark.parametrize("size", [32, 48, 64])
def test_imported_standard_key_returns_exactly_the_imported_bytes(server, http, size):
    inst = new_instance()
    material = os.urandom(size)
    key = create(server, http, instance=inst, extractable=True, payload=b64(material))
    assert key["imported"] is True
    assert key["extractable"] is True
    assert "payload" not in key
    got = get_key(server, http, key["id"], inst)
    assert unb64(got["payload"]) == material


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 65, 128])
def test_standard_key_payload_of_a_wrong_size_is_400(server, http, size):
    inst = new_instance()
    r = create(server, http, instance=inst, status=400, extractable=True, payload=b64(os.urandom(size)))
    err(r, 400)
    assert list_keys(server, http, inst) == []


def test_imported_root_key_wraps_and_never_shows_material(server, http):
    inst = new_instance()
    material = os.urandom(32)
    key = create(server, http, instance=inst, payload=b64(material))
    assert key["imported"] is True
    assert key["extractable"] is False
    got = get_key(server, http, key["id"], inst)
    assert "payload" not in got
    dek = os.urandom(32)
    w = wrap(server, http, key["id"], dek, instance=inst)
    assert unb64(unwrap(server, http, key["id"], w["ciphertext"], instance=inst)["plaintext"]) == dek


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33, 48, 64])
def test_root_key_payload_must_be_exactly_32_bytes(server, http, size):
    inst = new_instance()
    r = create(server, http, instance=inst, status=400, payload=b64(os.urandom(size)))
    err(r, 400)
    assert list_keys(server, http, inst) == []


def test_payload_that_is_not_base64_is_400(server, http):
    r = create(server, http, instance=new_instance(), status=400, payload="not base64 !!")
    err(r, 400, "payload")


def test_duplicate_name_is_409_and_the_name_is_free_again_after_delete(server, http):
    inst = new_instance()
    name = unique_name("dup")
    first = create(server, http, name, instance=inst)
    err(create(server, http, name, instance=inst, status=409), 409, name)
    # a standard key cannot take the name either
    err(create(server, http, name, instance=inst, status=409, extractable=True), 409)
    # another instance has its own names
    other = create(server, http, name, instance=new_instance())
    assert other["id"] != first["id"]
    ok(call(server, http, "DELETE", "/" + first["id"], instance=inst), 204)
    again = create(server, http, name, instance=inst)
    assert again["id"] != first["id"]
    assert again["name"] == name
    assert get_key(server, http, name, inst)["id"] == again["id"]


@pytest.mark.parametrize("name", [
    "0f8fad5b-d9cb-469f-a165-70867728950e",     # a v4 UUID
    "0F8FAD5B-D9CB-469F-A165-70867728950E",     # upper-case UUID
    "00000000-0000-0000-0000-000000000000",     # UUID-shaped, not v4
])
def test_name_that_looks_like_a_uuid_is_400(server, http, name):
    inst = new_instance()
    err(create(server, http, name, instance=inst, status=400), 400)
    assert list_keys(server, http, inst) == []


@pytest.mark.parametrize("name", ["", "has space", "semi;colon", "sl/ash", "under\u00fcmlaut", "q?x",
                                  "a" * 129])
def test_invalid_name_is_400(server, http, name):
    inst = new_instance()
    r = call(server, http, "POST", body=create_body(name), instance=inst)
    err(r, 400)
    assert list_keys(server, http, inst) == []


def test_valid_names_of_every_allowed_character_and_128_chars(server, http):
    inst = new_instance()
    for name in ("A.b-c_9", "x" * 116 + secrets.token_hex(6), "7", "-.-"):
        key = create(server, http, name, instance=inst)
        assert key["name"] == name
        assert get_key(server, http, name, inst)["id"] == key["id"]


def test_expiration_date_in_the_past_or_malformed_is_400(server, http):
    inst = new_instance()
    for when in ("2001-01-01T00:00:00Z", rfc3339(time.time() - 60)):
        err(create(server, http, instance=inst, status=400, expirationDate=when), 400, "expirationDate")
    for when in ("tomorrow", "2030-13-01T00:00:00Z", "2030-01-01", "1893456000", "2030-01-01 00:00:00"):
        err(create(server, http, instance=inst, status=400, expirationDate=when), 400, "expirationDate")
    assert list_keys(server, http, inst) == []


@pytest.mark.parametrize("body", [
    {},
    {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1}},
    {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1}, "resources": []},
    {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1}, "resources": {"name": "x"}},
    {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1},
     "resources": [{"type": KEY_TYPE}]},                                   # no name
    {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1},
     "resources": [{"type": KEY_TYPE, "name": 7}]},                         # name not a string
    {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1},
     "resources": [{"type": KEY_TYPE, "name": "ok-name", "extractable": "yes"}]},
])
def test_malformed_create_body_is_400(server, http, body):
    inst = new_instance()
    err(call(server, http, "POST", body=body, instance=inst), 400)
    assert list_keys(server, http, inst) == []


def test_create_body_that_is_not_json_is_400(server, http):
    err(call(server, http, "POST", raw="{not json", instance=new_instance()), 400)


def test_create_checks_type_and_description(server, http):
    inst = new_instance()
    err(create(server, http, instance=inst, status=400, type="application/json"), 400, "type")
    err(create(server, http, instance=inst, status=400, description="x" * 241), 400, "description")
    assert list_keys(server, http, inst) == []
    key = create(server, http, instance=inst, description="y" * 240)
    assert key["description"] == "y" * 240
    # the type may be left out
    r = call(server, http, "POST", instance=inst, body={
        "metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1},
        "resources": [{"name": unique_name("notype")}]})
    assert envelope_key(ok(r, 201))["type"] == KEY_TYPE


def test_expiration_date_with_an_offset(server, http):
    key = create(server, http, instance=new_instance(), expirationDate="2030-01-01T02:00:00+02:00")
    assert parse_time(key["expirationDate"]) == datetime.datetime(2030, 1, 1, tzinfo=datetime.timezone.utc)


def test_invalid_instance_header_is_400_and_wrong_method_405(server, http):
    for bad in ("bad instance!", "x" * 65, "a/b"):
        err(call(server, http, "GET", instance=bad), 400)
    err(call(server, http, "PUT", body={}, instance=new_instance()), 405)
    err(call(server, http, "PATCH", "/" + create(server, http)["id"], body={}), 405)


# -- auth, instances, headers ----------------------------------------------------------------

def test_missing_or_unknown_token_is_401(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    attempts = [
        ("GET", "", None, None),
        ("POST", "", create_body(unique_name()), None),
        ("GET", "/" + key["id"], None, None),
        ("POST", "/" + key["id"], {"plaintext": b64(b"x")}, {"action": "wrap"}),
        ("DELETE", "/" + key["id"], None, None),
        ("HEAD", "", None, None),
    ]
    for method, path, body, params in attempts:
        for token in (None, "hvs.not-a-real-token"):
            # HEAD on a fresh connection: a stray body after a HEAD answer (see
            # test_head_errors_have_no_body) must not break the shared session's next request
            r = call(server, requests if method == "HEAD" else http, method, path, body=body,
                     instance=inst, token=token, params=params,
                     headers={"Connection": "close"} if method == "HEAD" else None)
            if method == "HEAD":
                assert r.status_code == 401, describe(r)
            else:
                err(r, 401)
        r = http.request(method, server.url + BASE + path, params=params, json=body,
                         headers={"X-Vault-Token": "wrong", "bluemix-instance": inst}, timeout=30)
        assert r.status_code == 401, describe(r)
    # nothing happened to the key
    assert get_key(server, http, key["id"], inst)["state"] == 1
    # X-Vault-Token is accepted as well as Bearer
    r = http.get(server.url + BASE + "/" + key["id"],
                 headers={"X-Vault-Token": server.token, "bluemix-instance": inst}, timeout=30)
    assert envelope_key(ok(r))["id"] == key["id"]


def test_a_key_is_invisible_from_another_instance(server, http):
    a, b = new_instance(), new_instance()
    key = create(server, http, instance=a)
    dek = wrap(server, http, key["id"], b"secret", instance=a)
    for inst in (b, None):
        err(call(server, http, "GET", "/" + key["id"], instance=inst), 404)
        err(call(server, http, "GET", "/" + key["name"], instance=inst), 404)
        err(action(server, http, key["id"], "wrap", {"plaintext": b64(b"x")}, instance=inst), 404)
        err(action(server, http, key["id"], "unwrap", {"ciphertext": dek["ciphertext"]}, instance=inst), 404)
        err(call(server, http, "DELETE", "/" + key["id"], instance=inst), 404)
        assert key["id"] not in [k["id"] for k in list_keys(server, http, inst)]
    assert [k["id"] for k in list_keys(server, http, a)] == [key["id"]]
    assert list_keys(server, http, b) == []


def test_icp_instance_header_selects_the_instance_too(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    r = call(server, http, "GET", "/" + key["id"], headers={"icp-instance": inst})
    assert envelope_key(ok(r))["id"] == key["id"]
    r = call(server, http, "POST", body=create_body(unique_name("icp")), headers={"icp-instance": inst})
    made = envelope_key(ok(r, 201))
    assert sorted(k["id"] for k in list_keys(server, http, inst)) == sorted([key["id"], made["id"]])


def test_no_instance_header_means_the_root_namespace(server, http):
    key = create(server, http)   # no header
    r = http.post(server.url + "/v1/transit/encrypt/" + key["name"],
                  json={"plaintext": b64(b"hello")}, headers={"X-Vault-Token": server.token}, timeout=30)
    assert r.status_code == 200, describe(r)
    err(call(server, http, "GET", "/" + key["id"], instance=new_instance()), 404)
    assert get_key(server, http, key["id"])["id"] == key["id"]


def test_correlation_id_is_echoed_on_success_and_error(server, http):
    inst = new_instance()
    cid = "corr-" + secrets.token_hex(8)
    r = call(server, http, "POST", body=create_body(unique_name()), instance=inst,
             headers={"correlation-id": cid})
    ok(r, 201)
    assert r.headers.get("correlation-id") == cid
    r = call(server, http, "GET", "/" + "no-such-key", instance=inst, headers={"correlation-id": cid})
    err(r, 404)
    assert r.headers.get("correlation-id") == cid
    r = call(server, http, "GET", instance=inst, token=None, headers={"correlation-id": cid})
    err(r, 401)
    assert r.headers.get("correlation-id") == cid


# -- list and count --------------------------------------------------------------------------

def test_list_is_in_creation_order_with_paging(server, http):
    inst = new_instance()
    made = [create(server, http, "list-%d-%s" % (i, secrets.token_hex(3)), instance=inst,
                   extractable=(i % 2 == 1))
            for i in range(5)]
    ids = [k["id"] for k in made]
    keys = list_keys(server, http, inst)
    assert [k["id"] for k in keys] == ids
    for k, m in zip(keys, made):
        assert "payload" not in k
        assert k["name"] == m["name"]
        assert k["state"] == 1
        assert k["extractable"] == m["extractable"]
        assert k["keyVersion"]["id"] == m["keyVersion"]["id"]
    assert [k["id"] for k in list_keys(server, http, inst, limit=2)] == ids[:2]
    assert [k["id"] for k in list_keys(server, http, inst, limit=2, offset=2)] == ids[2:4]
    assert [k["id"] for k in list_keys(server, http, inst, limit=2, offset=4)] == ids[4:]
    assert [k["id"] for k in list_keys(server, http, inst, offset=1)] == ids[1:]
    assert list_keys(server, http, inst, offset=5) == []
    assert list_keys(server, http, inst, offset=1000) == []
    assert [k["id"] for k in list_keys(server, http, inst, limit=5000)] == ids
    assert [k["id"] for k in list_keys(server, http, inst, limit=1)] == ids[:1]


def test_empty_instance_lists_nothing(server, http):
    r = call(server, http, "GET", instance=new_instance())
    body = ok(r)
    assert body == {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 0}, "resources": []}


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 5001}, {"limit": -1}, {"limit": "abc"},
                                    {"offset": -1}, {"offset": "x"}, {"state": "4"}, {"state": "1,9"},
                                    {"state": "active"}])
def test_bad_list_parameters_are_400(server, http, params):
    err(call(server, http, "GET", instance=new_instance(), params=params), 400)
    r = call(server, requests, "HEAD", instance=new_instance(), params=params, headers={"Connection": "close"})
    assert r.status_code == 400, describe(r)


def test_state_filter_and_destroyed_keys(server, http):
    inst = new_instance()
    active = create(server, http, instance=inst)
    suspended = create(server, http, instance=inst)
    deleted = create(server, http, instance=inst)
    ok(action(server, http, suspended["id"], "disable", instance=inst), 204)
    ok(call(server, http, "DELETE", "/" + deleted["id"], instance=inst), 204)

    def ids(**p):
        return [k["id"] for k in list_keys(server, http, inst, **p)]

    assert ids() == [active["id"], suspended["id"]]
    assert ids(state="1") == [active["id"]]
    assert ids(state="2") == [suspended["id"]]
    assert ids(state="1,2") == [active["id"], suspended["id"]]
    assert ids(state="0,3") == []
    assert ids(state="5") == [deleted["id"]]
    assert ids(state="1,2,5") == [active["id"], suspended["id"], deleted["id"]]
    gone = list_keys(server, http, inst, state="5")[0]
    assert gone["state"] == 5 and gone["deleted"] is True and "payload" not in gone
    states = {k["id"]: k["state"] for k in list_keys(server, http, inst, state="1,2,5")}
    assert states == {active["id"]: 1, suspended["id"]: 2, deleted["id"]: 5}


def head_total(server, http, inst, **params):
    r = call(server, http, "HEAD", instance=inst, params=params or None)
    assert r.status_code == 200, describe(r)
    assert r.content == b"", describe(r)
    assert "Key-Total" in r.headers, dict(r.headers)
    return int(r.headers["Key-Total"])


def test_head_counts_keys_with_the_same_filters(server, http):
    inst = new_instance()
    assert head_total(server, http, inst) == 0
    made = [create(server, http, instance=inst) for _ in range(4)]
    assert head_total(server, http, inst) == 4
    ok(action(server, http, made[0]["id"], "disable", instance=inst), 204)
    ok(call(server, http, "DELETE", "/" + made[1]["id"], instance=inst), 204)
    assert head_total(server, http, inst) == 3
    assert head_total(server, http, inst, state="1") == 2
    assert head_total(server, http, inst, state="2") == 1
    assert head_total(server, http, inst, state="5") == 1
    assert head_total(server, http, inst, state="1,2,5") == 4
    assert head_total(server, http, new_instance()) == 0


def raw_exchange(server, request_text, timeout=5):
    """Send one raw HTTP/1.1 request (Connection: close) and read everything until the server
    closes: (status, headers dict, bytes after the header block)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(request_text.encode())
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    return int(lines[0].split()[1]), headers, rest


@pytest.mark.parametrize("case", ["ok", "no-token", "bad-limit"])
def test_head_answers_have_no_body(server, case):
    """A HEAD answer never carries content (RFC 9110 9.3.2), errors included; otherwise the
    stray bytes are read as the next response on a keep-alive connection."""
    auth = "" if case == "no-token" else "Authorization: Bearer %s\r\n" % server.token
    query = "?limit=0" if case == "bad-limit" else ""
    status, headers, rest = raw_exchange(
        server, "HEAD %s%s HTTP/1.1\r\nHost: 127.0.0.1\r\n%sbluemix-instance: %s\r\n"
                "Connection: close\r\n\r\n" % (BASE, query, auth, new_instance()))
    assert status == {"ok": 200, "no-token": 401, "bad-limit": 400}[case], (status, headers, rest)
    assert rest == b"", "HEAD answer %d carried a body: %r" % (status, rest[:200])
    if case == "ok":
        assert headers.get("key-total") == "0", headers


def test_head_error_does_not_corrupt_a_keep_alive_connection(server):
    s = requests.Session()
    try:
        for _ in range(5):
            r = s.head(server.url + BASE, headers={"bluemix-instance": new_instance()}, timeout=10)
            assert r.status_code == 401, describe(r)
            r = s.get(server.url + BASE, headers={"Authorization": "Bearer " + server.token,
                                                  "bluemix-instance": new_instance()}, timeout=10)
            assert r.status_code == 200, describe(r)
    finally:
        s.close()


def test_curl_head_does_not_hang(server, http):
    inst = new_instance()
    create(server, http, instance=inst)
    create(server, http, instance=inst)
    started = time.monotonic()
    out = subprocess.run(
        ["curl", "-sS", "-m", "5", "-X", "HEAD", "-D", "-", server.url + BASE,
         "-H", "Authorization: Bearer " + server.token, "-H", "bluemix-instance: " + inst],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    elapsed = time.monotonic() - started
    assert out.returncode == 0, "curl rc %d after %.1fs: %s" % (out.returncode, elapsed, out.stderr)
    assert elapsed < 4, elapsed
    text = out.stdout.decode("latin-1")
    status_line = text.splitlines()[0]
    assert re.match(r"^HTTP/1\.[01] 200", status_line), text
    headers = {l.split(":", 1)[0].strip().lower(): l.split(":", 1)[1].strip()
               for l in text.splitlines()[1:] if ":" in l}
    assert headers.get("key-total") == "2", text


# -- read ------------------------------------------------------------------------------------

def test_get_by_id_and_by_name_agree(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst, description="d1")
    by_id = get_key(server, http, key["id"], inst)
    by_name = get_key(server, http, key["name"], inst)
    assert by_id == by_name
    for field in ("type", "id", "name", "state", "extractable", "imported", "creationDate", "createdBy",
                  "algorithmType", "keyVersion", "deleted", "description"):
        assert by_id[field] == key[field], field


def test_unknown_key_is_404(server, http):
    inst = new_instance()
    for ref in ("no-such-key", "0f8fad5b-d9cb-469f-a165-70867728950e"):
        err(call(server, http, "GET", "/" + ref, instance=inst), 404)
        err(action(server, http, ref, "wrap", {"plaintext": b64(b"x")}, instance=inst), 404)
        err(action(server, http, ref, "rotate", instance=inst), 404)
        err(call(server, http, "DELETE", "/" + ref, instance=inst), 404)


# -- wrap, unwrap, rewrap --------------------------------------------------------------------

def test_wrap_unwrap_round_trip_with_aad(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    dek = os.urandom(32)
    aad = ["tenant:42", "", "purpose=orders"]
    w = wrap(server, http, key["id"], dek, aad, inst)
    assert set(w) == {"ciphertext", "keyVersion"}, w
    assert w["keyVersion"] == {"id": key["keyVersion"]["id"]}
    assert dek not in unb64(w["ciphertext"])
    u = unwrap(server, http, key["id"], w["ciphertext"], aad, inst)
    assert unb64(u["plaintext"]) == dek
    assert u["keyVersion"]["id"] == key["keyVersion"]["id"]
    assert "rewrappedKeyVersion" not in u and "ciphertext" not in u
    # by name as well, and two wraps of one DEK differ
    w2 = wrap(server, http, key["name"], dek, aad, inst)
    assert w2["ciphertext"] != w["ciphertext"]
    assert unb64(unwrap(server, http, key["name"], w2["ciphertext"], aad, inst)["plaintext"]) == dek


def test_wrap_without_plaintext_generates_a_32_byte_dek(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    w = wrap(server, http, key["id"], instance=inst)
    assert set(w) == {"ciphertext", "keyVersion", "plaintext"}, w
    dek = unb64(w["plaintext"])
    assert len(dek) == 32
    assert unb64(unwrap(server, http, key["id"], w["ciphertext"], instance=inst)["plaintext"]) == dek
    w2 = wrap(server, http, key["id"], aad=["a"], instance=inst)
    assert unb64(w2["plaintext"]) != dek
    assert unb64(unwrap(server, http, key["id"], w2["ciphertext"], ["a"], inst)["plaintext"]) == unb64(w2["plaintext"])


def test_wrap_limits(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    kid = key["id"]
    # plaintext 1..4096 bytes
    for n in (1, 4096):
        dek = os.urandom(n)
        w = wrap(server, http, kid, dek, instance=inst)
        assert unb64(unwrap(server, http, kid, w["ciphertext"], instance=inst)["plaintext"]) == dek
    err(action(server, http, kid, "wrap", {"plaintext": b64(os.urandom(4097))}, instance=inst), 400, "plaintext")
    err(action(server, http, kid, "wrap", {"plaintext": ""}, instance=inst), 400, "plaintext")
    err(action(server, http, kid, "wrap", {"plaintext": "%%%not-base64"}, instance=inst), 400, "plaintext")
    err(action(server, http, kid, "wrap", {"plaintext": 12}, instance=inst), 400, "plaintext")
    # aad: up to 126 strings of 0..255 bytes
    aad_max = ["e%d" % i for i in range(126)]
    w = wrap(server, http, kid, b"k", aad_max, inst)
    assert unb64(unwrap(server, http, kid, w["ciphertext"], aad_max, inst)["plaintext"]) == b"k"
    long_entry = ["x" * 255]
    w = wrap(server, http, kid, b"k", long_entry, inst)
    assert unb64(unwrap(server, http, kid, w["ciphertext"], long_entry, inst)["plaintext"]) == b"k"
    err(action(server, http, kid, "wrap", {"plaintext": b64(b"k"), "aad": aad_max + ["one-more"]},
               instance=inst), 400, "aad")
    err(action(server, http, kid, "wrap", {"plaintext": b64(b"k"), "aad": ["x" * 256]}, instance=inst), 400, "aad")
    for bad in ([1], ["a", None], [{"a": 1}], "not-a-list", {"a": "b"}):
        err(action(server, http, kid, "wrap", {"plaintext": b64(b"k"), "aad": bad}, instance=inst), 400, "aad")
    # unwrap checks aad the same way
    err(action(server, http, kid, "unwrap", {"ciphertext": w["ciphertext"], "aad": ["x" * 256]}, instance=inst),
        400, "aad")


def test_unwrap_refuses_wrong_aad_tampering_and_foreign_ciphertexts(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    other = create(server, http, instance=inst)
    kid = key["id"]
    dek = os.urandom(32)
    aad = ["a", "b"]
    ct = wrap(server, http, kid, dek, aad, inst)["ciphertext"]

    def refused(body):
        err(action(server, http, kid, "unwrap", body, instance=inst), 400)

    refused({"ciphertext": ct})                          # aad missing
    refused({"ciphertext": ct, "aad": ["a"]})            # aad shorter
    refused({"ciphertext": ct, "aad": ["b", "a"]})       # aad reordered
    refused({"ciphertext": ct, "aad": ["ab"]})           # aad concatenated
    refused({"ciphertext": ct, "aad": ["a", "b", ""]})   # aad longer
    raw = bytearray(unb64(ct))
    for pos in (len(raw) - 1, len(raw) // 2, 0, 4):
        t = bytearray(raw)
        t[pos] ^= 0x01
        refused({"ciphertext": b64(bytes(t)), "aad": aad})
    refused({"ciphertext": b64(bytes(raw[:-1])), "aad": aad})
    refused({"ciphertext": "garbage!!", "aad": aad})
    refused({"ciphertext": b64(b"\x01\x00\x00\x00\x07" + os.urandom(44)), "aad": aad})  # no v7
    refused({"ciphertext": b64(b"\x02" + raw[1:]), "aad": aad})                        # wrong format byte
    refused({"ciphertext": b64(raw[:20]), "aad": aad})                                  # too short
    refused({"ciphertext": "", "aad": aad})
    refused({"aad": aad})                                 # no ciphertext
    refused({"ciphertext": 5, "aad": aad})
    # another key's ciphertext, same aad
    foreign = wrap(server, http, other["id"], dek, aad, inst)["ciphertext"]
    refused({"ciphertext": foreign, "aad": aad})
    # a transit ciphertext is not a wrap ciphertext
    r = http.post(server.url + "/v1/transit/encrypt/" + key["name"], json={"plaintext": b64(dek)},
                  headers={"X-Vault-Token": server.token, "X-Vault-Namespace": inst}, timeout=30)
    assert r.status_code == 200, describe(r)
    refused({"ciphertext": r.json()["data"]["ciphertext"], "aad": aad})
    # the genuine one still works
    assert unb64(unwrap(server, http, kid, ct, aad, inst)["plaintext"]) == dek
    # rewrap refuses the same things
    err(action(server, http, kid, "rewrap", {"ciphertext": ct, "aad": ["a"]}, instance=inst), 400)
    err(action(server, http, kid, "rewrap", {"ciphertext": foreign, "aad": aad}, instance=inst), 400)


def test_standard_key_cannot_wrap_unwrap_rewrap_or_rotate(server, http):
    inst = new_instance()
    std = create(server, http, instance=inst, extractable=True)
    root = create(server, http, instance=inst)
    ct = wrap(server, http, root["id"], b"dek", instance=inst)["ciphertext"]
    err(action(server, http, std["id"], "wrap", {"plaintext": b64(b"dek")}, instance=inst), 400)
    err(action(server, http, std["id"], "wrap", {}, instance=inst), 400)
    err(action(server, http, std["id"], "unwrap", {"ciphertext": ct}, instance=inst), 400)
    err(action(server, http, std["id"], "rewrap", {"ciphertext": ct}, instance=inst), 400)
    err(action(server, http, std["id"], "rotate", instance=inst), 400)
    err(action(server, http, std["id"], "rotate", {"payload": b64(os.urandom(32))}, instance=inst), 400)
    assert get_key(server, http, std["id"], inst)["keyVersion"]["id"] == std["keyVersion"]["id"]


# -- rotation --------------------------------------------------------------------------------

def test_rotation_unwrap_rewraps_old_ciphertexts_and_rewrap(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    kid = key["id"]
    v1 = key["keyVersion"]["id"]
    dek = os.urandom(32)
    aad = ["ctx"]
    ct1 = wrap(server, http, kid, dek, aad, inst)["ciphertext"]
    ok(action(server, http, kid, "rotate", instance=inst), 204)
    after = get_key(server, http, kid, inst)
    v2 = after["keyVersion"]["id"]
    assert v2 != v1
    assert after["id"] == kid and after["state"] == 1
    # unwrap of a v1 ciphertext: the plaintext, v1, and the DEK rewrapped under v2
    u = unwrap(server, http, kid, ct1, aad, inst)
    assert unb64(u["plaintext"]) == dek
    assert u["keyVersion"]["id"] == v1
    assert u["rewrappedKeyVersion"]["id"] == v2
    assert u["ciphertext"] and u["ciphertext"] != ct1
    u2 = unwrap(server, http, kid, u["ciphertext"], aad, inst)
    assert unb64(u2["plaintext"]) == dek
    assert u2["keyVersion"]["id"] == v2
    assert "rewrappedKeyVersion" not in u2 and "ciphertext" not in u2
    # the rewrapped ciphertext keeps the aad
    err(action(server, http, kid, "unwrap", {"ciphertext": u["ciphertext"]}, instance=inst), 400)
    # rewrap: no plaintext
    rw = ok(action(server, http, kid, "rewrap", {"ciphertext": ct1, "aad": aad}, instance=inst))
    assert set(rw) == {"ciphertext", "keyVersion", "rewrappedKeyVersion"}, rw
    assert rw["keyVersion"]["id"] == v1
    assert rw["rewrappedKeyVersion"]["id"] == v2
    u3 = unwrap(server, http, kid, rw["ciphertext"], aad, inst)
    assert unb64(u3["plaintext"]) == dek and u3["keyVersion"]["id"] == v2
    # new wraps use v2
    assert wrap(server, http, kid, dek, aad, inst)["keyVersion"]["id"] == v2
    # a second rotation: v1 and v2 ciphertexts both come back under v3
    ok(action(server, http, kid, "rotate", instance=inst), 204)
    v3 = get_key(server, http, kid, inst)["keyVersion"]["id"]
    assert v3 not in (v1, v2)
    for ct, ver in ((ct1, v1), (u["ciphertext"], v2)):
        x = unwrap(server, http, kid, ct, aad, inst)
        assert unb64(x["plaintext"]) == dek
        assert x["keyVersion"]["id"] == ver
        assert x["rewrappedKeyVersion"]["id"] == v3


def test_rewrap_of_a_current_ciphertext(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    v1 = key["keyVersion"]["id"]
    ct = wrap(server, http, key["id"], b"dek-1", instance=inst)["ciphertext"]
    rw = ok(action(server, http, key["id"], "rewrap", {"ciphertext": ct}, instance=inst))
    assert set(rw) == {"ciphertext", "keyVersion", "rewrappedKeyVersion"}, rw
    assert rw["keyVersion"]["id"] == v1 and rw["rewrappedKeyVersion"]["id"] == v1
    assert unb64(unwrap(server, http, key["id"], rw["ciphertext"], instance=inst)["plaintext"]) == b"dek-1"


def test_rotate_rules_for_generated_and_imported_keys(server, http):
    inst = new_instance()
    gen = create(server, http, instance=inst)
    err(action(server, http, gen["id"], "rotate", {"payload": b64(os.urandom(32))}, instance=inst), 400)
    assert get_key(server, http, gen["id"], inst)["keyVersion"]["id"] == gen["keyVersion"]["id"]

    imp = create(server, http, instance=inst, payload=b64(os.urandom(32)))
    ct = wrap(server, http, imp["id"], b"dek", instance=inst)["ciphertext"]
    err(action(server, http, imp["id"], "rotate", instance=inst), 400, "payload")
    err(action(server, http, imp["id"], "rotate", {"payload": b64(os.urandom(16))}, instance=inst), 400)
    err(action(server, http, imp["id"], "rotate", {"payload": b64(os.urandom(64))}, instance=inst), 400)
    assert get_key(server, http, imp["id"], inst)["keyVersion"]["id"] == imp["keyVersion"]["id"]
    ok(action(server, http, imp["id"], "rotate", {"payload": b64(os.urandom(32))}, instance=inst), 204)
    after = get_key(server, http, imp["id"], inst)
    assert after["keyVersion"]["id"] != imp["keyVersion"]["id"]
    assert after["imported"] is True
    u = unwrap(server, http, imp["id"], ct, instance=inst)
    assert unb64(u["plaintext"]) == b"dek"
    assert u["keyVersion"]["id"] == imp["keyVersion"]["id"]
    assert u["rewrappedKeyVersion"]["id"] == after["keyVersion"]["id"]


def test_imported_root_key_material_is_really_used(server, http):
    """Two keys imported with the same 32 bytes still do not open each other's ciphertexts (a
    wrap is bound to its key's id); rotating to the same bytes keeps old ciphertexts readable."""
    inst = new_instance()
    material = os.urandom(32)
    a = create(server, http, instance=inst, payload=b64(material))
    b = create(server, http, instance=inst, payload=b64(material))
    ct = wrap(server, http, a["id"], b"dek", instance=inst)["ciphertext"]
    err(action(server, http, b["id"], "unwrap", {"ciphertext": ct}, instance=inst), 400)
    ok(action(server, http, a["id"], "rotate", {"payload": b64(material)}, instance=inst), 204)
    after = get_key(server, http, a["id"], inst)
    assert after["keyVersion"]["id"] != a["keyVersion"]["id"]
    u = unwrap(server, http, a["id"], ct, instance=inst)
    assert unb64(u["plaintext"]) == b"dek"
    assert u["rewrappedKeyVersion"]["id"] == after["keyVersion"]["id"]


# -- lifecycle -------------------------------------------------------------------------------

def test_disable_and_enable(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    kid = key["id"]
    ct = wrap(server, http, kid, b"dek", instance=inst)["ciphertext"]
    ok(action(server, http, kid, "disable", instance=inst), 204)
    got = get_key(server, http, kid, inst)
    assert got["state"] == 2
    assert got["deleted"] is False
    err(action(server, http, kid, "wrap", {"plaintext": b64(b"x")}, instance=inst), 409)
    err(action(server, http, kid, "wrap", {}, instance=inst), 409)
    err(action(server, http, kid, "unwrap", {"ciphertext": ct}, instance=inst), 409)
    err(action(server, http, kid, "rewrap", {"ciphertext": ct}, instance=inst), 409)
    err(action(server, http, kid, "disable", instance=inst), 409)
    err(action(server, http, kid, "rotate", instance=inst), 409)
    assert get_key(server, http, kid, inst)["state"] == 2
    assert get_key(server, http, kid, inst)["keyVersion"]["id"] == key["keyVersion"]["id"]
    ok(action(server, http, kid, "enable", instance=inst), 204)
    assert get_key(server, http, kid, inst)["state"] == 1
    err(action(server, http, kid, "enable", instance=inst), 409)
    assert unb64(unwrap(server, http, kid, ct, instance=inst)["plaintext"]) == b"dek"
    assert wrap(server, http, kid, b"y", instance=inst)["keyVersion"]["id"] == key["keyVersion"]["id"]


def test_key_deactivates_when_its_expiration_date_passes(server, http):
    inst = new_instance()
    expires = int(time.time()) + 3
    key = create(server, http, instance=inst, expirationDate=rfc3339(expires))
    kid = key["id"]
    assert key["state"] == 1
    assert parse_time(key["expirationDate"]).timestamp() == expires
    dek = os.urandom(32)
    ct = wrap(server, http, kid, dek, instance=inst)["ciphertext"]
    deadline = time.time() + 10
    state = 1
    while time.time() < deadline:
        state = get_key(server, http, kid, inst)["state"]
        if state != 1:
            break
        time.sleep(0.2)
    assert state == 3, "key still in state %d 10 s after %s" % (state, rfc3339(expires))
    assert time.time() >= expires - 1
    err(action(server, http, kid, "wrap", {"plaintext": b64(b"x")}, instance=inst), 409)
    err(action(server, http, kid, "rewrap", {"ciphertext": ct}, instance=inst), 409)
    err(action(server, http, kid, "rotate", instance=inst), 409)
    u = unwrap(server, http, kid, ct, instance=inst)
    assert unb64(u["plaintext"]) == dek
    assert u["keyVersion"]["id"] == key["keyVersion"]["id"]
    assert [k["state"] for k in list_keys(server, http, inst)] == [3]
    assert [k["id"] for k in list_keys(server, http, inst, state="3")] == [kid]
    assert list_keys(server, http, inst, state="1") == []


def test_missing_or_unknown_action_is_400_naming_the_actions(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    for params in (None, {"action": "explode"}, {"action": ""}, {"action": "WRAP"}):
        r = call(server, http, "POST", "/" + key["id"], body={}, instance=inst, params=params)
        err(r, 400, *ACTIONS)
    assert get_key(server, http, key["id"], inst)["state"] == 1


def test_delete_then_tombstone_rules(server, http):
    inst = new_instance()
    name = unique_name("del")
    key = create(server, http, name, instance=inst, extractable=True)
    kid = key["id"]
    assert "payload" in get_key(server, http, kid, inst)
    ok(call(server, http, "DELETE", "/" + kid, instance=inst), 204)
    gone = get_key(server, http, kid, inst)
    assert gone["state"] == 5
    assert gone["deleted"] is True
    assert gone["id"] == kid and gone["name"] == name
    assert "payload" not in gone
    for act, body in (("wrap", {"plaintext": b64(b"x")}), ("unwrap", {"ciphertext": b64(os.urandom(40))}),
                      ("rewrap", {"ciphertext": b64(os.urandom(40))}), ("rotate", {}),
                      ("disable", {}), ("enable", {})):
        err(action(server, http, kid, act, body, instance=inst), 410)
    err(call(server, http, "DELETE", "/" + kid, instance=inst), 410)
    err(call(server, http, "GET", "/" + name, instance=inst), 404)
    again = create(server, http, name, instance=inst)
    assert again["id"] != kid
    assert get_key(server, http, name, inst)["id"] == again["id"]
    assert get_key(server, http, kid, inst)["state"] == 5


def test_delete_of_a_root_key_destroys_its_ciphertexts_use(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    ct = wrap(server, http, key["id"], b"dek", instance=inst)["ciphertext"]
    ok(call(server, http, "DELETE", "/" + key["id"], instance=inst), 204)
    err(action(server, http, key["id"], "unwrap", {"ciphertext": ct}, instance=inst), 410)
    # a new key of the same name cannot open the old ciphertext
    again = create(server, http, key["name"], instance=inst)
    err(action(server, http, again["id"], "unwrap", {"ciphertext": ct}, instance=inst), 400)


def test_delete_with_prefer_return_representation(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst, description="bye")
    r = call(server, http, "DELETE", "/" + key["id"], instance=inst,
             headers={"Prefer": "return=representation"})
    gone = envelope_key(ok(r, 200))
    assert gone["id"] == key["id"]
    assert gone["name"] == key["name"]
    assert gone["state"] == 5
    assert gone["deleted"] is True
    assert gone["description"] == "bye"
    assert "payload" not in gone
    assert get_key(server, http, key["id"], inst)["state"] == 5


def test_delete_by_name(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    ok(call(server, http, "DELETE", "/" + key["name"], instance=inst), 204)
    assert get_key(server, http, key["id"], inst)["state"] == 5


# -- interop with the transit dialect ----------------------------------------------------------

def vault(server, http, method, path, body=None, ns=None):
    headers = {"X-Vault-Token": server.token}
    if ns:
        headers["X-Vault-Namespace"] = ns
    return http.request(method, server.url + "/v1/" + path, json=body, headers=headers, timeout=30)


def test_kms_key_is_a_transit_key(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    name = key["name"]
    r = vault(server, http, "GET", "transit/keys/" + name, ns=inst)
    assert r.status_code == 200, describe(r)
    assert r.json()["data"]["type"] == "aes256-gcm96"
    r = vault(server, http, "POST", "transit/encrypt/" + name, {"plaintext": b64(b"interop")}, ns=inst)
    assert r.status_code == 200, describe(r)
    ct = r.json()["data"]["ciphertext"]
    assert ct.startswith("vault:v1:")
    r = vault(server, http, "POST", "transit/decrypt/" + name, {"ciphertext": ct}, ns=inst)
    assert r.status_code == 200, describe(r)
    assert unb64(r.json()["data"]["plaintext"]) == b"interop"
    # not visible in another namespace
    assert vault(server, http, "GET", "transit/keys/" + name, ns=new_instance()).status_code == 404
    # a KMS rotation is a transit rotation
    ok(action(server, http, key["id"], "rotate", instance=inst), 204)
    r = vault(server, http, "POST", "transit/encrypt/" + name, {"plaintext": b64(b"v2")}, ns=inst)
    assert r.json()["data"]["ciphertext"].startswith("vault:v2:"), describe(r)


def test_transit_key_is_usable_and_listed_through_kms(server, http):
    inst = new_instance()
    name = unique_name("transit")
    r = vault(server, http, "POST", "transit/keys/" + name, {}, ns=inst)
    assert r.status_code in (200, 204), describe(r)
    listed = list_keys(server, http, inst)
    assert [k["name"] for k in listed] == [name]
    k = listed[0]
    assert UUID4_RE.match(k["id"]), k
    assert k["state"] == 1 and k["extractable"] is False and k["algorithmType"] == "AES"
    assert head_total(server, http, inst) == 1
    dek = os.urandom(32)
    w = wrap(server, http, name, dek, ["x"], inst)
    assert unb64(unwrap(server, http, name, w["ciphertext"], ["x"], inst)["plaintext"]) == dek
    w2 = wrap(server, http, k["id"], dek, None, inst)
    assert unb64(unwrap(server, http, k["id"], w2["ciphertext"], None, inst)["plaintext"]) == dek
    assert get_key(server, http, name, inst)["id"] == k["id"]


def test_hvac_transit_encrypt_with_a_kms_key(server, http):
    import hvac
    inst = new_instance()
    key = create(server, http, instance=inst)
    client = hvac.Client(url=server.url, token=server.token, namespace=inst)
    try:
        enc = client.secrets.transit.encrypt_data(name=key["name"], plaintext=b64(b"from hvac"))
        ct = enc["data"]["ciphertext"]
        assert ct.startswith("vault:v1:"), enc
        dec = client.secrets.transit.decrypt_data(name=key["name"], ciphertext=ct)
        assert unb64(dec["data"]["plaintext"]) == b"from hvac"
    finally:
        client.adapter.close()
    # and the key is still a working KMS root key
    w = wrap(server, http, key["id"], b"dek", instance=inst)
    assert unb64(unwrap(server, http, key["id"], w["ciphertext"], instance=inst)["plaintext"]) == b"dek"


# -- the round trip: 10,000 distinct DEKs across two rotations ---------------------------

def test_ten_thousand_deks_round_trip_across_two_rotations(server, http):
    inst = new_instance()
    key = create(server, http, instance=inst)
    kid = key["id"]
    total = 10000
    deks = [os.urandom(32) for _ in range(total)]
    assert len(set(deks)) == total
    local = threading.local()
    headers = {"Authorization": "Bearer " + server.token, "bluemix-instance": inst,
               "Content-Type": "application/json"}
    url = server.url + BASE + "/" + kid

    def session():
        s = getattr(local, "s", None)
        if s is None:
            s = local.s = requests.Session()
        return s

    def post(act, body):
        r = session().post(url, params={"action": act}, json=body, headers=headers, timeout=60)
        if r.status_code != 200:
            raise AssertionError(describe(r))
        return r.json()

    def wrap_range(indices):
        out = []
        for i in indices:
            w = post("wrap", {"plaintext": b64(deks[i]), "aad": ["dek-%d" % i]})
            out.append((i, w["ciphertext"], w["keyVersion"]["id"]))
        return out

    def unwrap_range(items):
        out = []
        for i, ct, _ in items:
            u = post("unwrap", {"ciphertext": ct, "aad": ["dek-%d" % i]})
            out.append((i, u))
        return out

    def run(fn, items, workers=4):
        chunks = [items[w::workers] for w in range(workers)]
        with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
            results = []
            for part in pool.map(fn, chunks):
                results.extend(part)
        return results

    started = time.monotonic()
    bounds = [0, 3334, 6667, total]
    versions = [key["keyVersion"]["id"]]
    wrapped = []
    for phase in range(3):
        if phase > 0:
            ok(action(server, http, kid, "rotate", instance=inst), 204)
            versions.append(get_key(server, http, kid, inst)["keyVersion"]["id"])
        wrapped.extend(run(wrap_range, list(range(bounds[phase], bounds[phase + 1]))))
    assert len(set(versions)) == 3, versions
    assert len(wrapped) == total
    assert len({ct for _, ct, _ in wrapped}) == total
    phase_of = {}
    for phase in range(3):
        for i in range(bounds[phase], bounds[phase + 1]):
            phase_of[i] = phase
    for i, _, ver in wrapped:
        assert ver == versions[phase_of[i]], (i, ver)

    unwrapped = run(unwrap_range, wrapped)
    assert len(unwrapped) == total
    seen = set()
    latest = versions[2]
    for i, u in unwrapped:
        seen.add(i)
        assert unb64(u["plaintext"]) == deks[i], i
        assert u["keyVersion"]["id"] == versions[phase_of[i]], (i, u)
        if phase_of[i] < 2:
            assert u["rewrappedKeyVersion"]["id"] == latest, (i, u)
            assert u["ciphertext"]
        else:
            assert "rewrappedKeyVersion" not in u, (i, u)
    assert seen == set(range(total))
    elapsed = time.monotonic() - started
    assert elapsed < 150, "10,000 DEK round trip took %.1f s" % elapsed


# -- roles: a configured server with kms-viewer / kms-editor / kms-admin tokens ------------------

ROLE_TOKENS = {name: "tok-%s-%s" % (name, secrets.token_hex(8))
               for name in ("boss", "viewer", "editor", "kadmin")}


@pytest.fixture(scope="module")
def roles():
    yield from cs.serve_with_tokens("p11kms-kms-roles-", [
        ("boss", ROLE_TOKENS["boss"], "[root]", '["*"]'),
        ("viewer", ROLE_TOKENS["viewer"], "[kms-viewer]", '[team-a]'),
        ("editor", ROLE_TOKENS["editor"], "[kms-editor]", '[team-a]'),
        ("kadmin", ROLE_TOKENS["kadmin"], "[kms-admin]", '[team-a]'),
    ])


def as_role(srv, who, method, path="", body=None, params=None, instance="team-a"):
    headers = {"Authorization": "Bearer " + ROLE_TOKENS[who]}
    if instance:
        headers["bluemix-instance"] = instance
    session = srv.session
    if method == "HEAD":   # own connection: see test_head_answers_have_no_body
        session = requests
        headers["Connection"] = "close"
    return session.request(method, srv.url + BASE + path, json=body, params=params,
                           headers=headers, timeout=30)


def role_key(srv, who="boss"):
    r = as_role(srv, who, "POST", body=create_body(unique_name("role")))
    return envelope_key(ok(r, 201))


def role_matrix(srv, who):
    """Every route once as `who`; returns {operation: status}. Each destructive operation gets a
    fresh key made by the root-policy token."""
    out = {}
    key = role_key(srv)
    kid = key["id"]
    r = as_role(srv, "boss", "POST", "/" + kid, {"plaintext": b64(b"dek")}, {"action": "wrap"})
    ct = ok(r)["ciphertext"]
    out["create"] = as_role(srv, who, "POST", body=create_body(unique_name("mine"))).status_code
    out["import"] = as_role(srv, who, "POST", body=create_body(unique_name("imp"), payload=b64(os.urandom(32)))).status_code
    out["list"] = as_role(srv, who, "GET").status_code
    out["head"] = as_role(srv, who, "HEAD").status_code
    out["read"] = as_role(srv, who, "GET", "/" + kid).status_code
    out["wrap"] = as_role(srv, who, "POST", "/" + kid, {"plaintext": b64(b"x")}, {"action": "wrap"}).status_code
    out["unwrap"] = as_role(srv, who, "POST", "/" + kid, {"ciphertext": ct}, {"action": "unwrap"}).status_code
    out["rewrap"] = as_role(srv, who, "POST", "/" + kid, {"ciphertext": ct}, {"action": "rewrap"}).status_code
    out["rotate"] = as_role(srv, who, "POST", "/" + kid, {}, {"action": "rotate"}).status_code
    out["disable"] = as_role(srv, who, "POST", "/" + kid, {}, {"action": "disable"}).status_code
    k2 = role_key(srv)
    ok(as_role(srv, "boss", "POST", "/" + k2["id"], {}, {"action": "disable"}), 204)
    out["enable"] = as_role(srv, who, "POST", "/" + k2["id"], {}, {"action": "enable"}).status_code
    out["delete"] = as_role(srv, who, "DELETE", "/" + role_key(srv)["id"]).status_code
    return out


def expected(allowed):
    codes = {"create": 201, "import": 201, "list": 200, "head": 200, "read": 200, "wrap": 200,
             "unwrap": 200, "rewrap": 200, "rotate": 204, "disable": 204, "enable": 204, "delete": 204}
    return {op: (code if op in allowed else 403) for op, code in codes.items()}


VIEWER_OPS = {"wrap", "unwrap", "rewrap"}
EDITOR_OPS = VIEWER_OPS | {"create", "import", "list", "head", "read"}
ADMIN_OPS = EDITOR_OPS | {"rotate", "disable", "enable", "delete"}


@pytest.mark.parametrize("who,allowed", [("viewer", VIEWER_OPS), ("editor", EDITOR_OPS),
                                         ("kadmin", ADMIN_OPS), ("boss", ADMIN_OPS)])
def test_kms_roles(roles, who, allowed):
    assert role_matrix(roles, who) == expected(allowed)


def test_role_refusal_is_403_in_the_kms_error_shape_and_reveals_nothing(roles):
    kid = role_key(roles)["id"]
    err(as_role(roles, "viewer", "GET", "/" + kid), 403)
    # the policy is checked before the key is looked up: an unknown key is also 403
    err(as_role(roles, "viewer", "GET", "/no-such-key"), 403)
    err(as_role(roles, "editor", "DELETE", "/no-such-key"), 403)
    err(as_role(roles, "viewer", "POST", body=create_body(unique_name())), 403)
    # a token outside its namespaces is 403, an unknown token 401
    err(as_role(roles, "kadmin", "GET", "/" + kid, instance="team-b"), 403)
    err(as_role(roles, "editor", "GET", instance=None), 403)
    r = roles.session.get(roles.url + BASE, headers={"Authorization": "Bearer nope",
                                                       "bluemix-instance": "team-a"}, timeout=30)
    err(r, 401)


def test_created_by_is_the_configured_token_name(roles):
    for who in ("editor", "kadmin", "boss"):
        key = role_key(roles, who)
        assert key["createdBy"] == who
        got = envelope_key(ok(as_role(roles, "boss", "GET", "/" + key["id"])))
        assert got["createdBy"] == who


def test_role_tokens_work_with_x_vault_token_and_see_each_others_keys(roles):
    key = role_key(roles, "editor")
    r = roles.session.post(roles.url + BASE + "/" + key["id"], params={"action": "wrap"},
                           json={"plaintext": b64(b"v")},
                           headers={"X-Vault-Token": ROLE_TOKENS["viewer"], "bluemix-instance": "team-a"},
                           timeout=30)
    ct = ok(r)["ciphertext"]
    r = as_role(roles, "kadmin", "POST", "/" + key["id"], {"ciphertext": ct}, {"action": "unwrap"})
    assert unb64(ok(r)["plaintext"]) == b"v"
    names = [k["name"] for k in ok(as_role(roles, "editor", "GET", params={"limit": 5000}))["resources"]]
    assert key["name"] in names
