// app::token_options against a real SoftHSM token: hsm.serialize_batches and hsm.compose_gcm
// "auto" follow what the loaded module is known to need and can do; an explicit value wins.
#include "app/token_options.hpp"

#include <gtest/gtest.h>

#include "support/temp_token.hpp"

using namespace p11kms;

TEST(TokenOptions, AutoSerializesBatchesOnSoftHsm) {
  test_support::TempToken temp;
  hsm::SessionPool pool(temp.pool_config());
  EXPECT_EQ(pool.library_manufacturer(), "SoftHSM");

  app::Config::Hsm config;
  config.session_copies = false;
  config.compose_gcm = false;  // an item's C_EncryptInit holds SoftHSM's locks: gate batches
  auto automatic = app::token_options(config, pool);
  EXPECT_TRUE(automatic.serialize_batches);
  EXPECT_FALSE(automatic.session_copies);
  config.compose_gcm.reset();  // auto: composed on SoftHSM, and then no gate
  EXPECT_FALSE(app::token_options(config, pool).serialize_batches);

  config.serialize_batches = false;
  EXPECT_FALSE(app::token_options(config, pool).serialize_batches);
  config.serialize_batches = true;
  config.session_copies = true;
  auto forced = app::token_options(config, pool);
  EXPECT_TRUE(forced.serialize_batches);
  EXPECT_TRUE(forced.session_copies);
}

TEST(TokenOptions, AutoComposesGcmOnSoftHsmWhichOffersAesEcb) {
  test_support::TempToken temp;
  hsm::SessionPool pool(temp.pool_config());
  ASSERT_TRUE(pool.capabilities()->has(CKM_AES_ECB, CKF_ENCRYPT));

  app::Config::Hsm config;
  EXPECT_TRUE(app::token_options(config, pool).compose_gcm);
  config.compose_gcm = false;
  EXPECT_FALSE(app::token_options(config, pool).compose_gcm);
  config.compose_gcm = true;
  EXPECT_TRUE(app::token_options(config, pool).compose_gcm);
}

TEST(TokenOptions, OnlySoftHsmIsKnownToSerialize) {
  EXPECT_TRUE(hsm::serializes_calls_in_process("SoftHSM"));
  EXPECT_FALSE(hsm::serializes_calls_in_process("p11-kit"));
  EXPECT_FALSE(hsm::serializes_calls_in_process("Thales"));
  EXPECT_FALSE(hsm::serializes_calls_in_process(""));
}
