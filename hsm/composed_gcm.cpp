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

// A GCM128 context keyed by `feed` (asks for H at once).
Context keyed(Feed& feed) {
  Context ctx(CRYPTO_gcm128_new(&feed, feed_block));
  if (!ctx) throw std::bad_alloc();
  return ctx;
}

// Sets the IV (asks for J0) and absorbs the AAD.
void begin_message(GCM128_CONTEXT* ctx, const Bytes& iv, const Bytes& aad) {
  if (iv.size() != 12) throw Mismatch("composed AES-GCM takes a 96-bit IV only");
  CRYPTO_gcm128_setiv(ctx, iv.data(), iv.size());
  if (!aad.empty() && CRYPTO_gcm128_aad(ctx, aad.data(), aad.size()) != 0) throw Mismatch("GCM128 refused the AAD");
}

Context start(Feed& feed, const Bytes& iv, const Bytes& aad) {
  Context ctx = keyed(feed);
  begin_message(ctx.get(), iv, aad);
  return ctx;
}

// ciphertext || tag of one message into `out` (len + 16 bytes); wiped if anything fails, since
// blocks not handed out are zeros and `out` may then hold plaintext.
void seal_message(GCM128_CONTEXT* ctx, const Message& m, uint8_t* out) {
  try {
    begin_message(ctx, *m.iv, *m.aad);
    if (m.len && CRYPTO_gcm128_encrypt(ctx, m.data, out, m.len) != 0) throw Mismatch("GCM128 refused the plaintext");
    CRYPTO_gcm128_tag(ctx, out + m.len, kTag);
  } catch (...) {
    OPENSSL_cleanse(out, m.len + kTag);
    throw;
  }
}

void require_all_used(const Feed& feed) {
  if (feed.mismatch || feed.next != feed.blocks) throw Mismatch("GCM128 asked for other blocks than were encrypted");
}

void check_size(const SecureBytes& encrypted, size_t len) {
  if (encrypted.size() != kBlock * (1 + blocks_of(len))) throw Mismatch("keystream size does not match the message");
}

uint8_t* put_counters(uint8_t* j, const Bytes& iv, size_t len) {
  if (iv.size() != 12) throw Mismatch("composed AES-GCM takes a 96-bit IV only");
  const size_t n = blocks_of(len);
  uint32_t counter = 1;
  for (size_t i = 0; i < n; ++i, ++counter, j += kBlock) {  // J0 = iv || 1, then inc32 (mod 2^32)
    std::memcpy(j, iv.data(), 12);
    j[12] = static_cast<uint8_t>(counter >> 24);
    j[13] = static_cast<uint8_t>(counter >> 16);
    j[14] = static_cast<uint8_t>(counter >> 8);
    j[15] = static_cast<uint8_t>(counter);
  }
  return j;
}

}  // namespace

size_t blocks_of(size_t len) { return 1 + (len + kBlock - 1) / kBlock; }

Bytes counter_blocks(const Bytes& iv, size_t len) {
  Bytes blocks(kBlock * (1 + blocks_of(len)), 0);  // block 0: the zero block, for H
  put_counters(blocks.data() + kBlock, iv, len);
  return blocks;
}

Bytes counter_blocks(const std::vector<Message>& batch) {
  size_t n = 1;
  for (const auto& m : batch) n += blocks_of(m.len);
  Bytes blocks(kBlock * n, 0);
  uint8_t* j = blocks.data() + kBlock;
  for (const auto& m : batch) j = put_counters(j, *m.iv, m.len);
  return blocks;
}

Bytes seal(const SecureBytes& encrypted, const Bytes& iv, const Bytes& aad, const uint8_t* plaintext, size_t len) {
  return std::move(seal(encrypted, std::vector<Message>{Message{&iv, &aad, plaintext, len}}).front());
}

std::vector<Bytes> seal(const SecureBytes& encrypted, const std::vector<Message>& batch) {
  const Bytes in = counter_blocks(batch);
  if (encrypted.size() != in.size()) throw Mismatch("keystream size does not match the batch");
  Feed feed{in.data(), encrypted.data(), in.size() / kBlock};
  Context ctx = keyed(feed);
  std::vector<Bytes> out;
  out.reserve(batch.size());
  try {
    size_t used = 1;
    for (const auto& m : batch) {
      out.emplace_back(m.len + kTag);
      seal_message(ctx.get(), m, out.back().data());
      used += blocks_of(m.len);
      // Each message must have taken exactly its own blocks, or a later one would be sealed
      // with the wrong keystream.
      if (feed.mismatch || feed.next != used) throw Mismatch("GCM128 asked for other blocks than were encrypted");
    }
  } catch (...) {
    for (auto& o : out) OPENSSL_cleanse(o.data(), o.size());
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
