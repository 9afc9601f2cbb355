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
#include <vector>

#include "hsm/secret.hpp"

namespace p11kms::hsm::composed_gcm {

// One message of a batch under one key: a 12-byte IV, the AAD and the data (plaintext to seal).
struct Message {
  const Bytes* iv;
  const Bytes* aad;
  const uint8_t* data;
  size_t len;
};

// The blocks whose encryptions a message of `len` bytes under the 12-byte `iv` needs, in the
// order GCM128 asks for them: the zero block (the hash key H), J0 = iv || 1 (the tag mask),
// then inc32(J0) ... for ceil(len / 16) blocks.
Bytes counter_blocks(const Bytes& iv, size_t len);
// A batch's: the zero block once (every message has the same H), then each message's J0 and
// counter blocks, in order; 16 * blocks_of(batch) bytes.
Bytes counter_blocks(const std::vector<Message>& batch);
size_t blocks_of(size_t len);  // a message's J0 and counter blocks

// The block function asked for a block it was not given (a bug, never the data's fault): the
// caller runs the operation in the token instead.
class Mismatch : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

// ciphertext || tag, from `encrypted` = AES-ECB of counter_blocks(iv, len).
Bytes seal(const SecureBytes& encrypted, const Bytes& iv, const Bytes& aad, const uint8_t* plaintext, size_t len);
// ciphertext || tag of each message, from `encrypted` = AES-ECB of counter_blocks(batch): one
// GCM128 context (H once) takes each message's IV in turn.
std::vector<Bytes> seal(const SecureBytes& encrypted, const std::vector<Message>& batch);
// The plaintext of ciphertext || tag (`len` includes the 16-byte tag), or nullopt when the tag
// does not verify; `encrypted` = AES-ECB of counter_blocks(iv, len - 16).
std::optional<SecureBytes> open(const SecureBytes& encrypted, const Bytes& iv, const Bytes& aad,
                                const uint8_t* ciphertext, size_t len);

}  // namespace p11kms::hsm::composed_gcm
