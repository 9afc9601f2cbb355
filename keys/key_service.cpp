#include "keys/key_service.hpp"

#include <openssl/rand.h>

#include <cctype>
#include <chrono>
#include <set>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/uuid.hpp"
#include "keys/envelope.hpp"
#include "keys/key_service_guard.hpp"

namespace p11kms::keys {
namespace {

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string cache_key(const KeyRef& r) { return r.ns + '\n' + r.name; }

hsm::ObjectId object_id_of(const store::VersionRecord& v) {
  auto id = encoding::hex_decode(v.object_id);
  if (!id) throw KeyError(ErrorKind::internal, "internal", "corrupt object id in the store");
  return *id;
}

std::vector<uint8_t> new_iv() {
  // The IV is public and only needs uniqueness; OpenSSL's DRBG saves a token round trip.
  std::vector<uint8_t> iv(12);
  if (RAND_bytes(iv.data(), static_cast<int>(iv.size())) != 1)
    throw KeyError(ErrorKind::internal, "internal", "random IV generation failed");
  return iv;
}

}  // namespace

KeyService::KeyService(store::MetadataStore& store, hsm::Token& token, ServiceLimits limits)
    : store_(store), token_(token), limits_(limits) {}

void KeyService::validate_name(const std::string& name) const {
  bool ok = !name.empty() && name.size() <= limits_.max_key_name_length;
  for (char c : name)
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                c == '_' || c == '-');
  if (!ok)
    throw invalid("invalid key name: names are 1 to " + std::to_string(limits_.max_key_name_length) +
                  " characters of [A-Za-z0-9._-]", "invalid_name");
}

std::shared_ptr<const Key> KeyService::load(const KeyRef& ref) {
  validate_name(ref.name);
  std::shared_ptr<const Key> key;
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    auto it = cache_.find(cache_key(ref));
    if (it != cache_.end()) key = it->second;
  }
  if (!key) {
    auto rec = store_.get_key(ref.ns, ref.name);
    if (!rec) return nullptr;
    key = std::make_shared<const Key>(std::move(*rec));
    std::lock_guard<std::mutex> lk(cache_mu_);
    cache_[cache_key(ref)] = key;
  }
  if (!ref.id.empty() && key->record().id != ref.id) return nullptr;
  return key;
}

std::shared_ptr<const Key> KeyService::load_for_use(const KeyRef& ref) {
  auto k = load(ref);
  if (!k) throw invalid("encryption key not found: no key named \"" + ref.name + "\"", "key_not_found");
  if (!is_aes(k->type()))
    throw invalid("key \"" + ref.name + "\" is of type " + k->record().type + ", which does not support encryption",
                  "unsupported_operation");
  require_aes_gcm();
  return k;
}

void KeyService::require_aes_gcm() const {
  if (!token_.supports_aes_gcm())
    throw invalid("the token's PKCS#11 module does not offer AES-GCM (CKM_AES_GCM, CKM_AES_KEY_GEN), "
                  "so AES keys cannot be created or used through it", "mechanism_unavailable");
}

std::shared_ptr<const Key> KeyService::load_existing(const KeyRef& ref) {
  auto k = load(ref);
  if (!k) throw not_found("key \"" + ref.name + "\" not found");
  return k;
}

void KeyService::invalidate(const KeyRef& ref) {
  std::lock_guard<std::mutex> lk(cache_mu_);
  cache_.erase(cache_key(ref));
}

// Intent first, then the object, then the metadata that removes the intent: a crash at any
// point leaves an intent the sweeper settles (object kept if metadata committed, else destroyed).
store::VersionRecord KeyService::create_version_object(const Key& key, int version,
                                                      const hsm::SecureBytes* material) {
  auto id = token_.new_object_id();
  std::string label = key.label_for(version);
  store::VersionRecord v;
  v.version = version;
  v.id = uuid::new_v4();
  v.object_id = encoding::hex_encode(id);
  v.created_at = now_seconds();
  store_.add_intent(store::Intent{v.object_id, label, v.created_at});
  try {
    if (material)
      token_.import_aes_key(id, *material, label);
    else
      token_.generate_aes_key(id, key_type_bytes(key.type()), label);
  } catch (...) {
    try {
      token_.destroy(id);
      store_.remove_intent(v.object_id);
    } catch (...) {
      // The intent stays; the sweeper removes the object later.
    }
    throw;
  }
  return v;
}

