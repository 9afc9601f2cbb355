// Key Protect-style KMS dialect (/kms/api/v2/keys): root keys that wrap and unwrap data keys
// inside the token, standard keys, rotation and lifecycle states. Shapes follow IBM Key
// Protect's API v2; see docs/api/kms.md. Callbacks parse, call one KeyService method, render.
#include <algorithm>
#include <limits>
#include <set>

#include "api/api_service.hpp"
#include "api/kms_shape.hpp"
#include "common/encoding.hpp"
#include "common/time.hpp"
#include "common/uuid.hpp"

namespace p11kms::api {
namespace {

using keys::invalid;

constexpr int64_t kDefaultLimit = 200;
constexpr int64_t kMaxLimit = 5000;

int64_t now() { return timefmt::now_unix(); }

int state_of(const store::KeyRecord& k) { return keys::Key(k).state_at(now()); }

// The key a URL names (by id or by name), or a 404 / 410 in Key Protect's words.
store::KeyRecord resolve(Context& ctx, bool allow_deleted = false) {
  const auto& id = ctx.params.at("id");
  auto key = ctx.keys->find_key(ctx.ns, id);
  if (!key) throw keys::not_found("key \"" + id + "\" not found in instance \"" + ctx.ns + "\"");
  if (key->state == store::kDestroyed && !allow_deleted)
    throw keys::gone("key " + key->id + " has been deleted; its id is never reused");
  return *key;
}

keys::KeyRef ref_of(const store::KeyRecord& k) { return keys::KeyRef{k.ns, k.name, k.id}; }

hsm::SecureBytes decode_secret(const json& value, const std::string& field) {
  if (!value.is_string()) throw invalid(field + " must be a base64 string", "invalid_" + field);
  auto bytes = encoding::base64_decode(value.get<std::string>());
  if (!bytes) throw invalid(field + " is not valid base64 (standard alphabet, with padding)", "invalid_" + field);
  hsm::SecureBytes out(bytes->data(), bytes->size());
  if (!bytes->empty()) OPENSSL_cleanse(bytes->data(), bytes->size());
  return out;
}

std::vector<std::string> aad_of(const FieldData& f) {
  std::vector<std::string> out;
  if (!f.has("aad")) return out;
  const json& a = f.raw().at("aad");
  if (!a.is_array()) throw invalid("aad must be an array of strings", "invalid_aad");
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].is_string()) throw invalid("aad[" + std::to_string(i) + "] must be a string", "invalid_aad");
    out.push_back(a[i].get<std::string>());
  }
  return out;
}

std::string b64(const hsm::SecureBytes& b) { return encoding::base64_encode(b.data(), b.size()); }

json version_ref(const std::string& id) { return json{{"id", id}}; }

Reply resource_reply(int status, const store::KeyRecord& k, json extra = json::object()) {
  json r = kms::key_resource(k, state_of(k));
  for (auto it = extra.begin(); it != extra.end(); ++it) r[it.key()] = *it;
  return Reply{status, kms::collection(kms::kKeyType, json::array({r})), {}, true};
}

// The single resource of a create request, checked field by field.
const json& single_resource(const FieldData& f) {
  if (!f.has("resources"))
    throw invalid("the body must be {\"metadata\": {...}, \"resources\": [ {key} ]}: resources is missing",
                  "bad_body");
  const json& res = f.raw().at("resources");
  if (!res.is_array() || res.size() != 1 || !res[0].is_object())
    throw invalid("resources must be an array holding exactly one key object", "bad_body");
  return res[0];
}

std::string string_member(const json& o, const char* name, bool required) {
  auto it = o.find(name);
  if (it == o.end() || it->is_null()) {
    if (required) throw invalid(std::string("resources[0].") + name + " is required", "bad_body");
    return {};
  }
  if (!it->is_string()) throw invalid(std::string("resources[0].") + name + " must be a string", "bad_body");
  return it->get<std::string>();
}

