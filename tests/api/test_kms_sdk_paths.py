"""HTTP end to end against the real `p11kms server -dev`: what IBM's Key Protect SDKs call beyond
the `?action=` API (docs/api/kms.md, "Both path forms"): every action also at
`/keys/{id}/actions/{action}` with the same answers, `/keys/{id}/metadata`, `/keys/{id}/versions`,
aliases, the SDK routes p11kms does not offer (501 in IBM's error shape, never a 404), and the
alias rights of the built-in roles (configured server).
"""

import datetime
import json
import os
import re
import secrets
import sys
import uuid

import pytest
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "integration"))
import p11kms_testlib as tl  # noqa: E402
from p11kms_testlib import b64, unb64, unique_name  # noqa: E402
import configured_server as cs  # noqa: E402

KEY_TYPE = "application/vnd.ibm.kms.key+json"
ALIAS_TYPE = "application/vnd.ibm.kms.key_alias+json"
VERSION_TYPE = "application/vnd.ibm.kms.key_version+json"
ERR_TYPE = "application/vnd.ibm.kms.error+json"
API = "/kms/api/v2"
BASE = API + "/keys"
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
RFC3339_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


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


@pytest.fixture
def inst():
    return "inst-" + secrets.token_hex(5)


# -- helpers ---------------------------------------------------------------------------------

class Kms:
    """KMS requests in one instance, with the root token as a Bearer token."""

    def __init__(self, server, http, inst):
        self.server, self.http, self.inst = server, http, inst

    def call(self, method, path, body=None, params=None, base=BASE, token=None):
        hdrs = {"Authorization": "Bearer " + (token or self.server.token), "bluemix-instance": self.inst}
        data = None
        if body is not None:
            hdrs["Content-Type"] = KEY_TYPE
            data = json.dumps(body)
        return self.http.request(method, self.server.url + base + path, data=data, headers=hdrs,
                                 params=params, timeout=60)

    def create(self, name=None, status=201, **fields):
        res = {"type": KEY_TYPE, "name": name or unique_name("sdk")}
        res.update(fields)
        body = {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1}, "resources": [res]}
        r = self.call("POST", "", body)
        if status != 201:
            return r
        return one(ok(r, 201))

    def get(self, ref):
        return one(ok(self.call("GET", "/" + ref)))

    def act_query(self, ref, action, body=None):
        return self.call("POST", "/" + ref, {} if body is None else body, params={"action": action})

    def act_path(self, ref, action, body=None):
        return self.call("POST", "/%s/actions/%s" % (ref, action), {} if body is None else body)

    def act(self, form, ref, action, body=None):
        return (self.act_query if form == "query" else self.act_path)(ref, action, body)


@pytest.fixture
def kms(server, http, inst):
    return Kms(server, http, inst)


def describe(resp):
    return tl.describe(resp)


def media_type(resp):
    return resp.headers.get("Content-Type", "").split(";")[0].strip()


def ok(resp, status=200, media=KEY_TYPE):
    assert resp.status_code == status, describe(resp)
    if status == 204:
        assert resp.content == b"", describe(resp)
        return None
    if media == KEY_TYPE:
        assert media_type(resp) == media, describe(resp)
    else:   # alias and version collections: a JSON media type (their collectionType is checked)
        assert media_type(resp) in (media, KEY_TYPE, "application/json"), describe(resp)
    return resp.json()


def one(body, collection=KEY_TYPE):
    assert body["metadata"] == {"collectionType": collection, "collectionTotal": 1}, body
    assert isinstance(body["resources"], list) and len(body["resources"]) == 1, body
    return body["resources"][0]


def err(resp, status, *needles):
    """A KMS error: status, media type, IBM's error collection; returns the reason code."""
    assert resp.status_code == status, describe(resp)
    assert media_type(resp) == ERR_TYPE, describe(resp)
    body = resp.json()
    assert body["metadata"] == {"collectionType": ERR_TYPE, "collectionTotal": 1}, body
    res = body["resources"][0]
    reason = res["reasons"][0]
    assert reason["status"] == status, body
    assert isinstance(reason["code"], str) and reason["code"], body
    text = (res["errorMsg"] + " " + reason["message"]).lower()
    for n in needles:
        assert n.lower() in text, "error should mention %r: %s" % (n, body)
    return reason["code"]


