// Unit tests for keys/envelope.hpp: the Vault transit ciphertext envelope.
#include "keys/envelope.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/encoding.hpp"
#include "keys/errors.hpp"

namespace keys = p11kms::keys;
namespace enc = p11kms::encoding;

namespace {

std::vector<uint8_t> seq(size_t n, uint8_t start) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(start + i);
  return v;
}

// Expects parse to throw KeyError(invalid_argument) whose message mentions "ciphertext".
void expect_rejected(const std::string& text) {
  try {
    keys::parse_transit_ciphertext(text);
    ADD_FAILURE() << "accepted malformed ciphertext: \"" << text << "\"";
  } catch (const keys::KeyError& e) {
    EXPECT_EQ(e.kind(), keys::ErrorKind::invalid_argument) << text;
    EXPECT_NE(std::string(e.what()).find("ciphertext"), std::string::npos)
        << "message for \"" << text << "\": " << e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "\"" << text << "\" threw something other than KeyError: " << e.what();
  }
}

const std::string kValidBody = enc::base64_encode(seq(12 + 5 + 16, 1));

}  // namespace

TEST(TransitEnvelope, FormatsVaultShape) {
  auto iv = seq(12, 0);
  auto sealed = seq(20, 100);
  std::string text = keys::format_transit_ciphertext(7, iv, sealed);
  std::vector<uint8_t> blob = iv;
  blob.insert(blob.end(), sealed.begin(), sealed.end());
  EXPECT_EQ(text, "vault:v7:" + enc::base64_encode(blob));
}

TEST(TransitEnvelope, RoundTrips) {
  auto iv = seq(12, 3);
  auto sealed = seq(16 + 33, 200);
  for (int version : {1, 2, 10, 12345}) {
    auto parsed = keys::parse_transit_ciphertext(keys::format_transit_ciphertext(version, iv, sealed));
    EXPECT_EQ(parsed.version, version);
    EXPECT_EQ(parsed.iv, iv);
    EXPECT_EQ(parsed.sealed, sealed);
  }
}

TEST(TransitEnvelope, AcceptsShortestValid) {
  // iv(12) + tag(16) with an empty plaintext is the minimum.
  auto iv = seq(12, 0);
  auto tag = seq(16, 50);
  auto parsed = keys::parse_transit_ciphertext(keys::format_transit_ciphertext(1, iv, tag));
  EXPECT_EQ(parsed.version, 1);
  EXPECT_EQ(parsed.iv, iv);
  EXPECT_EQ(parsed.sealed, tag);
}

TEST(TransitEnvelope, RejectsEmpty) { expect_rejected(""); }

TEST(TransitEnvelope, RejectsMissingPrefix) {
  expect_rejected(kValidBody);
  expect_rejected("v1:" + kValidBody);
  expect_rejected("VAULT:v1:" + kValidBody);
  expect_rejected("vaul:v1:" + kValidBody);
  expect_rejected(" vault:v1:" + kValidBody);
}

TEST(TransitEnvelope, RejectsWrongNumberOfFields) {
  expect_rejected("vault:");
  expect_rejected("vault:v1");
  expect_rejected("vault:v1" + kValidBody);
  expect_rejected("vault:v1:" + kValidBody + ":extra");
  expect_rejected("vault:v1::" + kValidBody);
}

TEST(TransitEnvelope, RejectsVersionWithoutDigits) {
  expect_rejected("vault:v:" + kValidBody);
  expect_rejected("vault::" + kValidBody);
}

TEST(TransitEnvelope, RejectsVersionZero) {
  expect_rejected("vault:v0:" + kValidBody);
  expect_rejected("vault:v00:" + kValidBody);
}

TEST(TransitEnvelope, RejectsNonNumericVersion) {
  expect_rejected("vault:vx:" + kValidBody);
  expect_rejected("vault:1:" + kValidBody);
  expect_rejected("vault:v1a:" + kValidBody);
  expect_rejected("vault:v-1:" + kValidBody);
  expect_rejected("vault:v+1:" + kValidBody);
  expect_rejected("vault:v 1:" + kValidBody);
  expect_rejected("vault:V1:" + kValidBody);
  // Too many digits to be a version (would overflow int).
  expect_rejected("vault:v99999999999:" + kValidBody);
}

TEST(TransitEnvelope, RejectsBadBase64) {
  expect_rejected("vault:v1:" + kValidBody.substr(0, kValidBody.size() - 1));  // length not % 4
  expect_rejected("vault:v1:" + kValidBody + " ");
  std::string bad = kValidBody;
  bad[3] = '*';
  expect_rejected("vault:v1:" + bad);
  bad = kValidBody;
  bad[4] = '=';
  expect_rejected("vault:v1:" + bad);
}

TEST(TransitEnvelope, RejectsTooShort) {
  expect_rejected("vault:v1:");  // empty body
  expect_rejected("vault:v1:" + enc::base64_encode(seq(27, 0)));
  expect_rejected("vault:v1:" + enc::base64_encode(seq(12, 0)));
  expect_rejected("vault:v1:" + enc::base64_encode(seq(1, 0)));
}

// The KMS wrap envelope carries its version so unwrap works after rotation.
TEST(WrapEnvelope, RoundTripsVersionIvAndSealed) {
  std::vector<uint8_t> iv(12, 7), sealed(40, 9);
  auto text = keys::format_wrap_ciphertext(70000, iv, sealed);
  auto ct = keys::parse_wrap_ciphertext(text);
  EXPECT_EQ(ct.version, 70000);
  EXPECT_EQ(ct.iv, iv);
  EXPECT_EQ(ct.sealed, sealed);
}

TEST(WrapEnvelope, RejectsEmptyGarbageShortAndForeignFormats) {
  for (const std::string bad : {"", "not base64!", "AAAA", "vault:v1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}) {
    try {
      keys::parse_wrap_ciphertext(bad);
      ADD_FAILURE() << "accepted " << bad;
    } catch (const keys::KeyError& e) {
      EXPECT_EQ(e.kind(), keys::ErrorKind::invalid_argument);
    }
  }
  // Right length, wrong format byte.
  std::vector<uint8_t> blob(5 + 12 + 16, 0);
  blob[0] = 2;
  blob[4] = 1;
  EXPECT_THROW(keys::parse_wrap_ciphertext(enc::base64_encode(blob)), keys::KeyError);
  // Version 0 is never made.
  blob[0] = 1;
  blob[4] = 0;
  EXPECT_THROW(keys::parse_wrap_ciphertext(enc::base64_encode(blob)), keys::KeyError);
}

TEST(WrapAad, LengthPrefixingKeepsSplitsApartAndBindsTheKey) {
  EXPECT_NE(keys::wrap_aad("k", {"ab", "c"}), keys::wrap_aad("k", {"a", "bc"}));
  EXPECT_NE(keys::wrap_aad("k", {}), keys::wrap_aad("k", {""}));
  EXPECT_NE(keys::wrap_aad("k1", {"x"}), keys::wrap_aad("k2", {"x"}));
  EXPECT_EQ(keys::wrap_aad("k", {"x", "y"}), keys::wrap_aad("k", {"x", "y"}));
}

TEST(SealedMaterialAad, DiffersPerNamespaceKeyAndVersion) {
  auto a = keys::sealed_material_aad("root", "id", 1);
  EXPECT_NE(a, keys::sealed_material_aad("other", "id", 1));
  EXPECT_NE(a, keys::sealed_material_aad("root", "id2", 1));
  EXPECT_NE(a, keys::sealed_material_aad("root", "id", 2));
}
