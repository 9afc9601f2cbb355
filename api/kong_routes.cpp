// Kong Gateway's keys and key sets (/keys, /key-sets), Kong 3.x Admin API shapes, plus what Kong
// does not have: GET /key-sets/{x}/jwks, POST /keys/{x}/sign (JWS) and POST /keys/{x}/decrypt
// (JWE), with the private key in the token (keys/kong_keys.hpp). Bodies as JSON, urlencoded or
// multipart forms with Kong's dotted names (api/form_body.hpp). Errors in Kong's shape. See
// docs/api/kong.md.
#include <openssl/crypto.h>

#include <algorithm>

#include "api/api_service.hpp"
#include "api/form_body.hpp"
#include "common/digest.hpp"
#include "common/encoding.hpp"
#include "common/json_text.hpp"
#include "keys/jose.hpp"
#include "keys/kong_keys.hpp"

namespace p11kms::api {
namespace {

using keys::invalid;

using json_text::dump;

http::Response render(const Reply& reply, const std::string& /*request_id*/) {
  http::Response r;
  r.status = reply.status;
  if (reply.status == 204 || reply.status == 304 || reply.data.is_null()) return r;
  r.body = reply.data.is_string() ? reply.data.get<std::string>() : dump(reply.data);
  r.content_type = "application/json; charset=utf-8";
  return r;
}

// Kong's errors: {"message"}; a field at fault (code "invalid_<field>", dotted for nested
// fields) as a schema violation {"message", "name": "schema violation", "code": 2, "fields"};
// a name or kid taken (code "unique_<field>") as {"name": "unique constraint violation", "code": 5}.
http::Response error(int status, const std::string& code, const std::string& message) {
  http::Response r;
  r.status = status;
  r.content_type = "application/json; charset=utf-8";
  json body = {{"message", message}};
  if (status == 400 && code.rfind("invalid_", 0) == 0 && code.size() > 8 && code != "invalid_argument" &&
      code != "invalid_namespace" && code != "invalid_action") {
    std::string field = code.substr(8);
    json fields = message;
    for (size_t dot; (dot = field.rfind('.')) != std::string::npos; field = field.substr(0, dot))
      fields = json{{field.substr(dot + 1), fields}};
    body["message"] = "schema violation (" + code.substr(8) + ": " + message + ")";
    body["name"] = "schema violation";
    body["code"] = 2;
    body["fields"] = json{{field, fields}};
  } else if (status == 409 && code.rfind("unique_", 0) == 0) {
    body["name"] = "unique constraint violation";
    body["code"] = 5;
    body["fields"] = json{{code.substr(7), message}};
  }
  r.body = dump(body);
  return r;
}

keys::KongKeys& kong(Context& ctx) {
  if (!ctx.kong) throw keys::unavailable("keys and key sets are not available in this server");
  return *ctx.kong;
}

Reply raw(int status, json data = nullptr, http::Headers headers = {}) {
  return Reply{status, std::move(data), {}, true, std::move(headers)};
}

const json& values(Context& ctx) { return ctx.fields.raw(); }

bool present(const json& v, const char* name) { return v.contains(name); }
bool is_null_like(const json& v) { return v.is_null() || (v.is_string() && v.get<std::string>().empty()); }

std::optional<std::string> opt_string(const json& v, const char* name) {
  if (!v.contains(name) || v[name].is_null()) return std::nullopt;
  if (!v[name].is_string()) throw invalid("expected a string", std::string("invalid_") + name);
  return v[name].get<std::string>();
}

std::optional<std::vector<std::string>> tags_of(const json& v) {
  const json& t = v["tags"];
  if (is_null_like(t)) return std::nullopt;
  std::vector<std::string> out;
  auto add = [&](const std::string& s) {
    size_t start = 0;
    while (true) {  // a form's "tags=a,b" is two tags, as Kong takes it
      size_t comma = s.find(',', start);
      std::string tag = s.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
      if (tag.empty() || tag.size() > 128 || tag.find_first_of("/ ") != std::string::npos)
        throw invalid("tags are 1 to 128 characters without '/', ',' or spaces", "invalid_tags");
      if (std::find(out.begin(), out.end(), tag) == out.end()) out.push_back(tag);
      if (comma == std::string::npos) break;
      start = comma + 1;
    }
  };
  if (t.is_string()) {
    add(t.get<std::string>());
  } else if (t.is_array()) {
    for (const auto& e : t) {
      if (!e.is_string()) throw invalid("expected an array of strings", "invalid_tags");
      add(e.get<std::string>());
    }
  } else {
    throw invalid("expected an array of strings", "invalid_tags");
  }
  if (out.size() > 64) throw invalid("at most 64 tags", "invalid_tags");
  return out;
}

keys::KongSetInput set_input(Context& ctx) {
  const json& v = values(ctx);
  keys::KongSetInput in;
  in.name = opt_string(v, "name");
  in.tags_given = present(v, "tags");
  if (in.tags_given) in.tags = tags_of(v);
  return in;
}

keys::KongKeyInput key_input(Context& ctx) {
  const json& v = values(ctx);
  keys::KongKeyInput in;
  in.name = opt_string(v, "name");
  in.kid = opt_string(v, "kid");
  in.tags_given = present(v, "tags");
  if (in.tags_given) in.tags = tags_of(v);
  in.jwk_given = present(v, "jwk");
  if (in.jwk_given && !is_null_like(v["jwk"])) {
    if (v["jwk"].is_string()) in.jwk.emplace(v["jwk"].get<std::string>());
    else if (v["jwk"].is_object()) in.jwk.emplace(v["jwk"].dump());
    else throw invalid("expected a JSON Web Key (a string of JSON)", "invalid_jwk");
  }
  in.pem_given = present(v, "pem");
  if (in.pem_given && !is_null_like(v["pem"])) {
    const json& pem = v["pem"];
    if (!pem.is_object()) throw invalid("expected an object with public_key and/or private_key", "invalid_pem");
    for (auto it = pem.begin(); it != pem.end(); ++it)
      if (it.key() != "public_key" && it.key() != "private_key")
        throw invalid("unknown field", "invalid_pem." + it.key());
    if (pem.contains("public_key") && !is_null_like(pem["public_key"])) {
      if (!pem["public_key"].is_string()) throw invalid("expected a string", "invalid_pem.public_key");
      in.pem_public = pem["public_key"].get<std::string>();
    }
    if (pem.contains("private_key") && !is_null_like(pem["private_key"])) {
      if (!pem["private_key"].is_string()) throw invalid("expected a string", "invalid_pem.private_key");
      in.pem_private.emplace(pem["private_key"].get<std::string>());
    }
  }
  in.set_given = present(v, "set");
  if (in.set_given && !is_null_like(v["set"])) {
    const json& s = v["set"];
    if (!s.is_object()) throw invalid("expected a reference {\"id\"} or {\"name\"}", "invalid_set");
    in.set.id = opt_string(s, "id");
    in.set.name = opt_string(s, "name");
    if (!in.set.given()) throw invalid("expected a reference {\"id\"} or {\"name\"}", "invalid_set");
  }
  return in;
}

// The request's copies of private key text (its parsed fields) are wiped once used.
void wipe_fields(Context& ctx) {
  json& v = const_cast<json&>(ctx.fields.raw());
  auto wipe = [](json& s) {
    if (s.is_string()) {
      auto& str = s.get_ref<std::string&>();
      if (!str.empty()) OPENSSL_cleanse(str.data(), str.size());
    }
  };
  if (v.contains("jwk")) {
    if (v["jwk"].is_object()) for (auto& [k, e] : v["jwk"].items()) wipe(e);
    wipe(v["jwk"]);
  }
  if (v.contains("pem") && v["pem"].is_object() && v["pem"].contains("private_key")) wipe(v["pem"]["private_key"]);
}

json tags_json(const std::optional<std::vector<std::string>>& t) { return t ? json(*t) : json(nullptr); }

json set_json(const keys::KongKeySet& s) {
  return {{"id", s.id}, {"name", s.name}, {"tags", tags_json(s.tags)}, {"created_at", s.created_at},
          {"updated_at", s.updated_at}};
}

json key_json(const keys::KongKey& k) {
  json j = {{"id", k.id},
            {"name", k.name},
            {"kid", k.kid},
            {"jwk", k.pem_form ? json(nullptr) : json(k.public_jwk)},
            {"pem", k.pem_form ? json{{"public_key", k.public_pem}, {"private_key", nullptr}} : json(nullptr)},
            {"set", k.set_id.empty() ? json(nullptr) : json{{"id", k.set_id}}},
            {"tags", tags_json(k.tags)},
            {"created_at", k.created_at},
            {"updated_at", k.updated_at},
            {"private_key", k.object_id.empty() ? "none" : "hsm"}};
  return j;
}

std::string url_encode(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      char buf[4];
      std::snprintf(buf, sizeof buf, "%%%02X", c);
      out += buf;
    }
  }
  return out;
}

