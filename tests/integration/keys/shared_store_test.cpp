// Two KeyServices on one PostgreSQL database and one token, as two instances are: each caches
// key metadata, checks a cached key's stamp against the store before use, and drops it early on
// the store's LISTEN/NOTIFY (whatever one writes, the other's next call sees, notified or not);
// and the sweeper destroys only what a dead instance left, never what a live one is making.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <set>
#include <string>
#include <thread>

#include "common/encoding.hpp"
#include "keys/key_service.hpp"
#include "support/temp_postgres.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

keys::ServiceLimits shared_limits() {
  keys::ServiceLimits l;
  l.cache_metadata = true;
  l.check_cached_versions = true;
  l.cluster.shared_store = true;
  return l;
}

class SharedStoreTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  std::string dsn_ = test_support::TempPostgres::shared().new_database();
  std::unique_ptr<store::MetadataStore> store_a_ = store::open_postgres_store(dsn_);
  std::unique_ptr<store::MetadataStore> store_b_ = store::open_postgres_store(dsn_);
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token hsm_{pool_};
  keys::KeyService a_{*store_a_, hsm_, shared_limits()};
  keys::KeyService b_{*store_b_, hsm_, shared_limits()};
  keys::KeyRef ref_{"root", "shared"};

  int version_of(keys::KeyService& ks) {
    std::string pt = "x";
    return ks.encrypt(ref_, reinterpret_cast<const uint8_t*>(pt.data()), pt.size(), 0).key_version;
  }
  template <typename P>
  bool eventually(P pred) {
    for (int i = 0; i < 100; ++i) {
      if (pred()) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  }
};

TEST_F(SharedStoreTest, TheCacheServesAndNotificationsEvictWhatAnotherInstanceChanged) {
  // b's listener announces itself once it LISTENs (a "maybe anything" notification).
  ASSERT_TRUE(eventually([&] { return b_.cache_stats().notifications >= 1; }));
  auto listening = b_.cache_stats().notifications;
  a_.create_key(ref_, "aes256-gcm96");
  ASSERT_TRUE(eventually([&] { return b_.cache_stats().notifications > listening; }));
  EXPECT_EQ(version_of(b_), 1);
  auto before = b_.cache_stats();
  EXPECT_EQ(version_of(b_), 1);
  EXPECT_EQ(version_of(b_), 1);
  EXPECT_GE(b_.cache_stats().hits, before.hits + 2) << "the cached key was used after its stamp matched";

  auto notified = b_.cache_stats().notifications;
  a_.rotate_key(ref_);
  EXPECT_EQ(version_of(b_), 2);  // at once, whether or not the notification has arrived
  EXPECT_TRUE(eventually([&] { return b_.cache_stats().notifications > notified; }))
      << "b heard of a's rotation through LISTEN/NOTIFY";

  keys::KeyConfigChange allow;
  allow.deletion_allowed = true;
  a_.configure_key(ref_, allow);
  EXPECT_TRUE(b_.read_key(ref_).deletion_allowed);
  a_.delete_key(ref_);
  EXPECT_FALSE(b_.key_exists(ref_));
}

TEST_F(SharedStoreTest, AMissedNotificationNeverServesAStaleVersionOrADeletedKey) {
  a_.create_key(ref_, "aes256-gcm96");
  EXPECT_EQ(version_of(b_), 1);
  // b stops hearing notifications (as if they were lost): only the stamp check is left.
  store_b_->on_key_change(nullptr);
  EXPECT_EQ(version_of(b_), 1);  // cached now, and nothing will evict it
  auto stale = b_.cache_stats().stale;
  a_.rotate_key(ref_);
  EXPECT_EQ(version_of(b_), 2);
  EXPECT_EQ(b_.cache_stats().stale, stale + 1);
  keys::KeyConfigChange allow;
  allow.deletion_allowed = true;
  a_.configure_key(ref_, allow);
  EXPECT_EQ(version_of(b_), 2);
  a_.delete_key(ref_);
  EXPECT_FALSE(b_.key_exists(ref_));
  // A new key under the same name is another key: never the old one's cached versions.
  a_.create_key(ref_, "aes128-gcm96");
  EXPECT_EQ(b_.read_key(ref_).type, "aes128-gcm96");
  EXPECT_EQ(version_of(b_), 1);
}

