// Key types the service knows, by their Vault names.
#pragma once

#include <optional>
#include <string>

namespace p11kms::keys {

enum class KeyType { aes128_gcm96, aes256_gcm96 };

std::optional<KeyType> parse_key_type(const std::string& name);
const char* key_type_name(KeyType type);
size_t key_type_bytes(KeyType type);
std::string supported_key_types();  // "aes128-gcm96, aes256-gcm96", for error messages

}  // namespace p11kms::keys
