// Kong Gateway's keyring (/keyring, cluster or vault strategy): data keys with one active key,
// made by the token (or read from Vault) and kept sealed under its master key (keys/keyring.hpp),
// exported to and imported from another instance. Shapes follow Kong's Admin API; errors are
// Kong's {"message": ...} (plus name/code/fields for a field at fault). See docs/api/keyring.md.
#include <openssl/crypto.h>

#include "api/api_service.hpp"
#include "common/encoding.hpp"
#include "common/json_text.hpp"
#include "keys/keyring.hpp"

namespace p11kms::api {
namespace {

using keys::invalid;

using json_text::dump;

http::Response render(const Reply& reply, const std::string& /*request_id*/) {
  http::Response r;
  r.status = reply.status;
  if (reply.status == 204 || reply.data.is_null()) return r;
  r.body = dump(reply.data);
  r.content_type = "application/json; charset=utf-8";
  return r;
}

// Kong: {"message": "..."}; a field at fault (code "invalid_<field>" for id, data, key) in its
// schema-violation shape {"message", "name": "schema violation", "code": 2, "fields": {...}}.
http::Response error(int status, const std::string& code, const std::string& message) {
  http::Response r;
  r.status = status;
  r.content_type = "application/json; charset=utf-8";
  json body = {{"message", message}};
  for (const char* field : {"id", "data", "key"})
    if (status == 400 && code == std::string("invalid_") + field) {
      body["name"] = "schema violation";
      body["code"] = 2;
      body["fields"] = {{field, message}};
    }
  r.body = dump(body);
  return r;
}

keys::Keyring& keyring(Context& ctx) {
  if (!ctx.keyring) throw keys::unavailable("the keyring is not available in this server");
  return *ctx.keyring;
}

std::string required_string(Context& ctx, const std::string& name) {
  if (!ctx.fields.has(name)) throw invalid(name + ": required field missing", "invalid_" + name);
  const json& v = ctx.fields.raw().at(name);
  if (!v.is_string()) throw invalid(name + ": expected a string", "invalid_" + name);
  return v.get<std::string>();
}

Reply raw(int status, json data = nullptr) { return Reply{status, std::move(data), {}, true}; }

Reply view(Context& ctx) {
  auto v = keyring(ctx).view(ctx.tenant);
  return raw(200, {{"active", v.active ? json(*v.active) : json(nullptr)}, {"ids", v.ids}});
}

Reply active(Context& ctx) {
  auto v = keyring(ctx).view(ctx.tenant);
  if (!v.active) throw keys::not_found("the keyring has no active key");
  return raw(200, {{"id", *v.active}});
}

Reply generate(Context& ctx) {
  auto g = keyring(ctx).generate(ctx.tenant);
  return raw(201, {{"id", g.id}, {"key", encoding::base64_encode(g.key.data(), g.key.size())}});
}

Reply remove(Context& ctx) {
  keyring(ctx).remove(ctx.tenant, required_string(ctx, "key"));
  return raw(204);
}

Reply import_raw(Context& ctx) {
  std::string id = required_string(ctx, "id");
  std::string data = required_string(ctx, "data");
  auto bytes = encoding::base64_decode(data);
  OPENSSL_cleanse(data.data(), data.size());
  if (!bytes) throw invalid("data: not valid base64 (standard alphabet, with padding)", "invalid_data");
  hsm::SecureBytes key(bytes->data(), bytes->size());
  if (!bytes->empty()) OPENSSL_cleanse(bytes->data(), bytes->size());
  keyring(ctx).import_raw(ctx.tenant, id, key);
  return raw(201);
}

Reply import_export(Context& ctx) {
  keyring(ctx).import_export(ctx.tenant, required_string(ctx, "data"));
  return raw(201);
}

Reply export_keyring(Context& ctx) { return raw(200, {{"data", keyring(ctx).export_keyring(ctx.tenant)}}); }

// Vault strategy: re-reads the KV v2 secret into the root namespace's keyring (keys/keyring.hpp).
Reply vault_sync(Context& ctx) {
  keyring(ctx).sync(ctx.tenant);
  return raw(204);
}

}  // namespace

void add_keyring_routes(Router& router) {
  router.add({"GET", "", {}, "The keyring: the active key's id and every key's id (oldest first).", view,
              policy::kRead});
  router.add({"GET", "/active", {}, "The active key's id; 404 when the keyring is empty.", active, policy::kRead});
  router.add({"POST", "/generate", {},
              "A new AES-256 key made by the token (`{\"id\", \"key\"}`, 201); it becomes the active key.", generate,
              policy::kUpdate});
  router.add({"POST", "/remove", {{"key", FieldType::string, "The id of the key to remove (not the active key)."}},
              "Removes a key (204); 404 unknown, 409 the active key.", remove, policy::kUpdate});
  router.add({"POST", "/import/raw",
              {{"id", FieldType::string, "8 characters of [A-Za-z0-9]."},
               {"data", FieldType::string, "Base64 of the 32-byte key."}},
              "Adds a key (201); active only when the keyring was empty. 409 if the id is present.", import_raw,
              policy::kUpdate});
  router.add({"POST", "/import", {{"data", FieldType::string, "An export made for this instance's import key."}},
              "Merges an export made for this instance (201); its active key becomes active.", import_export,
              policy::kUpdate});
  router.add({"POST", "/export", {},
              "The whole keyring encrypted to keyring.recipient_public_key_file (`{\"data\"}`); format in keyring.md.",
              export_keyring, policy::kSudo});
  router.add({"POST", "/vault/sync", {},
              "Vault strategy only (400 under cluster): re-reads the Vault KV v2 secret into the root namespace's "
              "keyring (204); 503 Vault unreachable, 502 Vault refused or the secret is malformed (keyring unchanged).",
              vault_sync, policy::kUpdate});
}

Dialect keyring_dialect() {
  Dialect d;
  d.name = "keyring";
  // Routes are "" and "/<op>" after "/keyring", so policy paths are "keyring" and "keyring/<op>".
  d.mount = "/keyring";
  d.policy_prefix = "keyring";
  d.unauthenticated_status = 401;
  d.namespace_headers = {"X-Vault-Namespace"};
  d.render = &render;
  d.error = &error;
  add_keyring_routes(d.router);
  return d;
}

}  // namespace p11kms::api
