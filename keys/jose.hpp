// JOSE key formats for Kong's /keys (keys/kong_keys.hpp): JWK and PEM parsed with OpenSSL into
// a public key (SubjectPublicKeyInfo, public JWK) and, when present, a private key as PKCS#8
// DER in wiped buffers, ready for hsm::Token::import_private_key. Errors are 400s whose code is
// "invalid_<field>" (jwk, kid, pem.public_key, pem.private_key), Kong's schema-violation field.
#pragma once

#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "hsm/secret.hpp"

namespace p11kms::keys::jose {

struct ParsedKey {
  std::string kty, crv;  // RSA | EC (P-256, P-384, P-521) | OKP (Ed25519)
  int bits = 0;          // RSA modulus bits
  hsm::Bytes spki;
  hsm::SecureBytes pkcs8;      // empty: a public key only
  nlohmann::json public_jwk;   // kty and public members only
  std::string alg, use;        // from the JWK, when it has them
};

// A JWK (JSON text). Its kid, when present, must equal kid_field.
ParsedKey parse_jwk(const std::string& text, const std::string& kid_field);
// A PEM pair: public key (SubjectPublicKeyInfo) and/or private key (PKCS#8, PKCS#1 or SEC 1,
// unencrypted); when both are given they must match.
ParsedKey parse_pem(const std::optional<std::string>& public_pem, const hsm::SecretString* private_pem);
// The public JWK of a SubjectPublicKeyInfo DER.
nlohmann::json jwk_of_spki(const hsm::Bytes& spki);

std::string b64url(const uint8_t* p, size_t n);
inline std::string b64url(const hsm::Bytes& v) { return b64url(v.data(), v.size()); }
inline std::string b64url(const std::string& s) { return b64url(reinterpret_cast<const uint8_t*>(s.data()), s.size()); }
// Strict base64url without padding; nullopt otherwise.
std::optional<hsm::SecureBytes> b64url_decode(const std::string& text);

}  // namespace p11kms::keys::jose
