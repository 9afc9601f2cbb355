#include "policy/token_auth.hpp"

#include <openssl/crypto.h>

#include "common/digest.hpp"
#include "common/encoding.hpp"

namespace p11kms::policy {

TokenHash sha256_of(const std::string& token) {
  return digest::sha256(token.data(), token.size());
}

std::optional<TokenHash> parse_token_hash(const std::string& hex) {
  auto bytes = encoding::hex_decode(hex);
  if (!bytes || bytes->size() != 32) return std::nullopt;
  TokenHash h{};
  std::copy(bytes->begin(), bytes->end(), h.begin());
  return h;
}

std::optional<TokenHash> parse_cert_fingerprint(const std::string& text) {
  std::string hex;
  if (text.size() == 32 * 3 - 1) {  // AB:CD:...:EF
    for (size_t i = 0; i < text.size(); ++i) {
      if (i % 3 == 2) {
        if (text[i] != ':') return std::nullopt;
      } else {
        hex.push_back(text[i]);
      }
    }
  } else if (text.size() == 64) {
    hex = text;
  } else {
    return std::nullopt;
  }
  return parse_token_hash(hex);
}

const TokenEntry* TokenAuthenticator::authenticate_cert(const std::string& cert_sha256_hex, int64_t now) const {
  auto presented = parse_token_hash(cert_sha256_hex);
  if (!presented) return nullptr;
  const TokenEntry* match = nullptr;
  for (const auto& t : tokens_) {
    if (t.cert_sha256 && CRYPTO_memcmp(presented->data(), t.cert_sha256->data(), presented->size()) == 0) match = &t;
  }
  if (match && match->expires && now >= *match->expires) return nullptr;
  return match;
}

const TokenEntry* TokenAuthenticator::authenticate(const std::string& presented, int64_t now) const {
  if (presented.empty()) return nullptr;
  TokenHash h = sha256_of(presented);
  const TokenEntry* match = nullptr;
  for (const auto& t : tokens_) {
    if (CRYPTO_memcmp(h.data(), t.sha256.data(), h.size()) == 0) match = &t;
  }
  if (match && match->expires && now >= *match->expires) return nullptr;
  return match;
}

}  // namespace p11kms::policy
