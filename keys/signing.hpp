// What signing and HMAC need outside the token: hash selection, DigestInfo and signature
// encodings, verification against a public key (public by definition, so OpenSSL checks it in
// the process) and the export formats of private keys. No private key is used here except in
// export_private_key, which only an exportable key's owner reaches.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "hsm/secret.hpp"
#include "hsm/pkcs11.hpp"
#include "keys/key_type.hpp"

namespace p11kms::keys {

struct SignOptions {
  std::string hash_algorithm = "sha2-256";  // sha1, sha2-*, sha3-*, none (RSA PKCS#1 v1.5 only)
  bool prehashed = false;
  std::string signature_algorithm;          // RSA: pss (default) or pkcs1v15
  std::string marshaling_algorithm = "asn1";  // ECDSA: asn1 or jws
  std::string salt_length = "auto";         // RSA-PSS: auto, hash or a number of bytes
};

// The digest size of a hash name, or throws 400 naming the algorithm.
size_t hash_size(const std::string& algorithm);
std::vector<uint8_t> hash_input(const std::string& algorithm, const std::vector<uint8_t>& input);
// CKM_SHA*_HMAC of a hash name; 400 naming the algorithm when the token offers none.
CK_MECHANISM_TYPE hmac_mechanism(const std::string& algorithm);
// PKCS#1 v1.5 DigestInfo of a digest.
std::vector<uint8_t> digest_info(const std::string& algorithm, const std::vector<uint8_t>& digest);
// CK_RSA_PKCS_PSS_PARAMS fields for a hash; 400 for hashes the token's PSS cannot use.
CK_MECHANISM_TYPE pkcs11_hash(const std::string& algorithm);
CK_RSA_PKCS_MGF_TYPE pkcs11_mgf(const std::string& algorithm);
// The PSS salt length Vault signs with: auto = the largest, hash = the digest size, or a number.
size_t pss_salt_length(const std::string& salt_length, size_t modulus_bits, size_t digest_bytes);

// ECDSA r || s <-> DER ECDSA-Sig-Value.
std::vector<uint8_t> ecdsa_raw_to_der(const std::vector<uint8_t>& raw);
std::optional<std::vector<uint8_t>> ecdsa_der_to_raw(const std::vector<uint8_t>& der, size_t field_bytes);

std::string base64url_nopad(const std::vector<uint8_t>& bytes);
std::optional<std::vector<uint8_t>> base64url_decode(const std::string& text);

// SubjectPublicKeyInfo DER -> "-----BEGIN PUBLIC KEY-----" PEM.
std::string public_key_pem(const std::vector<uint8_t>& spki);
size_t rsa_modulus_bits(const std::string& public_pem);

// Checks a signature (raw bytes: DER for asn1 ECDSA, r || s for jws) against the PEM public
// key. False for any signature that does not verify, however malformed.
bool verify_signature(KeyType type, const std::string& public_pem, const SignOptions& options,
                      const std::vector<uint8_t>& input, const std::vector<uint8_t>& signature);

// Vault's export format of a private key: PEM "EC PRIVATE KEY" (SEC 1) for ECDSA, PEM "RSA
// PRIVATE KEY" (PKCS#1) for RSA, base64 of seed || public key (64 bytes) for Ed25519.
std::string export_private_key(KeyType type, const hsm::SecureBytes& pkcs8);

}  // namespace p11kms::keys
