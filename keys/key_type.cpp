#include "keys/key_type.hpp"

namespace p11kms::keys {

namespace {
struct TypeName {
  KeyType type;
  const char* name;
};
constexpr TypeName kTypes[] = {
    {KeyType::aes128_gcm96, "aes128-gcm96"}, {KeyType::aes256_gcm96, "aes256-gcm96"},
    {KeyType::standard, "standard"},         {KeyType::ecdsa_p256, "ecdsa-p256"},
    {KeyType::ecdsa_p384, "ecdsa-p384"},     {KeyType::ed25519, "ed25519"},
    {KeyType::rsa_2048, "rsa-2048"},         {KeyType::rsa_3072, "rsa-3072"},
    {KeyType::rsa_4096, "rsa-4096"},         {KeyType::hmac, "hmac"},
};
}  // namespace

std::optional<KeyType> parse_key_type(const std::string& name) {
  for (const auto& t : kTypes)
    if (name == t.name) return t.type;
  return std::nullopt;
}

const char* key_type_name(KeyType type) {
  for (const auto& t : kTypes)
    if (type == t.type) return t.name;
  return "unknown";
}

size_t key_type_bytes(KeyType type) { return type == KeyType::aes128_gcm96 ? 16 : 32; }

bool is_aes(KeyType type) { return type == KeyType::aes128_gcm96 || type == KeyType::aes256_gcm96; }

bool is_rsa(KeyType type) {
  return type == KeyType::rsa_2048 || type == KeyType::rsa_3072 || type == KeyType::rsa_4096;
}

bool is_ecdsa(KeyType type) { return type == KeyType::ecdsa_p256 || type == KeyType::ecdsa_p384; }

bool is_asymmetric(KeyType type) { return is_rsa(type) || is_ecdsa(type) || type == KeyType::ed25519; }

hsm::PairSpec pair_spec(KeyType type) {
  switch (type) {
    case KeyType::ecdsa_p384: return {hsm::PairKind::ec_p384, 0};
    case KeyType::ed25519: return {hsm::PairKind::ed25519, 0};
    case KeyType::rsa_2048: return {hsm::PairKind::rsa, 2048};
    case KeyType::rsa_3072: return {hsm::PairKind::rsa, 3072};
    case KeyType::rsa_4096: return {hsm::PairKind::rsa, 4096};
    default: return {hsm::PairKind::ec_p256, 0};
  }
}

const char* public_key_name(KeyType type) {
  switch (type) {
    case KeyType::ecdsa_p256: return "P-256";
    case KeyType::ecdsa_p384: return "P-384";
    default: return key_type_name(type);
  }
}

std::string supported_key_types() {
  return "aes128-gcm96, aes256-gcm96, ecdsa-p256, ecdsa-p384, ed25519, rsa-2048, rsa-3072, rsa-4096, hmac";
}

std::string encryption_key_types() { return "aes128-gcm96, aes256-gcm96"; }

}  // namespace p11kms::keys
