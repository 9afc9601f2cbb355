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

// KMS wrap envelope (Key Protect's `ciphertext`): base64 of
//   0x01 (format) || key version (uint32, big endian) || iv(12) || ct || tag(16).
// The version travels with the ciphertext so unwrap keeps working after rotation.
struct WrapCiphertext {
  int version = 0;
  std::vector<uint8_t> iv;
  std::vector<uint8_t> sealed;  // ciphertext || tag
};
std::string format_wrap_ciphertext(int version, const std::vector<uint8_t>& iv, const std::vector<uint8_t>& sealed);
// Throws KeyError(invalid_argument) naming what is wrong with the ciphertext.
WrapCiphertext parse_wrap_ciphertext(const std::string& text);

// The GCM additional data of a wrap: a domain label, the key's id (so another key's ciphertext
// never opens) and the caller's AAD strings, each length-prefixed (count, then length || bytes),
// so ["ab","c"] and ["a","bc"] differ. Callers check the limits (126 strings of 0-255 bytes).
std::vector<uint8_t> wrap_aad(const std::string& key_id, const std::vector<std::string>& aad);

// The GCM additional data that binds material sealed under the master key to one key version,
// so sealed blobs cannot be swapped between keys or versions in the store.
std::vector<uint8_t> sealed_material_aad(const std::string& ns, const std::string& key_id, int version);

}  // namespace p11kms::keys
