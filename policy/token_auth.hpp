// API tokens: held only as SHA-256 hashes, compared in constant time.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace p11kms::policy {

using TokenHash = std::array<uint8_t, 32>;

struct TokenEntry {
  std::string name;
  TokenHash sha256{};
  std::vector<std::string> policies{"root"};
  std::vector<std::string> namespaces{"root"};
  std::optional<int64_t> expires;  // unix seconds
};

TokenHash sha256_of(const std::string& token);
std::optional<TokenHash> parse_token_hash(const std::string& hex);

class TokenAuthenticator {
 public:
  explicit TokenAuthenticator(std::vector<TokenEntry> tokens) : tokens_(std::move(tokens)) {}
  // The matching, unexpired entry, or nullptr. Examines every entry whatever matches, so the
  // time taken does not tell which token (or how much of one) was right.
  const TokenEntry* authenticate(const std::string& presented, int64_t now) const;

 private:
  std::vector<TokenEntry> tokens_;
};

}  // namespace p11kms::policy
