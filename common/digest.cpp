#include "common/digest.hpp"

#include <stdexcept>
#include <utility>

namespace p11kms::digest {
namespace {

struct Fetched {
  const EVP_MD* legacy;
  EVP_MD* md;  // null if the fetch failed (the default provider lacks it): the legacy handle serves
};

// Fetched once, on first use from any thread (a function-local static's initialisation is
// thread-safe), and never freed: digests are used until exit.
const std::array<Fetched, 9>& table() {
  static const std::array<Fetched, 9> t = [] {
    std::array<std::pair<const EVP_MD*, const char*>, 9> wanted = {{
        {EVP_sha1(), "SHA1"},
        {EVP_sha224(), "SHA2-224"},
        {EVP_sha256(), "SHA2-256"},
        {EVP_sha384(), "SHA2-384"},
        {EVP_sha512(), "SHA2-512"},
        {EVP_sha3_224(), "SHA3-224"},
        {EVP_sha3_256(), "SHA3-256"},
        {EVP_sha3_384(), "SHA3-384"},
        {EVP_sha3_512(), "SHA3-512"},
    }};
    std::array<Fetched, 9> out{};
    for (size_t i = 0; i < wanted.size(); ++i) out[i] = {wanted[i].first, EVP_MD_fetch(nullptr, wanted[i].second, nullptr)};
    return out;
  }();
  return t;
}

}  // namespace

const EVP_MD* fetched(const EVP_MD* legacy) {
  for (const auto& f : table())
    if (f.legacy == legacy) return f.md ? f.md : legacy;
  return legacy;
}

bool compute(const EVP_MD* md, const void* data, size_t len, uint8_t* out) {
  unsigned int n = 0;
  return EVP_Digest(data, len, out, &n, fetched(md), nullptr) == 1;
}

std::array<uint8_t, 32> sha256(const void* data, size_t len) {
  std::array<uint8_t, 32> out{};
  if (!compute(EVP_sha256(), data, len, out.data())) throw std::runtime_error("SHA-256 failed");
  return out;
}

}  // namespace p11kms::digest