// Kong's pagination (size 1..1000, default 100; opaque offset) and tags filter (a,b: both; a/b: either).
template <typename T>
Reply page(Context& ctx, const std::vector<T>& all, const std::string& base, json (*shape)(const T&)) {
  const json& v = values(ctx);
  size_t size = 100;
  bool size_given = false;
  if (auto s = opt_string(v, "size")) {
    if (s->empty() || s->size() > 4 || s->find_first_not_of("0123456789") != std::string::npos ||
        std::stoul(*s) < 1 || std::stoul(*s) > 1000)
      throw invalid("must be an integer from 1 to 1000", "invalid_size");
    size = std::stoul(*s);
    size_given = true;
  } else if (v.contains("size") && v["size"].is_number_integer()) {
    auto n = v["size"].get<int64_t>();
    if (n < 1 || n > 1000) throw invalid("must be an integer from 1 to 1000", "invalid_size");
    size = static_cast<size_t>(n);
    size_given = true;
  }
  std::string after;
  if (auto o = opt_string(v, "offset")) {
    auto d = keys::jose::b64url_decode(*o);
    if (!d || d->size() > 64) throw invalid("not an offset this server gave", "invalid_offset");
    after.assign(reinterpret_cast<const char*>(d->data()), d->size());
  }
  std::vector<std::string> want;
  bool any = false;
  auto tags = opt_string(v, "tags");
  if (tags && !tags->empty()) {
    bool has_comma = tags->find(',') != std::string::npos, has_slash = tags->find('/') != std::string::npos;
    if (has_comma && has_slash) throw invalid("use either a,b (both) or a/b (either), not both", "invalid_tags");
    any = has_slash;
    char sep = any ? '/' : ',';
    size_t start = 0;
    while (true) {
      size_t e = tags->find(sep, start);
      want.push_back(tags->substr(start, e == std::string::npos ? std::string::npos : e - start));
      if (want.back().empty()) throw invalid("an empty tag", "invalid_tags");
      if (e == std::string::npos) break;
      start = e + 1;
    }
  }
  json data = json::array();
  std::string last;
  bool more = false;
  for (const auto& item : all) {
    if (!after.empty() && item.id <= after) continue;
    if (!want.empty()) {
      const auto& have = item.tags ? *item.tags : std::vector<std::string>{};
      auto has = [&](const std::string& t) { return std::find(have.begin(), have.end(), t) != have.end(); };
      bool ok = any ? std::any_of(want.begin(), want.end(), has) : std::all_of(want.begin(), want.end(), has);
      if (!ok) continue;
    }
    if (data.size() == size) {
      more = true;
      break;
    }
    data.push_back(shape(item));
    last = item.id;
  }
  json out = {{"data", data}, {"next", nullptr}};
  if (more) {
    std::string off = keys::jose::b64url(last);
    std::string next = base + "?offset=" + off;
    if (size_given) next += "&size=" + std::to_string(size);
    if (tags && !tags->empty()) next += "&tags=" + url_encode(*tags);
    out["next"] = next;
    out["offset"] = off;
  }
  return raw(200, std::move(out));
}

