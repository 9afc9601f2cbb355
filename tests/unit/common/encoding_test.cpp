// Unit tests for common/encoding.hpp: strict base64 and hex.
#include "common/encoding.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace enc = p11kms::encoding;

namespace {

std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }

}  // namespace

TEST(Base64, EncodesKnownVectors) {
  // RFC 4648 section 10.
  EXPECT_EQ(enc::base64_encode(bytes("")), "");
  EXPECT_EQ(enc::base64_encode(bytes("f")), "Zg==");
  EXPECT_EQ(enc::base64_encode(bytes("fo")), "Zm8=");
  EXPECT_EQ(enc::base64_encode(bytes("foo")), "Zm9v");
  EXPECT_EQ(enc::base64_encode(bytes("foob")), "Zm9vYg==");
  EXPECT_EQ(enc::base64_encode(bytes("fooba")), "Zm9vYmE=");
  EXPECT_EQ(enc::base64_encode(bytes("foobar")), "Zm9vYmFy");
}

TEST(Base64, AppendsAfterWhatIsThere) {
  std::string out = "vault:v1:";
  auto foob = bytes("foob");
  enc::base64_append(out, foob.data(), foob.size());
  EXPECT_EQ(out, "vault:v1:Zm9vYg==");
  enc::base64_append(out, foob.data(), 0);
  EXPECT_EQ(out, "vault:v1:Zm9vYg==");
}

TEST(Base64, DecodesKnownVectors) {
  EXPECT_EQ(enc::base64_decode("Zg==").value(), bytes("f"));
  EXPECT_EQ(enc::base64_decode("Zm8=").value(), bytes("fo"));
  EXPECT_EQ(enc::base64_decode("Zm9v").value(), bytes("foo"));
  EXPECT_EQ(enc::base64_decode("Zm9vYmFy").value(), bytes("foobar"));
}

TEST(Base64, EmptyRoundTrips) {
  auto d = enc::base64_decode("");
  ASSERT_TRUE(d.has_value());
  EXPECT_TRUE(d->empty());
  EXPECT_EQ(enc::base64_encode(std::vector<uint8_t>{}), "");
}

TEST(Base64, RoundTripsEveryTailLength) {
  // Lengths 0..9 cover a 0, 1, 2 byte tail after whole 3-byte groups, several times.
  for (size_t len = 0; len < 10; ++len) {
    std::vector<uint8_t> v(len);
    for (size_t i = 0; i < len; ++i) v[i] = static_cast<uint8_t>(0xff - i * 37);
    std::string text = enc::base64_encode(v);
    EXPECT_EQ(text.size() % 4, 0u) << "len " << len;
    auto back = enc::base64_decode(text);
    ASSERT_TRUE(back.has_value()) << "len " << len << " text " << text;
    EXPECT_EQ(*back, v) << "len " << len;
  }
}

TEST(Base64, RoundTripsAllByteValues) {
  std::vector<uint8_t> v(256);
  for (int i = 0; i < 256; ++i) v[i] = static_cast<uint8_t>(i);
  auto back = enc::base64_decode(enc::base64_encode(v));
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(*back, v);
}

TEST(Base64, RoundTripsZeroBytesTails) {
  // Zero bytes in the tail must survive (the pad count is not inferred from the data).
  for (size_t len = 1; len <= 4; ++len) {
    std::vector<uint8_t> v(len, 0);
    auto back = enc::base64_decode(enc::base64_encode(v));
    ASSERT_TRUE(back.has_value());
    EXPECT_EQ(*back, v) << "len " << len;
  }
}

TEST(Base64, RejectsCharactersOutsideTheAlphabet) {
  EXPECT_FALSE(enc::base64_decode("Zm9*").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm-v").has_value());  // URL-safe alphabet is not accepted
  EXPECT_FALSE(enc::base64_decode("Zm_v").has_value());
  EXPECT_FALSE(enc::base64_decode(std::string("Zm\0v", 4)).has_value());
  EXPECT_FALSE(enc::base64_decode("Zm9\xc3").has_value());
}

TEST(Base64, RejectsWhitespace) {
  EXPECT_FALSE(enc::base64_decode("Zm9v Zm9v").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm9v\nZm9v").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm9vYmFy\n").has_value());
  EXPECT_FALSE(enc::base64_decode(" Zm9vYmFy").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm9\tv").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm 9").has_value());  // length 4, a space inside
}

TEST(Base64, RejectsLengthNotMultipleOfFour) {
  EXPECT_FALSE(enc::base64_decode("Z").has_value());
  EXPECT_FALSE(enc::base64_decode("Zg").has_value());
  EXPECT_FALSE(enc::base64_decode("Zg=").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm9").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm9vY").has_value());
}

TEST(Base64, RejectsWrongPadding) {
  EXPECT_FALSE(enc::base64_decode("Z===").has_value());
  EXPECT_FALSE(enc::base64_decode("====").has_value());
  EXPECT_FALSE(enc::base64_decode("Zg=A").has_value());  // '=' then data
  EXPECT_FALSE(enc::base64_decode("Zm9vZg=A").has_value());
}

TEST(Base64, RejectsPaddingInTheMiddle) {
  EXPECT_FALSE(enc::base64_decode("Zg==Zm9v").has_value());
  EXPECT_FALSE(enc::base64_decode("Zm8=Zm9v").has_value());
  EXPECT_FALSE(enc::base64_decode("Z=9v").has_value());
  EXPECT_FALSE(enc::base64_decode("=m9v").has_value());
}

TEST(Hex, EncodesLowercase) {
  std::vector<uint8_t> v{0x00, 0x01, 0x7f, 0x80, 0xab, 0xff};
  EXPECT_EQ(enc::hex_encode(v), "00017f80abff");
  EXPECT_EQ(enc::hex_encode(std::vector<uint8_t>{}), "");
}

TEST(Hex, RoundTrips) {
  std::vector<uint8_t> v(256);
  for (int i = 0; i < 256; ++i) v[i] = static_cast<uint8_t>(i);
  auto back = enc::hex_decode(enc::hex_encode(v));
  ASSERT_TRUE(back.has_value());
  EXPECT_EQ(*back, v);
  auto empty = enc::hex_decode("");
  ASSERT_TRUE(empty.has_value());
  EXPECT_TRUE(empty->empty());
}

TEST(Hex, AcceptsUppercase) {
  auto d = enc::hex_decode("ABcdEF");
  ASSERT_TRUE(d.has_value());
  EXPECT_EQ(*d, (std::vector<uint8_t>{0xab, 0xcd, 0xef}));
}

TEST(Hex, Rejects) {
  EXPECT_FALSE(enc::hex_decode("a").has_value());     // odd length
  EXPECT_FALSE(enc::hex_decode("abc").has_value());   // odd length
  EXPECT_FALSE(enc::hex_decode("zz").has_value());
  EXPECT_FALSE(enc::hex_decode("0g").has_value());
  EXPECT_FALSE(enc::hex_decode("g0").has_value());
  EXPECT_FALSE(enc::hex_decode("0x12").has_value());
  EXPECT_FALSE(enc::hex_decode("12 4").has_value());
  EXPECT_FALSE(enc::hex_decode(" 1234").has_value());
  EXPECT_FALSE(enc::hex_decode("-1").has_value());
}