// The sweeper with several writers: an object is destroyed only when its intent's lease has
// expired and its owner has missed its heartbeats (or is this instance), never another live
// instance's object in the making.
TEST_F(SharedStoreTest, TheSweeperDestroysOnlyExpiredIntentsOfDeadInstances) {
  const int64_t now = static_cast<int64_t>(std::time(nullptr));
  auto object = [&](const std::string& label) {
    auto id = hsm_.new_object_id();
    hsm_.generate_aes_key(id, 32, label);
    return encoding::hex_encode(id);
  };
  auto present = [&] {
    std::set<std::string> out;
    for (const auto& o : hsm_.list_key_objects()) out.insert(encoding::hex_encode(o.id));
    return out;
  };
  store_a_->heartbeat("inst-live", now);
  store_a_->heartbeat("inst-dead", now - 60);
  std::string live_expired = object("p11kms/root/live/v1"), dead_expired = object("p11kms/root/dead/v1"),
              dead_leased = object("p11kms/root/dead/v2");
  store_a_->add_intent(store::Intent{live_expired, "p11kms/root/live/v1", now - 10, "inst-live", now - 1});
  store_a_->add_intent(store::Intent{dead_expired, "p11kms/root/dead/v1", now - 10, "inst-dead", now - 1});
  store_a_->add_intent(store::Intent{dead_leased, "p11kms/root/dead/v2", now - 10, "inst-dead", now + 600});
  auto report = b_.sweep();
  EXPECT_EQ(report.orphans_destroyed, 1u);
  EXPECT_EQ(report.intents_waiting, 2u);
  auto objects = present();
  EXPECT_FALSE(objects.count(dead_expired));
  EXPECT_TRUE(objects.count(live_expired)) << "its owner is alive: it may still be creating it";
  EXPECT_TRUE(objects.count(dead_leased)) << "within its lease";
  EXPECT_EQ(store_a_->list_intents().size(), 2u);
  // The live instance goes away (a clean shutdown removes its heartbeat row): now it is dead.
  store_a_->remove_instance("inst-live");
  report = b_.sweep();
  EXPECT_EQ(report.orphans_destroyed, 1u);
  EXPECT_FALSE(present().count(live_expired));
  EXPECT_TRUE(present().count(dead_leased));
  EXPECT_TRUE(report.missing.empty());
}

// Sweeps on one instance while the other creates and rotates keys: nothing in the making is
// destroyed and no metadata ends up without its object.
TEST_F(SharedStoreTest, SweepsRacingCreatesAndRotationsLoseNothing) {
  a_.heartbeat();
  b_.heartbeat();
  std::atomic<bool> done{false};
  std::atomic<int> sweeps{0};
  std::thread sweeper([&] {
    while (!done) {
      try {
        auto r = a_.sweep();
        EXPECT_EQ(r.orphans_destroyed, 0u);
        EXPECT_TRUE(r.missing.empty());
        ++sweeps;
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
      } catch (const std::exception& e) {
        ADD_FAILURE() << "sweep failed: " << e.what();
        return;
      }
    }
  });
  std::vector<std::string> names;
  try {
    for (int i = 0; i < 15; ++i) {
      keys::KeyRef ref{"root", "race-" + std::to_string(i)};
      b_.create_key(ref, "aes256-gcm96");
      b_.rotate_key(ref);
      names.push_back(ref.name);
    }
  } catch (const std::exception& e) {
    ADD_FAILURE() << "a write failed while sweeps ran: " << e.what();
  }
  done = true;
  sweeper.join();
  EXPECT_GT(sweeps.load(), 0);
  auto final_report = a_.sweep();
  EXPECT_TRUE(final_report.missing.empty());
  EXPECT_TRUE(store_a_->list_intents().empty());
  for (const auto& n : names) {
    std::string pt = "x";
    EXPECT_EQ(a_.encrypt({"root", n}, reinterpret_cast<const uint8_t*>(pt.data()), 1, 0).key_version, 2) << n;
  }
}

}  // namespace
