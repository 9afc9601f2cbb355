// KeyService::seal_secret / unseal_secret: AES-256-GCM under the token's master key for small
// secrets kept by registries on top of the store (the Kong keyring, keyring.cpp).
#include <openssl/rand.h>

#include "common/encoding.hpp"
#include "keys/key_service.hpp"
#include "keys/key_service_guard.hpp"

namespace p11kms::keys {

std::string KeyService::seal_secret(const std::string& aad, const hsm::SecureBytes& secret) {
  return guarded([&] {
    hsm::Bytes iv(12);
    if (RAND_bytes(iv.data(), static_cast<int>(iv.size())) != 1)
      throw KeyError(ErrorKind::internal, "internal", "random IV generation failed");
    auto sealed = token_.aes_gcm_encrypt(master_key(), iv, hsm::Bytes(aad.begin(), aad.end()), secret.data(),
                                         secret.size());
    iv.insert(iv.end(), sealed.begin(), sealed.end());
    return encoding::base64_encode(iv);
  });
}

std::optional<hsm::SecureBytes> KeyService::unseal_secret(const std::string& aad, const std::string& sealed) {
  return guarded([&]() -> std::optional<hsm::SecureBytes> {
    auto blob = encoding::base64_decode(sealed);
    if (!blob || blob->size() < 12 + 16) return std::nullopt;
    hsm::Bytes iv(blob->begin(), blob->begin() + 12);
    return token_.aes_gcm_decrypt(master_key(), iv, hsm::Bytes(aad.begin(), aad.end()), blob->data() + 12,
                                  blob->size() - 12);
  });
}

}  // namespace p11kms::keys
