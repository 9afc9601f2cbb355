#include "keys/key_service.hpp"
#include "keys/kong_keys.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <cctype>
#include <chrono>
#include <limits>
#include <map>
#include <set>
#include <thread>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/public_random.hpp"
#include "common/uuid.hpp"
#include "hsm/errors.hpp"
#include "keys/digest.hpp"
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

// SoftHSM refuses HMAC keys shorter than the digest (CKR_KEY_SIZE_RANGE: 32 bytes with
// SHA-384/512). HMAC zero-pads a short key to the hash's block size, so a key zero-padded to
// 64 bytes gives exactly the HMAC of the key itself with sha1 and every sha2.
constexpr size_t kTokenHmacKeyBytes = 64;
constexpr size_t kVaultHmacKeyBytes = 32;  // Vault's per-version HMAC key

hsm::SecureBytes padded_hmac_key(const hsm::SecureBytes& key) {
  if (key.size() >= kTokenHmacKeyBytes) return key;
  hsm::SecureBytes out(kTokenHmacKeyBytes);
  std::copy(key.data(), key.data() + key.size(), out.data());
  return out;
}

hsm::ObjectId session_id(const std::string& version_id, const char* what) {
  std::string s = version_id + what;
  return hsm::ObjectId(s.begin(), s.end());
}

std::vector<uint8_t> hmac_aad(const std::string& ns, const std::string& key_id, int version) {
  return sealed_material_aad(ns, key_id + "/hmac", version);
}

// "vault:v<N>:<payload>" -> (N, payload); 400 naming the problem.
std::pair<int, std::string> split_vault_value(const std::string& text, const char* what) {
  const std::string prefix = "vault:v";
  if (text.rfind(prefix, 0) != 0) throw invalid(std::string("invalid ") + what + ": it must start with vault:v<N>:");
  size_t colon = text.find(':', prefix.size());
  std::string num = text.substr(prefix.size(), colon == std::string::npos ? std::string::npos : colon - prefix.size());
  if (colon == std::string::npos || num.empty() || num.size() > 9 || num.find_first_not_of("0123456789") != std::string::npos)
    throw invalid(std::string("invalid ") + what + ": no version after vault:v");
  int version = std::stoi(num);
  if (version < 1) throw invalid(std::string("invalid ") + what + ": version must be at least 1");
  return {version, text.substr(colon + 1)};
}

// The SubjectPublicKeyInfo of a PKCS#8 private key, checked against the key's declared type.
std::vector<uint8_t> checked_public_key(KeyType type, const hsm::SecureBytes& pkcs8) {
  std::vector<uint8_t> spki;
  try {
    spki = hsm::public_key_of_pkcs8(pkcs8);
  } catch (const std::invalid_argument& e) {
    throw invalid(std::string("invalid key material: ") + e.what(), "invalid_payload");
  }
  const unsigned char* p = spki.data();
  EVP_PKEY* raw = d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size()));
  if (!raw) throw invalid("invalid key material: unreadable public key", "invalid_payload");
  std::unique_ptr<EVP_PKEY, void (*)(EVP_PKEY*)> pub(raw, EVP_PKEY_free);
  int id = EVP_PKEY_get_base_id(pub.get());
  bool ok = false;
  if (type == KeyType::ed25519) {
    ok = id == EVP_PKEY_ED25519;
  } else if (is_rsa(type)) {
    ok = id == EVP_PKEY_RSA && EVP_PKEY_get_bits(pub.get()) == pair_spec(type).rsa_bits;
  } else if (is_ecdsa(type)) {
    char group[64] = {0};
    size_t n = 0;
    ok = id == EVP_PKEY_EC &&
         EVP_PKEY_get_utf8_string_param(pub.get(), "group", group, sizeof group, &n) == 1 &&
         std::string(group, n) == (type == KeyType::ecdsa_p384 ? "secp384r1" : "prime256v1");
  }
  if (!ok)
    throw invalid(std::string("invalid key material: it is not a ") + key_type_name(type) + " private key",
                  "invalid_payload");
  return spki;
}

// An HMAC in the token; a key shorter than the digest (an imported hmac key: SoftHSM refuses
// those for sha2-384/512 with CKR_KEY_SIZE_RANGE) is the caller's 400, not a token failure.
hsm::Bytes token_hmac(hsm::Token& token, const hsm::KeyHandle& handle, CK_MECHANISM_TYPE mech,
                      const std::vector<uint8_t>& input, const std::string& algorithm) {
  try {
    return token.hmac(handle, mech, input.data(), input.size());
  } catch (const hsm::Pkcs11Error& e) {
    if (e.rv() != CKR_KEY_SIZE_RANGE) throw;
    throw invalid("the token's PKCS#11 module refuses " + algorithm + " HMACs with this key: it is shorter than the "
                  "digest (an imported hmac key); use a shorter hash algorithm", "mechanism_unavailable");
  }
}

std::vector<uint8_t> new_iv() {
  // The IV is public and only needs uniqueness; OpenSSL's DRBG saves a token round trip.
  std::vector<uint8_t> iv(12);
  try {
    public_random::fill(iv.data(), iv.size());
  } catch (const std::runtime_error&) {
    throw KeyError(ErrorKind::internal, "internal", "random IV generation failed");
  }
  return iv;
}

}  // namespace

KeyService::KeyService(store::MetadataStore& store, hsm::Token& token, ServiceLimits limits)
    : store_(store), token_(token), limits_(limits) {
  if (limits_.cluster.instance_id.empty()) limits_.cluster.instance_id = uuid::new_v4();
  if (limits_.cache_metadata && limits_.check_cached_versions)
    store_.on_key_change([this](const std::string& ns, const std::string& name) {
      std::lock_guard<std::mutex> lk(cache_mu_);
      ++cache_stats_.notifications;
      if (name.empty()) cache_.clear();
      else cache_.erase(cache_key(KeyRef{ns, name}));
    });
}

KeyService::~KeyService() {
  if (limits_.cache_metadata && limits_.check_cached_versions) store_.on_key_change(nullptr);
}

KeyService::CacheStats KeyService::cache_stats() const {
  std::lock_guard<std::mutex> lk(cache_mu_);
  return cache_stats_;
}

// Held by every write that creates token objects, after write_mu_: the intents it commits
// stay in flight (renewed by heartbeats) until it ends, settled or not.
class KeyService::IntentScope {
 public:
  explicit IntentScope(KeyService& ks) : ks_(ks) {}
  ~IntentScope() {
    std::lock_guard<std::mutex> lk(ks_.inflight_mu_);
    ks_.inflight_.clear();
  }

 private:
  KeyService& ks_;
};

void KeyService::begin_intent(const std::string& object_id, const std::string& label, int64_t created_at) {
  store::Intent intent{object_id, label, created_at};
  intent.owner = limits_.cluster.instance_id;
  intent.lease_expires = now_seconds() + limits_.cluster.intent_lease_s;
  {
    std::lock_guard<std::mutex> lk(inflight_mu_);
    inflight_.insert(object_id);
  }
  store_.add_intent(intent);
}

// A key's name is unique in its namespace across every dialect: not an alias, not a Kong key.
void KeyService::require_name_not_elsewhere(const KeyRef& ref) {
  if (alias_target(ref.ns, ref.name))
    throw conflict("\"" + ref.name + "\" is already an alias of another key in this namespace", "name_in_use");
  if (kong_name_taken(store_, ref.ns, ref.name))
    throw conflict("\"" + ref.name + "\" is already the name of a key in /keys in this namespace", "name_in_use");
}

