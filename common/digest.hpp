// One-shot message digests (SHA-1, SHA-2, SHA-3) through implementations OpenSSL fetches once.
//
// EVP_sha256() and its kind are legacy handles: OpenSSL 3.0 fetches the provider's
// implementation again on every EVP_DigestInit with one, and SHA256() fetches by name. Each
// fetch is a name lookup and a method-store search under process-wide read-write locks, which
// costs more than hashing an API token or a 32-byte input, and those are the locks SoftHSM's
// own OpenSSL calls take on every token operation (docs/PERFORMANCE.md section 14). A fetched
// implementation is only reference-counted per use.
#pragma once

#include <openssl/evp.h>

#include <array>
#include <cstddef>
#include <cstdint>

namespace p11kms::digest {

// The provider's implementation behind `legacy` (EVP_sha1(), EVP_sha256(), EVP_sha3_512(), ...),
// fetched on first use and kept for the life of the process; `legacy` itself for any other.
const EVP_MD* fetched(const EVP_MD* legacy);

// out must hold EVP_MD_get_size(md) bytes. Returns false if OpenSSL fails.
bool compute(const EVP_MD* md, const void* data, size_t len, uint8_t* out);

std::array<uint8_t, 32> sha256(const void* data, size_t len);

}  // namespace p11kms::digest
