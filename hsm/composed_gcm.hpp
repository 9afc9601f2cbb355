// AES-GCM (96-bit IV, 128-bit tag) put together from AES block encryptions the token made: the
// token runs AES-ECB on the counter blocks (Token keeps that operation active on a session, so
// a message costs one C_EncryptUpdate instead of a C_EncryptInit and a C_Encrypt), and the CTR
// XOR and GHASH run here, in OpenSSL's GCM128 (modes.h) with a block function that hands out
// the token's results in order and checks that each block asked for is the one encrypted.
// The output is bit for bit NIST SP 800-38D AES-GCM: the token's CKM_AES_GCM opens it and
// the reverse. Custody: docs/OPERATIONS.md section 12.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <stdexcept>

#include "hsm/secret.hpp"

namespace p11kms::hsm::composed_gcm {

// The blocks whose encryptions a message of `len` bytes under the 12-byte `iv` needs, in the
// order GCM128 asks for them: the zero block (the hash key H), J0 = iv || 1 (the tag mask),
// then inc32(J0) ... for ceil(len / 16) blocks.
Bytes counter_blocks(const Bytes& iv, size_t len);

// The block function asked for a block it was not given (a bug, never the data's fault): the
// caller runs the operation in the token instead.
class Mismatch : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// ciphertext || tag, from `encrypted` = AES-ECB of counter_blocks(iv, len).
Bytes seal(const SecureBytes& encrypted, const Bytes& iv, const Bytes& aad, const uint8_t* plaintext, size_t len);
// The plaintext of ciphertext || tag (`len` includes the 16-byte tag), or nullopt when the tag
// does not verify; `encrypted` = AES-ECB of counter_blocks(iv, len - 16).
std::optional<SecureBytes> open(const SecureBytes& encrypted, const Bytes& iv, const Bytes& aad,
                                const uint8_t* ciphertext, size_t len);

}  // namespace p11kms::hsm::composed_gcm