// -- key sets -----------------------------------------------------------------------------

Reply list_sets(Context& ctx) { return page<keys::KongKeySet>(ctx, kong(ctx).list_sets(ctx.tenant), "/key-sets", set_json); }
Reply create_set(Context& ctx) { return raw(201, set_json(kong(ctx).create_set(ctx.tenant, set_input(ctx)))); }
Reply put_set_collection(Context& ctx) {
  return raw(200, set_json(kong(ctx).put_set(ctx.tenant, std::nullopt, set_input(ctx)).first));
}
Reply get_set(Context& ctx) { return raw(200, set_json(kong(ctx).get_set(ctx.tenant, ctx.params.at("id")))); }
Reply put_set(Context& ctx) {
  return raw(200, set_json(kong(ctx).put_set(ctx.tenant, ctx.params.at("id"), set_input(ctx)).first));
}
Reply patch_set(Context& ctx) {
  return raw(200, set_json(kong(ctx).patch_set(ctx.tenant, ctx.params.at("id"), set_input(ctx))));
}
Reply delete_set(Context& ctx) {
  kong(ctx).delete_set(ctx.tenant, ctx.params.at("id"));
  return raw(204);
}
Reply set_keys(Context& ctx) {
  auto s = kong(ctx).get_set(ctx.tenant, ctx.params.at("id"));
  return page<keys::KongKey>(ctx, kong(ctx).list_keys(ctx.tenant, s.id), "/key-sets/" + ctx.params.at("id") + "/keys",
                             key_json);
}

