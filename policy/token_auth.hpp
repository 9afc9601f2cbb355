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
  // mTLS: the SHA-256 of a client certificate (DER) that authenticates as this token without a
  // token header (auth.tokens[].cert_sha256).
  std::optional<TokenHash> cert_sha256;
};

TokenHash sha256_of(const std::string& token);
std::optional<TokenHash> parse_token_hash(const std::string& hex);
// A certificate fingerprint as configured: 64 hex digits in either case, or the colon-separated
// form `openssl x509 -fingerprint -sha256` prints (AB:CD:...); nullopt otherwise.
std::optional<TokenHash> parse_cert_fingerprint(const std::string& text);

class TokenAuthenticator {
 public:
  explicit TokenAuthenticator(std::vector<TokenEntry> tokens) : tokens_(std::move(tokens)) {}
  // The matching, unexpired entry, or nullptr. Examines every entry whatever matches, so the
  // time taken does not tell which token (or how much of one) was right.
  const TokenEntry* authenticate(const std::string& presented, int64_t now) const;
  // The unexpired entry whose cert_sha256 is this client certificate's fingerprint (lowercase
  // hex from the listener), or nullptr; constant time over the entries as above.
  const TokenEntry* authenticate_cert(const std::string& cert_sha256_hex, int64_t now) const;

 private:
  std::vector<TokenEntry> tokens_;
};

}  // namespace p11kms::policy