def same_error(rq, rp, status):
    """Both forms refused alike: same status, same error code."""
    assert err(rq, status) == err(rp, status), (describe(rq), describe(rp))


def shape(value):
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def parse_time(text):
    assert isinstance(text, str) and RFC3339_RE.match(text), "not RFC 3339: %r" % (text,)
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


FORMS = ("query", "path")


# -- both path forms -------------------------------------------------------------------------

def test_wrap_in_both_forms_gives_the_same_answer(kms):
    key = kms.create()
    dek = os.urandom(32)
    aad = ["tenant:7", "orders"]
    wq = ok(kms.act_query(key["id"], "wrap", {"plaintext": b64(dek), "aad": aad}))
    wp = ok(kms.act_path(key["id"], "wrap", {"plaintext": b64(dek), "aad": aad}))
    assert set(wq) == set(wp) == {"ciphertext", "keyVersion"}, (wq, wp)
    assert shape(wq) == shape(wp)
    assert wq["keyVersion"] == wp["keyVersion"] == {"id": key["keyVersion"]["id"]}
    assert wq["ciphertext"] != wp["ciphertext"]          # fresh IV each time
    # each form's ciphertext opens with the other form
    for ct in (wq["ciphertext"], wp["ciphertext"]):
        uq = ok(kms.act_query(key["id"], "unwrap", {"ciphertext": ct, "aad": aad}))
        up = ok(kms.act_path(key["id"], "unwrap", {"ciphertext": ct, "aad": aad}))
        assert uq == up
        assert unb64(uq["plaintext"]) == dek
        assert uq["keyVersion"]["id"] == key["keyVersion"]["id"]
        assert set(uq) == {"plaintext", "keyVersion"}


def test_wrap_without_plaintext_in_both_forms(kms):
    key = kms.create()
    wq = ok(kms.act_query(key["id"], "wrap"))
    wp = ok(kms.act_path(key["id"], "wrap"))
    assert set(wq) == set(wp) == {"ciphertext", "keyVersion", "plaintext"}
    assert shape(wq) == shape(wp) and wq["keyVersion"] == wp["keyVersion"]
    assert len(unb64(wq["plaintext"])) == len(unb64(wp["plaintext"])) == 32
    assert wq["plaintext"] != wp["plaintext"]
    u = ok(kms.act_path(key["id"], "unwrap", {"ciphertext": wq["ciphertext"]}))
    assert u["plaintext"] == wq["plaintext"]


def test_rotate_unwrap_and_rewrap_in_both_forms(kms):
    key = kms.create()
    kid = key["id"]
    v1 = key["keyVersion"]["id"]
    dek = os.urandom(32)
    ct1 = ok(kms.act_path(kid, "wrap", {"plaintext": b64(dek)}))["ciphertext"]

    ok(kms.act_query(kid, "rotate"), 204)
    v2 = kms.get(kid)["keyVersion"]["id"]
    ok(kms.act_path(kid, "rotate"), 204)
    v3 = kms.get(kid)["keyVersion"]["id"]
    assert len({v1, v2, v3}) == 3
    versions = [v["id"] for v in one_collection(ok(kms.call("GET", "/%s/versions" % kid)), VERSION_TYPE)]
    assert versions == [v3, v2, v1], "each rotate form adds exactly one version"

    uq = ok(kms.act_query(kid, "unwrap", {"ciphertext": ct1}))
    up = ok(kms.act_path(kid, "unwrap", {"ciphertext": ct1}))
    assert set(uq) == set(up) == {"plaintext", "keyVersion", "ciphertext", "rewrappedKeyVersion"}
    assert shape(uq) == shape(up)
    assert uq["plaintext"] == up["plaintext"] == b64(dek)
    assert uq["keyVersion"] == up["keyVersion"] == {"id": v1}
    assert uq["rewrappedKeyVersion"] == up["rewrappedKeyVersion"] == {"id": v3}

    rq = ok(kms.act_query(kid, "rewrap", {"ciphertext": ct1}))
    rp = ok(kms.act_path(kid, "rewrap", {"ciphertext": ct1}))
    assert set(rq) == set(rp) == {"ciphertext", "keyVersion", "rewrappedKeyVersion"}
    assert shape(rq) == shape(rp)
    assert rq["keyVersion"] == rp["keyVersion"] == {"id": v1}
    assert rq["rewrappedKeyVersion"] == rp["rewrappedKeyVersion"] == {"id": v3}
    for ct in (rq["ciphertext"], rp["ciphertext"], uq["ciphertext"], up["ciphertext"]):
        u = ok(kms.act_query(kid, "unwrap", {"ciphertext": ct}))
        assert u["plaintext"] == b64(dek) and u["keyVersion"] == {"id": v3}
        assert "rewrappedKeyVersion" not in u