Reply create(Context& ctx) {
  const json& r = single_resource(ctx.fields);
  std::string type = string_member(r, "type", false);
  if (!type.empty() && type != kms::kKeyType)
    throw invalid("resources[0].type must be \"" + std::string(kms::kKeyType) + "\"", "bad_body");
  std::string name = string_member(r, "name", true);
  if (uuid::looks_like_uuid(name))
    throw invalid("resources[0].name must not have the form of a UUID: ids and names share the URL", "invalid_name");
  ctx.keys->validate_name(name);
  keys::KeySpec spec;
  spec.description = string_member(r, "description", false);
  if (spec.description.size() > 240)
    throw invalid("resources[0].description must be at most 240 characters", "bad_body");
  std::string expiration = string_member(r, "expirationDate", false);
  if (!expiration.empty()) {
    auto t = timefmt::parse_rfc3339(expiration);
    if (!t) throw invalid("resources[0].expirationDate must be an RFC 3339 time such as 2030-01-01T00:00:00Z", "bad_body");
    if (*t <= now()) throw invalid("resources[0].expirationDate must be in the future", "bad_body");
    spec.expires_at = *t;
  }
  bool extractable = false;
  if (auto it = r.find("extractable"); it != r.end() && !it->is_null()) {
    if (!it->is_boolean()) throw invalid("resources[0].extractable must be true or false", "bad_body");
    extractable = it->get<bool>();
  }
  spec.type = extractable ? "standard" : "aes256-gcm96";
  spec.created_by = ctx.token ? ctx.token->name : "";
  std::optional<hsm::SecureBytes> material;
  if (auto it = r.find("payload"); it != r.end() && !it->is_null()) {
    material = decode_secret(*it, "payload");
    spec.material = &*material;
  }
  auto result = ctx.keys->create_key(keys::KeyRef{ctx.ns, name}, spec);
  if (!result.created)
    throw keys::conflict("a key named \"" + name + "\" already exists in instance \"" + ctx.ns + "\"",
                         "key_alias_not_unique");
  return resource_reply(201, result.key);
}

// ?state=1,2 (default 0,1,2,3) and paging, shared by GET and HEAD.
struct ListQuery {
  std::set<int> states{store::kPreActive, store::kActive, store::kSuspended, store::kDeactivated};
  int64_t limit = kDefaultLimit;
  int64_t offset = 0;
};

ListQuery list_query(const FieldData& f) {
  ListQuery q;
  if (f.has("limit")) {
    q.limit = f.get_int("limit");
    if (q.limit < 1 || q.limit > kMaxLimit)
      throw invalid("limit must be from 1 to " + std::to_string(kMaxLimit), "invalid_query_param");
  }
  if (f.has("offset")) {
    q.offset = f.get_int("offset");
    if (q.offset < 0) throw invalid("offset must not be negative", "invalid_query_param");
  }
  if (f.has("state")) {
    q.states.clear();
    std::string s = f.get_string("state");
    size_t start = 0;
    while (start <= s.size()) {
      size_t comma = s.find(',', start);
      if (comma == std::string::npos) comma = s.size();
      std::string item = s.substr(start, comma - start);
      if (item.size() != 1 || std::string("01235").find(item[0]) == std::string::npos)
        throw invalid("state must be a comma-separated list of 0, 1, 2, 3 and 5", "invalid_query_param");
      q.states.insert(item[0] - '0');
      start = comma + 1;
    }
  }
  return q;
}

std::vector<std::pair<store::KeyRecord, int>> matching_keys(Context& ctx, const ListQuery& q) {
  std::vector<std::pair<store::KeyRecord, int>> out;
  for (auto& k : ctx.keys->list_key_records(ctx.ns, q.states.count(store::kDestroyed) != 0)) {
    int state = state_of(k);
    if (q.states.count(state)) out.emplace_back(std::move(k), state);
  }
  return out;
}

Reply list(Context& ctx) {
  auto q = list_query(ctx.fields);
  auto keys = matching_keys(ctx, q);
  json resources = json::array();
  for (size_t i = static_cast<size_t>(std::min<int64_t>(q.offset, static_cast<int64_t>(keys.size())));
       i < keys.size() && resources.size() < static_cast<size_t>(q.limit); ++i)
    resources.push_back(kms::key_resource(keys[i].first, keys[i].second));
  return Reply{200, kms::collection(kms::kKeyType, std::move(resources)), {}, true};
}

