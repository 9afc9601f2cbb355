// Vault's path-policy semantics: matching, priority between matching paths, deny, merging.
#include <gtest/gtest.h>

#include "policy/policy.hpp"

using namespace p11kms::policy;

namespace {

TEST(PathMatches, ExactGlobAndPlus) {
  EXPECT_TRUE(path_matches("transit/keys", "transit/keys"));
  EXPECT_FALSE(path_matches("transit/keys", "transit/keys/a"));
  EXPECT_TRUE(path_matches("transit/encrypt/app-*", "transit/encrypt/app-1"));
  EXPECT_TRUE(path_matches("transit/encrypt/app-*", "transit/encrypt/app-"));
  EXPECT_FALSE(path_matches("transit/encrypt/app-*", "transit/encrypt/ap"));
  EXPECT_TRUE(path_matches("transit/*", "transit/keys/a/config"));
  EXPECT_TRUE(path_matches("*", "anything/at/all"));
  EXPECT_TRUE(path_matches("transit/keys/+", "transit/keys/a"));
  EXPECT_FALSE(path_matches("transit/keys/+", "transit/keys/a/rotate"));
  EXPECT_FALSE(path_matches("transit/keys/+", "transit/keys/"));
  EXPECT_TRUE(path_matches("transit/keys/+/rotate", "transit/keys/a/rotate"));
  EXPECT_TRUE(path_matches("transit/+/app-*", "transit/encrypt/app-9"));
}

TEST(Priority, VaultRules) {
  // An exact path beats any wildcard; a later first wildcard beats an earlier one.
  EXPECT_TRUE(lower_priority("transit/encrypt/*", "transit/encrypt/app"));
  EXPECT_TRUE(lower_priority("transit/*", "transit/encrypt/*"));
  // Without a trailing * beats with one, at the same first wildcard position.
  EXPECT_TRUE(lower_priority("transit/+/*", "transit/+/x"));
  // Fewer + segments beat more.
  EXPECT_TRUE(lower_priority("a/+/+", "a/+/b"));
  // Longer beats shorter.
  EXPECT_TRUE(lower_priority("transit/encrypt/a*", "transit/encrypt/app-*"));
  EXPECT_FALSE(lower_priority("transit/encrypt/app-*", "transit/encrypt/a*"));
}

std::map<std::string, Policy> configured() {
  return {
      {"app", {"app", {{"transit/encrypt/app-*", kUpdate}, {"transit/keys/+", kRead}}}},
      {"no-orders", {"no-orders", {{"transit/encrypt/app-orders", kDeny}}}},
      {"wide-deny", {"wide-deny", {{"transit/encrypt/*", kDeny}}}},
      {"reader", {"reader", {{"transit/encrypt/app-*", kRead}}}},
  };
}

TEST(PolicySet, GrantsOnlyTheCapabilityOnThePath) {
  PolicySet ps(configured());
  EXPECT_TRUE(ps.allows({"app"}, "transit/encrypt/app-1", kUpdate));
  EXPECT_FALSE(ps.allows({"app"}, "transit/encrypt/app-1", kCreate));
  EXPECT_FALSE(ps.allows({"app"}, "transit/encrypt/other", kUpdate));
  EXPECT_TRUE(ps.allows({"app"}, "transit/keys/x", kRead));
  EXPECT_FALSE(ps.allows({"app"}, "transit/keys/x/rotate", kUpdate));
  EXPECT_FALSE(ps.allows({}, "transit/keys/x", kRead));
  EXPECT_FALSE(ps.allows({"unknown-policy"}, "transit/keys/x", kRead));
}

TEST(PolicySet, DenyOnTheMostSpecificPathWins) {
  PolicySet ps(configured());
  EXPECT_FALSE(ps.allows({"app", "no-orders"}, "transit/encrypt/app-orders", kUpdate));
  EXPECT_TRUE(ps.allows({"app", "no-orders"}, "transit/encrypt/app-x", kUpdate));
  // A broader deny loses to a more specific grant, as in Vault.
  EXPECT_TRUE(ps.allows({"app", "wide-deny"}, "transit/encrypt/app-x", kUpdate));
  EXPECT_FALSE(ps.allows({"app", "wide-deny"}, "transit/encrypt/zzz", kUpdate));
}

TEST(PolicySet, RulesOnTheSamePathMergeAcrossPolicies) {
  PolicySet ps(configured());
  EXPECT_TRUE(ps.allows({"app", "reader"}, "transit/encrypt/app-1", kRead));
  EXPECT_TRUE(ps.allows({"app", "reader"}, "transit/encrypt/app-1", kUpdate));
  EXPECT_FALSE(ps.allows({"reader"}, "transit/encrypt/app-1", kUpdate));
}

TEST(PolicySet, BuiltIns) {
  PolicySet ps;
  EXPECT_TRUE(ps.allows({"root"}, "transit/keys/x", kDelete));
  EXPECT_TRUE(ps.allows({"root"}, "sys/anything", kSudo));
  EXPECT_TRUE(ps.allows({"kms-viewer"}, "kms/keys/abc/wrap", kUpdate));
  EXPECT_FALSE(ps.allows({"kms-viewer"}, "kms/keys", kCreate));
  EXPECT_FALSE(ps.allows({"kms-viewer"}, "kms/keys/abc", kRead));
  EXPECT_TRUE(ps.allows({"kms-editor"}, "kms/keys", kCreate));
  EXPECT_TRUE(ps.allows({"kms-editor"}, "kms/keys", kList));
  EXPECT_TRUE(ps.allows({"kms-editor"}, "kms/keys/abc", kRead));
  EXPECT_FALSE(ps.allows({"kms-editor"}, "kms/keys/abc", kDelete));
  EXPECT_FALSE(ps.allows({"kms-editor"}, "kms/keys/abc/rotate", kUpdate));
  EXPECT_TRUE(ps.allows({"kms-admin"}, "kms/keys/abc", kDelete));
  EXPECT_TRUE(ps.allows({"kms-admin"}, "kms/keys/abc/rotate", kUpdate));
  EXPECT_TRUE(ps.allows({"kms-admin"}, "kms/keys/abc/unwrap", kUpdate));
  EXPECT_FALSE(ps.allows({"kms-admin"}, "transit/keys/x", kRead));
  EXPECT_TRUE(is_builtin_policy("kms-admin"));
  EXPECT_FALSE(is_builtin_policy("app"));
}

TEST(Capabilities, NamesRoundTrip) {
  for (auto c : {kCreate, kRead, kUpdate, kDelete, kList, kSudo, kDeny})
    EXPECT_EQ(parse_capability(capability_name(c)), c);
  EXPECT_FALSE(parse_capability("fly").has_value());
}

}  // namespace
