#include "keys/digest.hpp"

#include <openssl/evp.h>

#include "common/digest.hpp"
#include "keys/errors.hpp"

namespace p11kms::keys {

std::vector<uint8_t> digest(const std::string& algorithm, const std::vector<uint8_t>& input) {
  const EVP_MD* md = nullptr;
  if (algorithm == "sha2-224") md = EVP_sha224();
  else if (algorithm == "sha2-256") md = EVP_sha256();
  else if (algorithm == "sha2-384") md = EVP_sha384();
  else if (algorithm == "sha2-512") md = EVP_sha512();
  else if (algorithm == "sha3-224") md = EVP_sha3_224();
  else if (algorithm == "sha3-256") md = EVP_sha3_256();
  else if (algorithm == "sha3-384") md = EVP_sha3_384();
  else if (algorithm == "sha3-512") md = EVP_sha3_512();
  else
    throw invalid("unsupported hash algorithm \"" + algorithm +
                  "\": algorithm must be sha2-224, sha2-256, sha2-384, sha2-512 or sha3-224/256/384/512");
  std::vector<uint8_t> out(static_cast<size_t>(EVP_MD_get_size(md)));
  if (!p11kms::digest::compute(md, input.data(), input.size(), out.data()))
    throw KeyError(ErrorKind::internal, "internal", "hashing failed");
  return out;
}

}  // namespace p11kms::keys
