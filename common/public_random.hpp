// Random bytes for values that are published: AES-GCM nonces, request ids, record ids.
//
// OpenSSL 3.0's RAND_bytes costs ~0.55 us for 12 bytes here and 1.0-1.4 us for 4 KiB: most of a
// small call is per-call setup (the profile shows a fork check through getpid, OSSL_PARAM
// lookups, locks). An encrypt request made two such calls (its request id and its nonce) and a
// batch of 1,000 items 1,001. These come from a per-thread block of DRBG output instead, drawn
// 4 KiB at a time (docs/PERFORMANCE.md section 9).
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
