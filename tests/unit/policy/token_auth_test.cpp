// Unit tests for policy/token_auth.hpp: token hashes and authentication.
#include "policy/token_auth.hpp"

#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "common/encoding.hpp"

namespace policy = p11kms::policy;

namespace {

std::string hex(const policy::TokenHash& h) { return p11kms::encoding::hex_encode(h.data(), h.size()); }

policy::TokenEntry entry(const std::string& name, const std::string& token,
                         std::optional<int64_t> expires = std::nullopt) {
  policy::TokenEntry e;
  e.name = name;
  e.sha256 = policy::sha256_of(token);
  e.expires = expires;
  return e;
}

constexpr int64_t kNow = 1800000000;

}  // namespace

TEST(TokenHash, Sha256OfKnownVector) {
  EXPECT_EQ(hex(policy::sha256_of("test")), "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
  EXPECT_EQ(hex(policy::sha256_of("")), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(TokenHash, ParseRoundTrips) {
  const std::string h = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
  auto parsed = policy::parse_token_hash(h);
  ASSERT_TRUE(parsed.has_value());
  EXPECT_EQ(*parsed, policy::sha256_of("test"));
  std::string upper = h;
  for (auto& c : upper) c = static_cast<char>(toupper(static_cast<unsigned char>(c)));
  auto parsed_upper = policy::parse_token_hash(upper);
  ASSERT_TRUE(parsed_upper.has_value());
  EXPECT_EQ(*parsed_upper, *parsed);
}

TEST(TokenHash, ParseRejectsWrongLengthsAndNonHex) {
  const std::string h = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
  EXPECT_FALSE(policy::parse_token_hash("").has_value());
  EXPECT_FALSE(policy::parse_token_hash(h.substr(0, 62)).has_value());  // 31 bytes
  EXPECT_FALSE(policy::parse_token_hash(h.substr(0, 63)).has_value());  // odd
  EXPECT_FALSE(policy::parse_token_hash(h + "0").has_value());          // odd
  EXPECT_FALSE(policy::parse_token_hash(h + "00").has_value());         // 33 bytes
  EXPECT_FALSE(policy::parse_token_hash(h.substr(0, 40)).has_value());  // SHA-1 length
  std::string bad = h;
  bad[10] = 'g';
  EXPECT_FALSE(policy::parse_token_hash(bad).has_value());
  EXPECT_FALSE(policy::parse_token_hash(" " + h.substr(1)).has_value());
  EXPECT_FALSE(policy::parse_token_hash(h.substr(0, 63) + "\n").has_value());
  EXPECT_FALSE(policy::parse_token_hash("test").has_value());
}

TEST(TokenAuth, RightTokenMatchesItsEntry) {
  policy::TokenAuthenticator auth({entry("ci", "s3cret-token")});
  const auto* e = auth.authenticate("s3cret-token", kNow);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->name, "ci");
}

TEST(TokenAuth, WrongOrEmptyTokenRefused) {
  policy::TokenAuthenticator auth({entry("ci", "s3cret-token")});
  EXPECT_EQ(auth.authenticate("s3cret-tokeN", kNow), nullptr);
  EXPECT_EQ(auth.authenticate("s3cret-token ", kNow), nullptr);
  EXPECT_EQ(auth.authenticate("s3cret", kNow), nullptr);
  EXPECT_EQ(auth.authenticate("", kNow), nullptr);
  // The hash itself is not a token.
  EXPECT_EQ(auth.authenticate(hex(policy::sha256_of("s3cret-token")), kNow), nullptr);
}

TEST(TokenAuth, EmptyTokenRefusedEvenIfItsHashIsConfigured) {
  policy::TokenAuthenticator auth({entry("empty", "")});
  EXPECT_EQ(auth.authenticate("", kNow), nullptr);
}

TEST(TokenAuth, NoEntriesRefusesEverything) {
  policy::TokenAuthenticator auth({});
  EXPECT_EQ(auth.authenticate("anything", kNow), nullptr);
}

TEST(TokenAuth, ExpiredTokenRefused) {
  policy::TokenAuthenticator auth({entry("old", "tok", kNow - 1), entry("edge", "tok2", kNow)});
  EXPECT_EQ(auth.authenticate("tok", kNow), nullptr);
  EXPECT_EQ(auth.authenticate("tok2", kNow), nullptr);  // expires == now: expired
}

TEST(TokenAuth, UnexpiredTokenMatches) {
  policy::TokenAuthenticator auth({entry("soon", "tok", kNow + 1)});
  const auto* e = auth.authenticate("tok", kNow);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->name, "soon");
  EXPECT_EQ(auth.authenticate("tok", kNow + 1), nullptr);
}

TEST(TokenAuth, SeveralEntriesPicksTheRightOne) {
  policy::TokenAuthenticator auth({entry("alpha", "token-a"), entry("beta", "token-b", kNow + 3600),
                                   entry("gamma", "token-c"), entry("delta", "token-d", kNow - 10)});
  const auto* a = auth.authenticate("token-a", kNow);
  const auto* b = auth.authenticate("token-b", kNow);
  const auto* c = auth.authenticate("token-c", kNow);
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  ASSERT_NE(c, nullptr);
  EXPECT_EQ(a->name, "alpha");
  EXPECT_EQ(b->name, "beta");
  EXPECT_EQ(c->name, "gamma");
  EXPECT_EQ(auth.authenticate("token-d", kNow), nullptr);  // expired
  EXPECT_EQ(auth.authenticate("token-e", kNow), nullptr);
}

TEST(TokenAuth, EntryKeepsPoliciesAndNamespaces) {
  auto e = entry("scoped", "tok");
  e.namespaces = {"team-a"};
  policy::TokenAuthenticator auth({e});
  const auto* got = auth.authenticate("tok", kNow);
  ASSERT_NE(got, nullptr);
  EXPECT_EQ(got->namespaces, std::vector<std::string>{"team-a"});
  EXPECT_EQ(got->policies, std::vector<std::string>{"root"});
}