store::Intent KeyService::object_intent(const std::string& object_id, const std::string& label, bool doomed) const {
  store::Intent intent{object_id, label, now_seconds()};
  intent.owner = limits_.cluster.instance_id;
  intent.lease_expires = now_seconds() + limits_.cluster.intent_lease_s;
  intent.doomed = doomed;
  return intent;
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
  std::shared_ptr<const Key> key;
  if (limits_.cache_metadata) {
    std::lock_guard<std::mutex> lk(cache_mu_);
    auto it = cache_.find(cache_key(ref));
    if (it != cache_.end()) key = it->second;
  }
  if (key && limits_.check_cached_versions) {
    // Never a stale version nor a deleted key: the cached copy must match the store now.
    auto stamp = store_.key_stamp(ref.ns, ref.name);
    bool current = stamp && stamp->id == key->record().id && stamp->generation == key->record().generation;
    std::lock_guard<std::mutex> lk(cache_mu_);
    if (current) {
      ++cache_stats_.hits;
    } else {
      ++cache_stats_.stale;
      cache_.erase(cache_key(ref));
      key = nullptr;
      if (!stamp) return nullptr;
    }
  }
  if (!key) {
    auto rec = store_.get_key(ref.ns, ref.name);
    if (!rec) return nullptr;
    key = std::make_shared<const Key>(std::move(*rec));
    if (limits_.cache_metadata) {
      std::lock_guard<std::mutex> lk(cache_mu_);
      cache_[cache_key(ref)] = key;
    }
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
  require_aes_gcm("encrypting or decrypting with key \"" + ref.name + "\" (" + k->record().type + ")");
  return k;
}

void KeyService::require_capability(hsm::CapabilityKind kind, const char* name, const std::string& what) const {
  std::string why = token_.capabilities()->refusal(kind, name, what);
  if (!why.empty()) throw invalid(why, "mechanism_unavailable");
}

void KeyService::require_aes_gcm(const std::string& what) const {
  require_capability(hsm::CapabilityKind::operation, hsm::cap::kEncrypt, what);
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
  begin_intent(v.object_id, label, v.created_at);
  try {
    bool retry = false;
    with_generation_retries([&] {
      if (retry) token_.destroy_own(id);  // whatever a failed attempt may have left of it
      retry = true;
      make_version_object(key, id, label, material, v);
    });
  } catch (...) {
    try {
      token_.destroy_own(id);
      store_.remove_intent(v.object_id);
    } catch (...) {
      // The intent stays; the sweeper removes the object later.
    }
    throw;
  }
  return v;
}

// SoftHSM under several processes sometimes answers CKR_GENERAL_ERROR to concurrent key
// generation, and CKR_TEMPLATE_INCONSISTENT (for a template that works every other time: its
// object file could not be written) right after another process sharing the token directory
// was killed; a few retries (each starting clean) absorb that, and only a persistent failure
// reaches the caller.
template <typename F>
void KeyService::with_generation_retries(F&& make) {
  for (int attempt = 1;; ++attempt) {
    try {
      make();
      return;
    } catch (const hsm::Pkcs11Error& e) {
      if ((e.rv() != CKR_GENERAL_ERROR && e.rv() != CKR_TEMPLATE_INCONSISTENT) || attempt >= 5) throw;
      log::warn(std::string("keys: retrying a token object creation after ") + e.what());
      std::this_thread::sleep_for(std::chrono::milliseconds(20 * attempt));
    }
  }
}

void KeyService::make_version_object(const Key& key, const hsm::ObjectId& id, const std::string& label,
                                     const hsm::SecureBytes* material, store::VersionRecord& v) {
  {
    KeyType type = key.type();
    if (is_asymmetric(type)) {
      if (material) throw invalid("importing " + std::string(key_type_name(type)) + " keys is not supported yet");
      v.public_key = public_key_pem(token_.generate_key_pair(pair_spec(type), id, label));
    } else if (type == KeyType::hmac) {
      if (material)
        token_.import_hmac_key(id, padded_hmac_key(*material), label);
      else  // at least 64 bytes (see kTokenHmacKeyBytes); never exported, so never seen
        token_.generate_hmac_key(id, std::max(material_bytes(key.record()), kTokenHmacKeyBytes), label);
    } else if (material) {
      token_.import_aes_key(id, *material, label);
    } else if (key.record().derived) {
      token_.generate_derivation_key(id, key_type_bytes(type), label);
    } else {
      token_.generate_aes_key(id, key_type_bytes(type), label);
    }
  }
}

size_t KeyService::material_bytes(const store::KeyRecord& key) const {
  auto type = parse_key_type(key.type);
  if (type == KeyType::hmac) return key.key_size > 0 ? static_cast<size_t>(key.key_size) : 32;
  return type ? key_type_bytes(*type) : 32;
}

store::VersionRecord KeyService::new_version(const Key& key, int version, const hsm::SecureBytes* material) {
  KeyType type = key.type();
  if (type != KeyType::standard && !key.record().exportable) return create_version_object(key, version, material);
  // Exportable material never becomes a persistent token object: the token draws it (or makes
  // the key pair as session objects) and it is sealed under the master key at once; only the
  // sealed form is stored.
  store::VersionRecord v;
  hsm::SecureBytes drawn;
  if (is_asymmetric(type) && material) {
    v.public_key = public_key_pem(checked_public_key(type, *material));
  } else if (is_asymmetric(type)) {
    auto pair = token_.generate_exportable_key_pair(pair_spec(type));
    drawn = std::move(pair.pkcs8);
    v.public_key = public_key_pem(pair.spki);
    material = &drawn;
  } else if (!material) {
    drawn = token_.random_secret(material_bytes(key.record()));
    material = &drawn;
  }
  v.version = version;
  v.id = uuid::new_v4();
  v.created_at = now_seconds();
  v.sealed = seal_material(key.record(), version, *material);
  return v;
}

hsm::KeyHandle KeyService::material_handle(const Key& key, const store::VersionRecord& v) {
  if (!v.object_id.empty()) return object_id_of(v);
  store::KeyRecord owner;  // what unsealing needs, not the whole record
  owner.ns = key.record().ns;
  owner.id = key.record().id;
  KeyType type = key.type();
  bool derived = key.record().derived;
  return hsm::KeyHandle(session_id(v.id, "/material"), [this, owner, v, type, derived] {
    hsm::SecureBytes m = unseal_material(owner, v);
    if (is_asymmetric(type)) return hsm::session_private_key_template(m);
    if (type == KeyType::hmac)
      return hsm::session_secret_template(CKK_GENERIC_SECRET, padded_hmac_key(m), {CKA_SIGN, CKA_VERIFY});
    if (derived) return hsm::session_secret_template(CKK_AES, m, {CKA_DERIVE});
    return hsm::session_secret_template(CKK_AES, m, {CKA_ENCRYPT, CKA_DECRYPT});
  });
}

// Derivation data: SHA-256 of a label and the context (32 bytes, two AES blocks), so the key
// is AES-ECB(base, H(label || context)) computed in the token; the nonce key of a convergent
// key uses another label. The cache id names the version, the purpose and the hash.
hsm::KeyHandle KeyService::derived_handle(const Key& key, const store::VersionRecord& v,
                                          const std::vector<uint8_t>& context, bool nonce) {
  if (context.empty())
    throw invalid("missing 'context' for key derivation: key \"" + key.name() +
                  "\" was created as a derived key, so every request must include a base64 context",
                  "missing_context");
  std::string label = nonce ? "p11kms transit convergent nonce v1" : "p11kms transit derived key v1";
  std::vector<uint8_t> input(label.begin(), label.end());
  input.push_back(0);
  input.insert(input.end(), context.begin(), context.end());
  auto data = digest("sha2-256", input);
  std::string what = std::string(nonce ? "/nonce/" : "/derived/") + encoding::hex_encode(data);
  return hsm::derived_key_handle(session_id(v.id, what.c_str()), material_handle(key, v), data,
                                 nonce ? CKK_GENERIC_SECRET : CKK_AES,
                                 nonce ? 32 : key_type_bytes(key.type()));
}

void KeyService::ensure_hmac_key(const KeyRef& ref, int version) {
  std::lock_guard<std::mutex> lk(write_mu_);
  IntentScope intents(*this);
  invalidate(ref);
  auto key = load_existing(ref);
  auto it = key->record().versions.find(version);
  if (it == key->record().versions.end()) throw invalid("key version " + std::to_string(version) + " does not exist");
  const auto& v = it->second;
  if (!v.hmac_object_id.empty() || !v.hmac_sealed.empty()) return;
  if (key->record().exportable) {
    // Vault's size; sealed like the key's own material, under its own AAD.
    auto material = token_.random_secret(kVaultHmacKeyBytes);
    store_.set_version_hmac(ref.ns, ref.name, version, "",
                            master_seal_.seal(hmac_aad(ref.ns, key->record().id, version), material));
  } else {
    auto id = token_.new_object_id();
    std::string hex = encoding::hex_encode(id);
    std::string label = key->label_for(version) + "/hmac";
    begin_intent(hex, label, now_seconds());
    try {
      token_.generate_hmac_key(id, kTokenHmacKeyBytes, label);
      if (!store_.set_version_hmac(ref.ns, ref.name, version, hex, "")) throw std::runtime_error("lost a race");
    } catch (...) {
      try {
        token_.destroy_own(id);
        store_.remove_intent(hex);
      } catch (...) {
        // The intent stays; the sweeper removes the object later.
      }
      throw;
    }
    log::info("keys: made the HMAC key of " + ref.ns + "/" + ref.name + " v" + std::to_string(version));
  }
  invalidate(ref);
}

hsm::KeyHandle KeyService::hmac_handle(const KeyRef& ref, std::shared_ptr<const Key>& key, int version) {
  const store::VersionRecord* v = &key->record().versions.at(version);
  if (key->type() == KeyType::hmac) return material_handle(*key, *v);
  if (v->hmac_object_id.empty() && v->hmac_sealed.empty()) {
    ensure_hmac_key(ref, version);
    key = load_existing(ref);
    v = &key->record().versions.at(version);
  }
  if (!v->hmac_object_id.empty()) {
    auto id = encoding::hex_decode(v->hmac_object_id);
    if (!id) throw KeyError(ErrorKind::internal, "internal", "corrupt object id in the store");
    return *id;
  }
  std::string ns = key->record().ns, key_id = key->record().id, sealed = v->hmac_sealed;
  int number = v->version;
  return hsm::KeyHandle(session_id(v->id, "/hmac"), [this, ns, key_id, sealed, number] {
    auto pt = master_seal_.unseal(hmac_aad(ns, key_id, number), sealed);
    if (!pt) throw KeyError(ErrorKind::internal, "internal", "sealed HMAC key does not open");
    return hsm::session_secret_template(CKK_GENERIC_SECRET, padded_hmac_key(*pt), {CKA_SIGN, CKA_VERIFY});
  });
}

void KeyService::discard_version(const store::VersionRecord& v) noexcept {
  if (v.object_id.empty()) return;
  try {
    token_.destroy_own(*encoding::hex_decode(v.object_id));
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

// Sealing and opening under the master key: keys/master_seal.hpp (scheme chosen from the
// module's mechanisms and recorded in each blob).
std::string KeyService::seal_material(const store::KeyRecord& key, int version, const hsm::SecureBytes& material) {
  return master_seal_.seal(sealed_material_aad(key.ns, key.id, version), material);
}

hsm::SecureBytes KeyService::unseal_material(const store::KeyRecord& key, const store::VersionRecord& v) {
  auto pt = master_seal_.unseal(sealed_material_aad(key.ns, key.id, v.version), v.sealed);
  if (!pt)
    throw KeyError(ErrorKind::internal, "internal",
                   "sealed material of key " + key.id + " v" + std::to_string(v.version) + " does not open");
  return std::move(*pt);
}

CreateResult KeyService::create_key(const KeyRef& ref, const std::string& type_name, const std::string& created_by,
                                    bool derived, bool convergent) {
  auto type = parse_key_type(type_name);
  if (!type || !is_aes(*type))
    throw invalid((type ? "key type \"" + type_name + "\" cannot encrypt" : "unknown key type \"" + type_name + "\"") +
                      ": type must be one of " + encryption_key_types(),
                  "invalid_type");
  KeySpec spec;
  spec.type = type_name;
  spec.created_by = created_by;
  spec.derived = derived;
  spec.convergent = convergent;
  return create_key(ref, spec);
}

CreateResult KeyService::create_key(const KeyRef& ref, const KeySpec& spec) {
  return guarded([&] {
    validate_name(ref.name);
    auto type = parse_key_type(spec.type);
    if (!type)
      throw invalid("unknown key type \"" + spec.type + "\": type must be one of " + supported_key_types(), "invalid_type");
    if (*type != KeyType::standard)
      require_capability(hsm::CapabilityKind::key_type, key_type_name(*type), std::string("creating ") + (std::string("aeiou").find(spec.type[0]) != std::string::npos ? "an " : "a ") + spec.type + " key");
    if (*type == KeyType::standard || spec.exportable)
      require_capability(hsm::CapabilityKind::key_type, hsm::cap::kExportable,
                         "creating an exportable key (its material is sealed under the master key)");
    if (*type == KeyType::hmac) {
      if (spec.key_size != 0 && (spec.key_size < 16 || spec.key_size > 512))
        throw invalid("key_size must be between 16 and 512 bytes for hmac keys, not " + std::to_string(spec.key_size),
                      "invalid_key_size");
    }
    if (spec.convergent && !spec.derived)
      throw invalid("convergent encryption requires derivation to be enabled (set derived)", "invalid_argument");
    if (spec.derived) {
      if (*type == KeyType::ed25519)
        throw invalid("derived ed25519 keys are not supported: Vault derives an Ed25519 private key from the key "
                      "material in software, which a token-resident key does not allow", "unsupported_operation");
      if (!is_aes(*type))
        throw invalid("key derivation is only for encryption keys (aes128-gcm96, aes256-gcm96), not " + spec.type,
                      "unsupported_operation");
      require_capability(hsm::CapabilityKind::key_type, hsm::cap::kDerived, "creating a derived " + spec.type + " key");
      if (spec.convergent)
        require_capability(hsm::CapabilityKind::operation, hsm::cap::kConvergent,
                           "creating a key with convergent encryption");
    }
    if (spec.material) check_material(*type, *spec.material);
    std::lock_guard<std::mutex> lk(write_mu_);
    IntentScope intents(*this);
    if (auto existing = load(KeyRef{ref.ns, ref.name})) return CreateResult{existing->record(), false};
    require_name_not_elsewhere(ref);
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
    rec.exportable = *type == KeyType::standard || spec.exportable;
    if (*type == KeyType::hmac) rec.key_size = spec.key_size != 0 ? spec.key_size : 32;
    rec.derived = spec.derived;
    rec.convergent = spec.convergent;
    Key draft(rec);
    auto v1 = new_version(draft, 1, spec.material);
    rec.versions[1] = v1;
    try {
      store_.create_key(rec);
    } catch (const store::ConflictError&) {
      discard_version(v1);
      // Another instance created the name at the same moment: its key stands, and this
      // request answers as for any existing name.
      if (auto winner = store_.get_key(ref.ns, ref.name)) {
        invalidate(ref);
        return CreateResult{*winner, false};
      }
      throw;
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
      const std::string by_id = ns + '\0' + id;
      std::optional<std::string> name;
      if (limits_.cache_metadata) {
        std::lock_guard<std::mutex> lk(cache_mu_);
        auto it = names_by_id_.find(by_id);
        if (it != names_by_id_.end()) name = it->second;
      }
      // The name may since belong to another key (deleted, then made again): only the same id counts.
      if (name) {
        if (auto k = load(KeyRef{ns, *name}); k && k->record().id == id) return k->record();
      }
      if (auto r = store_.get_key_by_id(ns, id)) {
        if (limits_.cache_metadata) {
          std::lock_guard<std::mutex> lk(cache_mu_);
          if (names_by_id_.size() >= 65536) names_by_id_.clear();
          names_by_id_[by_id] = r->name;
        }
        return r;
      }
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
    if (change.auto_rotate_period && *change.auto_rotate_period > 0) {
      // Only keys the token can renew alone rotate by themselves.
      if (key->type() == KeyType::standard)
        throw invalid("key \"" + ref.name + "\" is of type " + next.type + ", which is not rotated", "unsupported_operation");
      if (next.imported)
        throw invalid("key \"" + ref.name + "\" was imported: only new material can rotate it, so it cannot rotate "
                      "itself", "unsupported_operation");
    }
    next.updated_at = now_seconds();
    store_.update_config(next);
    invalidate(ref);
    return load_existing(ref)->record();
  });
}

store::KeyRecord KeyService::rotate_key(const KeyRef& ref, const hsm::SecureBytes* material) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    IntentScope intents(*this);
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
    // Instances sharing a store may rotate the same key at once: the one whose version number
    // is taken discards its object and tries the next number, so every rotation lands once.
    for (int attempt = 1;; ++attempt) {
      int next = key->latest_version() + 1;
      auto v = new_version(*key, next, material);
      try {
        store_.add_version(ref.ns, ref.name, v);
      } catch (const store::ConflictError&) {
        discard_version(v);
        if (attempt >= kMaxRotateAttempts) throw;
        invalidate(ref);
        key = load_existing(ref);
        continue;
      } catch (...) {
        discard_version(v);
        throw;
      }
      invalidate(ref);
      log::info("keys: rotated key " + ref.ns + "/" + ref.name + " to v" + std::to_string(next));
      return load_existing(ref)->record();
    }
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
    invalidate(ref);
    destroy_for_intents(intents);
    log::info("keys: deleted key " + ref.ns + "/" + ref.name);
    auto tombstone = store_.get_key_by_id(ref.ns, key->record().id);
    if (!tombstone) throw KeyError(ErrorKind::internal, "internal", "deleted key left no tombstone");
    return *tombstone;
  });
}

Sealed KeyService::encrypt(const KeyRef& ref, const uint8_t* plaintext, size_t len, int key_version,
                           const std::vector<uint8_t>& aad, const std::vector<uint8_t>& context) {
  return guarded([&] {
    auto key = load_for_use(ref);
    key->require_state_for(KeyUse::encrypt, now_seconds());
    const auto& v = key->encryption_version(key_version);
    if (!key->record().derived) {
      auto iv = new_iv();
      auto sealed = token_.aes_gcm_encrypt(material_handle(*key, v), iv, aad, plaintext, len);
      usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
      return Sealed{format_transit_ciphertext(v.version, iv, sealed), v.version};
    }
    auto handle = derived_handle(*key, v, context, false);
    std::vector<uint8_t> iv;
    if (key->record().convergent) {
      // The nonce is an HMAC, in the token, of the associated data and the plaintext under a
      // second key derived from the context: same inputs, same ciphertext; a different AAD
      // never reuses a nonce.
      std::vector<uint8_t> input(8);
      uint64_t n = aad.size();
      for (int i = 7; i >= 0; --i, n >>= 8) input[i] = static_cast<uint8_t>(n & 0xff);
      input.insert(input.end(), aad.begin(), aad.end());
      input.insert(input.end(), plaintext, plaintext + len);
      auto mac = token_.hmac(derived_handle(*key, v, context, true), CKM_SHA256_HMAC, input.data(), input.size());
      OPENSSL_cleanse(input.data(), input.size());
      iv.assign(mac.begin(), mac.begin() + 12);
    } else {
      iv = new_iv();
    }
    auto sealed = token_.aes_gcm_encrypt(handle, iv, aad, plaintext, len);
    usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
    return Sealed{format_transit_ciphertext(v.version, iv, sealed), v.version};
  });
}

std::vector<ItemResult<Sealed>> KeyService::encrypt_batch(const KeyRef& ref, const std::vector<EncryptItem>& items) {
  std::vector<ItemResult<Sealed>> out(items.size());
  auto turn = token_.batch_scope();
  auto one_by_one = [&] {
    for (size_t i = 0; i < items.size(); ++i) {
      turn.next_item();
      const auto& it = items[i];
      run_item(out[i], [&] { out[i].value = encrypt(ref, it.plaintext, it.len, it.key_version, it.aad, it.context); });
    }
    return std::move(out);
  };
  std::shared_ptr<const Key> key;
  try {
    key = guarded([&] { return load_for_use(ref); });
  } catch (const KeyError& e) {
    if (e.kind() != ErrorKind::invalid_argument) throw;
    return one_by_one();  // each item gets its 400 (no such key, not an AES key), as one by one
  }
  // A derived key's items each need the key of their context: encrypt's own path.
  if (key->record().derived) return one_by_one();
  return guarded([&] {
    key->require_state_for(KeyUse::encrypt, now_seconds());
    std::map<int, std::vector<size_t>> by_version;
    for (size_t i = 0; i < items.size(); ++i)
      run_item(out[i], [&] { by_version[key->encryption_version(items[i].key_version).version].push_back(i); });
    for (const auto& [version, which] : by_version) {
      std::vector<std::vector<uint8_t>> ivs(which.size());
      std::vector<hsm::GcmMessage> batch;
      batch.reserve(which.size());
      for (size_t k = 0; k < which.size(); ++k) {
        const auto& it = items[which[k]];
        ivs[k] = new_iv();
        batch.push_back({&ivs[k], &it.aad, it.plaintext, it.len});
      }
      auto sealed = token_.aes_gcm_encrypt_batch(material_handle(*key, key->encryption_version(version)), batch, turn);
      for (size_t k = 0; k < which.size(); ++k)
        out[which[k]].value = Sealed{format_transit_ciphertext(version, ivs[k], sealed[k]), version};
    }
    if (!by_version.empty()) usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
    return std::move(out);
  });
}

hsm::SecureBytes KeyService::decrypt(const KeyRef& ref, const std::string& ciphertext,
                                     const std::vector<uint8_t>& aad, const std::vector<uint8_t>& context) {
  return guarded([&] {
    auto key = load_for_use(ref);
    key->require_state_for(KeyUse::decrypt, now_seconds());
    auto ct = parse_transit_ciphertext(ciphertext);
    const auto& v = key->decryption_version(ct.version);
    auto handle = key->record().derived ? derived_handle(*key, v, context, false) : material_handle(*key, v);
    auto pt = token_.aes_gcm_decrypt(handle, ct.iv, aad, ct.sealed.data(), ct.sealed.size());
    if (!pt) throw invalid("invalid ciphertext: message authentication failed", "decryption_failed");
    usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
    return std::move(*pt);
  });
}

Sealed KeyService::rewrap(const KeyRef& ref, const std::string& ciphertext, int key_version,
                          const std::vector<uint8_t>& aad, const std::vector<uint8_t>& context) {
  return guarded([&] {
    auto pt = decrypt(ref, ciphertext, aad, context);
    return encrypt(ref, pt.data(), pt.size(), key_version, aad, context);
  });
}

DataKey KeyService::generate_data_key(const KeyRef& ref, int bits, int key_version,
                                      const std::vector<uint8_t>& context) {
  return guarded([&] {
    if (bits != 128 && bits != 256 && bits != 512)
      throw invalid("invalid bits " + std::to_string(bits) + ": bits must be 128, 256 or 512", "invalid_bits");
    auto key = load_for_use(ref);
    key->require_state_for(KeyUse::encrypt, now_seconds());
    key->encryption_version(key_version);  // refuse before drawing randomness
    if (key->record().derived && context.empty()) derived_handle(*key, key->encryption_version(key_version), context, false);
    DataKey dk;
    dk.plaintext = token_.random_secret(static_cast<size_t>(bits / 8));
    dk.sealed = encrypt(ref, dk.plaintext.data(), dk.plaintext.size(), key_version, {}, context);
    return dk;
  });
}

std::shared_ptr<const Key> KeyService::load_wrapping_key(const KeyRef& ref, KeyUse use) {
  auto key = load_existing(ref);
  key->require_state_for(use, now_seconds());
  if (!is_aes(key->type()))
    throw invalid("key \"" + ref.name + "\" is a standard key; wrap, unwrap and rewrap need a root key",
                  "unsupported_operation");
  if (key->record().derived)
    throw invalid("key \"" + ref.name + "\" is a derived transit key: it encrypts only with a context, through "
                  "transit", "unsupported_operation");
  require_capability(hsm::CapabilityKind::operation, hsm::cap::kWrap,
                     std::string(use == KeyUse::encrypt ? "wrapping" : "unwrapping") + " with key \"" + ref.name + "\"");
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
    usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
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
    usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
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

std::shared_ptr<const Key> KeyService::load_for_signing(const KeyRef& ref) {
  auto k = load(ref);
  if (!k) throw invalid("signing key not found: no key named \"" + ref.name + "\"", "key_not_found");
  if (!is_asymmetric(k->type()))
    throw invalid("key \"" + ref.name + "\" is of type " + k->record().type + ", which does not support signing",
                  "unsupported_operation");
  return k;
}

SignResult KeyService::sign(const KeyRef& ref, const std::vector<uint8_t>& input, const SignOptions& o, int key_version) {
  return guarded([&] {
    auto key = load_for_signing(ref);
    key->require_state_for(KeyUse::encrypt, now_seconds());
    KeyType type = key->type();
    const auto& v = key->encryption_version(key_version);
    std::vector<uint8_t> sig;
    std::string encoded;
    if (type == KeyType::ed25519) {
      if (o.prehashed) throw invalid("prehashed input is not supported for ed25519 keys (Ed25519 signs the message itself)");
      require_capability(hsm::CapabilityKind::operation, hsm::cap::kSignEd25519, "signing with ed25519 key \"" + ref.name + "\"");
      sig = token_.sign(material_handle(*key, v), CKM_EDDSA, nullptr, 0, input.data(), input.size());
    } else if (is_ecdsa(type)) {
      if (o.marshaling_algorithm != "asn1" && o.marshaling_algorithm != "jws")
        throw invalid("unsupported marshaling_algorithm \"" + o.marshaling_algorithm + "\": use asn1 or jws");
      if (o.hash_algorithm == "none") throw invalid("hash_algorithm none is only for RSA PKCS#1 v1.5 signatures");
      size_t n = hash_size(o.hash_algorithm);
      if (o.prehashed && input.size() != n)
        throw invalid("prehashed input must be " + std::to_string(n) + " bytes for " + o.hash_algorithm + ", not " +
                      std::to_string(input.size()));
      auto digest = o.prehashed ? input : hash_input(o.hash_algorithm, input);
      require_capability(hsm::CapabilityKind::operation, hsm::cap::kSignEcdsa, "signing with ECDSA key \"" + ref.name + "\"");
      auto raw = token_.sign(material_handle(*key, v), CKM_ECDSA, nullptr, 0, digest.data(), digest.size());
      if (o.marshaling_algorithm == "jws") encoded = base64url_nopad(raw);
      else sig = ecdsa_raw_to_der(raw);
    } else {  // RSA
      std::string alg = o.signature_algorithm.empty() ? "pss" : o.signature_algorithm;
      if (alg != "pss" && alg != "pkcs1v15")
        throw invalid("unsupported signature_algorithm \"" + alg + "\": use pss or pkcs1v15");
      std::vector<uint8_t> digest;
      if (o.hash_algorithm == "none") {
        if (alg != "pkcs1v15") throw invalid("hash_algorithm none needs signature_algorithm pkcs1v15");
        if (!o.prehashed) throw invalid("hash_algorithm none needs prehashed input");
        digest = input;
      } else {
        size_t n = hash_size(o.hash_algorithm);
        if (o.prehashed && input.size() != n)
          throw invalid("prehashed input must be " + std::to_string(n) + " bytes for " + o.hash_algorithm + ", not " +
                        std::to_string(input.size()));
        digest = o.prehashed ? input : hash_input(o.hash_algorithm, input);
      }
      if (alg == "pss") {
        CK_RSA_PKCS_PSS_PARAMS params{pkcs11_hash(o.hash_algorithm), pkcs11_mgf(o.hash_algorithm), 0};
        params.sLen = pss_salt_length(o.salt_length, rsa_modulus_bits(v.public_key), digest.size());
        // CKM_RSA_PKCS_PSS over the digest computed above: the same signature as
        // CKM_SHA*_RSA_PKCS_PSS (which p11-kit's remoting drops), the key still in the token.
        require_capability(hsm::CapabilityKind::operation, hsm::cap::kSignRsaPss, "RSA-PSS signing with key \"" + ref.name + "\"");
        sig = token_.sign(material_handle(*key, v), CKM_RSA_PKCS_PSS, &params, sizeof params, digest.data(), digest.size());
      } else {
        auto data = o.hash_algorithm == "none" ? digest : digest_info(o.hash_algorithm, digest);
        require_capability(hsm::CapabilityKind::operation, hsm::cap::kSignRsaPkcs1, "PKCS#1 v1.5 signing with key \"" + ref.name + "\"");
        sig = token_.sign(material_handle(*key, v), CKM_RSA_PKCS, nullptr, 0, data.data(), data.size());
      }
    }
    if (encoded.empty()) encoded = encoding::base64_encode(sig);
    usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
    return SignResult{"vault:v" + std::to_string(v.version) + ":" + encoded, v.version};
  });
}

void KeyService::sign_as_token_benchmark(const KeyRef& ref) {
  guarded([&] {
    static const std::vector<uint8_t> kBytes(32, 0x5a);
    auto key = load_for_signing(ref);
    const auto& v = key->encryption_version(0);
    KeyType type = key->type();
    if (type == KeyType::ed25519) {
      token_.sign(material_handle(*key, v), CKM_EDDSA, nullptr, 0, kBytes.data(), kBytes.size());
    } else if (is_ecdsa(type)) {
      auto digest = hash_input("sha2-256", kBytes);
      token_.sign(material_handle(*key, v), CKM_ECDSA, nullptr, 0, digest.data(), digest.size());
    } else {
      auto digest = hash_input("sha2-256", kBytes);
      CK_RSA_PKCS_PSS_PARAMS params{CKM_SHA256, CKG_MGF1_SHA256, 0};
      params.sLen = pss_salt_length("auto", rsa_modulus_bits(v.public_key), digest.size());
      token_.sign(material_handle(*key, v), CKM_RSA_PKCS_PSS, &params, sizeof params, digest.data(), digest.size());
    }
  });
}

bool KeyService::verify(const KeyRef& ref, const std::vector<uint8_t>& input, const SignOptions& o,
                        const std::string& signature) {
  return guarded([&] {
    auto key = load_for_signing(ref);
    key->require_state_for(KeyUse::decrypt, now_seconds());
    auto [version, payload] = split_vault_value(signature, "signature");
    const auto& v = key->decryption_version(version);
    KeyType type = key->type();
    bool jws = is_ecdsa(type) && o.marshaling_algorithm == "jws";
    if (is_ecdsa(type) && !jws && o.marshaling_algorithm != "asn1")
      throw invalid("unsupported marshaling_algorithm \"" + o.marshaling_algorithm + "\": use asn1 or jws");
    if (is_rsa(type) && !o.signature_algorithm.empty() && o.signature_algorithm != "pss" && o.signature_algorithm != "pkcs1v15")
      throw invalid("unsupported signature_algorithm \"" + o.signature_algorithm + "\": use pss or pkcs1v15");
    if (type != KeyType::ed25519 && o.hash_algorithm != "none") {
      size_t n = hash_size(o.hash_algorithm);  // 400 for unknown names
      if (o.prehashed && input.size() != n)
        throw invalid("prehashed input must be " + std::to_string(n) + " bytes for " + o.hash_algorithm);
    }
    auto bytes = jws ? base64url_decode(payload) : encoding::base64_decode(payload);
    if (!bytes) throw invalid("invalid signature: it is not valid " + std::string(jws ? "base64url" : "base64"));
    return verify_signature(type, v.public_key, o, input, *bytes);
  });
}

SignResult KeyService::hmac(const KeyRef& ref, const std::vector<uint8_t>& input, const std::string& algorithm,
                            int key_version) {
  return guarded([&] {
    auto mech = hmac_mechanism(algorithm);
    if (!token_.capabilities()->has(mech, CKF_SIGN))
      throw invalid("HMAC with " + algorithm + " needs " + hsm::mechanism_name(mech) +
                    " (sign), which the token's PKCS#11 module does not offer; p11kms never does it outside the token",
                    "mechanism_unavailable");
    auto key = load(ref);
    if (!key) throw invalid("HMAC key not found: no key named \"" + ref.name + "\"", "key_not_found");
    if (key->type() == KeyType::standard) throw invalid("key \"" + ref.name + "\" is a standard key; it has no HMAC key");
    key->require_state_for(KeyUse::encrypt, now_seconds());
    int version = key->encryption_version(key_version).version;
    auto handle = hmac_handle(ref, key, version);
    auto mac = token_hmac(token_, handle, mech, input, algorithm);
    usage_.record(ref.ns, key->record().id);  // BYOK IN_USE
    return SignResult{"vault:v" + std::to_string(version) + ":" + encoding::base64_encode(mac), version};
  });
}

bool KeyService::verify_hmac(const KeyRef& ref, const std::vector<uint8_t>& input, const std::string& algorithm,
                             const std::string& hmac_value) {
  return guarded([&] {
    auto mech = hmac_mechanism(algorithm);
    auto key = load(ref);
    if (!key) throw invalid("HMAC key not found: no key named \"" + ref.name + "\"", "key_not_found");
    if (key->type() == KeyType::standard) throw invalid("key \"" + ref.name + "\" is a standard key; it has no HMAC key");
    key->require_state_for(KeyUse::decrypt, now_seconds());
    auto [version, payload] = split_vault_value(hmac_value, "hmac");
    key->decryption_version(version);
    auto expected = encoding::base64_decode(payload);
    if (!expected) throw invalid("invalid hmac: it is not valid base64");
    auto handle = hmac_handle(ref, key, version);
    auto mac = token_hmac(token_, handle, mech, input, algorithm);
    return mac.size() == expected->size() && CRYPTO_memcmp(mac.data(), expected->data(), mac.size()) == 0;
  });
}

ExportResult KeyService::export_key(const KeyRef& ref, const std::string& export_type, const std::string& version) {
  return guarded([&] {
    if (export_type != "encryption-key" && export_type != "signing-key" && export_type != "hmac-key")
      throw invalid("invalid export type \"" + export_type + "\": use encryption-key, signing-key or hmac-key");
    auto key = load_existing(ref);
    KeyType type = key->type();
    if (!key->record().exportable || type == KeyType::standard)
      throw invalid("key \"" + ref.name + "\" is not exportable: it was created without exportable, so it exists only "
                    "inside the token", "not_exportable");
    if (export_type == "encryption-key" && !is_aes(type))
      throw invalid("encryption-key export: key \"" + ref.name + "\" (" + key->record().type + ") is not an encryption key");
    if (export_type == "signing-key" && !is_asymmetric(type))
      throw invalid("signing-key export: key \"" + ref.name + "\" (" + key->record().type + ") is not a signing key");
    key->require_state_for(KeyUse::read_material, now_seconds());
    std::vector<int> versions;
    if (version.empty()) {
      for (const auto& [n, v] : key->record().versions)
        if (n >= key->record().min_decryption_version) versions.push_back(n);
    } else if (version == "latest") {
      versions.push_back(key->latest_version());
    } else {
      if (version.size() > 9 || version.find_first_not_of("0123456789") != std::string::npos)
        throw invalid("invalid version \"" + version + "\": use a number or latest");
      int n = std::stoi(version);
      if (n == 0) n = key->latest_version();
      key->decryption_version(n);  // exists, not below min_decryption_version
      versions.push_back(n);
    }
    ExportResult out;
    out.name = ref.name;
    out.type = key->record().type;
    for (int n : versions) {
      if (export_type == "hmac-key" && type != KeyType::hmac) {
        auto v = key->record().versions.at(n);
        if (v.hmac_sealed.empty()) {
          ensure_hmac_key(ref, n);
          key = load_existing(ref);
          v = key->record().versions.at(n);
        }
        auto pt = master_seal_.unseal(hmac_aad(ref.ns, key->record().id, n), v.hmac_sealed);
        if (!pt) throw KeyError(ErrorKind::internal, "internal", "sealed HMAC key does not open");
        out.keys[n] = encoding::base64_encode(pt->data(), pt->size());
        continue;
      }
      auto material = unseal_material(key->record(), key->record().versions.at(n));
      out.keys[n] = is_asymmetric(type) ? export_private_key(type, material)
                                        : encoding::base64_encode(material.data(), material.size());
    }
    log::info("keys: exported " + export_type + " of " + ref.ns + "/" + ref.name);
    return out;
  });
}

std::vector<uint8_t> KeyService::random_bytes(size_t n) {
  return guarded([&] { return token_.random(n); });
}

void KeyService::heartbeat() {
  std::vector<std::string> ids;
  {
    std::lock_guard<std::mutex> lk(inflight_mu_);
    ids.assign(inflight_.begin(), inflight_.end());
  }
  int64_t now = now_seconds();
  store_.heartbeat(limits_.cluster.instance_id, now);
  store_.renew_intents(limits_.cluster.instance_id, ids, now + limits_.cluster.intent_lease_s);
}

void KeyService::retire() noexcept {
  try {
    store_.remove_instance(limits_.cluster.instance_id);
  } catch (const std::exception& e) {
    log::warn(std::string("keys: heartbeat row not removed: ") + e.what());
  }
}

SweepReport KeyService::sweep() {
  return guarded([&] {
    // No write_mu_: another instance's writes race with this anyway. Intents in flight are
    // protected by their leases, claims are atomic in the store, and destroying an object
    // twice is harmless.
    std::lock_guard<std::mutex> one(sweep_mu_);
    SweepReport report;
    const auto& cluster = limits_.cluster;
    const std::string& me = cluster.instance_id;
    const int64_t now = now_seconds();
    // Another instance is alive while its latest heartbeat is within three intervals. With a
    // store only this process writes, no other owner is.
    const int64_t alive_since =
        cluster.shared_store ? now - 3 * cluster.heartbeat_s : std::numeric_limits<int64_t>::max();
    std::set<std::string> alive;
    if (cluster.shared_store)
      for (const auto& i : store_.list_instances())
        if (i.last_seen >= alive_since) alive.insert(i.id);

    // Objects first, then intents, then versions: an object listed here had its intent
    // committed before it was created, so when the intents are read it still has one, or its
    // metadata committed (and the versions read after show it), or it was destroyed.
    auto objects = token_.list_key_objects();
    auto intents = store_.list_intents();
    auto versions = store_.all_versions();
    std::set<std::string> referenced, present, intended;
    for (const auto& v : versions) referenced.insert(v.object_id);
    for (const auto& o : objects) present.insert(encoding::hex_encode(o.id));

    std::vector<store::Intent> to_destroy;
    for (const auto& intent : intents) {
      intended.insert(intent.object_id);
      if (referenced.count(intent.object_id)) {
        if (intent.doomed) {
          // Never destroy what metadata names; say so instead.
          log::error("sweep: object " + intent.object_id + " (" + intent.label +
                     ") has a destroy intent but metadata still names it; left in place");
          continue;
        }
        store_.remove_intent(intent.object_id);
        ++report.intents_settled;
        continue;
      }
      if (!intent.doomed) {
        bool mine_or_orphaned = intent.owner == me || !alive.count(intent.owner);
        bool lease_over = intent.lease_expires <= now || (!cluster.shared_store && intent.owner != me);
        if (!mine_or_orphaned || !lease_over) {
          ++report.intents_waiting;
          continue;
        }
      }
      // A store only this process writes: a previous run's intent is over whatever its lease.
      int64_t at = !cluster.shared_store && intent.owner != me ? std::numeric_limits<int64_t>::max() : now;
      if (!store_.claim_intent(intent.object_id, me, at, alive_since)) {
        ++report.intents_waiting;  // settled meanwhile, or renewed by its owner
        continue;
      }
      if (present.count(intent.object_id)) ++report.orphans_destroyed;
      if (!intent.doomed)
        log::warn("sweep: destroying object " + intent.object_id + " (" + intent.label + "): its intent's lease expired" +
                  (intent.owner == me ? "" : " and its owner " + (intent.owner.empty() ? std::string("(none)") : intent.owner) +
                                                 " is not alive") + ", and no metadata names it");
      to_destroy.push_back(intent);
    }
    destroy_for_intents(to_destroy);

    // What looks wrong is checked again before it is reported: a write may have landed between
    // the reads above (a version committed after the object listing, a key deleted since).
    std::vector<std::pair<std::string, std::string>> unknown;  // hex, label
    for (const auto& o : objects) {
      std::string hex = encoding::hex_encode(o.id);
      if (o.label.rfind("p11kms/", 0) == 0 && !referenced.count(hex) && !intended.count(hex)) unknown.emplace_back(hex, o.label);
    }
    std::vector<store::MetadataStore::VersionRef> absent;
    for (const auto& v : versions)
      if (!present.count(v.object_id)) absent.push_back(v);
    if (!unknown.empty() || !absent.empty()) {
      std::set<std::string> now_present;
      for (const auto& o : token_.list_key_objects()) now_present.insert(encoding::hex_encode(o.id));
      if (!unknown.empty()) {
        std::set<std::string> explained;
        for (const auto& i : store_.list_intents()) explained.insert(i.object_id);
        for (const auto& v : store_.all_versions()) explained.insert(v.object_id);
        for (const auto& [hex, label] : unknown) {
          if (!now_present.count(hex) || explained.count(hex)) continue;
          // Never destroyed blindly: another deployment may share the token.
          ++report.unknown_objects;
          log::warn("sweep: token object " + hex + " (" + label + ") is not known to this store; left in place");
        }
      }
      for (const auto& v : absent) {
        if (now_present.count(v.object_id)) continue;
        // SoftHSM skips an object whose file another session is rewriting at that moment: a
        // lookup by CKA_ID, tried a few times, is what decides.
        bool found = false;
        if (auto id = encoding::hex_decode(v.object_id))
          for (int attempt = 0; attempt < 3 && !found; ++attempt) {
            if (attempt) std::this_thread::sleep_for(std::chrono::milliseconds(50));
            found = token_.exists(*id);
          }
        if (found) continue;
        auto key = store_.get_key(v.ns, v.name);
        bool still_named = false;
        if (key)
          if (auto it = key->versions.find(v.version); it != key->versions.end())
            still_named = it->second.object_id == v.object_id || it->second.hmac_object_id == v.object_id;
        if (!still_named) continue;
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
  for (const auto& c : token_.capabilities()->table()) {
    if (c.available()) continue;
    std::vector<std::string> missing;
    for (const auto& n : c.missing) missing.push_back(n.describe());
    h.unavailable_operations.emplace_back(c.id(), std::move(missing));
  }
  try {
    store_.schema_version();  // one round trip: answers only while the database does
  } catch (const std::exception& e) {
    h.store_reachable = false;
    h.store_error = "the metadata store is unavailable";
    log::warn(std::string("health: ") + e.what());
  }
  std::lock_guard<std::mutex> lk(missing_mu_);
  h.missing_objects = missing_;
  return h;
}

}  // namespace p11kms::keys

// -- Vault's secure import (BYOK) and trim ----------------------------------------------------

namespace p11kms::keys {
namespace {

CK_MECHANISM_TYPE oaep_hash_of(const std::string& name) {
  std::string n;
  for (char c : name) n += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (n == "SHA1") return CKM_SHA_1;
  if (n == "SHA224") return CKM_SHA224;
  if (n == "SHA256") return CKM_SHA256;
  if (n == "SHA384") return CKM_SHA384;
  if (n == "SHA512") return CKM_SHA512;
  throw invalid("unsupported hash_function \"" + name + "\": use SHA1, SHA224, SHA256, SHA384 or SHA512");
}

}  // namespace

// The transit wrapping key: an RSA-4096 pair made in the token on first use; its CKA_ID and
// public PEM are one setting, written only if absent, so concurrent instances agree on one key
// (a loser destroys its own).
const hsm::ObjectId& KeyService::wrapping_key() {
  std::lock_guard<std::mutex> lk(master_mu_);
  if (!wrapping_key_id_.empty()) return wrapping_key_id_;
  const char* setting = "keys.transit_wrapping_key";
  auto value = store_.get_setting(setting);
  if (!value) {
    auto id = token_.new_object_id();
    auto spki = token_.generate_wrapping_key_pair(id, "p11kms-system/transit-wrapping-key", 4096);
    std::string mine = encoding::hex_encode(id) + "\n" + public_key_pem(spki);
    value = store_.put_setting_if_absent(setting, mine);
    if (*value != mine) token_.destroy_own(id);
    else log::info("keys: created the RSA-4096 wrapping key for transit imports");
  }
  auto id = encoding::hex_decode(value->substr(0, value->find('\n')));
  if (!id || value->find('\n') == std::string::npos)
    throw KeyError(ErrorKind::internal, "internal", "corrupt wrapping key setting in the store");
  wrapping_key_id_ = *id;
  return wrapping_key_id_;
}

std::string KeyService::wrapping_public_key() {
  return guarded([&] {
    wrapping_key();
    auto value = store_.get_setting("keys.transit_wrapping_key");
    if (!value) throw KeyError(ErrorKind::internal, "internal", "the wrapping key setting is gone");
    return value->substr(value->find('\n') + 1);
  });
}

// Intent first, as for generated versions; C_UnwrapKey makes the token object from the blob.
store::VersionRecord KeyService::import_version_object(const Key& key, int version, const WrappedImport& wrapped) {
  KeyType type = key.type();
  auto hash = oaep_hash_of(wrapped.hash_function);
  const auto& wrapping = wrapping_key();
  auto id = token_.new_object_id();
  std::string label = key.label_for(version);
  store::VersionRecord v;
  v.version = version;
  v.id = uuid::new_v4();
  v.object_id = encoding::hex_encode(id);
  v.created_at = now_seconds();
  begin_intent(v.object_id, label, v.created_at);
  try {
    if (is_asymmetric(type)) {
      auto spec = pair_spec(type);
      auto t = hsm::token_private_key_template(spec.kind, id, label);
      auto made = token_.import_wrapped(wrapping, wrapped.ciphertext, hash, t, &spec);
      v.public_key = public_key_pem(made.spki);
    } else {
      auto t = type == KeyType::hmac     ? hsm::token_secret_template(CKK_GENERIC_SECRET, id, label, {CKA_SIGN, CKA_VERIFY})
               : key.record().derived ? hsm::token_secret_template(CKK_AES, id, label, {CKA_DERIVE})
                                      : hsm::token_secret_template(CKK_AES, id, label, {CKA_ENCRYPT, CKA_DECRYPT});
      auto made = token_.import_wrapped(wrapping, wrapped.ciphertext, hash, t, nullptr,
                                        type == KeyType::hmac ? 0 : key_type_bytes(type));
      bool ok = type == KeyType::hmac ? made.value_len >= 16 && made.value_len <= 519
                                      : made.value_len == key_type_bytes(type);
      if (!ok)
        throw invalid("invalid import: the unwrapped key is " + std::to_string(made.value_len) + " bytes, which is not a " +
                          key_type_name(type) + " key (" +
                          (type == KeyType::hmac ? std::string("16 to 512 bytes")
                                                 : std::to_string(key_type_bytes(type)) + " bytes") + ")",
                      "invalid_payload");
    }
  } catch (...) {
    try {
      token_.destroy_own(id);
      store_.remove_intent(v.object_id);
    } catch (...) {
      // The intent stays; the sweeper removes the object later.
    }
    throw;
  }
  return v;
}

CreateResult KeyService::import_key(const KeyRef& ref, const KeySpec& spec, const WrappedImport& wrapped) {
  return guarded([&] {
    validate_name(ref.name);
    auto type = parse_key_type(spec.type);
    if (!type || *type == KeyType::standard)
      throw invalid("unknown key type \"" + spec.type + "\": type must be one of " + supported_key_types(), "invalid_type");
    oaep_hash_of(wrapped.hash_function);
    if (wrapped.ciphertext.empty()) throw invalid("missing ciphertext: the wrapped key to import");
    require_capability(hsm::CapabilityKind::operation, hsm::cap::kImportOp, "importing a " + spec.type + " key");
    require_capability(hsm::CapabilityKind::key_type, key_type_name(*type), "importing a " + spec.type + " key");
    if (spec.exportable)
      require_capability(hsm::CapabilityKind::key_type, hsm::cap::kExportable, "importing an exportable key");
    if (spec.convergent && !spec.derived) throw invalid("convergent encryption requires derivation to be enabled (set derived)");
    if (spec.derived && !is_aes(*type))
      throw invalid("key derivation is only for encryption keys (aes128-gcm96, aes256-gcm96), not " + spec.type,
                    "unsupported_operation");
    if (*type == KeyType::ed25519 && !spec.exportable)
      throw invalid("importing a non-exportable ed25519 key is not possible with this token: its PKCS#11 module "
                    "cannot unwrap Ed25519 private keys (SoftHSM: CKR_FUNCTION_FAILED); import it with exportable "
                    "set, or use another key type", "mechanism_unavailable");
    std::lock_guard<std::mutex> lk(write_mu_);
    IntentScope intents(*this);
    if (load(KeyRef{ref.ns, ref.name}))
      throw invalid("key \"" + ref.name + "\" already exists: the import path cannot be used with an existing key; "
                    "use import_version to add a version to an imported key", "key_exists");
    require_name_not_elsewhere(ref);
    store::KeyRecord rec;
    rec.id = uuid::new_v4();
    rec.ns = ref.ns;
    rec.name = ref.name;
    rec.type = key_type_name(*type);
    rec.created_at = rec.updated_at = now_seconds();
    rec.created_by = spec.created_by;
    rec.imported = true;
    rec.exportable = spec.exportable;
    rec.derived = spec.derived;
    rec.convergent = spec.convergent;
    Key draft(rec);
    store::VersionRecord v1;
    if (spec.exportable) {
      // Its owner may read it anyway: unwrapped in the token into a short-lived session object,
      // read once and sealed under the master key like any exportable key's material.
      auto material = token_.import_wrapped_material(wrapping_key(), wrapped.ciphertext, oaep_hash_of(wrapped.hash_function));
      if (*type == KeyType::hmac && (material.size() < 16 || material.size() > 512))
        throw invalid("invalid import: an hmac key must be 16 to 512 bytes, not " + std::to_string(material.size()),
                      "invalid_payload");
      check_material(*type, material);
      if (*type == KeyType::hmac) rec.key_size = static_cast<int>(material.size());
      v1 = new_version(draft, 1, &material);
    } else {
      v1 = import_version_object(draft, 1, wrapped);
      if (*type == KeyType::hmac) rec.key_size = 0;  // set below from the object
    }
    rec.versions[1] = v1;
    try {
      store_.create_key(rec);
    } catch (...) {
      discard_version(v1);
      throw;
    }
    invalidate(ref);
    log::info("keys: imported key " + ref.ns + "/" + ref.name + " (" + rec.type + ")");
    return CreateResult{rec, true};
  });
}

store::KeyRecord KeyService::import_key_version(const KeyRef& ref, const WrappedImport& wrapped) {
  return guarded([&] {
    oaep_hash_of(wrapped.hash_function);
    if (wrapped.ciphertext.empty()) throw invalid("missing ciphertext: the wrapped key to import");
    std::lock_guard<std::mutex> lk(write_mu_);
    IntentScope intents(*this);
    auto key = load_existing(ref);
    key->require_state_for(KeyUse::rotate, now_seconds());
    KeyType type = key->type();
    if (!key->record().imported || type == KeyType::standard)
      throw invalid("key \"" + ref.name + "\" was not imported: import_version is only for imported keys "
                    "(a generated key gets new versions from rotate)", "unsupported_operation");
    if (type == KeyType::ed25519 && !key->record().exportable)
      throw invalid("the token's PKCS#11 module cannot unwrap Ed25519 private keys", "mechanism_unavailable");
    int next = key->latest_version() + 1;
    store::VersionRecord v;
    if (key->record().exportable) {
      auto material = token_.import_wrapped_material(wrapping_key(), wrapped.ciphertext, oaep_hash_of(wrapped.hash_function));
      if (type == KeyType::hmac && (material.size() < 16 || material.size() > 512))
        throw invalid("invalid import: an hmac key must be 16 to 512 bytes, not " + std::to_string(material.size()),
                      "invalid_payload");
      check_material(type, material);
      v = new_version(*key, next, &material);
    } else {
      v = import_version_object(*key, next, wrapped);
    }
    try {
      store_.add_version(ref.ns, ref.name, v);
    } catch (...) {
      discard_version(v);
      throw;
    }
    invalidate(ref);
    log::info("keys: imported version " + std::to_string(next) + " of " + ref.ns + "/" + ref.name);
    return load_existing(ref)->record();
  });
}

}  // namespace p11kms::keys

namespace p11kms::keys {

store::KeyRecord KeyService::trim_key(const KeyRef& ref, int min_available_version) {
  return guarded([&] {
    std::lock_guard<std::mutex> lk(write_mu_);
    auto key = load_existing(ref);
    const auto& r = key->record();
    int n = min_available_version;
    if (n <= 0) throw invalid("min_available_version must be a positive version number", "invalid_argument");
    if (r.min_encryption_version == 0)
      throw invalid("min_encryption_version must be set (it is 0, the latest) before trimming: set it with the key's "
                    "config, at least " + std::to_string(n));
    if (n > r.min_decryption_version)
      throw invalid("min_available_version (" + std::to_string(n) + ") cannot be greater than min_decryption_version (" +
                    std::to_string(r.min_decryption_version) + ")");
    if (n > r.min_encryption_version)
      throw invalid("min_available_version (" + std::to_string(n) + ") cannot be greater than min_encryption_version (" +
                    std::to_string(r.min_encryption_version) + ")");
    if (n < r.min_available_version)
      throw invalid("min_available_version cannot be decreased: it is " + std::to_string(r.min_available_version));
    auto intents = store_.trim_versions(ref.ns, ref.name, n);
    invalidate(ref);
    for (const auto& [number, v] : r.versions)
      if (number < n) {
        try {
          token_.drop_session_objects(hsm::ObjectId(v.id.begin(), v.id.end()));
        } catch (const std::exception&) {
          // Session objects die with their sessions; the store no longer names this version.
        }
      }
    destroy_for_intents(intents);
    log::info("keys: trimmed key " + ref.ns + "/" + ref.name + " below v" + std::to_string(n) + " (" +
              std::to_string(intents.size()) + " token objects)");
    return load_existing(ref)->record();
  });
}

}  // namespace p11kms::keys
