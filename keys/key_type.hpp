// Key types the service knows, by their Vault names.
#pragma once

#include <optional>
#include <string>

namespace p11kms::keys {

// `standard` is Key Protect's standard key: secret material (256, 384 or 512 bits) that the
// caller may read back, kept sealed under the master key, never used for crypto by the service.
enum class KeyType { aes128_gcm96, aes256_gcm96, standard };

std::optional<KeyType> parse_key_type(const std::string& name);
const char* key_type_name(KeyType type);
size_t key_type_bytes(KeyType type);  // the generated size (standard: 32)
bool is_aes(KeyType type);
// Transit-creatable types, for error messages: "aes128-gcm96, aes256-gcm96".
std::string supported_key_types();

}  // namespace p11kms::keys
