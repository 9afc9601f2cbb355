// Confluent-style BYOK key registry (/byok/v1/keys): register customer-managed keys, list them
// with Confluent's filters and opaque keyset pages, see whether each is valid (measured in the
// token for p11kms root keys) and in use. Shapes follow Confluent Cloud's byok/v1 OpenAPI; see
// docs/api/byok.md. Callbacks parse, call one ByokRegistry method, render.
#include <algorithm>
#include <cctype>
#include <map>
#include <regex>
#include <set>

#include "api/api_service.hpp"
#include "api/byok_shape.hpp"
#include "keys/byok_registry.hpp"
#include "keys/key_type.hpp"

namespace p11kms::api {
namespace {

using byok::bad_field;
using byok::bad_parameter;

constexpr int64_t kDefaultPageSize = 10;
constexpr int64_t kMaxPageSize = 100;
constexpr size_t kMaxDisplayName = 255;
constexpr size_t kMaxPageToken = 255;

keys::ByokRegistry& registry(Context& ctx) {
  if (!ctx.byok) throw keys::unavailable("the BYOK registry is not available in this server");
  return *ctx.byok;
}

// Problems with a source are rendered here, in Confluent's shape; every other error goes
// through the shared pipeline (and byok::error).
Callback sourced(Callback f) {
  return [f = std::move(f)](Context& ctx) -> Reply {
    try {
      return f(ctx);
    } catch (const byok::Problem& p) {
      return Reply{p.status(), byok::error_body(p.status(), p.code(), p.what(), p.source_kind(), p.source()), {}, true};
    }
  };
}

// "scheme://host" of the request, for absolute links; a Host that is not a plain host[:port]
// is not echoed.
std::string base_url(const Context& ctx) {
  std::string host = ctx.request.header("Host").value_or("");
  bool ok = !host.empty() && host.size() <= 255;
  for (char c : host)
    ok = ok && (std::isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '-' || c == ':' || c == '[' || c == ']');
  if (!ok) host = "localhost";
  return std::string(ctx.request.tls ? "https" : "http") + "://" + host;
}

std::string percent_encode(const std::string& s) {
  static const char hex[] = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : s) {
    if (std::isalnum(c) || c == '-' || c == '_' || c == '.' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += hex[c >> 4];
      out += hex[c & 15];
    }
  }
  return out;
}

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

// -- the request body ------------------------------------------------------------------------

json body_of(Context& ctx) {
  if (ctx.request.body.find_first_not_of(" \t\r\n") == std::string::npos) throw bad_field("", "a JSON body is required");
  json b = parse_body(ctx.request.body, ctx.limits ? ctx.limits->max_json_depth : 64);
  if (!b.is_object()) throw bad_field("", "the request body must be a JSON object");
  return b;
}

const std::set<std::string>& read_only_fields() {
  static const std::set<std::string> s = {"api_version", "kind", "id", "metadata", "provider", "state", "validation"};
  return s;
}

std::string display_name_of(const json& b) {
  const json& d = b.at("display_name");
  if (d.is_null()) return "";
  if (!d.is_string()) throw bad_field("/display_name", "display_name must be a string");
  std::string s = d.get<std::string>();
  if (s.size() > kMaxDisplayName)
    throw bad_field("/display_name", "display_name must be at most " + std::to_string(kMaxDisplayName) + " characters");
  return s;
}

std::string required_string(const json& key, const std::string& name) {
  auto it = key.find(name);
  if (it == key.end() || it->is_null()) throw bad_field("/key/" + name, "key." + name + " is required");
  if (!it->is_string()) throw bad_field("/key/" + name, "key." + name + " must be a string");
  return it->get<std::string>();
}

struct KindSpec {
  const char* provider;
  std::vector<std::string> fields;     // writable, all required
  std::vector<std::string> read_only;  // computed by the provider
};

const std::map<std::string, KindSpec>& kinds() {
  static const std::map<std::string, KindSpec> k = {
      {"AwsKey", {"AWS", {"key_arn"}, {"roles"}}},
      {"AzureKey", {"Azure", {"key_id", "key_vault_id", "tenant_id"}, {"application_id"}}},
      {"GcpKey", {"GCP", {"key_id"}, {"security_group"}}},
      {keys::kP11kmsKeyKind, {"P11KMS", {"key_id"}, {}}},
  };
  return k;
}

void check_format(const std::string& kind, const std::string& field, const std::string& value) {
  static const std::regex aws_arn(
      R"(^arn:aws(-cn|-us-gov|-iso|-iso-b)?:kms:[a-z]{2}(-[a-z]+)+-[0-9]:[0-9]{12}:key/)"
      R"(([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32})$)");
  static const std::regex azure_key(
      R"(^https://[A-Za-z0-9-]{3,24}\.(vault\.azure\.net|vault\.azure\.cn|vault\.usgovcloudapi\.net|managedhsm\.azure\.net)/keys/[A-Za-z0-9-]{1,127}$)");
  static const std::regex uuid(R"(^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$)");
  static const std::regex azure_vault(
      R"(^/subscriptions/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/resourceGroups/[^/]+)"
      R"(/providers/Microsoft\.KeyVault/(vaults|managedHSMs)/[A-Za-z0-9-]{3,24}$)",
      std::regex::icase);
  static const std::regex gcp_key(
      R"(^projects/[^/]+/locations/[^/]+/keyRings/[^/]+/cryptoKeys/[^/]+(/cryptoKeyVersions/[0-9]+)?$)");
  const std::string pointer = "/key/" + field;
  if (kind == "AwsKey" && field == "key_arn" && !std::regex_match(value, aws_arn))
    throw bad_field(pointer, "key.key_arn must be the ARN of an AWS KMS key, such as "
                             "arn:aws:kms:us-west-2:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab");
  if (kind == "AzureKey" && field == "key_id" && !std::regex_match(value, azure_key))
    throw bad_field(pointer, "key.key_id must be an Azure Key Vault key URL without a version, such as "
                             "https://vault-name.vault.azure.net/keys/key-name");
  if (kind == "AzureKey" && field == "key_vault_id" && !std::regex_match(value, azure_vault))
    throw bad_field(pointer, "key.key_vault_id must be a Key Vault resource id: /subscriptions/<uuid>/resourceGroups/"
                             "<group>/providers/Microsoft.KeyVault/vaults/<vault-name>");
  if (kind == "AzureKey" && field == "tenant_id" && !std::regex_match(value, uuid))
    throw bad_field(pointer, "key.tenant_id must be a UUID");
  if (kind == "GcpKey" && field == "key_id" && !std::regex_match(value, gcp_key))
    throw bad_field(pointer, "key.key_id must be a GCP key path projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>"
                             " (optionally /cryptoKeyVersions/<n>)");
}

// The key object of a create: checked field by field; for a P11kmsKey the referenced key is
// resolved in the caller's namespace and must be a root key.
void parse_key(Context& ctx, const json& key, store::ByokKeyRecord& rec) {
  if (!key.is_object()) throw bad_field("/key", "key must be an object with a kind");
  auto k = key.find("kind");
  if (k == key.end() || !k->is_string())
    throw bad_field("/key/kind", "key.kind is required: AwsKey, AzureKey, GcpKey or P11kmsKey");
  std::string kind = k->get<std::string>();
  auto spec_it = kinds().find(kind);
  if (spec_it == kinds().end())
    throw bad_field("/key/kind", "key.kind must be AwsKey, AzureKey, GcpKey or P11kmsKey, not \"" + kind + "\"");
  const KindSpec& spec = spec_it->second;
  for (auto it = key.begin(); it != key.end(); ++it) {
    if (it.key() == "kind") continue;
    if (std::find(spec.read_only.begin(), spec.read_only.end(), it.key()) != spec.read_only.end())
      throw bad_field("/key/" + it.key(), "key." + it.key() + " is read-only: it is computed, not set", "read_only_field");
    if (std::find(spec.fields.begin(), spec.fields.end(), it.key()) == spec.fields.end())
      throw bad_field("/key/" + it.key(), "key." + it.key() + " is not a field of " + kind);
  }
  json stored = {{"kind", kind}};
  for (const auto& f : spec.fields) {
    std::string v = required_string(key, f);
    check_format(kind, f, v);
    stored[f] = v;
  }
  rec.kind = kind;
  rec.provider = spec.provider;
  if (kind == keys::kP11kmsKeyKind) {
    const std::string ref = stored["key_id"].get<std::string>();
    std::optional<store::KeyRecord> target;
    if (!ref.empty()) target = ctx.keys->find_key(ctx.ns, ref);
    if (!target || target->state == store::kDestroyed)
      throw bad_field("/key/key_id", "key.key_id: no p11kms key \"" + ref + "\" in namespace \"" + ctx.ns + "\"");
    auto type = keys::parse_key_type(target->type);
    if (target->exportable || target->type == "standard" || !type || !keys::is_aes(*type))
      throw bad_field("/key/key_id", "key.key_id: p11kms key \"" + ref + "\" is not a root key (a non-exportable AES "
                                     "key, such as a Key Protect root key or a transit aes256-gcm96 key)");
    rec.target_key_id = target->id;
  }
  rec.key_json = stored.dump();
}

void refuse_read_only(const json& b) {
  for (auto it = b.begin(); it != b.end(); ++it)
    if (read_only_fields().count(it.key()))
      throw bad_field("/" + it.key(), it.key() + " is read-only: it is computed, not set", "read_only_field");
}

Reply key_reply(Context& ctx, int status, const keys::ByokRegistry::Entry& e) {
  return Reply{status, byok::key_resource(e, base_url(ctx)), {}, true};
}

void refuse_query(Context& ctx, const std::set<std::string>& allowed) {
  for (const auto& [k, v] : ctx.request.query)
    if (!allowed.count(k)) throw bad_parameter(k, "unknown query parameter \"" + k + "\"", "invalid_filter");
}

Reply create(Context& ctx) {
  refuse_query(ctx, {});
  json b = body_of(ctx);
  refuse_read_only(b);
  for (auto it = b.begin(); it != b.end(); ++it)
    if (it.key() != "display_name" && it.key() != "key")
      throw bad_field("/" + it.key(), it.key() + " is not a field of Key (display_name, key)");
  if (!b.contains("key")) throw bad_field("/key", "key is required: {\"kind\": ..., ...}");
  store::ByokKeyRecord rec;
  rec.ns = ctx.ns;
  if (b.contains("display_name")) rec.display_name = display_name_of(b);
  parse_key(ctx, b.at("key"), rec);
  return key_reply(ctx, 201, registry(ctx).create(std::move(rec)));
}

const std::string& id_of(Context& ctx) { return ctx.params.at("id"); }

[[noreturn]] void missing(Context& ctx) {
  throw keys::not_found("key \"" + id_of(ctx) + "\" not found in namespace \"" + ctx.ns + "\"");
}

Reply read(Context& ctx) {
  refuse_query(ctx, {"validate"});
  bool validate = false;
  if (auto v = ctx.request.query_param("validate")) {
    if (*v != "true" && *v != "false") throw bad_parameter("validate", "validate must be true or false");
    validate = *v == "true";
  }
  auto e = validate ? registry(ctx).validate(ctx.ns, id_of(ctx)) : registry(ctx).get(ctx.ns, id_of(ctx));
  if (!e) missing(ctx);
  return key_reply(ctx, 200, *e);
}

Reply update(Context& ctx) {
  refuse_query(ctx, {});
  json b = body_of(ctx);
  refuse_read_only(b);
  if (b.contains("key")) throw bad_field("/key", "key is immutable: register a new key instead", "immutable_field");
  for (auto it = b.begin(); it != b.end(); ++it)
    if (it.key() != "display_name") throw bad_field("/" + it.key(), it.key() + " is not a field of Key that can be changed (display_name)");
  std::optional<keys::ByokRegistry::Entry> e;
  if (b.contains("display_name")) e = registry(ctx).rename(ctx.ns, id_of(ctx), display_name_of(b));
  else e = registry(ctx).get(ctx.ns, id_of(ctx));
  if (!e) missing(ctx);
  return key_reply(ctx, 200, *e);
}

Reply remove(Context& ctx) {
  refuse_query(ctx, {});
  registry(ctx).remove(ctx.ns, id_of(ctx));
  return Reply{204};
}

// -- the list --------------------------------------------------------------------------------

const char* const kFilters[] = {"display_name", "key", "provider", "state", "validation_phase", "validation_region"};

void check_enum(const std::string& name, const std::string& value, std::initializer_list<const char*> allowed) {
  std::string list;
  for (const char* a : allowed) {
    if (value == a) return;
    list += (list.empty() ? "" : ", ") + std::string(a);
  }
  throw bad_parameter(name, name + " must be one of " + list, "invalid_filter");
}

std::string key_identifier(const store::ByokKeyRecord& r) {
  json k = json::parse(r.key_json, nullptr, false);
  if (!k.is_object()) return "";
  for (const char* f : {"key_arn", "key_id"})
    if (k.contains(f) && k[f].is_string()) return k[f].get<std::string>();
  return "";
}

Reply list(Context& ctx) {
  std::set<std::string> allowed(std::begin(kFilters), std::end(kFilters));
  allowed.insert({"page_size", "page_token"});
  refuse_query(ctx, allowed);
  std::map<std::string, std::string> filters;
  for (const char* f : kFilters)
    if (auto v = ctx.request.query_param(f)) filters[f] = *v;
  if (filters.count("provider")) check_enum("provider", filters["provider"], {"AWS", "Azure", "GCP", "P11KMS"});
  if (filters.count("state")) check_enum("state", filters["state"], {"AVAILABLE", "IN_USE"});
  if (filters.count("validation_phase"))
    check_enum("validation_phase", filters["validation_phase"], {"INITIALIZING", "VALID", "INVALID"});
  int64_t page_size = kDefaultPageSize;
  if (auto v = ctx.request.query_param("page_size")) {
    bool digits = !v->empty() && v->size() <= 4 && v->find_first_not_of("0123456789") == std::string::npos;
    page_size = digits ? std::stoll(*v) : 0;
    if (page_size < 1 || page_size > kMaxPageSize)
      throw bad_parameter("page_size", "page_size must be an integer from 1 to " + std::to_string(kMaxPageSize));
  }
  // The filters, canonical (sorted, length-prefixed): page tokens are bound to them.
  std::string query;
  for (const auto& [k, v] : filters) query += k + "=" + std::to_string(v.size()) + ":" + v + "&";
  std::string after;
  if (auto t = ctx.request.query_param("page_token")) {
    if (t->size() > kMaxPageToken)
      throw bad_parameter("page_token", "page_token must be at most " + std::to_string(kMaxPageToken) + " characters");
    auto opened = registry(ctx).open_page_token(ctx.ns, query, *t);
    if (!opened)
      throw bad_parameter("page_token", "page_token is not a token this server issued for this namespace and these "
                                        "filters (use the links of a previous page)", "invalid_page_token");
    after = *opened;
  }

  std::vector<keys::ByokRegistry::Entry> matching;
  const std::string name_part = filters.count("display_name") ? lower(filters["display_name"]) : "";
  for (auto& e : registry(ctx).list(ctx.ns)) {
    const auto& r = e.record;
    if (filters.count("display_name") && lower(r.display_name).find(name_part) == std::string::npos) continue;
    if (filters.count("provider") && r.provider != filters["provider"]) continue;
    if (filters.count("state") && (e.in_use ? "IN_USE" : "AVAILABLE") != filters["state"]) continue;
    if (filters.count("validation_phase") && r.validation_phase != filters["validation_phase"]) continue;
    if (filters.count("validation_region") && r.validation_region != filters["validation_region"]) continue;
    if (filters.count("key") && key_identifier(r).find(filters["key"]) == std::string::npos) continue;
    matching.push_back(std::move(e));
  }
  // Keyset paging: the page starts after the token's id, so keys created or deleted meanwhile
  // never shift it.
  size_t n = matching.size();
  size_t start = static_cast<size_t>(
      std::upper_bound(matching.begin(), matching.end(), after,
                       [](const std::string& a, const keys::ByokRegistry::Entry& e) { return a < e.record.id; }) -
      matching.begin());
  size_t size = static_cast<size_t>(page_size);
  size_t end = std::min(n, start + size);

  std::string link = base_url(ctx) + "/byok/v1/keys?";
  for (const auto& [k, v] : filters) link += k + "=" + percent_encode(v) + "&";
  link += "page_size=" + std::to_string(page_size);
  auto page_link = [&](size_t first_index) -> std::string {
    if (first_index == 0) return link;
    return link + "&page_token=" + registry(ctx).page_token(ctx.ns, query, matching[first_index - 1].record.id);
  };
  json meta = {{"first", link}, {"total_size", n}};
  size_t last_start = n ? ((n - 1) / size) * size : 0;
  meta["last"] = page_link(last_start);
  if (start > 0) meta["prev"] = page_link(start > size ? start - size : 0);
  if (end < n) meta["next"] = page_link(end);
  json data = json::array();
  std::string base = base_url(ctx);
  for (size_t i = start; i < end; ++i) data.push_back(byok::key_resource(matching[i], base));
  return Reply{200, json{{"api_version", byok::kApiVersion}, {"kind", "KeyList"}, {"metadata", meta}, {"data", data}},
               {}, true};
}

}  // namespace