store::VersionRecord KeyService::new_version(const Key& key, int version, const hsm::SecureBytes* material) {
  if (is_aes(key.type())) return create_version_object(key, version, material);
  // Exportable material never becomes a persistent token object: the token draws it and seals
  // it under the master key; only the sealed form is stored.
  hsm::SecureBytes drawn;
  if (!material) {
    drawn = token_.random_secret(key_type_bytes(key.type()));
    material = &drawn;
  }
  store::VersionRecord v;
  v.version = version;
  v.id = uuid::new_v4();
  v.created_at = now_seconds();
  v.sealed = seal_material(key.record(), version, *material);
  return v;
}

void KeyService::discard_version(const store::VersionRecord& v) noexcept {
  if (v.object_id.empty()) return;
  try {
    token_.destroy(*encoding::hex_decode(v.object_id));
    store_.remove_intent(v.object_id);
  } catch (...) {
    // The intent stays; the sweeper removes the object later.
  }
}

void KeyService::check_material(KeyType type, const hsm::SecureBytes& material) const {
  size_t n = material.size();
  if (is_aes(type) && n != key_type_bytes(type))
    throw invalid("payload must be " + std::to_string(key_type_bytes(type) * 8) + " bits (" +
                      std::to_string(key_type_bytes(type)) + " bytes) for a " + key_type_name(type) + " key, not " +
                      std::to_string(n * 8) + " bits",
                  "invalid_payload");
  if (type == KeyType::standard && n != 32 && n != 48 && n != 64)
    throw invalid("payload must be 256, 384 or 512 bits for a standard key, not " + std::to_string(n * 8) + " bits",
                  "invalid_payload");
}

const hsm::ObjectId& KeyService::master_key() {
  std::lock_guard<std::mutex> lk(master_mu_);
  if (!master_key_id_.empty()) return master_key_id_;
  const char* setting = "keys.master_key_id";
  if (auto hex = store_.get_setting(setting)) {
    auto id = encoding::hex_decode(*hex);
    if (!id) throw KeyError(ErrorKind::internal, "internal", "corrupt master key id in the store");
    master_key_id_ = *id;
    return master_key_id_;
  }
  // Created on first use. A crash between the two steps leaves one unreferenced system key on
  // the token (never a key without its object): the setting is written only after it exists.
  auto id = token_.new_object_id();
  token_.generate_aes_key(id, 32, "p11kms-system/master-key");
  store_.put_setting(setting, encoding::hex_encode(id));
  log::info("keys: created the master key that seals exportable key material");
  master_key_id_ = id;
  return master_key_id_;
}

std::string KeyService::seal_material(const store::KeyRecord& key, int version, const hsm::SecureBytes& material) {
  auto iv = new_iv();
  auto sealed = token_.aes_gcm_encrypt(master_key(), iv, sealed_material_aad(key.ns, key.id, version),
                                       material.data(), material.size());
  iv.insert(iv.end(), sealed.begin(), sealed.end());
  return encoding::base64_encode(iv);
}

hsm::SecureBytes KeyService::unseal_material(const store::KeyRecord& key, const store::VersionRecord& v) {
  auto blob = encoding::base64_decode(v.sealed);
  if (!blob || blob->size() < 12 + 16)
    throw KeyError(ErrorKind::internal, "internal", "corrupt sealed material in the store");
  hsm::Bytes iv(blob->begin(), blob->begin() + 12);
  auto pt = token_.aes_gcm_decrypt(master_key(), iv, sealed_material_aad(key.ns, key.id, v.version),
                                   blob->data() + 12, blob->size() - 12);
  if (!pt)
    throw KeyError(ErrorKind::internal, "internal",
                   "sealed material of key " + key.id + " v" + std::to_string(v.version) + " does not open");
  return std::move(*pt);
}