Reply jwks(Context& ctx) {
  std::string body = kong(ctx).jwks(ctx.tenant, ctx.params.at("id"));
  auto md = digest::sha256(body.data(), body.size());
  std::string etag = "\"" + encoding::hex_encode(md.data(), 16) + "\"";
  http::Headers h = {{"ETag", etag}, {"Cache-Control", "public, max-age=300"}};
  if (auto inm = ctx.request.header("If-None-Match"); inm && (inm->find(etag) != std::string::npos || *inm == "*"))
    return raw(304, nullptr, std::move(h));
  Reply r = raw(200, json(body), std::move(h));
  return r;
}

// -- keys ---------------------------------------------------------------------------------

Reply list_keys(Context& ctx) { return page<keys::KongKey>(ctx, kong(ctx).list_keys(ctx.tenant), "/keys", key_json); }
Reply create_key(Context& ctx) {
  auto in = key_input(ctx);
  wipe_fields(ctx);
  return raw(201, key_json(kong(ctx).create_key(ctx.tenant, in)));
}
Reply put_key_collection(Context& ctx) {
  auto in = key_input(ctx);
  wipe_fields(ctx);
  return raw(200, key_json(kong(ctx).put_key(ctx.tenant, std::nullopt, in).first));
}
Reply get_key(Context& ctx) { return raw(200, key_json(kong(ctx).get_key(ctx.tenant, ctx.params.at("id")))); }
Reply put_key(Context& ctx) {
  auto in = key_input(ctx);
  wipe_fields(ctx);
  return raw(200, key_json(kong(ctx).put_key(ctx.tenant, ctx.params.at("id"), in).first));
}
Reply patch_key(Context& ctx) {
  auto in = key_input(ctx);
  wipe_fields(ctx);
  return raw(200, key_json(kong(ctx).patch_key(ctx.tenant, ctx.params.at("id"), in)));
}
Reply delete_key(Context& ctx) {
  kong(ctx).delete_key(ctx.tenant, ctx.params.at("id"));
  return raw(204);
}

Reply sign(Context& ctx) {
  const json& v = values(ctx);
  auto payload = opt_string(v, "payload");
  if (!payload) throw invalid("required field missing", "invalid_payload");
  std::string alg = opt_string(v, "alg").value_or("");
  std::string header;
  if (v.contains("header") && !v["header"].is_null()) {
    if (!v["header"].is_object()) throw invalid("expected a JSON object", "invalid_header");
    header = v["header"].dump();
  }
  return raw(200, {{"jws", kong(ctx).sign(ctx.tenant, ctx.params.at("id"), *payload, alg, header)}});
}

Reply decrypt(Context& ctx) {
  auto jwe = opt_string(values(ctx), "jwe");
  if (!jwe) throw invalid("required field missing", "invalid_jwe");
  auto d = kong(ctx).decrypt(ctx.tenant, ctx.params.at("id"), *jwe);
  return raw(200, {{"plaintext", keys::jose::b64url(d.plaintext.data(), d.plaintext.size())},
                   {"header", json::parse(d.protected_header)}});
}

const std::vector<Field> kSetFields = {
    {"name", FieldType::string, "The set's name: unique in the namespace, [A-Za-z0-9._-]."},
    {"tags", FieldType::array, "Tags (`tags[]=a`, `tags=a,b` in forms)."}};
const std::vector<Field> kKeyFields = {
    {"name", FieldType::string, "Unique in the namespace across every dialect."},
    {"kid", FieldType::string, "Key id; unique within a set; must equal the JWK's kid."},
    {"jwk", FieldType::string, "A JSON Web Key (JSON text): RSA 2048-4096, EC P-256/384/521, OKP Ed25519."},
    {"pem", FieldType::object, "`{public_key, private_key}` PEM (forms: `pem.public_key`, `pem.private_key`)."},
    {"set", FieldType::object, "`{id}` or `{name}` of a key set (forms: `set.id`, `set.name`)."},
    {"tags", FieldType::array, "Tags."}};