def test_disable_and_enable_in_both_forms(kms):
    keys = {form: kms.create() for form in FORMS}
    for form, key in keys.items():
        ok(kms.act(form, key["id"], "disable"), 204)
        assert kms.get(key["id"])["state"] == 2, form
    # a suspended key: every action refused alike, 409
    a, b = keys["query"]["id"], keys["path"]["id"]
    for action, body in (("wrap", {"plaintext": b64(b"x")}), ("unwrap", {"ciphertext": b64(os.urandom(60))}),
                         ("rewrap", {"ciphertext": b64(os.urandom(60))}), ("rotate", {}), ("disable", {})):
        same_error(kms.act_query(a, action, body), kms.act_path(b, action, body), 409)
        same_error(kms.act_query(b, action, body), kms.act_path(a, action, body), 409)
    for form, key in keys.items():
        ok(kms.act(form, key["id"], "enable"), 204)
        assert kms.get(key["id"])["state"] == 1, form
    same_error(kms.act_query(a, "enable"), kms.act_path(b, "enable"), 409)
    for form, key in keys.items():
        assert ok(kms.act(form, key["id"], "wrap", {"plaintext": b64(b"y")}))["keyVersion"] == {"id": key["keyVersion"]["id"]}


def test_errors_are_the_same_in_both_forms(kms):
    key = kms.create()
    kid = key["id"]
    ct = ok(kms.act_query(kid, "wrap", {"plaintext": b64(b"dek"), "aad": ["right"]}))["ciphertext"]
    cases = [
        ("wrap", {"plaintext": b64(b"x"), "aad": "not-a-list"}, 400),
        ("wrap", {"plaintext": b64(b"x"), "aad": [1, 2]}, 400),
        ("wrap", {"plaintext": "!!not base64!!"}, 400),
        ("wrap", {"plaintext": b64(os.urandom(5000))}, 400),
        ("unwrap", {"ciphertext": ct, "aad": ["wrong"]}, 400),
        ("unwrap", {"ciphertext": ct}, 400),
        ("unwrap", {}, 400),
        ("unwrap", {"ciphertext": 42}, 400),
        ("rewrap", {"ciphertext": ct, "aad": ["wrong"]}, 400),
        ("rewrap", {"ciphertext": b64(os.urandom(80)), "aad": ["right"]}, 400),
        ("rotate", {"payload": b64(os.urandom(32))}, 400),     # generated keys take no payload
    ]
    for action, body, status in cases:
        rq, rp = kms.act_query(kid, action, body), kms.act_path(kid, action, body)
        assert rq.status_code == rp.status_code == status, (action, body, describe(rq), describe(rp))
        same_error(rq, rp, status)
    # nothing changed behind the refusals
    assert kms.get(kid)["keyVersion"] == key["keyVersion"]

    # a missing key on a real route is 404 in both forms
    for ref in ("no-such-key", str(uuid.uuid4())):
        for action in ("wrap", "unwrap", "rotate", "enable"):
            same_error(kms.act_query(ref, action, {"ciphertext": ct}), kms.act_path(ref, action, {"ciphertext": ct}), 404)

    # a standard key cannot wrap: the same refusal in both forms
    std = kms.create(extractable=True)
    for action in ("wrap", "rotate"):
        rq, rp = kms.act_query(std["id"], action), kms.act_path(std["id"], action)
        assert rq.status_code == rp.status_code and rq.status_code >= 400, (describe(rq), describe(rp))
        same_error(rq, rp, rq.status_code)


