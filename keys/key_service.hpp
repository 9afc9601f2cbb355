// KeyService: every key operation of every dialect. It owns the rules (names, versions,
// lifecycle, crash-safe creation) and calls the token (hsm/) and the metadata store (store/)
// through their interfaces. It knows nothing of HTTP.
#pragma once

#include <memory>
#include <optional>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "hsm/secret.hpp"
#include "hsm/token.hpp"
#include "keys/key.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

struct KeyRef {
  std::string ns = "root";
  std::string name;
  // When set, the key found by name must have this id (else 404): a caller that resolved an id
  // never acts on a different key created later under the same name.
  std::string id = {};
};

// What a new key is. `material` imports (the caller wipes it); otherwise the token generates.
struct KeySpec {
  std::string type = "aes256-gcm96";
  std::string description;
  int64_t expires_at = 0;  // unix seconds; 0 = never
  std::string created_by;
  const hsm::SecureBytes* material = nullptr;
};

// Envelope wrapping (Key Protect's wrap/unwrap/rewrap): limits of the caller's input.
constexpr size_t kMaxWrapPlaintextBytes = 4096;
constexpr size_t kMaxWrapAadEntries = 126;
constexpr size_t kMaxWrapAadEntryBytes = 255;
constexpr size_t kGeneratedDekBytes = 32;

struct Wrapped {
  std::string ciphertext;  // base64 wrap envelope
  int version = 0;
  std::string version_id;  // the wrapping version's UUID
};

struct WrapResult {
  Wrapped wrapped;
  std::optional<hsm::SecureBytes> generated;  // the DEK, when the token made it
};

struct UnwrapResult {
  hsm::SecureBytes plaintext;
  int version = 0;
  std::string version_id;            // the version that wrapped it
  std::optional<Wrapped> rewrapped;  // under the latest version, when an older one wrapped it
};

struct ServiceLimits {
  size_t max_key_name_length = 128;
};

struct CreateResult {
  store::KeyRecord key;
  bool created = false;  // false: the key already existed and was left unchanged
};

struct Sealed {
  std::string ciphertext;  // transit envelope
  int key_version = 0;
};

struct DataKey {
  hsm::SecureBytes plaintext;
  Sealed sealed;
};

struct MissingObject {
  std::string ns, name;
  int version = 0;
};

struct SweepReport {
  size_t intents_settled = 0;      // intents whose object was kept (metadata committed)
  size_t orphans_destroyed = 0;    // objects whose metadata never committed, or was deleted
  size_t unknown_objects = 0;      // p11kms-labelled objects no store row or intent explains
  std::vector<MissingObject> missing;
};

struct Health {
  hsm::PoolStatus token;
  std::vector<MissingObject> missing_objects;
};

class KeyService {
 public:
  KeyService(store::MetadataStore& store, hsm::Token& token, ServiceLimits limits = {});

  // Creates the key unless one of that name is live (then created = false, nothing changes).
  CreateResult create_key(const KeyRef& ref, const KeySpec& spec);
  // Transit's create: only the types transit offers.
  CreateResult create_key(const KeyRef& ref, const std::string& type, const std::string& created_by = "");
  store::KeyRecord read_key(const KeyRef& ref);
  bool key_exists(const KeyRef& ref);
  std::vector<std::string> list_keys(const std::string& ns);
  // By id (a live key or its tombstone) or else by name (live keys only).
  std::optional<store::KeyRecord> find_key(const std::string& ns, const std::string& id_or_name);
  std::vector<store::KeyRecord> list_key_records(const std::string& ns, bool include_deleted);
  store::KeyRecord configure_key(const KeyRef& ref, const KeyConfigChange& change);
  // A new version made by the token, or from `material` for an imported key (which must be
  // rotated with new material; a generated key must not be given any).
  store::KeyRecord rotate_key(const KeyRef& ref, const hsm::SecureBytes* material = nullptr);
  // Key Protect's enable/disable: active <-> suspended; any other state is a 409.
  store::KeyRecord set_enabled(const KeyRef& ref, bool enabled);
  // Destroys every version's material and leaves a tombstone (returned). Transit requires the
  // key's deletion_allowed; Key Protect does not.
  store::KeyRecord delete_key(const KeyRef& ref, bool require_deletion_allowed = true);
  // The latest version's material of an exportable (standard) key, unsealed in the token.
  hsm::SecureBytes read_material(const KeyRef& ref);

  // Key Protect's envelope operations, with a root (AES) key.
  WrapResult wrap(const KeyRef& ref, const hsm::SecureBytes* plaintext, const std::vector<std::string>& aad);
  UnwrapResult unwrap(const KeyRef& ref, const std::string& ciphertext, const std::vector<std::string>& aad);
  // Unwraps and wraps again under the latest version; the plaintext stays inside.
  UnwrapResult rewrap_wrapped(const KeyRef& ref, const std::string& ciphertext, const std::vector<std::string>& aad);

  Sealed encrypt(const KeyRef& ref, const uint8_t* plaintext, size_t len, int key_version,
                 const std::vector<uint8_t>& aad = {});
  hsm::SecureBytes decrypt(const KeyRef& ref, const std::string& ciphertext,
                           const std::vector<uint8_t>& aad = {});
  Sealed rewrap(const KeyRef& ref, const std::string& ciphertext, int key_version,
                const std::vector<uint8_t>& aad = {});
  DataKey generate_data_key(const KeyRef& ref, int bits, int key_version);
  std::vector<uint8_t> random_bytes(size_t n);

  // Settles creation/deletion intents left by a crash; checks every version has its object.
  SweepReport sweep();
  Health health();

  void validate_name(const std::string& name) const;

 private:
  std::shared_ptr<const Key> load(const KeyRef& ref);  // nullptr when absent
  std::shared_ptr<const Key> load_for_use(const KeyRef& ref);  // 400 when absent (Vault)
  std::shared_ptr<const Key> load_existing(const KeyRef& ref);  // 404 when absent
  store::VersionRecord create_version_object(const Key& key, int version, const hsm::SecureBytes* material);
  // A version's material: a token object for AES keys, sealed under the master key otherwise.
  store::VersionRecord new_version(const Key& key, int version, const hsm::SecureBytes* material);
  void discard_version(const store::VersionRecord& v) noexcept;
  void check_material(KeyType type, const hsm::SecureBytes& material) const;
  const hsm::ObjectId& master_key();
  std::string seal_material(const store::KeyRecord& key, int version, const hsm::SecureBytes& material);
  hsm::SecureBytes unseal_material(const store::KeyRecord& key, const store::VersionRecord& v);
  std::shared_ptr<const Key> load_wrapping_key(const KeyRef& ref, KeyUse use);
  Wrapped wrap_with(const Key& key, const uint8_t* plaintext, size_t len, const std::vector<std::string>& aad);
  void invalidate(const KeyRef& ref);
  void require_aes_gcm() const;
  void destroy_for_intents(const std::vector<store::Intent>& intents);
  template <typename F>
  auto guarded(F&& f) -> decltype(f());

  store::MetadataStore& store_;
  hsm::Token& token_;
  ServiceLimits limits_;

  std::mutex write_mu_;  // serializes metadata writes (create, rotate, config, delete)
  std::mutex cache_mu_;
  std::unordered_map<std::string, std::shared_ptr<const Key>> cache_;
  std::mutex master_mu_;
  hsm::ObjectId master_key_id_;  // empty until first needed
  std::mutex missing_mu_;
  std::vector<MissingObject> missing_;
};

}  // namespace p11kms::keys
