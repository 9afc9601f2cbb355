// The capability table against a real SoftHSM token: read at connect from C_GetMechanismList
// and C_GetMechanismInfo, everything p11kms runs is available directly, and `hsm info`'s
// description names the token.
#include <gtest/gtest.h>

#include <chrono>
#include <thread>

#include "hsm/capabilities.hpp"
#include "hsm/session_pool.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

TEST(CapabilitiesSoftHsm, EveryKeyTypeAndOperationIsAvailableDirectly) {
  test_support::TempToken token;
  hsm::SessionPool pool(token.pool_config(1));
  auto caps = pool.capabilities();
  ASSERT_TRUE(caps);
  EXPECT_GE(caps->mechanisms().size(), 40u);  // SoftHSM 2.6.1 offers 70
  for (const auto& c : caps->table()) {
    std::string missing;
    for (const auto& n : c.missing) missing += n.describe() + " ";
    EXPECT_TRUE(c.available()) << c.id() << " lacks " << missing;
  }
  EXPECT_TRUE(caps->unavailable().empty());
  // Flags come from C_GetMechanismInfo, not just the list.
  EXPECT_TRUE(caps->has(CKM_AES_GCM, CKF_ENCRYPT | CKF_DECRYPT));
  EXPECT_FALSE(caps->has(CKM_AES_GCM, CKF_SIGN));
  EXPECT_TRUE(caps->has(CKM_EC_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR));
  EXPECT_TRUE(caps->has(CKM_AES_ECB_ENCRYPT_DATA, CKF_DERIVE));
  auto rsa = caps->info(CKM_RSA_PKCS_KEY_PAIR_GEN);
  ASSERT_TRUE(rsa);
  EXPECT_LE(rsa->min_key_size, 2048u);
  EXPECT_GE(rsa->max_key_size, 4096u);
}

// A reconnect reads the list again (a different module may answer); the table stays usable.
TEST(CapabilitiesSoftHsm, ReadAgainAfterReconnect) {
  test_support::TempToken token;
  hsm::SessionPool pool(token.pool_config(1));
  auto before = pool.capabilities();
  {
    auto l = pool.lease();
    // A connection-class failure: the pool reconnects on the next lease.
    EXPECT_THROW(l.check(CKR_DEVICE_REMOVED, "test"), hsm::TokenUnavailable);
  }
  for (int i = 0; i < 50 && !pool.probe().reachable; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(pool.status().reachable);
  auto after = pool.capabilities();
  EXPECT_NE(before.get(), after.get());  // a new table, read at the reconnect
  EXPECT_EQ(before->mechanisms().size(), after->mechanisms().size());
  EXPECT_TRUE(after->unavailable().empty());
}

TEST(CapabilitiesSoftHsm, DescribeTokenNamesModuleTokenAndMechanisms) {
  test_support::TempToken token;
  auto d = hsm::describe_token(token.pool_config().module, token.label());
  EXPECT_EQ(d.label, token.label());
  EXPECT_FALSE(d.serial.empty());
  EXPECT_EQ(d.model, "SoftHSM v2");
  EXPECT_NE(d.module_path.find("softhsm"), std::string::npos);
  EXPECT_FALSE(d.mechanisms.empty());
  hsm::Capabilities caps(d.mechanisms);
  EXPECT_TRUE(caps.available(hsm::CapabilityKind::key_type, hsm::cap::kEd25519));
  EXPECT_THROW(hsm::describe_token(token.pool_config().module, "no-such-token"), std::runtime_error);
}