def test_a_deleted_key_is_410_in_both_forms(kms):
    key = kms.create()
    kid = key["id"]
    ct = ok(kms.act_path(kid, "wrap", {"plaintext": b64(b"dek")}))["ciphertext"]
    ok(kms.call("DELETE", "/" + kid), 204)
    for action, body in (("wrap", {"plaintext": b64(b"x")}), ("unwrap", {"ciphertext": ct}),
                         ("rewrap", {"ciphertext": ct}), ("rotate", {}), ("disable", {}), ("enable", {})):
        same_error(kms.act_query(kid, action, body), kms.act_path(kid, action, body), 410)


def test_unknown_action_path_is_404_and_unknown_query_action_400(kms):
    key = kms.create()
    r = kms.call("POST", "/%s/actions/explode" % key["id"], {})
    assert r.status_code == 404, describe(r)
    assert media_type(r) == ERR_TYPE
    err(kms.act_query(key["id"], "explode"), 400)
    r = kms.call("GET", "/%s/actions/wrap" % key["id"])
    assert r.status_code in (404, 405), describe(r)
    assert r.status_code != 200


# -- metadata and versions -------------------------------------------------------------------

def one_collection(body, collection):
    assert body["metadata"]["collectionType"] == collection, body
    assert body["metadata"]["collectionTotal"] == len(body["resources"]), body
    return body["resources"]


def test_metadata_never_has_a_payload(kms):
    root = kms.create(description="root one")
    std = kms.create(extractable=True, description="std one")
    full_std = kms.get(std["id"])
    assert len(unb64(full_std["payload"])) == 32        # GET /keys/{id} shows a standard key's payload
    for key in (root, std):
        for ref in (key["id"], key["name"]):
            meta = one(ok(kms.call("GET", "/%s/metadata" % ref)))
            assert "payload" not in meta, meta
            full = kms.get(ref)
            full.pop("payload", None)
            assert meta == full, (meta, full)
            assert meta["id"] == key["id"] and meta["description"] == key["description"]
    # a deleted key's metadata: the tombstone, still without payload
    ok(kms.call("DELETE", "/" + std["id"]), 204)
    meta = one(ok(kms.call("GET", "/%s/metadata" % std["id"])))
    assert meta["state"] == 5 and meta["deleted"] is True and "payload" not in meta
    err(kms.call("GET", "/no-such-key/metadata"), 404)
    err(kms.call("GET", "/%s/metadata" % uuid.uuid4()), 404)


def test_versions_newest_first_with_the_ids_seen(kms):
    key = kms.create()
    kid = key["id"]
    seen = [key["keyVersion"]["id"]]
    created = [key["keyVersion"]["creationDate"]]
    for form in ("query", "path", "query"):
        ok(kms.act(form, kid, "rotate"), 204)
        w = ok(kms.act(form, kid, "wrap", {"plaintext": b64(b"x")}))
        seen.append(w["keyVersion"]["id"])
        created.append(kms.get(kid)["keyVersion"]["creationDate"])
    assert len(set(seen)) == 4
    body = ok(kms.call("GET", "/%s/versions" % kid), 200, media=VERSION_TYPE)
    versions = one_collection(body, VERSION_TYPE)
    assert [v["id"] for v in versions] == list(reversed(seen))
    assert [v["creationDate"] for v in versions] == list(reversed(created))
    times = [parse_time(v["creationDate"]) for v in versions]
    assert times == sorted(times, reverse=True)
    for v in versions:
        assert UUID4_RE.match(v["id"]), v
        assert set(v) >= {"id", "creationDate"}, v
    # by name too
    by_name = one_collection(ok(kms.call("GET", "/%s/versions" % key["name"]), media=VERSION_TYPE), VERSION_TYPE)
    assert by_name == versions
    err(kms.call("GET", "/no-such-key/versions"), 404)


def test_a_new_key_has_one_version(kms):
    key = kms.create()
    versions = one_collection(ok(kms.call("GET", "/%s/versions" % key["id"]), media=VERSION_TYPE), VERSION_TYPE)
    assert versions == [{"id": key["keyVersion"]["id"], "creationDate": key["keyVersion"]["creationDate"]}], versions


# -- aliases ---------------------------------------------------------------------------------

