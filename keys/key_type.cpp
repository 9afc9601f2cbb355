#include "keys/key_type.hpp"

namespace p11kms::keys {

std::optional<KeyType> parse_key_type(const std::string& name) {
  if (name == "aes256-gcm96") return KeyType::aes256_gcm96;
  if (name == "aes128-gcm96") return KeyType::aes128_gcm96;
  if (name == "standard") return KeyType::standard;
  return std::nullopt;
}

const char* key_type_name(KeyType type) {
  switch (type) {
    case KeyType::aes128_gcm96: return "aes128-gcm96";
    case KeyType::aes256_gcm96: return "aes256-gcm96";
    case KeyType::standard: return "standard";
  }
  return "unknown";
}

size_t key_type_bytes(KeyType type) { return type == KeyType::aes128_gcm96 ? 16 : 32; }

bool is_aes(KeyType type) { return type == KeyType::aes128_gcm96 || type == KeyType::aes256_gcm96; }

std::string supported_key_types() { return "aes128-gcm96, aes256-gcm96"; }

}  // namespace p11kms::keys
