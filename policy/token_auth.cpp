#include "policy/token_auth.hpp"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include "common/encoding.hpp"

namespace p11kms::policy {

TokenHash sha256_of(const std::string& token) {
  TokenHash h{};
  SHA256(reinterpret_cast<const unsigned char*>(token.data()), token.size(), h.data());
  return h;
}

std::optional<TokenHash> parse_token_hash(const std::string& hex) {
  auto bytes = encoding::hex_decode(hex);
  if (!bytes || bytes->size() != 32) return std::nullopt;
  TokenHash h{};
  std::copy(bytes->begin(), bytes->end(), h.begin());
  return h;
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
