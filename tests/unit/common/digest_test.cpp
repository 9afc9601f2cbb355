// Unit tests for common/digest.hpp: fetched implementations give the standard digests, and a
// handle the table does not know is passed through unchanged.
#include "common/digest.hpp"

#include <gtest/gtest.h>

#include <string>

#include "common/encoding.hpp"

namespace p11kms {
namespace {

std::string hex_of(const EVP_MD* md, const std::string& input) {
  std::vector<uint8_t> out(static_cast<size_t>(EVP_MD_get_size(md)));
  EXPECT_TRUE(digest::compute(md, input.data(), input.size(), out.data()));
  return encoding::hex_encode(out);
}

// FIPS 180-4 and FIPS 202 example values for "abc".
TEST(Digest, ComputesTheStandardDigestsOfAbc) {
  EXPECT_EQ(hex_of(EVP_sha1(), "abc"), "a9993e364706816aba3e25717850c26c9cd0d89d");
  EXPECT_EQ(hex_of(EVP_sha256(), "abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(hex_of(EVP_sha384(), "abc"),
            "cb00753f45a35e8bb5a03d699ac65007272c32ab0eded1631a8b605a43ff5bed8086072ba1e7cc2358baeca134c825a7");
  EXPECT_EQ(hex_of(EVP_sha3_256(), "abc"), "3a985da74fe225b2045c172d6bd390bd855f086e3e9d525b46bfe24511431532");
  auto h = digest::sha256("abc", 3);
  EXPECT_EQ(encoding::hex_encode(h.data(), h.size()), hex_of(EVP_sha256(), "abc"));
}

TEST(Digest, EmptyInputHashes) {
  EXPECT_EQ(hex_of(EVP_sha256(), ""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(Digest, KnownLegacyHandlesAreReplacedByFetchedOnes) {
  for (const EVP_MD* legacy : {EVP_sha1(), EVP_sha224(), EVP_sha256(), EVP_sha384(), EVP_sha512(), EVP_sha3_224(),
                               EVP_sha3_256(), EVP_sha3_384(), EVP_sha3_512()}) {
    const EVP_MD* f = digest::fetched(legacy);
    EXPECT_NE(f, legacy) << EVP_MD_get0_name(legacy);
    EXPECT_NE(EVP_MD_get0_provider(f), nullptr) << EVP_MD_get0_name(legacy);  // a provider's implementation
    EXPECT_EQ(EVP_MD_get_type(f), EVP_MD_get_type(legacy));
    EXPECT_EQ(digest::fetched(legacy), f);  // fetched once, the same object every time
  }
}

TEST(Digest, UnknownHandlesPassThrough) {
  EXPECT_EQ(digest::fetched(EVP_md5()), EVP_md5());
  EXPECT_EQ(hex_of(EVP_md5(), "abc"), "900150983cd24fb0d6963f7d28e17f72");
}

}  // namespace
}  // namespace p11kms
