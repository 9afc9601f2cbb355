// Operations on token objects, over the session pool. Objects are addressed by their CKA_ID;
// handles are cached per pool generation (a SoftHSM C_FindObjects re-reads every object file,
// so a lookup per operation would not scale).
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "hsm/secret.hpp"
#include "hsm/session_pool.hpp"

namespace p11kms::hsm {

using ObjectId = std::vector<uint8_t>;  // the CKA_ID, 16 random bytes

struct ObjectInfo {
  ObjectId id;
  std::string label;
  CK_OBJECT_CLASS object_class = 0;
};

class Token {
 public:
  explicit Token(SessionPool& pool) : pool_(pool) {}

  SessionPool& pool() { return pool_; }

  Bytes random(size_t n);
  SecureBytes random_secret(size_t n);
  ObjectId new_object_id() { return random(16); }

  // A persistent, private, sensitive, non-extractable AES key usable only to encrypt and
  // decrypt. Every boolean is set explicitly (SoftHSM turns several on by default).
  void generate_aes_key(const ObjectId& id, size_t bytes, const std::string& label);

  // The same kind of AES key from caller-supplied material (C_CreateObject); the template's
  // copy of the value is wiped, the caller wipes its own.
  void import_aes_key(const ObjectId& id, const SecureBytes& value, const std::string& label);

  // A persistent, private, sensitive, non-extractable generic secret usable only to compute
  // and check HMACs (CKA_SIGN/CKA_VERIFY), e.g. the audit log's key.
  void generate_hmac_key(const ObjectId& id, size_t bytes, const std::string& label);
  // HMAC-SHA256 computed in the token with that key.
  Bytes hmac_sha256(const ObjectId& key, const uint8_t* data, size_t len);

  // AES-GCM with a 128-bit tag; returns ciphertext || tag.
  Bytes aes_gcm_encrypt(const ObjectId& key, const Bytes& iv, const Bytes& aad,
                        const uint8_t* plaintext, size_t len);
  // nullopt when the tag does not verify (or the data is not a GCM ciphertext).
  std::optional<SecureBytes> aes_gcm_decrypt(const ObjectId& key, const Bytes& iv, const Bytes& aad,
                                             const uint8_t* ciphertext, size_t len);

  // Destroys the object with this CKA_ID if present; returns whether one was destroyed.
  bool destroy(const ObjectId& id);
  bool exists(const ObjectId& id);

  // Every secret and private key object, with id and label (one C_FindObjects pass).
  std::vector<ObjectInfo> list_key_objects();

  bool has_mechanism(CK_MECHANISM_TYPE m) const { return pool_.mechanisms().count(m) != 0; }
  // What key types need, read once from the module's mechanism list at start.
  bool supports_aes_gcm() const { return has_mechanism(CKM_AES_GCM) && has_mechanism(CKM_AES_KEY_GEN); }

 private:
  void generate_secret(CK_MECHANISM_TYPE mechanism, class AttributeTemplate& t, const ObjectId& id);
  std::optional<CK_OBJECT_HANDLE> find(SessionPool::Lease& lease, const ObjectId& id);
  CK_OBJECT_HANDLE handle(SessionPool::Lease& lease, const ObjectId& id);  // throws ObjectMissing
  void forget(const ObjectId& id);

  SessionPool& pool_;
  std::mutex cache_mu_;
  uint64_t cache_generation_ = 0;
  std::unordered_map<std::string, CK_OBJECT_HANDLE> cache_;
};

}  // namespace p11kms::hsm