CreateResult KeyService::create_key(const KeyRef& ref, const std::string& type_name, const std::string& created_by) {
  auto type = parse_key_type(type_name);
  if (!type || !is_aes(*type))
    throw invalid("unknown key type \"" + type_name + "\": type must be one of " + supported_key_types(),
                  "invalid_type");
  KeySpec spec;
  spec.type = type_name;
  spec.created_by = created_by;
  return create_key(ref, spec);
}

CreateResult KeyService::create_key(const KeyRef& ref, const KeySpec& spec) {
  return guarded([&] {
    validate_name(ref.name);
    auto type = parse_key_type(spec.type);
    if (!type) throw invalid("unknown key type \"" + spec.type + "\"", "invalid_type");
    if (is_aes(*type)) require_aes_gcm();
    if (spec.material) check_material(*type, *spec.material);
    std::lock_guard<std::mutex> lk(write_mu_);
    if (auto existing = load(KeyRef{ref.ns, ref.name})) return CreateResult{existing->record(), false};
    if (alias_target(ref.ns, ref.name))
      throw conflict("\"" + ref.name + "\" is already an alias of another key in this namespace", "name_in_use");
    store::KeyRecord rec;
    rec.id = uuid::new_v4();
    rec.ns = ref.ns;
    rec.name = ref.name;
    rec.type = key_type_name(*type);
    rec.created_at = rec.updated_at = now_seconds();
    rec.description = spec.description;
    rec.expires_at = spec.expires_at;
    rec.created_by = spec.created_by;
    rec.imported = spec.material != nullptr;
    rec.exportable = *type == KeyType::standard;
    Key draft(rec);
    auto v1 = new_version(draft, 1, spec.material);
    rec.versions[1] = v1;
    try {
      store_.create_key(rec);
    } catch (...) {
      discard_version(v1);
      throw;
    }
    invalidate(ref);
    log::info("keys: created key " + ref.ns + "/" + ref.name + " (" + rec.type + (rec.imported ? ", imported" : "") + ")");
    return CreateResult{rec, true};
  });
}

store::KeyRecord KeyService::read_key(const KeyRef& ref) {
  return guarded([&] { return load_existing(ref)->record(); });
}

bool KeyService::key_exists(const KeyRef& ref) {
  return guarded([&] { return load(ref) != nullptr; });
}

std::vector<std::string> KeyService::list_keys(const std::string& ns) {
  return guarded([&] { return store_.list_keys(ns); });
}

std::optional<store::KeyRecord> KeyService::find_key(const std::string& ns, const std::string& id_or_name) {
  return guarded([&]() -> std::optional<store::KeyRecord> {
    if (uuid::looks_like_uuid(id_or_name)) {
      std::string id = id_or_name;
      for (char& c : id) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
      if (auto r = store_.get_key_by_id(ns, id)) return r;
    }
    if (id_or_name.empty() || id_or_name.size() > limits_.max_key_name_length) return std::nullopt;
    try {
      validate_name(id_or_name);
    } catch (const KeyError&) {
      return std::nullopt;  // not a name any key can have
    }
    if (auto k = load(KeyRef{ns, id_or_name})) return k->record();
    if (auto id = alias_target(ns, id_or_name)) return store_.get_key_by_id(ns, *id);
    return std::nullopt;
  });
}

std::vector<store::KeyRecord> KeyService::list_key_records(const std::string& ns, bool include_deleted) {
  return guarded([&] { return store_.list_key_records(ns, include_deleted); });
}

store::KeyRecord KeyService::configure_key(const KeyRef& ref, const KeyConfigChange& change) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    auto next = key->with_config(change);
    next.updated_at = now_seconds();
    store_.update_config(next);
    invalidate(ref);
    return load_existing(ref)->record();
  });
}

