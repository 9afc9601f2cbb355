// Vault Transit dialect (/v1/transit/...): route declarations and thin callbacks. Shapes and
// messages follow Vault's transit engine; see docs/api/transit.md.
#include <openssl/crypto.h>

#include <algorithm>
#include <limits>

#include "api/api_service.hpp"
#include "common/encoding.hpp"
#include "keys/digest.hpp"

namespace p11kms::api {
namespace {

using keys::invalid;

json key_info(const store::KeyRecord& k) {
  json versions = json::object();
  for (const auto& [v, rec] : k.versions) versions[std::to_string(v)] = rec.created_at;
  return json{{"name", k.name},
              {"type", k.type},
              {"keys", versions},
              {"latest_version", k.latest_version()},
              {"min_available_version", 0},
              {"min_decryption_version", k.min_decryption_version},
              {"min_encryption_version", k.min_encryption_version},
              {"deletion_allowed", k.deletion_allowed},
              {"derived", false},
              {"exportable", k.exportable},
              {"allow_plaintext_backup", false},
              {"supports_encryption", k.type != "standard"},
              {"supports_decryption", k.type != "standard"},
              {"supports_derivation", k.type != "standard"},
              {"supports_signing", false},
              {"imported_key", k.imported},
              {"auto_rotate_period", 0},
              {"convergent_encryption", false}};
}

keys::KeyRef key_ref(const Context& ctx) { return keys::KeyRef{ctx.ns, ctx.params.at("name")}; }

int to_version(int64_t v, const char* field) {
  if (v < 0 || v > std::numeric_limits<int>::max()) throw invalid(std::string(field) + " must be a non-negative integer");
  return static_cast<int>(v);
}

std::vector<uint8_t> decode_b64_field(const std::string& value, const std::string& field) {
  auto bytes = encoding::base64_decode(value);
  if (!bytes) throw invalid("failed to base64-decode " + field + ": it must be standard base64 with padding");
  return *bytes;
}

// Fields a batch item may carry, shared by encrypt, decrypt and rewrap.
const std::vector<Field>& item_fields() {
  static const std::vector<Field> f = {
      {"plaintext", FieldType::string, "Base64 plaintext to encrypt."},
      {"ciphertext", FieldType::string, "Ciphertext in the vault:v<N>:<base64> form."},
      {"key_version", FieldType::integer, "Key version to encrypt with; 0 or absent means the latest."},
      {"associated_data", FieldType::string, "Base64 associated data bound into AES-GCM."},
      {"context", FieldType::string, "Derivation context (derived keys are not supported yet)."},
      {"nonce", FieldType::string, "Nonce for convergent encryption (not supported yet)."},
      {"reference", FieldType::string, "Echoed in the batch result, to match items."},
  };
  return f;
}

std::vector<uint8_t> aad_of(const FieldData& f) {
  return f.has("associated_data") ? decode_b64_field(f.get_string("associated_data"), "associated_data")
                                  : std::vector<uint8_t>{};
}

json encrypt_one(keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int default_version) {
  if (!f.has("plaintext")) throw invalid("missing plaintext to encrypt");
  auto pt = decode_b64_field(f.get_string("plaintext"), "plaintext");
  int version = f.has("key_version") ? to_version(f.get_int("key_version"), "key_version") : default_version;
  auto sealed = ks.encrypt(ref, pt.data(), pt.size(), version, aad_of(f));
  OPENSSL_cleanse(pt.data(), pt.size());
  return json{{"ciphertext", sealed.ciphertext}, {"key_version", sealed.key_version}};
}

json decrypt_one(keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int) {
  if (!f.has("ciphertext")) throw invalid("missing ciphertext to decrypt");
  auto pt = ks.decrypt(ref, f.get_string("ciphertext"), aad_of(f));
  return json{{"plaintext", encoding::base64_encode(pt.data(), pt.size())}};
}

json rewrap_one(keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int default_version) {
  if (!f.has("ciphertext")) throw invalid("missing ciphertext to rewrap");
  int version = f.has("key_version") ? to_version(f.get_int("key_version"), "key_version") : default_version;
  auto sealed = ks.rewrap(ref, f.get_string("ciphertext"), version, aad_of(f));
  return json{{"ciphertext", sealed.ciphertext}, {"key_version", sealed.key_version}};
}

using ItemOp = json (*)(keys::KeyService&, const keys::KeyRef&, const FieldData&, int);

// One request, or a batch processed item by item: a bad item gets an "error" in its slot and
// the others still succeed. A partly failed batch is a 400 carrying every result (Vault 1.13+)
// unless partial_failure_response_code says otherwise.
Reply single_or_batch(Context& ctx, keys::KeyService& ks, const ApiLimits& limits, ItemOp op) {
  auto ref = key_ref(ctx);
  int default_version = ctx.fields.has("key_version") ? to_version(ctx.fields.get_int("key_version"), "key_version") : 0;
  const json& batch = ctx.fields.get_array("batch_input");
  if (batch.empty()) return Reply{200, op(ks, ref, ctx.fields, default_version)};
  if (batch.size() > limits.max_batch_items)
    throw invalid("batch_input has " + std::to_string(batch.size()) + " items; the limit is " +
                  std::to_string(limits.max_batch_items));
  ks.validate_name(ref.name);
  json results = json::array();
  bool any_error = false, any_success = false;
  for (const auto& item : batch) {
    json result;
    try {
      if (!item.is_object()) throw invalid("batch_input items must be JSON objects");
      FieldData f(&item_fields(), item);
      result = op(ks, ref, f, 0);
      any_success = true;
    } catch (const keys::KeyError& e) {
      if (e.kind() != keys::ErrorKind::invalid_argument) throw;  // token down: the whole call is a 503
      result = json{{"error", e.what()}};
      any_error = true;
    }
    if (item.is_object() && item.contains("reference")) result["reference"] = item["reference"];
    results.push_back(std::move(result));
  }
  Reply reply{200, json{{"batch_results", results}}};
  if (any_error) {
    reply.status = 400;
    if (any_success && ctx.fields.has("partial_failure_response_code")) {
      auto code = ctx.fields.get_int("partial_failure_response_code");
      if (code >= 100 && code <= 599)
        reply.status = static_cast<int>(code);
      else
        reply.warnings.push_back("invalid HTTP response code override from partial_failure_response_code, reverting to 400");
    }
  }
  return reply;
}

void refuse_unsupported(const FieldData& f, std::initializer_list<const char*> flags) {
  for (const char* name : flags)
    if (f.has(name) && f.get_bool(name))
      throw invalid(std::string(name) + " keys are not supported yet by p11kms");
}

std::string encode_as(const std::vector<uint8_t>& bytes, const std::string& format, const char* default_format) {
  std::string fmt = format.empty() ? default_format : format;
  if (fmt == "hex") return encoding::hex_encode(bytes);
  if (fmt == "base64") return encoding::base64_encode(bytes);
  throw invalid("unsupported encoding format \"" + fmt + "\"; format must be \"hex\" or \"base64\"");
}

// Vault's upsert: encrypting with a key that does not exist creates it, with the request's
// `type`. The caller needs `create` on the encrypt path as well as `update`; the refusal does
// not say whether the key exists (a caller with update but without create on a missing key
// gets the same 403 as any other refusal).
void upsert_for_encrypt(Context& ctx) {
  auto ref = key_ref(ctx);
  if (ctx.keys->key_exists(ref)) return;
  if (!ctx.may(policy::kCreate)) throw keys::KeyError(keys::ErrorKind::forbidden, "forbidden", "permission denied");
  bool has_context = ctx.fields.has("context");
  for (const auto& item : ctx.fields.get_array("batch_input"))
    has_context = has_context || (item.is_object() && item.contains("context"));
  if (has_context)
    throw invalid("encryption key \"" + ref.name + "\" does not exist and would be created as a derived key "
                  "(context given), which p11kms does not support yet; create it first");
  std::string type = ctx.fields.has("type") ? ctx.fields.get_string("type") : "aes256-gcm96";
  ctx.keys->create_key(ref, type, ctx.token ? ctx.token->name : "");  // 400 naming the type if it cannot encrypt; creates nothing then
}

}  // namespace

void add_transit_routes(Router& router) {
  const Field name{"name", FieldType::string, "Name of the key: 1 to 128 characters of [A-Za-z0-9._-]."};

  router.add({"POST", "transit/keys/:name",
              {name,
               {"type", FieldType::string, "Key type: aes256-gcm96 or aes128-gcm96.", "aes256-gcm96"},
               {"derived", FieldType::boolean, "Key derivation (not supported yet)."},
               {"convergent_encryption", FieldType::boolean, "Convergent encryption (not supported yet)."},
               {"exportable", FieldType::boolean, "Exportable key (not supported yet)."},
               {"allow_plaintext_backup", FieldType::boolean, "Plaintext backup (not supported)."},
               {"auto_rotate_period", FieldType::string, "Automatic rotation (not supported yet)."},
               {"key_size", FieldType::integer, "Only for HMAC keys (not supported yet)."},
               {"context", FieldType::string, "Derivation context (not supported yet)."}},
              "Create a key in the token; an existing key is left unchanged.",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                refuse_unsupported(ctx.fields, {"derived", "convergent_encryption", "exportable", "allow_plaintext_backup"});
                auto period = ctx.fields.get_string("auto_rotate_period");
                if (!period.empty() && period != "0" && period != "0s")
                  throw invalid("auto_rotate_period is not supported yet by p11kms");
                auto result = ks.create_key(key_ref(ctx), ctx.fields.get_string("type"), ctx.token ? ctx.token->name : "");
                Reply r{200, key_info(result.key)};
                if (!result.created) r.warnings.push_back("key " + result.key.name + " already existed");
                return r;
              },
              policy::kCreate});

