// Key types the service knows, by their Vault names.
#pragma once

#include <optional>
#include <string>

#include "hsm/token.hpp"

namespace p11kms::keys {

// `standard` is Key Protect's standard key: secret material (256, 384 or 512 bits) that the
// caller may read back, kept sealed under the master key, never used for crypto by the service.
enum class KeyType {
  aes128_gcm96, aes256_gcm96, standard,
  ecdsa_p256, ecdsa_p384, ed25519, rsa_2048, rsa_3072, rsa_4096,
  hmac,
};

std::optional<KeyType> parse_key_type(const std::string& name);
const char* key_type_name(KeyType type);
size_t key_type_bytes(KeyType type);  // the generated size (standard: 32; hmac: default 32)
bool is_aes(KeyType type);
bool is_asymmetric(KeyType type);  // ECDSA, Ed25519, RSA: token key pairs that sign
bool is_rsa(KeyType type);
bool is_ecdsa(KeyType type);
hsm::PairSpec pair_spec(KeyType type);  // for asymmetric types
// Vault's `name` of an asymmetric version ("P-256", "ed25519", "rsa-2048").
const char* public_key_name(KeyType type);
// Transit-creatable types, for error messages: "aes128-gcm96, aes256-gcm96, ...".
std::string supported_key_types();
// The types transit can encrypt with (an upsert may create them): "aes128-gcm96, aes256-gcm96".
std::string encryption_key_types();

}  // namespace p11kms::keys
