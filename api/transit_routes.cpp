// Vault Transit dialect (/v1/transit/...): route declarations and thin callbacks. Shapes and
// messages follow Vault's transit engine; see docs/api/transit.md.
#include <openssl/crypto.h>

#include <algorithm>
#include <functional>
#include <limits>

#include "api/api_service.hpp"
#include "common/encoding.hpp"
#include "common/time.hpp"
#include "keys/digest.hpp"
#include "keys/key_type.hpp"

namespace p11kms::api {
namespace {

using keys::invalid;

json key_info(const store::KeyRecord& k) {
  auto type = keys::parse_key_type(k.type);
  bool asymmetric = type && keys::is_asymmetric(*type);
  bool aes = type && keys::is_aes(*type);
  json versions = json::object();
  // As Vault: a symmetric version is its creation time (unix seconds); an asymmetric one an
  // object with its public key and RFC 3339 creation time.
  for (const auto& [v, rec] : k.versions) {
    if (asymmetric)
      versions[std::to_string(v)] = json{{"name", keys::public_key_name(*type)},
                                         {"public_key", rec.public_key},
                                         {"creation_time", timefmt::format_rfc3339(rec.created_at)}};
    else
      versions[std::to_string(v)] = rec.created_at;
  }
  json info{{"name", k.name},
              {"type", k.type},
              {"keys", versions},
              {"latest_version", k.latest_version()},
              {"min_available_version", k.min_available_version},
              {"min_decryption_version", k.min_decryption_version},
              {"min_encryption_version", k.min_encryption_version},
              {"deletion_allowed", k.deletion_allowed},
              {"derived", k.derived},
              {"exportable", k.exportable},
              {"allow_plaintext_backup", false},
              {"supports_encryption", aes},
              {"supports_decryption", aes},
              {"supports_derivation", aes},
              {"supports_signing", asymmetric},
              {"imported_key", k.imported},
              {"auto_rotate_period", k.auto_rotate_period},
              {"convergent_encryption", k.convergent}};
  if (type == keys::KeyType::hmac) info["key_size"] = k.key_size;
  // Vault names its KDF here; p11kms derives in the token with AES-ECB over a hash of the context.
  if (k.derived) info["kdf"] = "pkcs11_aes_ecb_encrypt_data";
  return info;
}

constexpr const char* kRotatePeriodHelp =
    "Rotate automatically when the latest version is this old: seconds or a duration such as 24h or 1h30m "
    "(units s, m, h, d); 0 turns it off; at least 1h (10s in dev mode).";

// Vault's duration fields: an integer number of seconds, or numbers with units (s, m, h, d).
std::optional<int64_t> parse_duration(const std::string& text) {
  if (text.empty()) return std::nullopt;
  if (text.find_first_not_of("0123456789") == std::string::npos)
    return text.size() > 12 ? std::nullopt : std::optional<int64_t>(std::stoll(text));
  int64_t total = 0;
  size_t i = 0;
  while (i < text.size()) {
    size_t start = i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') ++i;
    if (i == start || i == text.size() || i - start > 9) return std::nullopt;
    int64_t n = std::stoll(text.substr(start, i - start));
    switch (text[i++]) {
      case 's': total += n; break;
      case 'm': total += n * 60; break;
      case 'h': total += n * 3600; break;
      case 'd': total += n * 86400; break;
      default: return std::nullopt;
    }
  }
  return total;
}

// The request's auto_rotate_period in seconds, checked against the minimum; nullopt if absent.
std::optional<int64_t> rotate_period_of(const Context& ctx) {
  if (!ctx.fields.has("auto_rotate_period")) return std::nullopt;
  auto period = parse_duration(ctx.fields.get_string("auto_rotate_period"));
  if (!period)
    throw invalid("auto_rotate_period must be a number of seconds or a duration such as 24h");
  if (*period != 0 && *period < ctx.limits->min_auto_rotate_period_s)
    throw invalid("auto_rotate_period must be 0 (off) or at least " + std::to_string(ctx.limits->min_auto_rotate_period_s) +
                  " seconds");
  return period;
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
      {"context", FieldType::string, "Base64 derivation context: required by derived keys (the token derives the key from it), ignored by others."},
      {"nonce", FieldType::string, "Not accepted: a convergent key's nonce is computed inside the token (400 if given)."},
      {"reference", FieldType::string, "Echoed in the batch result, to match items."},
  };
  return f;
}

std::vector<uint8_t> aad_of(const FieldData& f) {
  return f.has("associated_data") ? decode_b64_field(f.get_string("associated_data"), "associated_data")
                                  : std::vector<uint8_t>{};
}

// The item's base64 `context` (empty when absent); a `nonce` is refused: convergent keys compute
// theirs in the token (Vault's convergent version 1, with caller nonces, is not offered).
std::vector<uint8_t> context_of(const FieldData& f) {
  if (f.has("nonce") && !f.get_string("nonce").empty())
    throw invalid("nonce is not accepted: convergent encryption computes the nonce inside the token");
  return f.has("context") ? decode_b64_field(f.get_string("context"), "context") : std::vector<uint8_t>{};
}

// An encrypt request's or batch item's fields, checked; `plaintext` holds the decoded bytes the
// item points to.
keys::EncryptItem encrypt_item(const FieldData& f, int default_version, std::vector<uint8_t>& plaintext) {
  if (!f.has("plaintext")) throw invalid("missing plaintext to encrypt");
  keys::EncryptItem item;
  item.context = context_of(f);
  plaintext = decode_b64_field(f.get_string("plaintext"), "plaintext");
  item.plaintext = plaintext.data();
  item.len = plaintext.size();
  item.key_version = f.has("key_version") ? to_version(f.get_int("key_version"), "key_version") : default_version;
  item.aad = aad_of(f);
  return item;
}

json sealed_json(keys::Sealed&& sealed) {
  json out = json::object();  // built in place: a batch makes one per item
  out.emplace("ciphertext", std::move(sealed.ciphertext));
  out.emplace("key_version", sealed.key_version);
  return out;
}

json encrypt_one(keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int default_version) {
  std::vector<uint8_t> pt;
  auto item = encrypt_item(f, default_version, pt);
  auto sealed = ks.encrypt(ref, item.plaintext, item.len, item.key_version, item.aad, item.context);
  OPENSSL_cleanse(pt.data(), pt.size());
  return sealed_json(std::move(sealed));
}

json decrypt_one(keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int) {
  if (!f.has("ciphertext")) throw invalid("missing ciphertext to decrypt");
  auto pt = ks.decrypt(ref, f.get_string("ciphertext"), aad_of(f), context_of(f));
  return json{{"plaintext", encoding::base64_encode(pt.data(), pt.size())}};
}

json rewrap_one(keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int default_version) {
  if (!f.has("ciphertext")) throw invalid("missing ciphertext to rewrap");
  int version = f.has("key_version") ? to_version(f.get_int("key_version"), "key_version") : default_version;
  return sealed_json(ks.rewrap(ref, f.get_string("ciphertext"), version, aad_of(f), context_of(f)));
}

using ItemOp = std::function<json(keys::KeyService&, const keys::KeyRef&, const FieldData&, int)>;
using ItemResults = std::vector<keys::ItemResult<json>>;
// Runs all of a batch's items at once (their token work together); a result or a 400 each.
using BatchOp = std::function<ItemResults(keys::KeyService&, const keys::KeyRef&, const std::vector<FieldData>&)>;

ItemResults one_by_one(keys::KeyService& ks, const keys::KeyRef& ref, const std::vector<FieldData>& items,
                       const ItemOp& op) {
  ItemResults out(items.size());
  auto in_token = ks.batch_scope();
  for (size_t i = 0; i < items.size(); ++i) {
    in_token.next_item();
    keys::run_item(out[i], [&] { out[i].value = op(ks, ref, items[i], 0); });
  }
  return out;
}

ItemResults encrypt_batch(keys::KeyService& ks, const keys::KeyRef& ref, const std::vector<FieldData>& items) {
  ItemResults out(items.size());
  struct Plaintexts {  // wiped however the batch ends
    std::vector<std::vector<uint8_t>> bytes;
    ~Plaintexts() {
      for (auto& b : bytes) OPENSSL_cleanse(b.data(), b.size());
    }
  } plaintexts;
  plaintexts.bytes.resize(items.size());
  std::vector<keys::EncryptItem> requests;
  std::vector<size_t> at;
  for (size_t i = 0; i < items.size(); ++i)
    keys::run_item(out[i], [&] {
      requests.push_back(encrypt_item(items[i], 0, plaintexts.bytes[i]));
      at.push_back(i);
    });
  auto sealed = ks.encrypt_batch(ref, requests);
  for (size_t k = 0; k < sealed.size(); ++k) {
    if (sealed[k].value) out[at[k]].value = sealed_json(std::move(*sealed[k].value));
    else out[at[k]].error = std::move(sealed[k].error);
  }
  return out;
}

// One request, or a batch: a bad item gets an "error" in its slot and the others still succeed.
// A partly failed batch is a 400 carrying every result (Vault 1.13+) unless
// partial_failure_response_code says otherwise. Items run one by one through `op`, or all
// together through `batch_op` when there is one.
Reply single_or_batch(Context& ctx, keys::KeyService& ks, const ApiLimits& limits, const ItemOp& op,
                      const std::vector<Field>& schema = item_fields(), const BatchOp& batch_op = nullptr) {
  auto ref = key_ref(ctx);
  int default_version = ctx.fields.has("key_version") ? to_version(ctx.fields.get_int("key_version"), "key_version") : 0;
  const json& batch = ctx.fields.get_array("batch_input");
  if (batch.empty()) return Reply{200, op(ks, ref, ctx.fields, default_version)};
  if (batch.size() > limits.max_batch_items)
    throw invalid("batch_input has " + std::to_string(batch.size()) + " items; the limit is " +
                  std::to_string(limits.max_batch_items));
  ks.validate_name(ref.name);
  ItemResults done(batch.size());
  std::vector<FieldData> items;
  std::vector<size_t> at;
  for (size_t i = 0; i < batch.size(); ++i) {
    if (!batch[i].is_object()) {
      done[i].error = "batch_input items must be JSON objects";
      continue;
    }
    items.push_back(FieldData::view(&schema, batch[i]));
    at.push_back(i);
  }
  ItemResults ran = batch_op ? batch_op(ks, ref, items) : one_by_one(ks, ref, items, op);
  for (size_t k = 0; k < ran.size(); ++k) done[at[k]] = std::move(ran[k]);
  json results = json::array();
  bool any_error = false, any_success = false;
  for (size_t i = 0; i < batch.size(); ++i) {
    json result = done[i].value ? std::move(*done[i].value) : json{{"error", done[i].error}};
    (done[i].value ? any_success : any_error) = true;
    if (batch[i].is_object() && batch[i].contains("reference")) result["reference"] = batch[i]["reference"];
    results.push_back(std::move(result));
  }
  Reply reply{200, json{{"batch_results", std::move(results)}}};
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

// Fields of a sign, verify or hmac batch item.
const std::vector<Field>& sign_item_fields() {
  static const std::vector<Field> f = {
      {"input", FieldType::string, "Base64 input to sign, verify or HMAC."},
      {"signature", FieldType::string, "Signature to verify (vault:v<N>:...)."},
      {"hmac", FieldType::string, "HMAC to verify (vault:v<N>:...)."},
      {"context", FieldType::string, "Derivation context: not accepted (signing keys are never derived here)."},
      {"reference", FieldType::string, "Echoed in the batch result, to match items."},
  };
  return f;
}

std::vector<uint8_t> input_of(const FieldData& f) {
  if (!f.has("input")) throw invalid("missing input");
  return decode_b64_field(f.get_string("input"), "input");
}

// The hash algorithm of a sign/verify/hmac call: the URL's, else the body's (`algorithm` is
// Vault's older name for it).
std::string hash_algorithm_of(const Context& ctx, const char* url_param, const char* field) {
  if (ctx.params.count(url_param)) return ctx.params.at(url_param);
  if (ctx.fields.has(field)) return ctx.fields.get_string(field);
  if (ctx.fields.has("algorithm")) return ctx.fields.get_string("algorithm");
  return "sha2-256";
}

keys::SignOptions sign_options(const Context& ctx) {
  keys::SignOptions o;
  o.hash_algorithm = hash_algorithm_of(ctx, "urlalgorithm", "hash_algorithm");
  o.prehashed = ctx.fields.get_bool("prehashed");
  o.signature_algorithm = ctx.fields.get_string("signature_algorithm");
  o.marshaling_algorithm = ctx.fields.has("marshaling_algorithm") ? ctx.fields.get_string("marshaling_algorithm") : "asn1";
  o.salt_length = ctx.fields.has("salt_length") ? ctx.fields.get_string("salt_length") : "auto";
  return o;
}

void refuse_context(const FieldData& f) {
  if (f.has("context") && !f.get_string("context").empty())
    throw invalid("context is only for derived encryption keys: p11kms does not derive signing keys");
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
  // As Vault: a context makes the new key a derived one (convergent if the request asks).
  bool convergent = ctx.fields.get_bool("convergent_encryption");
  if (convergent && !has_context)
    throw invalid("convergent encryption requires derivation to be enabled, so a context is required");
  std::string type = ctx.fields.has("type") ? ctx.fields.get_string("type") : "aes256-gcm96";
  // 400 naming the type if it cannot encrypt; creates nothing then
  ctx.keys->create_key(ref, type, ctx.token ? ctx.token->name : "", has_context, convergent);
}

}  // namespace

void add_transit_routes(Router& router) {
  const Field name{"name", FieldType::string, "Name of the key: 1 to 128 characters of [A-Za-z0-9._-]."};

  router.add({"POST", "transit/keys/:name",
              {name,
               {"type", FieldType::string,
                "Key type: aes256-gcm96, aes128-gcm96, ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, "
                "rsa-4096 or hmac.", "aes256-gcm96"},
               {"derived", FieldType::boolean,
                "Key derivation (AES types): every request needs a context, from which the token derives the key "
                "(C_DeriveKey). ed25519 derivation is not supported (400)."},
               {"convergent_encryption", FieldType::boolean,
                "Same plaintext and context give the same ciphertext; the nonce is computed in the token. Requires derived."},
               {"exportable", FieldType::boolean,
                "Exportable key: its material is kept sealed under the token's master key and loaded into "
                "the token as non-extractable session objects to be used. Cannot be set later."},
               {"allow_plaintext_backup", FieldType::boolean, "Plaintext backup (not supported)."},
               {"auto_rotate_period", FieldType::string, kRotatePeriodHelp},
               {"key_size", FieldType::integer, "Bytes of an hmac key: 16 to 512 (default 32); ignored for other types."},
               {"context", FieldType::string, "Ignored on create (as Vault)."}},
              "Create a key in the token; an existing key is left unchanged.",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                refuse_unsupported(ctx.fields, {"allow_plaintext_backup"});
                auto period = rotate_period_of(ctx);
                keys::KeySpec spec;
                spec.type = ctx.fields.get_string("type");
                spec.created_by = ctx.token ? ctx.token->name : "";
                spec.exportable = ctx.fields.get_bool("exportable");
                spec.derived = ctx.fields.get_bool("derived");
                spec.convergent = ctx.fields.get_bool("convergent_encryption");
                if (spec.type == "hmac" && ctx.fields.has("key_size")) {
                  int64_t size = ctx.fields.get_int("key_size");
                  if (size < 16 || size > 512)
                    throw invalid("key_size must be between 16 and 512 bytes for hmac keys, not " + std::to_string(size));
                  spec.key_size = static_cast<int>(size);
                }
                auto result = ks.create_key(key_ref(ctx), spec);
                if (result.created && period && *period > 0) {
                  ks.set_rotation_policy(key_ref(ctx), *period);
                  result.key = ks.read_key(key_ref(ctx));
                }
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
               {"exportable", FieldType::boolean,
                "true only for a key created exportable (a non-exportable key exists only inside the token: 400); "
                "false is refused once it is exportable."},
               {"allow_plaintext_backup", FieldType::boolean, "Plaintext backup (not supported)."},
               {"auto_rotate_period", FieldType::string, kRotatePeriodHelp}},
              "Configure min versions, deletion and exportability.",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                refuse_unsupported(ctx.fields, {"allow_plaintext_backup"});
                auto period = rotate_period_of(ctx);
                keys::KeyConfigChange change;
                const auto& f = ctx.fields;
                if (f.has("min_decryption_version"))
                  change.min_decryption_version = static_cast<int>(std::clamp<int64_t>(f.get_int("min_decryption_version"), -1, std::numeric_limits<int>::max()));
                if (f.has("min_encryption_version"))
                  change.min_encryption_version = static_cast<int>(std::clamp<int64_t>(f.get_int("min_encryption_version"), -1, std::numeric_limits<int>::max()));
                if (f.has("deletion_allowed")) change.deletion_allowed = f.get_bool("deletion_allowed");
                if (f.has("exportable")) change.exportable = f.get_bool("exportable");
                if (period) change.auto_rotate_period = *period;
                return Reply{200, key_info(ks.configure_key(key_ref(ctx), change))};
              }});

  router.add({"POST", "transit/keys/:name/rotate", {name}, "Add a new key version in the token.",
              [](Context& ctx) {
                auto& ks = *ctx.keys;
                if (ks.key_exists(key_ref(ctx)) && ks.read_key(key_ref(ctx)).imported)
                  throw invalid("key \"" + key_ref(ctx).name + "\" was imported: it cannot be rotated in the token; "
                                "new versions come through keys/" + key_ref(ctx).name + "/import_version");
                return Reply{200, key_info(ks.rotate_key(key_ref(ctx)))}; }});

  // -- secure import (BYOK), as Vault 1.11+ --
  router.add({"GET", "transit/wrapping_key", {},
              "The public half (PEM) of the token's RSA-4096 wrapping key for imports; its private half unwraps "
              "inside the token only.",
              [](Context& ctx) { return Reply{200, json{{"public_key", ctx.keys->wrapping_public_key()}}}; },
              policy::kRead});
  const std::vector<Field> import_fields = {
      name,
      {"ciphertext", FieldType::string,
       "Base64 of RSA-OAEP(ephemeral AES-256 key, wrapping key) || AES-KWP(key material, ephemeral key). Material: "
       "raw bytes for AES and hmac keys, PKCS#8 DER for asymmetric keys."},
      {"hash_function", FieldType::string, "OAEP and MGF1 hash: SHA1, SHA224, SHA256 (default), SHA384 or SHA512.", "SHA256"},
      {"type", FieldType::string, "Key type (as create; not for import_version).", "aes256-gcm96"},
      {"exportable", FieldType::boolean,
       "Exportable: the material is then sealed under the master key (as any exportable key) instead of being a "
       "token object."},
      {"derived", FieldType::boolean, "Derived key (AES types): requests need a context."},
      {"convergent_encryption", FieldType::boolean, "Convergent encryption (requires derived)."},
      {"allow_rotation", FieldType::boolean, "Not supported (400 if true): new versions come through import_version."},
      {"allow_plaintext_backup", FieldType::boolean, "Plaintext backup (not supported)."},
      {"auto_rotate_period", FieldType::string, "Not supported for imported keys (400 unless 0)."},
      {"context", FieldType::string, "Ignored (as Vault)."}};
  auto wrapped_of = [](const Context& ctx) {
    keys::WrappedImport w;
    if (!ctx.fields.has("ciphertext") || ctx.fields.get_string("ciphertext").empty())
      throw invalid("missing ciphertext: the wrapped key to import");
    w.ciphertext = decode_b64_field(ctx.fields.get_string("ciphertext"), "ciphertext");
    w.hash_function = ctx.fields.get_string("hash_function");
    return w;
  };
  router.add({"POST", "transit/keys/:name/import", import_fields,
              "Import a key wrapped for the wrapping key: both layers are unwrapped inside the token (C_UnwrapKey).",
              [wrapped_of](Context& ctx) {
                refuse_unsupported(ctx.fields, {"allow_rotation", "allow_plaintext_backup"});
                auto period = rotate_period_of(ctx);
                if (period && *period > 0)
                  throw invalid("auto_rotate_period: an imported key cannot rotate itself (new versions come through "
                                "import_version)");
                keys::KeySpec spec;
                spec.type = ctx.fields.get_string("type");
                spec.created_by = ctx.token ? ctx.token->name : "";
                spec.exportable = ctx.fields.get_bool("exportable");
                spec.derived = ctx.fields.get_bool("derived");
                spec.convergent = ctx.fields.get_bool("convergent_encryption");
                ctx.keys->import_key(key_ref(ctx), spec, wrapped_of(ctx));
                return Reply{204};
              }});
  router.add({"POST", "transit/keys/:name/import_version",
              {name, import_fields[1], import_fields[2]},
              "Add a version to an imported key from wrapped material (only keys that were imported).",
              [wrapped_of](Context& ctx) {
                ctx.keys->import_key_version(key_ref(ctx), wrapped_of(ctx));
                return Reply{204};
              }});

  router.add({"POST", "transit/keys/:name/trim",
              {name,
               {"min_available_version", FieldType::integer,
                "Versions below it are destroyed (token objects included). At most min_decryption_version and "
                "min_encryption_version, which must be set."}},
              "Destroy old versions of a key, their token objects included (Vault's trim).",
              [](Context& ctx) {
                if (!ctx.fields.has("min_available_version")) throw invalid("missing min_available_version");
                int64_t n = ctx.fields.get_int("min_available_version");
                if (n <= 0 || n > std::numeric_limits<int>::max())
                  throw invalid("min_available_version must be a positive version number");
                return Reply{200, key_info(ctx.keys->trim_key(key_ref(ctx), static_cast<int>(n)))};
              }});

  std::vector<Field> crypt_fields = item_fields();
  crypt_fields.push_back(name);
  crypt_fields.push_back({"batch_input", FieldType::array, "Items to process, each with the single-call fields."});
  crypt_fields.push_back({"partial_failure_response_code", FieldType::integer, "Status for a partly failed batch."});
  crypt_fields.push_back({"type", FieldType::string, "Type of the key when encrypt creates it (upsert): aes256-gcm96 (default) or aes128-gcm96."});
  crypt_fields.push_back({"convergent_encryption", FieldType::boolean,
                          "When encrypt creates the key (upsert, with a context): make it convergent."});

  router.add({"POST", "transit/encrypt/:name", crypt_fields,
              "Encrypt base64 plaintext with AES-GCM in the token; a missing key is created first (as Vault "
              "does), which also needs create on this path.",
              [](Context& ctx) {
                upsert_for_encrypt(ctx);
                return single_or_batch(ctx, *ctx.keys, *ctx.limits, encrypt_one, item_fields(), encrypt_batch);
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
               {"context", FieldType::string, "Base64 derivation context: required by derived keys."},
               {"nonce", FieldType::string, "Not accepted (400): convergent nonces are computed in the token."}},
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
                auto dk = ks.generate_data_key(key_ref(ctx), static_cast<int>(bits), version, context_of(ctx.fields));
                json data{{"ciphertext", dk.sealed.ciphertext}, {"key_version", dk.sealed.key_version}};
                if (kind == "plaintext") data["plaintext"] = encoding::base64_encode(dk.plaintext.data(), dk.plaintext.size());
                return Reply{200, data};
              }});

  // -- sign / verify / hmac --
  const std::vector<Field> sign_fields = {
      name,
      {"urlalgorithm", FieldType::string, "Hash algorithm, from the URL."},
      {"input", FieldType::string, "Base64 input to sign (or, prehashed, its digest)."},
      {"key_version", FieldType::integer, "Version to sign with; 0 or absent = latest (min_encryption_version applies)."},
      {"hash_algorithm", FieldType::string,
       "sha1, sha2-224, sha2-256 (default), sha2-384, sha2-512, sha3-* (ECDSA, RSA PKCS#1 v1.5), or none "
       "(RSA PKCS#1 v1.5 over prehashed input). Ignored for ed25519.", "sha2-256"},
      {"algorithm", FieldType::string, "Older name of hash_algorithm."},
      {"prehashed", FieldType::boolean, "The input is already a digest of hash_algorithm (not for ed25519)."},
      {"signature_algorithm", FieldType::string, "RSA: pss (default) or pkcs1v15."},
      {"marshaling_algorithm", FieldType::string, "ECDSA: asn1 (DER, default) or jws (r || s, base64url).", "asn1"},
      {"salt_length", FieldType::string, "RSA-PSS salt: auto (largest, default), hash, or a number of bytes.", "auto"},
      {"context", FieldType::string, "Not accepted (400): p11kms does not derive signing keys."},
      {"batch_input", FieldType::array, "Items with input (and reference), all signed with the request's options."},
      {"partial_failure_response_code", FieldType::integer, "Status for a partly failed batch."},
      {"signature", FieldType::string, "verify: the vault:v<N>: signature."},
      {"hmac", FieldType::string, "verify: a vault:v<N>: HMAC to check instead of a signature."},
  };
  auto sign_cb = [](Context& ctx) {
    refuse_context(ctx.fields);
    auto options = sign_options(ctx);
    int version = ctx.fields.has("key_version") ? to_version(ctx.fields.get_int("key_version"), "key_version") : 0;
    ItemOp op = [options, version](keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int) {
      refuse_context(f);
      auto sig = ks.sign(ref, input_of(f), options, version);
      return json{{"signature", sig.value}, {"key_version", sig.key_version}};
    };
    return single_or_batch(ctx, *ctx.keys, *ctx.limits, op, sign_item_fields());
  };
  router.add({"POST", "transit/sign/:name", sign_fields,
              "Sign base64 input with an asymmetric key's private key, inside the token.", sign_cb});
  router.add({"POST", "transit/sign/:name/:urlalgorithm", sign_fields,
              "Sign, with the hash algorithm in the URL.", sign_cb});
  auto verify_cb = [](Context& ctx) {
    refuse_context(ctx.fields);
    auto options = sign_options(ctx);
    ItemOp op = [options](keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int) {
      refuse_context(f);
      bool has_sig = f.has("signature"), has_hmac = f.has("hmac");
      if (has_sig == has_hmac) throw invalid("exactly one of signature and hmac must be given");
      bool valid = has_hmac ? ks.verify_hmac(ref, input_of(f), options.hash_algorithm, f.get_string("hmac"))
                            : ks.verify(ref, input_of(f), options, f.get_string("signature"));
      return json{{"valid", valid}};
    };
    return single_or_batch(ctx, *ctx.keys, *ctx.limits, op, sign_item_fields());
  };
  router.add({"POST", "transit/verify/:name", sign_fields,
              "Verify a signature (against the version's public key) or an HMAC (in the token).", verify_cb});
  router.add({"POST", "transit/verify/:name/:urlalgorithm", sign_fields,
              "Verify, with the hash algorithm in the URL.", verify_cb});

  const std::vector<Field> hmac_fields = {
      name,
      {"urlalgorithm", FieldType::string, "Algorithm, from the URL."},
      {"input", FieldType::string, "Base64 input."},
      {"key_version", FieldType::integer, "Version whose HMAC key to use; 0 or absent = latest."},
      {"algorithm", FieldType::string, "sha1, sha2-224, sha2-256 (default), sha2-384 or sha2-512.", "sha2-256"},
      {"batch_input", FieldType::array, "Items with input (and reference)."},
      {"partial_failure_response_code", FieldType::integer, "Status for a partly failed batch."},
  };
  auto hmac_cb = [](Context& ctx) {
    std::string algorithm = hash_algorithm_of(ctx, "urlalgorithm", "algorithm");
    int version = ctx.fields.has("key_version") ? to_version(ctx.fields.get_int("key_version"), "key_version") : 0;
    ItemOp op = [algorithm, version](keys::KeyService& ks, const keys::KeyRef& ref, const FieldData& f, int) {
      auto mac = ks.hmac(ref, input_of(f), algorithm, version);
      return json{{"hmac", mac.value}, {"key_version", mac.key_version}};
    };
    return single_or_batch(ctx, *ctx.keys, *ctx.limits, op, sign_item_fields());
  };
  router.add({"POST", "transit/hmac/:name", hmac_fields,
              "HMAC of base64 input with the version's HMAC key, a generic secret inside the token.", hmac_cb});
  router.add({"POST", "transit/hmac/:name/:urlalgorithm", hmac_fields, "HMAC, with the algorithm in the URL.", hmac_cb});

  // -- export --
  const std::vector<Field> export_fields = {
      {"key_type", FieldType::string, "encryption-key, signing-key or hmac-key."},
      name,
      {"version", FieldType::string, "A version number or latest; absent = every version."}};
  auto export_cb = [](Context& ctx) {
    std::string version = ctx.params.count("version") ? ctx.params.at("version") : "";
    auto out = ctx.keys->export_key(key_ref(ctx), ctx.params.at("key_type"), version);
    json keys_json = json::object();
    for (const auto& [n, value] : out.keys) keys_json[std::to_string(n)] = value;
    return Reply{200, json{{"name", out.name}, {"type", out.type}, {"keys", keys_json}}};
  };
  router.add({"GET", "transit/export/:key_type/:name", export_fields,
              "Export every version of an exportable key (unsealed in the token).", export_cb, policy::kRead});
  router.add({"GET", "transit/export/:key_type/:name/:version", export_fields,
              "Export one version (a number or latest) of an exportable key.", export_cb, policy::kRead});

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