Reply count(Context& ctx) {
  auto q = list_query(ctx.fields);
  Reply r{200, nullptr, {}, true};
  r.headers.emplace_back("Key-Total", std::to_string(matching_keys(ctx, q).size()));
  return r;
}

json aliases_json(Context& ctx, const store::KeyRecord& k) {
  json out = json::array();
  for (const auto& a : ctx.keys->aliases_of(k.ns, k.id)) out.push_back(a.alias);
  return out;
}

Reply get(Context& ctx) {
  auto k = resolve(ctx, /*allow_deleted=*/true);
  json extra = json::object();
  if (auto aliases = aliases_json(ctx, k); !aliases.empty()) extra["aliases"] = aliases;
  int state = state_of(k);
  // A standard key's material is shown while the key may be read: not once it is suspended
  // or deleted.
  if (k.type == "standard" && state != store::kDestroyed && state != store::kSuspended)
    extra["payload"] = b64(ctx.keys->read_material(ref_of(k)));
  return resource_reply(200, k, std::move(extra));
}

Reply remove(Context& ctx) {
  auto k = resolve(ctx);
  auto tombstone = ctx.keys->delete_key(ref_of(k), /*require_deletion_allowed=*/false);
  auto prefer = ctx.request.header("Prefer").value_or("");
  if (prefer.find("return=representation") != std::string::npos) return resource_reply(200, tombstone);
  return Reply{204};
}

Reply wrap(Context& ctx) {
  auto k = resolve(ctx);
  auto aad = aad_of(ctx.fields);
  std::optional<hsm::SecureBytes> plaintext;
  if (ctx.fields.has("plaintext")) plaintext = decode_secret(ctx.fields.raw().at("plaintext"), "plaintext");
  auto out = ctx.keys->wrap(ref_of(k), plaintext ? &*plaintext : nullptr, aad);
  json body = {{"ciphertext", out.wrapped.ciphertext}, {"keyVersion", version_ref(out.wrapped.version_id)}};
  if (out.generated) body["plaintext"] = b64(*out.generated);
  return Reply{200, std::move(body), {}, true};
}

std::string ciphertext_of(const FieldData& f) {
  if (!f.has("ciphertext")) throw invalid("ciphertext is required: the base64 wrapped key returned by wrap", "bad_body");
  const json& c = f.raw().at("ciphertext");
  if (!c.is_string()) throw invalid("ciphertext must be a base64 string", "bad_body");
  return c.get<std::string>();
}

Reply unwrap(Context& ctx) {
  auto k = resolve(ctx);
  auto out = ctx.keys->unwrap(ref_of(k), ciphertext_of(ctx.fields), aad_of(ctx.fields));
  json body = {{"plaintext", b64(out.plaintext)}, {"keyVersion", version_ref(out.version_id)}};
  if (out.rewrapped) {
    body["ciphertext"] = out.rewrapped->ciphertext;
    body["rewrappedKeyVersion"] = version_ref(out.rewrapped->version_id);
  }
  return Reply{200, std::move(body), {}, true};
}

Reply rewrap(Context& ctx) {
  auto k = resolve(ctx);
  auto out = ctx.keys->rewrap_wrapped(ref_of(k), ciphertext_of(ctx.fields), aad_of(ctx.fields));
  json body = {{"ciphertext", out.rewrapped->ciphertext},
               {"keyVersion", version_ref(out.version_id)},
               {"rewrappedKeyVersion", version_ref(out.rewrapped->version_id)}};
  return Reply{200, std::move(body), {}, true};
}

Reply rotate(Context& ctx) {
  auto k = resolve(ctx);
  std::optional<hsm::SecureBytes> material;
  if (ctx.fields.has("payload")) material = decode_secret(ctx.fields.raw().at("payload"), "payload");
  ctx.keys->rotate_key(ref_of(k), material ? &*material : nullptr);
  return Reply{204};
}

