// KeyService::seal_secret / unseal_secret: small secrets kept by registries on top of the store
// (the Kong keyring, keyring.cpp), sealed under the token's master key by MasterSeal
// (keys/master_seal.hpp: the scheme is recorded in each blob).
#include "keys/key_service.hpp"
#include "keys/key_service_guard.hpp"

namespace p11kms::keys {

std::string KeyService::seal_secret(const std::string& aad, const hsm::SecureBytes& secret) {
  return guarded([&] { return master_seal_.seal(std::vector<uint8_t>(aad.begin(), aad.end()), secret); });
}

std::optional<hsm::SecureBytes> KeyService::unseal_secret(const std::string& aad, const std::string& sealed) {
  return guarded([&]() -> std::optional<hsm::SecureBytes> {
    return master_seal_.unseal(std::vector<uint8_t>(aad.begin(), aad.end()), sealed);
  });
}

}  // namespace p11kms::keys
