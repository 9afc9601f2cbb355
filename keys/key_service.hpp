// KeyService: every key operation of every dialect. It owns the rules (names, versions,
// lifecycle, crash-safe creation) and calls the token (hsm/) and the metadata store (store/)
// through their interfaces. It knows nothing of HTTP.
#pragma once

#include <memory>
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

  CreateResult create_key(const KeyRef& ref, const std::string& type);
  store::KeyRecord read_key(const KeyRef& ref);
  bool key_exists(const KeyRef& ref);
  std::vector<std::string> list_keys(const std::string& ns);
  store::KeyRecord configure_key(const KeyRef& ref, const KeyConfigChange& change);
  store::KeyRecord rotate_key(const KeyRef& ref);
  void delete_key(const KeyRef& ref);

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
  store::VersionRecord create_version_object(const Key& key, int version);
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
  std::mutex missing_mu_;
  std::vector<MissingObject> missing_;
};

}  // namespace p11kms::keys