Reply set_enabled(Context& ctx, bool enabled) {
  auto k = resolve(ctx);
  ctx.keys->set_enabled(ref_of(k), enabled);
  return Reply{204};
}

Reply read_metadata(Context& ctx) {
  auto k = resolve(ctx, /*allow_deleted=*/true);
  json extra = json::object();
  if (auto aliases = aliases_json(ctx, k); !aliases.empty()) extra["aliases"] = aliases;
  return resource_reply(200, k, std::move(extra));
}

Reply list_versions(Context& ctx) {
  auto k = resolve(ctx, /*allow_deleted=*/true);
  json resources = json::array();
  for (auto it = k.versions.rbegin(); it != k.versions.rend(); ++it)
    resources.push_back({{"id", it->second.id}, {"creationDate", timefmt::format_rfc3339(it->second.created_at)}});
  return Reply{200, kms::collection("application/vnd.ibm.kms.key_version+json", std::move(resources)), {}, true};
}

json alias_resource(const keys::KeyService::Alias& a) {
  return json{{"keyId", a.key_id},
              {"alias", a.alias},
              {"creationDate", timefmt::format_rfc3339(a.created_at)},
              {"createdBy", a.created_by}};
}

Reply add_alias(Context& ctx) {
  auto k = resolve(ctx);
  auto a = ctx.keys->add_alias(ref_of(k), ctx.params.at("alias"), ctx.token ? ctx.token->name : "");
  return Reply{201, kms::collection("application/vnd.ibm.kms.key_alias+json", json::array({alias_resource(a)})), {}, true};
}

Reply remove_alias(Context& ctx) {
  auto k = resolve(ctx);
  ctx.keys->remove_alias(ref_of(k), ctx.params.at("alias"));
  return Reply{204};
}

constexpr int64_t kMonthSeconds = 30 * 86400;
constexpr const char* kPolicyType = "application/vnd.ibm.kms.policy+json";

json policy_resources(const std::optional<keys::KeyService::RotationPolicy>& p) {
  json out = json::array();
  if (!p) return out;
  json rotation = {{"enabled", true}, {"interval_month", std::max<int64_t>(1, p->period_s / kMonthSeconds)}};
  if (p->period_s % kMonthSeconds != 0) rotation["interval_seconds"] = p->period_s;  // set through transit
  out.push_back({{"type", kPolicyType},
                 {"rotation", rotation},
                 {"createdBy", p->created_by},
                 {"lastUpdateDate", timefmt::format_rfc3339(p->updated_at)}});
  return out;
}

Reply get_policies(Context& ctx) {
  auto k = resolve(ctx);
  return Reply{200, kms::collection(kPolicyType, policy_resources(ctx.keys->rotation_policy(k.ns, k.id))), {}, true};
}

Reply put_policies(Context& ctx) {
  auto k = resolve(ctx);
  const json& r = single_resource(ctx.fields);
  auto rot = r.find("rotation");
  if (rot == r.end() || !rot->is_object())
    throw invalid("resources[0].rotation is required: {\"interval_month\": 1 to 12}", "bad_body");
  int64_t period = 0;
  auto enabled = rot->find("enabled");
  if (enabled != rot->end() && !enabled->is_boolean())
    throw invalid("resources[0].rotation.enabled must be true or false", "bad_body");
  bool on = enabled == rot->end() || enabled->get<bool>();
  if (on) {
    auto months = rot->find("interval_month");
    if (months == rot->end() || !months->is_number_integer() || months->get<int64_t>() < 1 || months->get<int64_t>() > 12)
      throw invalid("resources[0].rotation.interval_month must be an integer from 1 to 12", "bad_body");
    period = months->get<int64_t>() * kMonthSeconds;
  }
  ctx.keys->set_rotation_policy(ref_of(k), period);
  return Reply{200, kms::collection(kPolicyType, policy_resources(ctx.keys->rotation_policy(k.ns, k.id))), {}, true};
}