const std::vector<Field> kListFields = {
    {"size", FieldType::integer, "Page size, 1 to 1000 (default 100)."},
    {"offset", FieldType::string, "The `offset` of the previous page."},
    {"tags", FieldType::string, "`a,b`: both tags; `a/b`: either."}};

}  // namespace

// What /keys and /key-sets share: Kong's shapes, bodies and 401 for a missing token.
static Dialect kong_dialect(const char* name, const char* mount, const char* policy_prefix) {
  Dialect d;
  d.name = name;
  d.mount = mount;
  d.policy_prefix = policy_prefix;
  d.unauthenticated_status = 401;
  d.namespace_headers = {"X-Vault-Namespace"};
  d.render = &render;
  d.error = &error;
  d.parse_body = &parse_kong_body;
  return d;
}

Dialect kong_keys_dialect() {
  Dialect d = kong_dialect("jwks-keys", "/keys", "keys");
  auto& r = d.router;
  r.add({"GET", "", kListFields, "Lists keys (Kong pagination, tags filter).", list_keys, policy::kList});
  r.add({"POST", "", kKeyFields, "Creates a key (201); a private key goes into the token.", create_key, policy::kCreate});
  r.add({"PUT", "", kKeyFields, "Creates or replaces the key named in the body.", put_key_collection, policy::kUpdate});
  r.add({"GET", "/:id", {}, "A key by id or name (public parts only).", get_key, policy::kRead});
  r.add({"PUT", "/:id", kKeyFields,
         "Creates or replaces a key; the same public key keeps the token's private key, another destroys it.", put_key,
         policy::kUpdate});
  r.add({"PATCH", "/:id", kKeyFields, "Updates the given fields of a key.", patch_key, policy::kUpdate});
  r.add({"DELETE", "/:id", {}, "Deletes a key and its token object (204, also when absent).", delete_key,
         policy::kDelete});
  r.add({"POST", "/:id/sign",
         {{"payload", FieldType::string, "base64url of the JWS payload."},
          {"alg", FieldType::string, "RS256/384/512, PS256/384/512, ES256/384/512, EdDSA; default from the key."},
          {"header", FieldType::object, "Extra protected header members."}},
         "A compact JWS signed in the token (`{\"jws\"}`).", sign, policy::kUpdate});
  r.add({"POST", "/:id/decrypt", {{"jwe", FieldType::string, "A compact JWE."}},
         "Decrypts a compact JWE (RSA-OAEP, RSA-OAEP-256, ECDH-ES[+A128KW|+A256KW]; A128/192/256GCM) "
         "(`{\"plaintext\", \"header\"}`).",
         decrypt, policy::kUpdate});
  return d;
}

Dialect kong_key_sets_dialect(bool jwks_public) {
  Dialect d = kong_dialect("jwks-key-sets", "/key-sets", "key-sets");
  auto& r = d.router;
  r.add({"GET", "", kListFields, "Lists key sets (Kong pagination, tags filter).", list_sets, policy::kList});
  r.add({"POST", "", kSetFields, "Creates a key set (201).", create_set, policy::kCreate});
  r.add({"PUT", "", kSetFields, "Creates or replaces the key set named in the body.", put_set_collection,
         policy::kUpdate});
  r.add({"GET", "/:id", {}, "A key set by id or name.", get_set, policy::kRead});
  r.add({"PUT", "/:id", kSetFields, "Creates or replaces a key set.", put_set, policy::kUpdate});
  r.add({"PATCH", "/:id", kSetFields, "Updates the given fields of a key set.", patch_set, policy::kUpdate});
  r.add({"DELETE", "/:id", {}, "Deletes a key set, its keys and their token objects (204).", delete_set,
         policy::kDelete});
  r.add({"GET", "/:id/keys", kListFields, "The set's keys (Kong pagination, tags filter).", set_keys, policy::kList});
  Route j{"GET", "/:id/jwks", {}, "RFC 7517 JWK Set of the set's public keys, with ETag (no token unless jwks.public: false).",
          jwks, policy::kRead};
  j.authenticated = !jwks_public;
  r.add(std::move(j));
  return d;
}

}  // namespace p11kms::api
