// Automatic rotation (auto_rotate_period) over a real token and store: when a key is due, which keys never rotate by
// themselves, and that policies go with their key. rotate_due takes the time, so no test waits.
#include <gtest/gtest.h>

#include <ctime>

#include "keys/key_service.hpp"
#include "support/expect_key_error.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

class KeyRotationTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  std::string db_dir_ = test_support::make_temp_dir("p11kms-db");
  std::unique_ptr<store::MetadataStore> store_ = store::open_sqlite_store(db_dir_ + "/p11kms.db");
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token hsm_{pool_};
  keys::KeyService ks_{*store_, hsm_};
  keys::KeyRef ref_{"root", "orders"};
  int64_t now_ = static_cast<int64_t>(std::time(nullptr));

  ~KeyRotationTest() override { test_support::remove_tree(db_dir_); }
};

TEST_F(KeyRotationTest, RotatesOnlyOnceThePeriodHasPassed) {
  auto key = ks_.create_key(ref_, keys::KeySpec{}).key;
  auto p = ks_.set_rotation_policy(ref_, 100);
  EXPECT_EQ(p.period_s, 100);
  EXPECT_EQ(ks_.rotation_policy("root", key.id)->period_s, 100);
  EXPECT_EQ(ks_.read_key(ref_).auto_rotate_period, 100);
  EXPECT_EQ(ks_.rotate_due(now_ + 50), 0u);
  EXPECT_EQ(ks_.read_key(ref_).latest_version(), 1);
  EXPECT_EQ(ks_.rotate_due(now_ + 150), 1u);
  EXPECT_EQ(ks_.read_key(ref_).latest_version(), 2);
  // The new version restarts the clock.
  EXPECT_EQ(ks_.rotate_due(now_ + 50), 0u);
  EXPECT_EQ(ks_.read_key(ref_).latest_version(), 2);
}

TEST_F(KeyRotationTest, SuspendedKeysWaitAndPeriodZeroRemovesThePolicy) {
  auto key = ks_.create_key(ref_, keys::KeySpec{}).key;
  ks_.set_rotation_policy(ref_, 10);
  ks_.set_enabled(ref_, false);
  EXPECT_EQ(ks_.rotate_due(now_ + 100), 0u);
  ks_.set_enabled(ref_, true);
  EXPECT_EQ(ks_.rotate_due(now_ + 100), 1u);
  ks_.set_rotation_policy(ref_, 0);
  EXPECT_FALSE(ks_.rotation_policy("root", key.id).has_value());
  EXPECT_EQ(ks_.rotate_due(now_ + 10000), 0u);
}

TEST_F(KeyRotationTest, KeysTheTokenCannotRotateAloneAreRefused) {
  hsm::SecureBytes material(32);
  keys::KeySpec imported;
  imported.material = &material;
  ks_.create_key(keys::KeyRef{"root", "imported"}, imported);
  test_support::expect_key_error([&] { ks_.set_rotation_policy(keys::KeyRef{"root", "imported"}, 10); });
  keys::KeySpec standard;
  standard.type = "standard";
  ks_.create_key(keys::KeyRef{"root", "std"}, standard);
  test_support::expect_key_error([&] { ks_.set_rotation_policy(keys::KeyRef{"root", "std"}, 10); });
  test_support::expect_key_error([&] { ks_.set_rotation_policy(keys::KeyRef{"root", "missing"}, 10); },
                                 keys::ErrorKind::not_found);
  EXPECT_EQ(store_->keys_due_for_rotation(now_ + 1000000).size(), 0u);
}

TEST_F(KeyRotationTest, DeletingAKeyRemovesItsPolicy) {
  auto key = ks_.create_key(ref_, keys::KeySpec{}).key;
  ks_.set_rotation_policy(ref_, 10);
  ks_.delete_key(ref_, /*require_deletion_allowed=*/false);
  EXPECT_FALSE(ks_.rotation_policy("root", key.id).has_value());
  // A key created again under the name starts without one, and the tombstone is never due.
  auto again = ks_.create_key(ref_, keys::KeySpec{}).key;
  EXPECT_EQ(again.auto_rotate_period, 0);
  EXPECT_TRUE(store_->keys_due_for_rotation(now_ + 10000).empty());
}

TEST_F(KeyRotationTest, KeysOfAMountedEngineRotateToo) {
  keys::KeyRef mounted{"root/payments", "orders"};
  ks_.create_key(mounted, keys::KeySpec{});
  ks_.set_rotation_policy(mounted, 10);
  EXPECT_EQ(ks_.rotate_due(now_ + 100), 1u);
  EXPECT_EQ(ks_.read_key(mounted).latest_version(), 2);
}

}  // namespace
