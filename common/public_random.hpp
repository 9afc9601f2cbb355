// Random bytes for values that are published: AES-GCM nonces, request ids, record ids.
//
// OpenSSL's RAND_bytes costs ~0.55 us per call here, whatever the size up to a few KiB (the
// DRBG reseeds its AES key and checks for a fork on every call); an encrypt request made
// two such calls (its request id and its nonce) and a batch of 1,000 items 1,001. These come
// from a per-thread block of DRBG output instead, drawn 4 KiB at a time.
//
// Only for values that are not secret: a block holds future values in process memory until
// they are used. Keys, PINs and tokens take RAND_bytes (or the token) directly. A forked
// child never reuses its parent's block (a nonce must not repeat): it draws a fresh one.
#pragma once

#include <cstddef>
#include <cstdint>

namespace p11kms::public_random {

// Fills out[0, n) from the DRBG; throws std::runtime_error if OpenSSL's DRBG fails.
void fill(uint8_t* out, size_t n);

}  // namespace p11kms::public_random