store::KeyRecord KeyService::rotate_key(const KeyRef& ref, const hsm::SecureBytes* material) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    key->require_state_for(KeyUse::rotate, now_seconds());
    if (key->type() == KeyType::standard)
      throw invalid("key \"" + ref.name + "\" is a standard key; only root keys can be rotated", "unsupported_operation");
    if (key->record().imported && !material)
      throw invalid("key \"" + ref.name + "\" was imported: rotate it with a new payload", "payload_required");
    if (!key->record().imported && material)
      throw invalid("key \"" + ref.name + "\" was generated by the token: rotate it without a payload",
                    "payload_not_allowed");
    if (material) check_material(key->type(), *material);
    int next = key->latest_version() + 1;
    auto v = new_version(*key, next, material);
    try {
      store_.add_version(ref.ns, ref.name, v);
    } catch (...) {
      discard_version(v);
      throw;
    }
    invalidate(ref);
    log::info("keys: rotated key " + ref.ns + "/" + ref.name + " to v" + std::to_string(next));
    return load_existing(ref)->record();
  });
}

store::KeyRecord KeyService::set_enabled(const KeyRef& ref, bool enabled) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    int state = key->state_at(now_seconds());
    int from = enabled ? store::kSuspended : store::kActive;
    if (state != from) {
      const char* names[] = {"pre-active", "active", "suspended", "deactivated", "", "destroyed"};
      throw conflict("key \"" + ref.name + "\" is " + names[state] + "; only " + (enabled ? "a suspended" : "an active") +
                         " key can be " + (enabled ? "enabled" : "disabled"),
                     "key_state");
    }
    store::KeyRecord next = key->record();
    next.state = enabled ? store::kActive : store::kSuspended;
    next.updated_at = now_seconds();
    store_.update_config(next);
    invalidate(ref);
    log::info("keys: " + std::string(enabled ? "enabled" : "disabled") + " key " + ref.ns + "/" + ref.name);
    return load_existing(ref)->record();
  });
}

hsm::SecureBytes KeyService::read_material(const KeyRef& ref) {
  return guarded([&] {
    auto key = load_existing(ref);
    if (!key->record().exportable || key->type() != KeyType::standard)
      throw invalid("key \"" + ref.name + "\" is not exportable", "not_exportable");
    key->require_state_for(KeyUse::read_material, now_seconds());
    const auto& latest = key->record().versions.rbegin()->second;
    return unseal_material(key->record(), latest);
  });
}

void KeyService::destroy_for_intents(const std::vector<store::Intent>& intents) {
  for (const auto& intent : intents) {
    try {
      if (auto id = encoding::hex_decode(intent.object_id)) token_.destroy(*id);
      store_.remove_intent(intent.object_id);
    } catch (const std::exception& e) {
      // The intent stays committed, so the next sweep destroys the object.
      log::warn("keys: object " + intent.object_id + " not destroyed yet: " + e.what());
    }
  }
}

store::KeyRecord KeyService::delete_key(const KeyRef& ref, bool require_deletion_allowed) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    if (require_deletion_allowed && !key->record().deletion_allowed)
      throw invalid("deletion is not allowed for key \"" + ref.name + "\": set deletion_allowed with its config first",
                    "deletion_not_allowed");
    auto intents = store_.delete_key(ref.ns, ref.name);
    drop_aliases_of(ref.ns, key->record().id);
    drop_rotation_policy(ref.ns, key->record().id);
    invalidate(ref);
    destroy_for_intents(intents);
    log::info("keys: deleted key " + ref.ns + "/" + ref.name);
    auto tombstone = store_.get_key_by_id(ref.ns, key->record().id);
    if (!tombstone) throw KeyError(ErrorKind::internal, "internal", "deleted key left no tombstone");
    return *tombstone;
  });
}

Sealed KeyService::encrypt(const KeyRef& ref, const uint8_t* plaintext, size_t len, int key_version,
                           const std::vector<uint8_t>& aad) {
  return guarded([&] {
    auto key = load_for_use(ref);
    key->require_state_for(KeyUse::encrypt, now_seconds());
    const auto& v = key->encryption_version(key_version);
    auto iv = new_iv();
    auto sealed = token_.aes_gcm_encrypt(object_id_of(v), iv, aad, plaintext, len);
    return Sealed{format_transit_ciphertext(v.version, iv, sealed), v.version};
  });
}