def add_alias(kms, ref, alias, status=201):
    r = kms.call("POST", "/%s/aliases/%s" % (ref, alias))
    if status != 201:
        return r
    return one(ok(r, 201, media=ALIAS_TYPE), ALIAS_TYPE)


def alias_name(prefix="al"):
    return "%s-%s" % (prefix, secrets.token_hex(4))


def test_add_alias_answers_201_in_ibms_shape(kms):
    key = kms.create()
    alias = alias_name()
    r = kms.call("POST", "/%s/aliases/%s" % (key["id"], alias))
    body = ok(r, 201, media=ALIAS_TYPE)
    assert body["metadata"] == {"collectionType": ALIAS_TYPE, "collectionTotal": 1}, body
    res = one(body, ALIAS_TYPE)
    assert set(res) == {"keyId", "alias", "creationDate", "createdBy"}, res
    assert res["keyId"] == key["id"] and res["alias"] == alias and res["createdBy"] == "root"
    assert abs((parse_time(res["creationDate"]) - datetime.datetime.now(datetime.timezone.utc)).total_seconds()) < 120
    assert kms.get(key["id"])["aliases"] == [alias]
    # adding by name works too
    second = add_alias(kms, key["name"], alias_name())
    assert second["keyId"] == key["id"]
    assert sorted(kms.get(key["id"])["aliases"]) == sorted([alias, second["alias"]])


def test_an_alias_works_wherever_an_id_works(kms):
    key = kms.create()
    kid = key["id"]
    alias = add_alias(kms, kid, alias_name())["alias"]
    by_alias = kms.get(alias)
    assert by_alias == kms.get(kid)
    assert by_alias["aliases"] == [alias]
    assert one(ok(kms.call("GET", "/%s/metadata" % alias)))["id"] == kid
    dek = os.urandom(32)
    for form in FORMS:
        w = ok(kms.act(form, alias, "wrap", {"plaintext": b64(dek), "aad": ["a"]}))
        assert w["keyVersion"]["id"] == key["keyVersion"]["id"]
        for uform in FORMS:
            u = ok(kms.act(uform, alias, "unwrap", {"ciphertext": w["ciphertext"], "aad": ["a"]}))
            assert unb64(u["plaintext"]) == dek
        assert unb64(ok(kms.act_path(kid, "unwrap", {"ciphertext": w["ciphertext"], "aad": ["a"]}))["plaintext"]) == dek
    ok(kms.act_path(alias, "rotate"), 204)
    ok(kms.act_query(alias, "rotate"), 204)
    versions = one_collection(ok(kms.call("GET", "/%s/versions" % alias), media=VERSION_TYPE), VERSION_TYPE)
    assert len(versions) == 3 and versions[-1]["id"] == key["keyVersion"]["id"]
    ok(kms.act_path(alias, "disable"), 204)
    assert kms.get(kid)["state"] == 2
    ok(kms.act_query(alias, "enable"), 204)
    assert kms.get(kid)["state"] == 1
    # an alias is per instance
    other = Kms(kms.server, kms.http, kms.inst + "x")
    err(other.call("GET", "/" + alias), 404)


def test_alias_uniqueness_with_names_and_aliases(kms):
    a, b = kms.create(), kms.create()
    alias = add_alias(kms, a["id"], alias_name())["alias"]
    # an alias equal to another key's name or alias: 409
    err(add_alias(kms, a["id"], b["name"], 409), 409)
    err(add_alias(kms, b["id"], alias, 409), 409)
    # a key created with a name equal to an existing alias: 409
    err(kms.create(alias, status=409), 409)
    assert "aliases" not in kms.get(b["id"])
    assert kms.get(alias)["id"] == a["id"]


@pytest.mark.parametrize("bad", ["a", "x" * 91, "0f8fad5b-d9cb-469f-a165-70867728950e", "dot.ted", "sp ace"])
def test_bad_alias_format_is_400(kms, bad):
    key = kms.create()
    r = kms.call("POST", "/%s/aliases/%s" % (key["id"], requests.utils.quote(bad, safe="")))
    err(r, 400)
    assert "aliases" not in kms.get(key["id"])


def test_alias_length_bounds_are_allowed(kms):
    key = kms.create()
    for good in ("ab", "y" * 90, "A_b-9"):
        assert add_alias(kms, key["id"], good)["alias"] == good
    assert sorted(kms.get(key["id"])["aliases"]) == sorted(["ab", "y" * 90, "A_b-9"])