  router.add({"GET", "transit/keys/:name", {name}, "Read a key's versions and configuration.",
              [](Context& ctx) {
                auto& ks = *ctx.keys; return Reply{200, key_info(ks.read_key(key_ref(ctx)))}; },
              policy::kRead});

  router.add({"LIST", "transit/keys", {}, "List key names (also GET with ?list=true).",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                auto names = ks.list_keys(ctx.ns);
                if (names.empty()) return Reply{404, json{{"errors", json::array()}}, {}, true};  // as Vault
                return Reply{200, json{{"keys", names}}};
              },
              policy::kList});

  router.add({"DELETE", "transit/keys/:name", {name},
              "Delete a key and destroy its token objects; needs deletion_allowed.",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                ks.delete_key(key_ref(ctx));
                return Reply{204};
              },
              policy::kDelete});

  router.add({"POST", "transit/keys/:name/config",
              {name,
               {"min_decryption_version", FieldType::integer, "Oldest version allowed to decrypt."},
               {"min_encryption_version", FieldType::integer, "Oldest version allowed to encrypt (0 = latest)."},
               {"deletion_allowed", FieldType::boolean, "Whether the key may be deleted."},
               {"exportable", FieldType::boolean, "Exportable (not supported yet)."},
               {"allow_plaintext_backup", FieldType::boolean, "Plaintext backup (not supported)."},
               {"auto_rotate_period", FieldType::string, "Automatic rotation (not supported yet)."}},
              "Configure min versions and deletion.",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                refuse_unsupported(ctx.fields, {"exportable", "allow_plaintext_backup"});
                auto period = ctx.fields.get_string("auto_rotate_period");
                if (!period.empty() && period != "0" && period != "0s")
                  throw invalid("auto_rotate_period is not supported yet by p11kms");
                keys::KeyConfigChange change;
                const auto& f = ctx.fields;
                if (f.has("min_decryption_version"))
                  change.min_decryption_version = static_cast<int>(std::clamp<int64_t>(f.get_int("min_decryption_version"), -1, std::numeric_limits<int>::max()));
                if (f.has("min_encryption_version"))
                  change.min_encryption_version = static_cast<int>(std::clamp<int64_t>(f.get_int("min_encryption_version"), -1, std::numeric_limits<int>::max()));
                if (f.has("deletion_allowed")) change.deletion_allowed = f.get_bool("deletion_allowed");
                return Reply{200, key_info(ks.configure_key(key_ref(ctx), change))};
              }});

  router.add({"POST", "transit/keys/:name/rotate", {name}, "Add a new key version in the token.",
              [](Context& ctx) {
                auto& ks = *ctx.keys; return Reply{200, key_info(ks.rotate_key(key_ref(ctx)))}; }});

  std::vector<Field> crypt_fields = item_fields();
  crypt_fields.push_back(name);
  crypt_fields.push_back({"batch_input", FieldType::array, "Items to process, each with the single-call fields."});
  crypt_fields.push_back({"partial_failure_response_code", FieldType::integer, "Status for a partly failed batch."});
  crypt_fields.push_back({"type", FieldType::string, "Type of the key when encrypt creates it (upsert): aes256-gcm96 (default) or aes128-gcm96."});
  crypt_fields.push_back({"convergent_encryption", FieldType::boolean, "Not supported yet."});

  router.add({"POST", "transit/encrypt/:name", crypt_fields,
              "Encrypt base64 plaintext with AES-GCM in the token; a missing key is created first (as Vault "
              "does), which also needs create on this path.",
              [](Context& ctx) {
                upsert_for_encrypt(ctx);
                return single_or_batch(ctx, *ctx.keys, *ctx.limits, encrypt_one);
              }});
  router.add({"POST", "transit/decrypt/:name", crypt_fields, "Decrypt a vault:v<N>: ciphertext in the token.",
              [](Context& ctx) { return single_or_batch(ctx, *ctx.keys, *ctx.limits, decrypt_one); }});
  router.add({"POST", "transit/rewrap/:name", crypt_fields, "Re-encrypt a ciphertext with the latest (or given) version.",
              [](Context& ctx) { return single_or_batch(ctx, *ctx.keys, *ctx.limits, rewrap_one); }});

  router.add({"POST", "transit/datakey/:plaintext/:name",
              {name,
               {"plaintext", FieldType::string, "\"plaintext\" to also return the data key, or \"wrapped\"."},
               {"bits", FieldType::integer, "Data key size: 128, 256 or 512.", 256},
               {"key_version", FieldType::integer, "Key version to wrap with; 0 = latest."},
               {"context", FieldType::string, "Derivation context (not supported yet)."},
               {"nonce", FieldType::string, "Nonce (not supported yet)."}},
              "Generate a data key in the token, returned wrapped (and in plaintext if asked).",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                std::string kind = ctx.params.at("plaintext");
                if (kind != "plaintext" && kind != "wrapped")
                  throw invalid("invalid datakey type \"" + kind + "\": the path must be datakey/plaintext/<name> or datakey/wrapped/<name>");
                int64_t bits = ctx.fields.get_int("bits");
                if (bits != 128 && bits != 256 && bits != 512)
                  throw invalid("invalid bits " + std::to_string(bits) + ": bits must be 128, 256 or 512");
                int version = to_version(ctx.fields.get_int("key_version"), "key_version");
                auto dk = ks.generate_data_key(key_ref(ctx), static_cast<int>(bits), version);
                json data{{"ciphertext", dk.sealed.ciphertext}, {"key_version", dk.sealed.key_version}};
                if (kind == "plaintext") data["plaintext"] = encoding::base64_encode(dk.plaintext.data(), dk.plaintext.size());
                return Reply{200, data};
              }});

  const std::vector<Field> random_fields = {
      {"bytes", FieldType::integer, "Number of random bytes, 1 to 131072.", 32},
      {"format", FieldType::string, "Output encoding: base64 or hex.", "base64"},
      {"source", FieldType::string, "Entropy source: platform, seal or all (all are the token's RNG)."},
      {"urlbytes", FieldType::string, "Number of bytes, from the URL."}};
  auto random_cb = [](Context& ctx) {
                auto& ks = *ctx.keys;
    int64_t n = ctx.fields.get_int("bytes");
    std::string url_bytes = ctx.params.count("urlbytes") ? ctx.params.at("urlbytes") : "";
    if (!url_bytes.empty()) {
      if (url_bytes == "platform" || url_bytes == "seal" || url_bytes == "all") {
        url_bytes.clear();  // /random/:source
      } else if (url_bytes.find_first_not_of("0123456789") != std::string::npos || url_bytes.size() > 9) {
        throw invalid("error parsing URL bytes \"" + url_bytes + "\": bytes must be a positive integer");
      } else {
        n = std::stoll(url_bytes);
      }
    }
    if (n < 1) throw invalid("bytes cannot be less than 1");
    if (n > 128 * 1024) throw invalid("bytes should be at most 131072");
    auto bytes = ks.random_bytes(static_cast<size_t>(n));
    return Reply{200, json{{"random_bytes", encode_as(bytes, ctx.fields.get_string("format"), "base64")}}};
  };
  router.add({"POST", "transit/random", random_fields, "Random bytes from the token's RNG (C_GenerateRandom).", random_cb});
  router.add({"POST", "transit/random/:urlbytes", random_fields, "Random bytes; the URL gives the count or the source.", random_cb});
  router.add({"POST", "transit/random/:source/:urlbytes", random_fields, "Random bytes from a named source.", random_cb});

  const std::vector<Field> hash_fields = {
      {"input", FieldType::string, "Base64 input to hash."},
      {"algorithm", FieldType::string, "sha2-224, sha2-256, sha2-384, sha2-512 (or sha3-*).", "sha2-256"},
      {"urlalgorithm", FieldType::string, "Algorithm, from the URL."},
      {"format", FieldType::string, "Output encoding: hex or base64.", "hex"}};
  auto hash_cb = [](Context& ctx) {
    auto input = decode_b64_field(ctx.fields.get_string("input"), "input");
    std::string algorithm = ctx.params.count("urlalgorithm") ? ctx.params.at("urlalgorithm") : ctx.fields.get_string("algorithm");
    std::string format = ctx.fields.get_string("format");
    if (format != "hex" && format != "base64")
      throw invalid("unsupported encoding format \"" + format + "\"; format must be \"hex\" or \"base64\"");
    return Reply{200, json{{"sum", encode_as(keys::digest(algorithm, input), format, "hex")}}};
  };
  router.add({"POST", "transit/hash", hash_fields, "Hash base64 input.", hash_cb});
  router.add({"POST", "transit/hash/:urlalgorithm", hash_fields, "Hash base64 input with the URL's algorithm.", hash_cb});
}

}  // namespace p11kms::api