hsm::SecureBytes KeyService::decrypt(const KeyRef& ref, const std::string& ciphertext,
                                     const std::vector<uint8_t>& aad) {
  return guarded([&] {
    auto key = load_for_use(ref);
    key->require_state_for(KeyUse::decrypt, now_seconds());
    auto ct = parse_transit_ciphertext(ciphertext);
    const auto& v = key->decryption_version(ct.version);
    auto pt = token_.aes_gcm_decrypt(object_id_of(v), ct.iv, aad, ct.sealed.data(), ct.sealed.size());
    if (!pt) throw invalid("invalid ciphertext: message authentication failed", "decryption_failed");
    return std::move(*pt);
  });
}

Sealed KeyService::rewrap(const KeyRef& ref, const std::string& ciphertext, int key_version,
                          const std::vector<uint8_t>& aad) {
  return guarded([&] {
    auto pt = decrypt(ref, ciphertext, aad);
    return encrypt(ref, pt.data(), pt.size(), key_version, aad);
  });
}

DataKey KeyService::generate_data_key(const KeyRef& ref, int bits, int key_version) {
  return guarded([&] {
    if (bits != 128 && bits != 256 && bits != 512)
      throw invalid("invalid bits " + std::to_string(bits) + ": bits must be 128, 256 or 512", "invalid_bits");
    auto key = load_for_use(ref);
    key->require_state_for(KeyUse::encrypt, now_seconds());
    key->encryption_version(key_version);  // refuse before drawing randomness
    DataKey dk;
    dk.plaintext = token_.random_secret(static_cast<size_t>(bits / 8));
    dk.sealed = encrypt(ref, dk.plaintext.data(), dk.plaintext.size(), key_version);
    return dk;
  });
}

std::shared_ptr<const Key> KeyService::load_wrapping_key(const KeyRef& ref, KeyUse use) {
  auto key = load_existing(ref);
  key->require_state_for(use, now_seconds());
  if (!is_aes(key->type()))
    throw invalid("key \"" + ref.name + "\" is a standard key; wrap, unwrap and rewrap need a root key",
                  "unsupported_operation");
  require_aes_gcm();
  return key;
}

namespace {
void check_aad(const std::vector<std::string>& aad) {
  if (aad.size() > kMaxWrapAadEntries)
    throw invalid("aad has " + std::to_string(aad.size()) + " entries; at most " + std::to_string(kMaxWrapAadEntries) +
                  " are allowed", "invalid_aad");
  for (size_t i = 0; i < aad.size(); ++i)
    if (aad[i].size() > kMaxWrapAadEntryBytes)
      throw invalid("aad[" + std::to_string(i) + "] is " + std::to_string(aad[i].size()) + " bytes; each entry is 0 to " +
                    std::to_string(kMaxWrapAadEntryBytes) + " bytes", "invalid_aad");
}
}  // namespace

Wrapped KeyService::wrap_with(const Key& key, const uint8_t* plaintext, size_t len, const std::vector<std::string>& aad) {
  const auto& v = key.encryption_version(0);
  auto iv = new_iv();
  auto sealed = token_.aes_gcm_encrypt(object_id_of(v), iv, wrap_aad(key.record().id, aad), plaintext, len);
  return Wrapped{format_wrap_ciphertext(v.version, iv, sealed), v.version, v.id};
}

WrapResult KeyService::wrap(const KeyRef& ref, const hsm::SecureBytes* plaintext, const std::vector<std::string>& aad) {
  return guarded([&] {
    check_aad(aad);
    if (plaintext && (plaintext->empty() || plaintext->size() > kMaxWrapPlaintextBytes))
      throw invalid("plaintext must be 1 to " + std::to_string(kMaxWrapPlaintextBytes) + " bytes, not " +
                    std::to_string(plaintext->size()), "invalid_plaintext");
    auto key = load_wrapping_key(ref, KeyUse::encrypt);
    WrapResult out;
    if (!plaintext) {
      out.generated = token_.random_secret(kGeneratedDekBytes);
      plaintext = &*out.generated;
    }
    out.wrapped = wrap_with(*key, plaintext->data(), plaintext->size(), aad);
    return out;
  });
}