Reply not_offered(Context& ctx) {
  std::string what = ctx.request.method + " " + ctx.request.path;
  if (auto a = ctx.request.query_param("action")) what += "?action=" + *a;
  throw keys::KeyError(keys::ErrorKind::not_implemented, "not_implemented",
                       "p11kms does not implement " + what + " (a Key Protect feature outside its scope)");
}

}  // namespace

void add_kms_routes(Router& router) {
  const Field id{"id", FieldType::string, "The key's id (a v4 UUID) or its name."};
  const Field metadata{"metadata", FieldType::object, "`{\"collectionType\": \"application/vnd.ibm.kms.key+json\", \"collectionTotal\": 1}`."};
  const Field aad{"aad", FieldType::array, "Up to 126 strings of 0 to 255 bytes bound to the ciphertext; unwrap needs the same list."};
  const Field list_fields[] = {
      {"limit", FieldType::integer, "Keys per page, 1 to 5000.", kDefaultLimit},
      {"offset", FieldType::integer, "Keys to skip.", 0},
      {"state", FieldType::string, "Comma-separated states to include (0 pre-active, 1 active, 2 suspended, 3 deactivated, 5 destroyed).", "0,1,2,3"},
  };

  // Declared before keys/:id, which would otherwise take "registrations" for a key's id.
  router.add({"GET", "keys/registrations", {}, "Not offered by p11kms: answers 501.", not_offered, 0});
  router.add({"POST", "keys",
              {metadata,
               {"resources", FieldType::array,
                "One key: `type`, `name` (unique in the instance), `description`, `expirationDate` (RFC 3339), "
                "`extractable` (false: a root key in the token; true: a standard key), `payload` (base64: import "
                "256 bits for a root key, 256/384/512 for a standard key)."}},
              "Create or import a key. 201 with its metadata; a name already in use is a 409.", create, policy::kCreate});
  router.add({"GET", "keys", {list_fields[0], list_fields[1], list_fields[2]},
              "List keys' metadata (never material), oldest first.", list, policy::kList});
  router.add({"HEAD", "keys", {list_fields[0], list_fields[1], list_fields[2]},
              "Count the keys under the same filter: `Key-Total` header, no body.", count, policy::kList});
  router.add({"GET", "keys/:id", {id},
              "A key's metadata, and `payload` for a standard key; a deleted key shows state 5 and no material.",
              get, policy::kRead});
  router.add({"DELETE", "keys/:id", {id},
              "Destroy every version in the token and leave a tombstone: 204, or 200 with the deleted key under "
              "`Prefer: return=representation`.",
              remove, policy::kDelete});

  router.add({"GET", "keys/:id/metadata", {id}, "A key's metadata, never its material (IBM SDK: getKeyMetadata).",
              read_metadata, policy::kRead, true, "", "keys/:id"});
  router.add({"GET", "keys/:id/versions", {id},
              "The key's versions, newest first, with their ids and creation dates (IBM SDK: getKeyVersions).",
              list_versions, policy::kRead, true, "", "keys/:id"});

  const Field alias{"alias", FieldType::string, "2 to 90 characters of [A-Za-z0-9_-], unique in the instance together with key names."};
  router.add({"POST", "keys/:id/aliases/:alias", {id, alias},
              "Give the key an extra name, usable wherever its id is (at most 5). 201.", add_alias, policy::kUpdate, true,
              "", "keys/:id/aliases"});
  router.add({"DELETE", "keys/:id/aliases/:alias", {id, alias}, "Remove an alias. 204.", remove_alias, policy::kUpdate,
              true, "", "keys/:id/aliases"});

  router.add({"GET", "keys/:id/policies", {id},
              "The key's rotation policy (`rotation.interval_month`), an empty collection when it has none.",
              get_policies, policy::kRead, true, "", "keys/:id"});
  router.add({"PUT", "keys/:id/policies",
              {id, metadata,
               {"resources", FieldType::array,
                "One policy: `{\"type\": \"application/vnd.ibm.kms.policy+json\", \"rotation\": {\"interval_month\": 1-12}}`; "
                "`\"enabled\": false` removes it."}},
              "Rotate the key automatically every interval_month months (30 days each), the same mechanism as "
              "Transit's auto_rotate_period.",
              put_policies, policy::kUpdate, true, "", "keys/:id/policies"});

  // Each action in both of Key Protect's forms: `?action=wrap` (API v2 documents) and
  // `/actions/wrap` (IBM's SDKs); one callback and one policy path for both.
  std::vector<std::string> action_names;
  auto action = [&](const std::string& name, std::vector<Field> fields, const char* summary, Callback cb) {
    fields.insert(fields.begin(), id);
    action_names.push_back(name);
    Route query_form{"POST", "keys/:id", fields, summary, cb, policy::kUpdate};
    query_form.action = name;
    query_form.policy_pattern = "keys/:id/" + name;
    router.add(std::move(query_form));
    Route path_form{"POST", "keys/:id/actions/" + name, std::move(fields), summary, std::move(cb), policy::kUpdate};
    path_form.policy_pattern = "keys/:id/" + name;
    router.add(std::move(path_form));
  };
  action("wrap",
         {{"plaintext", FieldType::string, "Base64 data key, 1 to 4096 bytes; absent: the token generates 32 bytes."}, aad},
         "Wrap a data key with the root key's latest version: `ciphertext`, `keyVersion.id` (and `plaintext` when "
         "generated). Needs an active root key.",
         wrap);
  action("unwrap", {{"ciphertext", FieldType::string, "The `ciphertext` returned by wrap."}, aad},
         "Unwrap: `plaintext` and `keyVersion.id`; a ciphertext of an older version also comes back rewrapped by the "
         "latest (`ciphertext`, `rewrappedKeyVersion.id`). Allowed on deactivated keys.",
         unwrap);
  action("rewrap", {{"ciphertext", FieldType::string, "The `ciphertext` returned by wrap."}, aad},
         "Rewrap under the latest version without returning the plaintext: `ciphertext`, `keyVersion.id`, "
         "`rewrappedKeyVersion.id`.",
         rewrap);
  action("rotate", {{"payload", FieldType::string, "Base64 new material: required for imported keys, refused for generated ones."}},
         "A new version in the token; older versions keep unwrapping. 204.", rotate);
  action("disable", {}, "Suspend the key (state 2): wrap, unwrap and rewrap answer 409 until enabled. 204.",
         [](Context& ctx) { return set_enabled(ctx, false); });
  action("enable", {}, "Make a suspended key active again. 204.", [](Context& ctx) { return set_enabled(ctx, true); });

  // What IBM's SDK can call but p11kms does not offer: a 501 naming the route, never a 404
  // that reads like a missing key.
  for (const char* name : {"setKeyForDeletion", "unsetKeyForDeletion", "restore", "sync"})
    action(name, {}, "Not offered by p11kms: answers 501.", not_offered);
  const std::pair<const char*, const char*> unsupported[] = {
      {"POST", "import_token"},        {"GET", "import_token"},
      {"GET", "key_rings"},            {"POST", "key_rings/:key_ring_id"},
      {"DELETE", "key_rings/:key_ring_id"}, {"POST", "keys/:id/restore"},
      {"GET", "instance/policies"},    {"PUT", "instance/policies"},
      {"GET", "instance/allowed_ip_port"}, {"GET", "keys/:id/registrations"}};
  for (const auto& [method, pattern] : unsupported)
    router.add({method, pattern, {}, "Not offered by p11kms: answers 501.", not_offered, 0});
}

Dialect kms_dialect() {
  Dialect d;
  d.name = "kms";
  d.mount = "/kms/api/v2/";
  d.policy_prefix = "kms/";
  d.unauthenticated_status = 401;
  d.namespace_headers = {"bluemix-instance", "icp-instance", "X-Vault-Namespace"};
  d.uses_actions = true;
  d.render = &kms::render;
  d.error = &kms::error;
  add_kms_routes(d.router);
  return d;
}

}  // namespace p11kms::api
