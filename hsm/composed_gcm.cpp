#include "hsm/composed_gcm.hpp"

#include <openssl/crypto.h>
#include <openssl/modes.h>

#include <cstring>
#include <memory>

namespace p11kms::hsm::composed_gcm {
namespace {

constexpr size_t kBlock = 16;
constexpr size_t kTag = 16;

// What GCM128 calls as its block cipher: the token's encryptions of counter_blocks(), one
// after the other, each handed out only if GCM128 asks for exactly that block.
struct Feed {
  const uint8_t* in;
  const uint8_t* out;
  size_t blocks;
  size_t next = 0;
  bool mismatch = false;
};

void feed_block(const unsigned char in[16], unsigned char out[16], const void* key) {
  auto* f = static_cast<Feed*>(const_cast<void*>(key));
  if (!f->mismatch && f->next < f->blocks && CRYPTO_memcmp(in, f->in + kBlock * f->next, kBlock) == 0) {
    std::memcpy(out, f->out + kBlock * f->next, kBlock);
    ++f->next;
    return;
  }
  f->mismatch = true;
  std::memset(out, 0, kBlock);
}

struct ContextFree {
  void operator()(GCM128_CONTEXT* c) const { CRYPTO_gcm128_release(c); }  // wipes H and its tables
};
using Context = std::unique_ptr<GCM128_CONTEXT, ContextFree>;

// A GCM128 context keyed by `feed` (asks for H at once) with the IV set (asks for J0) and the
// AAD absorbed.
Context start(Feed& feed, const Bytes& iv, const Bytes& aad) {
  if (iv.size() != 12) throw Mismatch("composed AES-GCM takes a 96-bit IV only");
  Context ctx(CRYPTO_gcm128_new(&feed, feed_block));
  if (!ctx) throw std::bad_alloc();
  CRYPTO_gcm128_setiv(ctx.get(), iv.data(), iv.size());
  if (!aad.empty() && CRYPTO_gcm128_aad(ctx.get(), aad.data(), aad.size()) != 0)
    throw Mismatch("GCM128 refused the AAD");
  return ctx;
}

void require_all_used(const Feed& feed) {
  if (feed.mismatch || feed.next != feed.blocks) throw Mismatch("GCM128 asked for other blocks than were encrypted");
}

void check_size(const SecureBytes& encrypted, size_t len) {
  if (encrypted.size() != kBlock * (2 + (len + kBlock - 1) / kBlock))
    throw Mismatch("keystream size does not match the message");
}

}  // namespace

Bytes counter_blocks(const Bytes& iv, size_t len) {
  if (iv.size() != 12) throw Mismatch("composed AES-GCM takes a 96-bit IV only");
  const size_t n = (len + kBlock - 1) / kBlock;
  Bytes blocks(kBlock * (n + 2), 0);  // block 0: the zero block, for H
  uint8_t* j = blocks.data() + kBlock;
  uint32_t counter = 1;
  for (size_t i = 0; i <= n; ++i, ++counter) {  // J0 = iv || 1, then inc32 (mod 2^32)
    uint8_t* b = j + kBlock * i;
    std::memcpy(b, iv.data(), 12);
    b[12] = static_cast<uint8_t>(counter >> 24);
    b[13] = static_cast<uint8_t>(counter >> 16);
    b[14] = static_cast<uint8_t>(counter >> 8);
    b[15] = static_cast<uint8_t>(counter);
  }
  return blocks;
}

Bytes seal(const SecureBytes& encrypted, const Bytes& iv, const Bytes& aad, const uint8_t* plaintext, size_t len) {
  check_size(encrypted, len);
  const Bytes in = counter_blocks(iv, len);
  Feed feed{in.data(), encrypted.data(), in.size() / kBlock};
  Context ctx = start(feed, iv, aad);
  Bytes out(len + kTag);
  try {
    if (len && CRYPTO_gcm128_encrypt(ctx.get(), plaintext, out.data(), len) != 0)
      throw Mismatch("GCM128 refused the plaintext");
    CRYPTO_gcm128_tag(ctx.get(), out.data() + len, kTag);
    require_all_used(feed);
  } catch (...) {
    // Blocks not handed out are zeros, so `out` may hold plaintext.
    OPENSSL_cleanse(out.data(), out.size());
    throw;
  }
  return out;
}

std::optional<SecureBytes> open(const SecureBytes& encrypted, const Bytes& iv, const Bytes& aad,
                                const uint8_t* ciphertext, size_t len) {
  if (len < kTag) return std::nullopt;
  const size_t body = len - kTag;
  check_size(encrypted, body);
  const Bytes in = counter_blocks(iv, body);
  Feed feed{in.data(), encrypted.data(), in.size() / kBlock};
  Context ctx = start(feed, iv, aad);
  SecureBytes out(body);
  if (body && CRYPTO_gcm128_decrypt(ctx.get(), ciphertext, out.data(), body) != 0)
    throw Mismatch("GCM128 refused the ciphertext");
  require_all_used(feed);
  // CRYPTO_gcm128_finish compares in constant time; the plaintext is wiped unless it verifies.
  if (CRYPTO_gcm128_finish(ctx.get(), ciphertext + body, kTag) != 0) return std::nullopt;
  return out;
}

}  // namespace p11kms::hsm::composed_gcm
