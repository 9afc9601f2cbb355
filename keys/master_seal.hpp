// Sealing under the token-resident master key: the one place that turns exportable key
// material (and the keyring's secrets, and exportable HMAC keys) into the text kept in the
// store and back. The scheme is chosen from what the token's PKCS#11 module offers and recorded
// in each blob as a text prefix, so any instance through any module can tell blobs apart:
//
//   aes-gcm:<base64(iv(12) || ciphertext || tag(16))>
//       AES-256-GCM in the token (CKM_AES_GCM) under the master key; the default.
//   aes-ctr-hmac:<base64(nonce(16) || ciphertext || mac(32))>
//       where the module lacks CKM_AES_GCM (p11-kit 0.24 remoting) but has CKM_AES_ECB and
//       CKM_SHA256_HMAC: AES-256-CTR whose keystream blocks are computed in the token by C_Encrypt
//       (CKM_AES_ECB) of the counter blocks under the master key (only the XOR is done here),
//       then encrypt-then-MAC: HMAC-SHA-256 computed in the token under a second master key (a
//       generic secret, CKA_SIGN/CKA_VERIFY only) over a length-prefixed aad || nonce || ct,
//       compared in constant time.
//   <base64(iv || ciphertext || tag)> without a prefix: a legacy AES-GCM blob (stores written
//       before the prefix existed); it keeps opening.
//
// Base64 has no ':', so a prefix is unambiguous. Opening a blob needs the mechanisms of its own
// scheme: an AES-GCM blob through a module without CKM_AES_GCM is a 400 mechanism_unavailable
// naming the mechanism, never a silent failure. Both master keys are created on first use,
// their CKA_IDs recorded in the settings `keys.master_key_id` and `keys.master_mac_key_id`
// (put_setting_if_absent, so concurrent instances agree on one of each; a loser destroys its own).
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "hsm/capabilities.hpp"
#include "hsm/secret.hpp"
#include "hsm/token.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

class MasterSeal {
 public:
  enum class Scheme { aes_gcm, aes_ctr_hmac };
  static constexpr const char* kGcmPrefix = "aes-gcm:";
  static constexpr const char* kCtrHmacPrefix = "aes-ctr-hmac:";
  static constexpr const char* kMasterKeySetting = "keys.master_key_id";
  static constexpr const char* kMacKeySetting = "keys.master_mac_key_id";

  // Where the scheme choice (and each scheme's mechanism check) reads the module's
  // capabilities; by default the token's current table. Tests may pass a synthetic table to
  // force a scheme; the crypto always runs in the real token.
  using CapabilitySource = std::function<std::shared_ptr<const hsm::Capabilities>()>;

  MasterSeal(store::MetadataStore& store, hsm::Token& token, CapabilitySource capabilities = {});

  // The scheme new blobs get: aes-gcm when the module has it, else aes-ctr-hmac; a 400
  // mechanism_unavailable KeyError when neither is possible.
  Scheme scheme_for_sealing() const;
  // The scheme of a stored blob (legacy unprefixed blobs: aes_gcm); nullopt for an unknown prefix.
  static std::optional<Scheme> scheme_of(const std::string& blob);

  // Seals `plaintext` bound to `aad`. Throws KeyError (400 mechanism_unavailable when no
  // scheme is possible) or the token's errors (callers wrap those with guarded()).
  std::string seal(const std::vector<uint8_t>& aad, const uint8_t* plaintext, size_t len);
  std::string seal(const std::vector<uint8_t>& aad, const hsm::SecureBytes& plaintext) {
    return seal(aad, plaintext.data(), plaintext.size());
  }
  // nullopt when the blob does not open: tampered, sealed for another aad, truncated, not
  // base64, or its master key is not recorded. Throws KeyError 400 mechanism_unavailable when
  // the module lacks the mechanisms of the blob's scheme, KeyError 500 for an unknown prefix.
  std::optional<hsm::SecureBytes> unseal(const std::vector<uint8_t>& aad, const std::string& blob);

  // The AES master key, created on first use (for callers and tests that need its id).
  const hsm::ObjectId& master_key() { return key(kMasterKeySetting, true); }

 private:
  std::shared_ptr<const hsm::Capabilities> caps() const;
  void require(Scheme scheme, const std::string& what) const;
  // The id recorded in `setting`, made first (when `create`) if there is none; an empty id
  // when absent and not created.
  const hsm::ObjectId& key(const char* setting, bool create);
  hsm::Bytes ctr_mac(const hsm::ObjectId& mac_key, const std::vector<uint8_t>& aad, const uint8_t* nonce,
                     const uint8_t* ct, size_t ct_len);
  hsm::SecureBytes ctr_keystream(const hsm::ObjectId& aes_key, const uint8_t* nonce, size_t len);

  store::MetadataStore& store_;
  hsm::Token& token_;
  CapabilitySource capabilities_;
  std::mutex mu_;
  hsm::ObjectId master_key_id_;  // empty until first needed
  hsm::ObjectId mac_key_id_;     // empty until first needed
};

}  // namespace p11kms::keys