def test_at_most_five_aliases_per_key(kms):
    key = kms.create()
    aliases = [alias_name() for _ in range(5)]
    for a in aliases:
        add_alias(kms, key["id"], a)
    sixth = alias_name()
    err(add_alias(kms, key["id"], sixth, 400), 400)
    assert sorted(kms.get(key["id"])["aliases"]) == sorted(aliases)
    err(kms.call("GET", "/" + sixth), 404)
    # removing one makes room again
    ok(kms.call("DELETE", "/%s/aliases/%s" % (key["id"], aliases[0])), 204)
    add_alias(kms, key["id"], sixth)
    assert sorted(kms.get(key["id"])["aliases"]) == sorted(aliases[1:] + [sixth])


def test_delete_alias_then_it_no_longer_resolves(kms):
    key = kms.create()
    alias = add_alias(kms, key["id"], alias_name())["alias"]
    keep = add_alias(kms, key["id"], alias_name())["alias"]
    ok(kms.call("DELETE", "/%s/aliases/%s" % (key["id"], alias)), 204)
    err(kms.call("GET", "/" + alias), 404)
    err(kms.act_path(alias, "wrap", {"plaintext": b64(b"x")}), 404)
    err(kms.act_query(alias, "wrap", {"plaintext": b64(b"x")}), 404)
    assert kms.get(key["id"])["aliases"] == [keep]
    assert kms.get(keep)["id"] == key["id"]
    # deleting it again, or an alias the key never had: 404
    err(kms.call("DELETE", "/%s/aliases/%s" % (key["id"], alias)), 404)
    # the name is free: another key can take it
    other = kms.create()
    assert add_alias(kms, other["id"], alias)["keyId"] == other["id"]
    ok(kms.call("DELETE", "/%s/aliases/%s" % (keep, keep)), 204)   # by alias as the key ref too
    assert "aliases" not in kms.get(key["id"])


def test_alias_of_another_key_cannot_be_deleted_through_this_one(kms):
    a, b = kms.create(), kms.create()
    alias = add_alias(kms, a["id"], alias_name())["alias"]
    r = kms.call("DELETE", "/%s/aliases/%s" % (b["id"], alias))
    assert r.status_code in (400, 404), describe(r)
    assert kms.get(alias)["id"] == a["id"]


def test_deleting_the_key_frees_its_aliases(kms):
    key = kms.create()
    aliases = [add_alias(kms, key["id"], alias_name())["alias"] for _ in range(2)]
    ok(kms.call("DELETE", "/" + key["id"]), 204)
    for a in aliases:
        r = kms.call("GET", "/" + a)
        assert r.status_code == 404, describe(r)
    other = kms.create()
    for a in aliases:
        assert add_alias(kms, other["id"], a)["keyId"] == other["id"]
    assert kms.create(aliases[0], status=409).status_code == 409
    # the tombstone lists no aliases
    assert "aliases" not in kms.get(key["id"]) or kms.get(key["id"])["aliases"] == []


def test_alias_routes_on_a_missing_or_deleted_key(kms):
    err(add_alias(kms, "no-such-key", alias_name(), 404), 404)
    err(kms.call("DELETE", "/no-such-key/aliases/whatever"), 404)
    key = kms.create()
    ok(kms.call("DELETE", "/" + key["id"]), 204)
    r = add_alias(kms, key["id"], alias_name(), 410)
    assert r.status_code in (404, 410), describe(r)
    err(r, r.status_code)


# -- routes p11kms does not offer: 501 naming the route --------------------------------------