UnwrapResult KeyService::unwrap(const KeyRef& ref, const std::string& ciphertext, const std::vector<std::string>& aad) {
  return guarded([&] {
    check_aad(aad);
    auto key = load_wrapping_key(ref, KeyUse::decrypt);
    auto ct = parse_wrap_ciphertext(ciphertext);
    const auto& v = key->decryption_version(ct.version);
    auto pt = token_.aes_gcm_decrypt(object_id_of(v), ct.iv, wrap_aad(key->record().id, aad), ct.sealed.data(),
                                     ct.sealed.size());
    if (!pt)
      throw invalid("invalid ciphertext: it was not wrapped by this key with this aad, or it was altered",
                    "decryption_failed");
    UnwrapResult out;
    out.plaintext = std::move(*pt);
    out.version = v.version;
    out.version_id = v.id;
    // As Key Protect: a ciphertext of an older version comes back rewrapped by the latest one,
    // while the key may still wrap (a deactivated key only unwraps).
    if (v.version < key->latest_version() && key->state_at(now_seconds()) == store::kActive)
      out.rewrapped = wrap_with(*key, out.plaintext.data(), out.plaintext.size(), aad);
    return out;
  });
}

UnwrapResult KeyService::rewrap_wrapped(const KeyRef& ref, const std::string& ciphertext,
                                        const std::vector<std::string>& aad) {
  return guarded([&] {
    load_wrapping_key(ref, KeyUse::encrypt);  // refuse before opening anything
    auto out = unwrap(ref, ciphertext, aad);
    if (!out.rewrapped) {
      auto key = load_wrapping_key(ref, KeyUse::encrypt);
      out.rewrapped = wrap_with(*key, out.plaintext.data(), out.plaintext.size(), aad);
    }
    return out;
  });
}

std::vector<uint8_t> KeyService::random_bytes(size_t n) {
  return guarded([&] { return token_.random(n); });
}

SweepReport KeyService::sweep() {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    SweepReport report;
    // Objects first: any object seen here had its intent committed before it was created, so
    // the store read below explains it (a row or an intent) unless it is not ours.
    auto objects = token_.list_key_objects();
    auto versions = store_.all_versions();
    auto intents = store_.list_intents();
    std::set<std::string> referenced, present, intended;
    for (const auto& v : versions) referenced.insert(v.object_id);
    for (const auto& o : objects) present.insert(encoding::hex_encode(o.id));

    std::vector<store::Intent> to_destroy;
    for (const auto& intent : intents) {
      intended.insert(intent.object_id);
      if (referenced.count(intent.object_id)) {
        store_.remove_intent(intent.object_id);
        ++report.intents_settled;
      } else {
        if (present.count(intent.object_id)) ++report.orphans_destroyed;
        to_destroy.push_back(intent);
      }
    }
    destroy_for_intents(to_destroy);

    for (const auto& o : objects) {
      std::string hex = encoding::hex_encode(o.id);
      if (o.label.rfind("p11kms/", 0) == 0 && !referenced.count(hex) && !intended.count(hex)) {
        // Never destroyed blindly: another deployment may share the token.
        ++report.unknown_objects;
        log::warn("sweep: token object " + hex + " (" + o.label + ") is not known to this store; left in place");
      }
    }
    for (const auto& v : versions) {
      if (!present.count(v.object_id)) {
        report.missing.push_back(MissingObject{v.ns, v.name, v.version});
        log::error("sweep: key " + v.ns + "/" + v.name + " v" + std::to_string(v.version) +
                   " has no object on the token (object id " + v.object_id + ")");
      }
    }
    std::lock_guard<std::mutex> mk(missing_mu_);
    missing_ = report.missing;
    return report;
  });
}

Health KeyService::health() {
  Health h;
  h.token = token_.pool().probe();
  std::lock_guard<std::mutex> lk(missing_mu_);
  h.missing_objects = missing_;
  return h;
}

}  // namespace p11kms::keys
