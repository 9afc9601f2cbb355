#include "common/public_random.hpp"

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <pthread.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <stdexcept>

namespace p11kms::public_random {
namespace {

constexpr size_t kBlock = 4096;

// Bumped in a forked child, so every thread's block drawn before the fork is dropped there.
std::atomic<uint64_t> g_fork_generation{0};

void after_fork_in_child() { g_fork_generation.fetch_add(1, std::memory_order_relaxed); }

void draw(uint8_t* out, size_t n) {
  if (RAND_bytes(out, static_cast<int>(n)) != 1) throw std::runtime_error("random generation failed (OpenSSL DRBG)");
}

struct Block {
  uint8_t bytes[kBlock];
  size_t used = kBlock;  // empty until first use
  uint64_t generation = 0;

  ~Block() { OPENSSL_cleanse(bytes, sizeof bytes); }
};

}  // namespace

void fill(uint8_t* out, size_t n) {
  static std::once_flag registered;
  std::call_once(registered, [] { pthread_atfork(nullptr, nullptr, after_fork_in_child); });
  if (n > kBlock / 4) return draw(out, n);  // big requests gain nothing from the block
  thread_local Block block;
  uint64_t generation = g_fork_generation.load(std::memory_order_relaxed);
  if (block.generation != generation) {
    block.used = kBlock;
    block.generation = generation;
  }
  if (kBlock - block.used < n) {
    draw(block.bytes, kBlock);
    block.used = 0;
  }
  std::memcpy(out, block.bytes + block.used, n);
  OPENSSL_cleanse(block.bytes + block.used, n);  // a byte is handed out once
  block.used += n;
}

}  // namespace p11kms::public_random