void add_byok_routes(Router& router) {
  const Field id{"id", FieldType::string, "The key's id (`cck-...`)."};
  const Field display_name{"display_name", FieldType::string, "The human-readable name of the key (at most 255 characters)."};
  const Field key{"key", FieldType::object,
                  "The key, by `kind`: `AwsKey` {`key_arn`}, `AzureKey` {`key_id`, `key_vault_id`, `tenant_id`}, "
                  "`GcpKey` {`key_id`}, or `P11kmsKey` {`key_id`: the id or name of a p11kms root key in the namespace}."};
  std::vector<Field> list_fields = {
      {"display_name", FieldType::string, "Filter: partial, case-insensitive match of display_name."},
      {"provider", FieldType::string, "Filter: exact provider (AWS, Azure, GCP, P11KMS)."},
      {"state", FieldType::string, "Filter: exact state (AVAILABLE, IN_USE)."},
      {"validation_phase", FieldType::string, "Filter: exact validation phase (INITIALIZING, VALID, INVALID)."},
      {"validation_region", FieldType::string, "Filter: exact validation region."},
      {"key", FieldType::string, "Filter: partial match of the key identifier (key_arn, key_id)."},
      {"page_size", FieldType::integer, "Keys per page, 1 to 100.", kDefaultPageSize},
      {"page_token", FieldType::string, "The opaque token of a page, from a previous page's links."},
  };

  Route create_route{"POST", "keys", {display_name, key},
                     "Register a key: 201 with the Key. A P11kmsKey is validated in the token at once; external kinds "
                     "stay INITIALIZING. 409 quota_exceeded past byok.max_keys.",
                     sourced(create), policy::kCreate};
  create_route.policy_pattern = "keys";
  router.add(std::move(create_route));
  Route list_route{"GET", "keys", list_fields,
                   "List keys sorted by id, filtered, in keyset pages (`KeyList` with first/last/prev/next links and "
                   "total_size).",
                   sourced(list), policy::kList};
  list_route.policy_pattern = "keys";
  router.add(std::move(list_route));
  Route read_route{"GET", "keys/:id",
                   {id, {"validate", FieldType::boolean, "Validate the key in the token now, before answering.", false}},
                   "A key, with its state and validation.", sourced(read), policy::kRead};
  read_route.policy_pattern = "keys/:id";
  router.add(std::move(read_route));
  Route update_route{"PATCH", "keys/:id", {id, display_name},
                     "Change display_name (the only mutable field): 200 with the Key.", sourced(update), policy::kUpdate};
  update_route.policy_pattern = "keys/:id";
  router.add(std::move(update_route));
  Route delete_route{"DELETE", "keys/:id", {id},
                     "Remove a key from the registry: 204; 409 key_in_use while it is IN_USE. Its id is never reused.",
                     sourced(remove), policy::kDelete};
  delete_route.policy_pattern = "keys/:id";
  router.add(std::move(delete_route));
}

Dialect byok_dialect() {
  Dialect d;
  d.name = "byok";
  d.mount = "/byok/v1/";
  d.policy_prefix = "byok/";
  d.unauthenticated_status = 401;
  d.basic_auth = true;
  d.namespace_headers = {"X-Vault-Namespace"};
  d.render = &byok::render;
  d.error = &byok::error;
  add_byok_routes(d.router);
  return d;
}

}  // namespace p11kms::api
