// Hashing for transit's /hash: not key material, so it runs in-process (OpenSSL).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace p11kms::keys {

// algorithm: sha2-224, sha2-256, sha2-384, sha2-512, sha3-224, sha3-256, sha3-384, sha3-512.
// Throws KeyError(invalid_argument) naming the algorithm if unsupported.
std::vector<uint8_t> digest(const std::string& algorithm, const std::vector<uint8_t>& input);

}  // namespace p11kms::keys