def unsupported_routes(kid):
    return [
        ("POST", API + "/import_token", "import_token"),
        ("GET", API + "/import_token", "import_token"),
        ("GET", API + "/key_rings", "key_rings"),
        ("POST", API + "/key_rings/abc", "key_rings/abc"),
        ("DELETE", API + "/key_rings/abc", "key_rings/abc"),
        ("POST", BASE + "/%s/restore" % kid, "restore"),
        ("POST", BASE + "/%s/actions/setKeyForDeletion" % kid, "setKeyForDeletion"),
        ("POST", BASE + "/%s?action=setKeyForDeletion" % kid, "setKeyForDeletion"),
        ("POST", BASE + "/%s/actions/unsetKeyForDeletion" % kid, "unsetKeyForDeletion"),
        ("POST", BASE + "/%s?action=unsetKeyForDeletion" % kid, "unsetKeyForDeletion"),
        ("GET", API + "/instance/policies", "instance/policies"),
        ("PUT", API + "/instance/policies", "instance/policies"),
        ("GET", API + "/instance/allowed_ip_port", "instance/allowed_ip_port"),
        ("GET", BASE + "/%s/registrations" % kid, "registrations"),
        ("GET", API + "/keys/registrations", "keys/registrations"),
    ]


@pytest.mark.parametrize("index", range(15))
def test_sdk_routes_not_offered_answer_501_naming_the_route(kms, index):
    key = kms.create()
    method, url, needle = unsupported_routes(key["id"])[index]
    path, _, query = url.partition("?")
    params = dict([query.split("=")]) if query else None
    r = kms.call(method, path, {} if method in ("POST", "PUT") else None, params=params, base="")
    err(r, 501, needle)
    assert r.status_code != 404
    # nothing happened to the key
    assert kms.get(key["id"])["state"] == 1


def test_unknown_paths_are_404_and_missing_keys_on_real_routes_404(kms):
    for method, path in (("GET", API + "/nonsense"), ("POST", API + "/keys/x/y/z"),
                         ("GET", API + "/key_ringz"), ("GET", API + "/instance/nothing")):
        r = kms.call(method, path, base="")
        assert r.status_code == 404, describe(r)
        assert media_type(r) == ERR_TYPE
    for path in ("/no-such-key", "/no-such-key/metadata", "/no-such-key/versions", "/%s" % uuid.uuid4()):
        err(kms.call("GET", path), 404)
    err(kms.act_path("no-such-key", "wrap", {}), 404)


# -- roles: kms-admin manages aliases, kms-editor may not --------------------------------------

ROLE_TOKENS = {name: "tok-%s-%s" % (name, secrets.token_hex(8)) for name in ("boss", "editor", "kadmin")}


@pytest.fixture(scope="module")
def roles():
    yield from cs.serve_with_tokens("p11kms-kms-alias-roles-", [
        ("boss", ROLE_TOKENS["boss"], "[root]", '["*"]'),
        ("editor", ROLE_TOKENS["editor"], "[kms-editor]", '[team-a]'),
        ("kadmin", ROLE_TOKENS["kadmin"], "[kms-admin]", '[team-a]'),
    ])


def test_kms_admin_manages_aliases_and_kms_editor_cannot(roles):
    def as_role(who, method, path):
        return roles.session.request(method, roles.url + BASE + path, timeout=30,
                                     headers={"Authorization": "Bearer " + ROLE_TOKENS[who],
                                              "bluemix-instance": "team-a"})

    body = {"metadata": {"collectionType": KEY_TYPE, "collectionTotal": 1},
            "resources": [{"type": KEY_TYPE, "name": unique_name("role")}]}
    r = roles.session.post(roles.url + BASE, json=body, timeout=30,
                           headers={"Authorization": "Bearer " + ROLE_TOKENS["boss"], "bluemix-instance": "team-a"})
    kid = one(ok(r, 201))["id"]

    err(as_role("editor", "POST", "/%s/aliases/ed-alias" % kid), 403)
    err(as_role("editor", "GET", "/ed-alias"), 404)
    res = one(ok(as_role("kadmin", "POST", "/%s/aliases/adm-alias" % kid), 201, media=ALIAS_TYPE), ALIAS_TYPE)
    assert res["createdBy"] == "kadmin" and res["keyId"] == kid
    # the editor may read through it, not remove it
    assert one(ok(as_role("editor", "GET", "/adm-alias")))["id"] == kid
    err(as_role("editor", "DELETE", "/%s/aliases/adm-alias" % kid), 403)
    assert one(ok(as_role("editor", "GET", "/adm-alias")))["aliases"] == ["adm-alias"]
    ok(as_role("kadmin", "DELETE", "/%s/aliases/adm-alias" % kid), 204)
    err(as_role("kadmin", "GET", "/adm-alias"), 404)
