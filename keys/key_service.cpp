#include "keys/key_service.hpp"

#include <openssl/rand.h>

#include <chrono>
#include <set>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "keys/envelope.hpp"

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

// Turns failures of the layers below into the service's one error type: the token or the
// store being unavailable is a 503 with a message, never a crash or a 500 with internals.
template <typename F>
auto KeyService::guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const KeyError&) {
    throw;
  } catch (const hsm::TokenUnavailable& e) {
    throw unavailable(e.what());
  } catch (const hsm::ObjectMissing& e) {
    throw unavailable(std::string("a key version's token object is missing: ") + e.what());
  } catch (const hsm::Pkcs11Error& e) {
    log::error(std::string("hsm: ") + e.what());
    throw unavailable(std::string("the HSM refused the operation: ") + e.what());
  } catch (const store::ConflictError& e) {
    throw KeyError(ErrorKind::conflict, "conflict", e.what());
  } catch (const store::StoreError& e) {
    log::error(std::string("store: ") + e.what());
    throw unavailable("the metadata store is unavailable");
  }
}

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
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    auto it = cache_.find(cache_key(ref));
    if (it != cache_.end()) return it->second;
  }
  auto rec = store_.get_key(ref.ns, ref.name);
  if (!rec) return nullptr;
  auto key = std::make_shared<const Key>(std::move(*rec));
  std::lock_guard<std::mutex> lk(cache_mu_);
  cache_[cache_key(ref)] = key;
  return key;
}

std::shared_ptr<const Key> KeyService::load_for_use(const KeyRef& ref) {
  auto k = load(ref);
  if (!k) throw invalid("encryption key not found: no key named \"" + ref.name + "\"", "key_not_found");
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
store::VersionRecord KeyService::create_version_object(const Key& key, int version) {
  auto id = token_.new_object_id();
  std::string label = key.label_for(version);
  store::VersionRecord v{version, encoding::hex_encode(id), now_seconds()};
  store_.add_intent(store::Intent{v.object_id, label, v.created_at});
  try {
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

CreateResult KeyService::create_key(const KeyRef& ref, const std::string& type_name) {
  return guarded([&] {
    validate_name(ref.name);
    auto type = parse_key_type(type_name);
    if (!type)
      throw invalid("unknown key type \"" + type_name + "\": type must be one of " + supported_key_types(),
                    "invalid_type");
    require_aes_gcm();
    std::lock_guard<std::mutex> lk(write_mu_);
    if (auto existing = load(ref)) return CreateResult{existing->record(), false};
    store::KeyRecord rec;
    rec.ns = ref.ns;
    rec.name = ref.name;
    rec.type = key_type_name(*type);
    rec.created_at = now_seconds();
    Key draft(rec);
    auto v1 = create_version_object(draft, 1);
    rec.versions[1] = v1;
    try {
      store_.create_key(rec);
    } catch (...) {
      try {
        token_.destroy(*encoding::hex_decode(v1.object_id));
        store_.remove_intent(v1.object_id);
      } catch (...) {
      }
      throw;
    }
    invalidate(ref);
    log::info("keys: created key " + ref.ns + "/" + ref.name + " (" + rec.type + ")");
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

store::KeyRecord KeyService::configure_key(const KeyRef& ref, const KeyConfigChange& change) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    auto next = key->with_config(change);
    store_.update_config(next);
    invalidate(ref);
    return load_existing(ref)->record();
  });
}

store::KeyRecord KeyService::rotate_key(const KeyRef& ref) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    int next = key->latest_version() + 1;
    auto v = create_version_object(*key, next);
    try {
      store_.add_version(ref.ns, ref.name, v);
    } catch (...) {
      try {
        token_.destroy(*encoding::hex_decode(v.object_id));
        store_.remove_intent(v.object_id);
      } catch (...) {
      }
      throw;
    }
    invalidate(ref);
    log::info("keys: rotated key " + ref.ns + "/" + ref.name + " to v" + std::to_string(next));
    return load_existing(ref)->record();
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

void KeyService::delete_key(const KeyRef& ref) {
  guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    if (!key->record().deletion_allowed)
      throw invalid("deletion is not allowed for key \"" + ref.name + "\": set deletion_allowed with its config first",
                    "deletion_not_allowed");
    auto intents = store_.delete_key(ref.ns, ref.name);
    invalidate(ref);
    destroy_for_intents(intents);
    log::info("keys: deleted key " + ref.ns + "/" + ref.name);
    return 0;
  });
}

Sealed KeyService::encrypt(const KeyRef& ref, const uint8_t* plaintext, size_t len, int key_version,
                           const std::vector<uint8_t>& aad) {
  return guarded([&] {
    auto key = load_for_use(ref);
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
    key->encryption_version(key_version);  // refuse before drawing randomness
    DataKey dk;
    dk.plaintext = token_.random_secret(static_cast<size_t>(bits / 8));
    dk.sealed = encrypt(ref, dk.plaintext.data(), dk.plaintext.size(), key_version);
    return dk;
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
