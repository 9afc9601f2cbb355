// Transit ciphertext envelope, as Vault writes it: "vault:v<N>:" + base64(iv(12) || ct || tag(16)),
// so existing Vault ciphertext tooling and prefix checks keep working.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace p11kms::keys {

struct TransitCiphertext {
  int version = 0;
  std::vector<uint8_t> iv;
  std::vector<uint8_t> sealed;  // ciphertext || tag
};

std::string format_transit_ciphertext(int version, const std::vector<uint8_t>& iv,
                                      const std::vector<uint8_t>& sealed);
// Throws KeyError(invalid_argument) naming what is wrong with the ciphertext.
TransitCiphertext parse_transit_ciphertext(const std::string& text);

}  // namespace p11kms::keys
