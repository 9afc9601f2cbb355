// The MetadataStore contract, run against every driver (SQLite file, PostgreSQL database on a
// throwaway server), so the drivers cannot drift apart. Driver-specific behaviour (SQLite's
// WAL and migrations from old files) lives in sqlite_store_test.cpp.
#include <gtest/gtest.h>

#include <atomic>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <thread>

#include "store/metadata_store.hpp"
#include "support/temp_postgres.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;
using namespace p11kms::store;

namespace {

struct Driver {
  std::string name;
  // Returns where a store lives (a file path or a DSN) and opens stores there.
  std::function<std::string()> make_location;
  std::function<std::unique_ptr<MetadataStore>(const std::string&)> open;
};

void PrintTo(const Driver& d, std::ostream* os) { *os << d.name; }

std::string uuid_for(int n) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "00000000-0000-4000-8000-%012d", n);
  return buf;
}

class StoreConformance : public ::testing::TestWithParam<Driver> {
 protected:
  void SetUp() override {
    location_ = GetParam().make_location();
    store_ = GetParam().open(location_);
  }
  void TearDown() override {
    store_.reset();
    if (GetParam().name == "sqlite") test_support::remove_tree(location_.substr(0, location_.rfind('/')));
  }
  std::unique_ptr<MetadataStore> another() { return GetParam().open(location_); }

  VersionRecord object_version(int v, int tag) {
    VersionRecord r;
    r.version = v;
    r.id = uuid_for(tag * 100 + v);
    r.object_id = "obj-" + std::to_string(tag) + "-" + std::to_string(v);
    r.created_at = 1000 + v;
    return r;
  }
  VersionRecord sealed_version(int v, int tag) {
    VersionRecord r = object_version(v, tag);
    r.object_id.clear();
    r.sealed = "c2VhbGVk" + std::to_string(tag);
    return r;
  }
  KeyRecord key(const std::string& ns, const std::string& name, int tag, int versions = 1) {
    KeyRecord k;
    k.id = uuid_for(90000 + tag);
    k.ns = ns;
    k.name = name;
    k.type = "aes256-gcm96";
    k.created_at = 1000 + tag;
    for (int v = 1; v <= versions; ++v) k.versions[v] = object_version(v, tag);
    return k;
  }

  std::string location_;
  std::unique_ptr<MetadataStore> store_;
};

TEST_P(StoreConformance, EveryFieldRoundTrips) {
  KeyRecord k = key("team-a", "orders", 1, 0);
  k.type = "ecdsa-p256";
  k.description = "d";
  k.expires_at = 5000;
  k.state = kSuspended;
  k.imported = true;
  k.created_by = "app1";
  k.updated_at = 1200;
  k.exportable = true;
  k.deletion_allowed = true;
  k.min_decryption_version = 1;
  k.min_encryption_version = 2;
  k.derived = true;
  k.convergent = true;
  k.key_size = 48;
  k.auto_rotate_period = 3600;
  k.versions[1] = sealed_version(1, 1);
  k.versions[2] = object_version(2, 1);
  k.versions[2].public_key = "-----BEGIN PUBLIC KEY-----";
  k.versions[2].hmac_object_id = "hmac-obj";
  store_->create_key(k);
  auto got = store_->get_key("team-a", "orders");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->id, k.id);
  EXPECT_EQ(got->type, "ecdsa-p256");
  EXPECT_EQ(got->description, "d");
  EXPECT_EQ(got->expires_at, 5000);
  EXPECT_EQ(got->state, kSuspended);
  EXPECT_TRUE(got->imported);
  EXPECT_EQ(got->created_by, "app1");
  EXPECT_EQ(got->updated_at, 1200);
  EXPECT_TRUE(got->exportable);
  EXPECT_TRUE(got->deletion_allowed);
  EXPECT_EQ(got->min_encryption_version, 2);
  EXPECT_TRUE(got->derived);
  EXPECT_TRUE(got->convergent);
  EXPECT_EQ(got->key_size, 48);
  EXPECT_EQ(got->auto_rotate_period, 3600);
  ASSERT_EQ(got->versions.size(), 2u);
  EXPECT_EQ(got->versions.at(1).sealed, k.versions[1].sealed);
  EXPECT_EQ(got->versions.at(1).object_id, "");
  EXPECT_EQ(got->versions.at(2).object_id, "obj-1-2");
  EXPECT_EQ(got->versions.at(2).public_key, "-----BEGIN PUBLIC KEY-----");
  EXPECT_EQ(got->versions.at(2).hmac_object_id, "hmac-obj");
  EXPECT_EQ(got->versions.at(2).id, k.versions[2].id);
  EXPECT_EQ(got->versions.at(2).created_at, 1002);
  EXPECT_FALSE(store_->get_key("team-b", "orders").has_value());
  EXPECT_FALSE(store_->get_key_by_id("team-b", k.id).has_value());
  EXPECT_EQ(store_->get_key_by_id("team-a", k.id)->name, "orders");
}

TEST_P(StoreConformance, NamesAndIdsAreUnique) {
  store_->create_key(key("root", "a", 1));
  KeyRecord same_name = key("root", "a", 2);
  EXPECT_THROW(store_->create_key(same_name), ConflictError);
  KeyRecord same_id = key("root", "b", 3);
  same_id.id = uuid_for(90001);
  EXPECT_THROW(store_->create_key(same_id), ConflictError);
  KeyRecord same_version_id = key("root", "c", 4);
  same_version_id.versions[1].id = uuid_for(101);
  EXPECT_THROW(store_->create_key(same_version_id), ConflictError);
  // Nothing of the refused keys was written.
  EXPECT_EQ(store_->list_keys("root"), std::vector<std::string>{"a"});
  store_->create_key(key("other", "a", 5));  // names are per namespace
}

TEST_P(StoreConformance, DeleteLeavesATombstoneAndFreesTheName) {
  KeyRecord k = key("root", "gone", 1, 2);
  k.versions[3] = sealed_version(3, 1);
  store_->create_key(k);
  auto before = store_->get_key("root", "gone")->generation;
  auto intents = store_->delete_key("root", "gone");
  std::set<std::string> ids;
  for (const auto& i : intents) ids.insert(i.object_id);
  EXPECT_EQ(ids, (std::set<std::string>{"obj-1-1", "obj-1-2"}));
  EXPECT_EQ(store_->list_intents().size(), 2u);
  EXPECT_FALSE(store_->get_key("root", "gone").has_value());
  auto tomb = store_->get_key_by_id("root", k.id);
  ASSERT_TRUE(tomb.has_value());
  EXPECT_EQ(tomb->state, kDestroyed);
  EXPECT_NE(tomb->deleted_at, 0);
  ASSERT_EQ(tomb->versions.size(), 3u);
  for (const auto& [n, v] : tomb->versions) {
    EXPECT_TRUE(v.object_id.empty() && v.sealed.empty()) << n;
    EXPECT_FALSE(v.id.empty());
  }
  EXPECT_THROW(store_->add_version("root", "gone", object_version(4, 1)), std::out_of_range);
  EXPECT_THROW(store_->delete_key("root", "gone"), std::out_of_range);
  // The name is free again, with a generation above the deleted key's.
  KeyRecord again = key("root", "gone", 2);
  store_->create_key(again);
  EXPECT_GT(store_->get_key("root", "gone")->generation, before);
  EXPECT_EQ(store_->get_key_by_id("root", k.id)->state, kDestroyed);
  auto all = store_->list_key_records("root", true);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(store_->list_key_records("root", false).size(), 1u);
}

TEST_P(StoreConformance, VersionsIntentsAndGenerations) {
  store_->create_key(key("root", "k", 1));
  auto g1 = store_->get_key("root", "k")->generation;
  store_->add_intent(Intent{"obj-1-2", "p11kms/root/k/v2", 5});
  store_->add_intent(Intent{"obj-1-2", "ignored", 9});  // idempotent: keeps the first
  ASSERT_EQ(store_->list_intents().size(), 1u);
  EXPECT_EQ(store_->list_intents()[0].label, "p11kms/root/k/v2");
  store_->add_version("root", "k", object_version(2, 1));
  EXPECT_TRUE(store_->list_intents().empty());  // settled with the version
  EXPECT_GT(store_->get_key("root", "k")->generation, g1);
  EXPECT_THROW(store_->add_version("root", "k", object_version(2, 7)), ConflictError);
  EXPECT_THROW(store_->add_version("root", "missing", object_version(1, 8)), std::out_of_range);
  store_->add_intent(Intent{"x", "l", 1});
  store_->remove_intent("x");
  EXPECT_TRUE(store_->list_intents().empty());
}

TEST_P(StoreConformance, UpdateConfigWritesTheMutableFields) {
  store_->create_key(key("root", "k", 1, 3));
  KeyRecord k = *store_->get_key("root", "k");
  k.min_decryption_version = 2;
  k.min_encryption_version = 3;
  k.deletion_allowed = true;
  k.description = "new";
  k.expires_at = 99;
  k.state = kSuspended;
  k.updated_at = 4242;
  k.auto_rotate_period = 60;
  store_->update_config(k);
  auto got = *store_->get_key("root", "k");
  EXPECT_EQ(got.min_decryption_version, 2);
  EXPECT_EQ(got.min_encryption_version, 3);
  EXPECT_TRUE(got.deletion_allowed);
  EXPECT_EQ(got.description, "new");
  EXPECT_EQ(got.expires_at, 99);
  EXPECT_EQ(got.state, kSuspended);
  EXPECT_EQ(got.updated_at, 4242);
  EXPECT_EQ(got.auto_rotate_period, 60);
  k.name = "missing";
  EXPECT_THROW(store_->update_config(k), std::out_of_range);
}

TEST_P(StoreConformance, ListsAreOrdered) {
  store_->create_key(key("root", "b", 3));
  store_->create_key(key("root", "a", 2));
  store_->create_key(key("root", "C", 1));
  EXPECT_EQ(store_->list_keys("root"), (std::vector<std::string>{"C", "a", "b"}));  // byte order
  auto records = store_->list_key_records("root", false);
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records[0].name, "C");  // created_at 1001
  EXPECT_EQ(records[2].name, "b");
  EXPECT_TRUE(store_->list_keys("empty").empty());
}

TEST_P(StoreConformance, SweepInputsSkipSealedVersionsAndTombstones) {
  KeyRecord k = key("root", "k", 1, 2);
  k.versions[3] = sealed_version(3, 1);
  k.versions[3].hmac_object_id = "hmac-3";
  store_->create_key(k);
  store_->create_key(key("root", "gone", 2));
  store_->delete_key("root", "gone");
  auto ids = store_->all_object_ids();
  EXPECT_EQ(ids, (std::vector<std::string>{"hmac-3", "obj-1-1", "obj-1-2"}));
  auto versions = store_->all_versions();
  ASSERT_EQ(versions.size(), 3u);
  for (const auto& v : versions) EXPECT_EQ(v.name, "k");
}

TEST_P(StoreConformance, TrimRemovesOldVersionsAndRecordsIntents) {
  KeyRecord k = key("root", "k", 1, 4);
  k.versions[1].hmac_object_id = "hmac-1";
  store_->create_key(k);
  auto intents = store_->trim_versions("root", "k", 3);
  std::set<std::string> ids;
  for (const auto& i : intents) ids.insert(i.object_id);
  EXPECT_EQ(ids, (std::set<std::string>{"obj-1-1", "obj-1-2", "hmac-1"}));
  EXPECT_EQ(store_->list_intents().size(), 3u);
  auto got = *store_->get_key("root", "k");
  EXPECT_EQ(got.min_available_version, 3);
  EXPECT_EQ(got.versions.size(), 2u);
  EXPECT_EQ(got.versions.begin()->first, 3);
  EXPECT_THROW(store_->trim_versions("root", "missing", 2), std::out_of_range);
}

TEST_P(StoreConformance, HmacKeyIsRecordedOnce) {
  store_->create_key(key("root", "k", 1));
  EXPECT_TRUE(store_->set_version_hmac("root", "k", 1, "hm-1", ""));
  EXPECT_FALSE(store_->set_version_hmac("root", "k", 1, "hm-2", ""));
  EXPECT_EQ(store_->get_key("root", "k")->versions.at(1).hmac_object_id, "hm-1");
  EXPECT_THROW(store_->set_version_hmac("root", "k", 9, "hm-3", ""), std::out_of_range);
}

TEST_P(StoreConformance, KeysDueForRotation) {
  KeyRecord k = key("root", "k", 1);
  k.auto_rotate_period = 100;
  store_->create_key(k);  // v1 created at 1001
  store_->create_key(key("root", "never", 2));
  EXPECT_TRUE(store_->keys_due_for_rotation(1100).empty());
  auto due = store_->keys_due_for_rotation(1101);
  ASSERT_EQ(due.size(), 1u);
  EXPECT_EQ(due[0].name, "k");
  EXPECT_EQ(due[0].id, k.id);
}

TEST_P(StoreConformance, SettingsByLiteralPrefix) {
  store_->put_setting("a/b", "1");
  store_->put_setting("a/b", "2");
  store_->put_setting("a/c", "3");
  store_->put_setting("a%/d", "4");
  store_->put_setting("ab", "5");
  EXPECT_EQ(store_->get_setting("a/b"), std::optional<std::string>("2"));
  auto listed = store_->list_settings("a/");
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0].first, "a/b");
  EXPECT_EQ(store_->list_settings("a%").size(), 1u);
  EXPECT_EQ(store_->put_setting_if_absent("first", "mine"), "mine");
  EXPECT_EQ(another()->put_setting_if_absent("first", "theirs"), "mine");
  EXPECT_TRUE(store_->delete_setting("a/b"));
  EXPECT_FALSE(store_->delete_setting("a/b"));
  EXPECT_FALSE(store_->get_setting("a/b").has_value());
}

TEST_P(StoreConformance, OneLeaseHolderAtATime) {
  auto other = another();
  EXPECT_TRUE(store_->take_lease("rotation", "a", 100, 10));
  EXPECT_FALSE(other->take_lease("rotation", "b", 105, 10));  // a holds it until 110
  EXPECT_TRUE(store_->take_lease("rotation", "a", 108, 10));  // renewed to 118
  EXPECT_FALSE(other->take_lease("rotation", "b", 115, 10));
  EXPECT_TRUE(other->take_lease("rotation", "b", 118, 10));   // a stopped renewing
  EXPECT_FALSE(store_->take_lease("rotation", "a", 120, 10));
  EXPECT_TRUE(store_->take_lease("other-job", "a", 120, 10));  // leases are per job
  // A clean stop holds it "until now" (ttl 0): the next holder need not wait for it to run out.
  EXPECT_FALSE(store_->take_lease("rotation", "a", 121, 0));   // b's: a cannot let go of it
  EXPECT_FALSE(store_->take_lease("rotation", "a", 122, 10));  // ... so b still holds it
  EXPECT_TRUE(other->take_lease("rotation", "b", 123, 0));
  EXPECT_TRUE(store_->take_lease("rotation", "a", 123, 10));
}

TEST_P(StoreConformance, SchemaIsCurrentAndReopeningKeepsEverything) {
  EXPECT_EQ(store_->schema_version(), 5);
  store_->create_key(key("root", "k", 1));
  store_.reset();
  store_ = GetParam().open(location_);
  EXPECT_EQ(store_->schema_version(), 5);
  EXPECT_TRUE(store_->get_key("root", "k").has_value());
}

// Two store objects on one database stand for two instances: each sees the other's writes
// at once, and concurrent writers never produce a version twice.
TEST_P(StoreConformance, TwoWritersShareOneTruth) {
  auto other = another();
  store_->create_key(key("root", "k", 1));
  EXPECT_TRUE(other->get_key("root", "k").has_value());
  EXPECT_THROW(other->create_key(key("root", "k", 2)), ConflictError);
  std::atomic<int> added{0}, conflicts{0};
  auto writer = [&](MetadataStore& s, int tag) {
    for (int i = 0; i < 20; ++i) {
      int next = s.get_key("root", "k")->latest_version() + 1;
      try {
        s.add_version("root", "k", object_version(next, tag * 1000 + i));
        ++added;
      } catch (const ConflictError&) {
        ++conflicts;  // the other writer took that number: callers retry
      }
    }
  };
  std::thread a(writer, std::ref(*store_), 1), b(writer, std::ref(*other), 2);
  a.join();
  b.join();
  auto got = store_->get_key("root", "k");
  EXPECT_EQ(got->latest_version(), 1 + added.load());
  EXPECT_EQ(static_cast<int>(got->versions.size()), 1 + added.load());
  EXPECT_EQ(added + conflicts, 40);
}

// What a cache checks before using a key: its id and generation, bumped by every write.
TEST_P(StoreConformance, KeyStampFollowsEveryWrite) {
  EXPECT_FALSE(store_->key_stamp("root", "k").has_value());
  store_->create_key(key("root", "k", 1));
  auto s1 = store_->key_stamp("root", "k");
  ASSERT_TRUE(s1.has_value());
  EXPECT_EQ(s1->id, uuid_for(90001));
  EXPECT_EQ(s1->generation, store_->get_key("root", "k")->generation);
  EXPECT_FALSE(store_->key_stamp("other", "k").has_value());
  auto other = another();
  other->add_version("root", "k", object_version(2, 1));
  auto s2 = store_->key_stamp("root", "k");
  EXPECT_GT(s2->generation, s1->generation);
  KeyRecord changed = *store_->get_key("root", "k");
  changed.deletion_allowed = true;
  other->update_config(changed);
  auto s3 = store_->key_stamp("root", "k");
  EXPECT_GT(s3->generation, s2->generation);
  EXPECT_TRUE(other->set_version_hmac("root", "k", 1, "", "c2VhbGVk"));
  EXPECT_GT(store_->key_stamp("root", "k")->generation, s3->generation);
  other->delete_key("root", "k");
  EXPECT_FALSE(store_->key_stamp("root", "k").has_value());
  store_->create_key(key("root", "k", 2));
  EXPECT_EQ(store_->key_stamp("root", "k")->id, uuid_for(90002));
}

// Several writers (schema 5): intents name their owner and lease; heartbeats say who is alive.
TEST_P(StoreConformance, IntentsCarryOwnerLeaseAndRenewals) {
  Intent i{"obj-a", "p11kms/root/k/v1", 100, "inst-a", 160};
  store_->add_intent(i);
  store_->add_intent(Intent{"obj-b", "p11kms/root/k/v2", 100, "inst-b", 160});
  auto all = store_->list_intents();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].object_id, "obj-a");
  EXPECT_EQ(all[0].owner, "inst-a");
  EXPECT_EQ(all[0].lease_expires, 160);
  EXPECT_FALSE(all[0].doomed);
  // Only the owner's listed intents are renewed, and a renewal never shortens a lease.
  store_->renew_intents("inst-a", {"obj-a", "obj-b", "obj-none"}, 200);
  store_->renew_intents("inst-a", {"obj-a"}, 150);
  store_->renew_intents("inst-a", {}, 999);
  all = store_->list_intents();
  EXPECT_EQ(all[0].lease_expires, 200);
  EXPECT_EQ(all[1].lease_expires, 160);
  // Deletions record doomed intents: orders to destroy, which nobody renews.
  store_->create_key(key("root", "gone", 3));
  auto doomed = store_->delete_key("root", "gone");
  ASSERT_EQ(doomed.size(), 1u);
  EXPECT_TRUE(doomed[0].doomed);
  for (const auto& x : store_->list_intents())
    if (x.object_id == "obj-3-1") EXPECT_TRUE(x.doomed);
  // The copy keeps every field.
  auto snap = store_->snapshot();
  std::string elsewhere = GetParam().make_location();
  auto target = GetParam().open(elsewhere);
  target->restore(snap, false);
  auto copied = target->list_intents();
  ASSERT_EQ(copied.size(), 3u);
  auto original = store_->list_intents();
  for (size_t n = 0; n < copied.size(); ++n) {
    EXPECT_EQ(copied[n].object_id, original[n].object_id);
    EXPECT_EQ(copied[n].label, original[n].label);
    EXPECT_EQ(copied[n].created_at, original[n].created_at);
    EXPECT_EQ(copied[n].owner, original[n].owner);
    EXPECT_EQ(copied[n].lease_expires, original[n].lease_expires);
    EXPECT_EQ(copied[n].doomed, original[n].doomed);
  }
  target.reset();
  if (GetParam().name == "sqlite") test_support::remove_tree(elsewhere.substr(0, elsewhere.rfind('/')));
}

TEST_P(StoreConformance, HeartbeatsRecordLiveInstances) {
  EXPECT_TRUE(store_->list_instances().empty());
  store_->heartbeat("inst-b", 100);
  store_->heartbeat("inst-a", 105);
  store_->heartbeat("inst-b", 110);
  store_->heartbeat("inst-b", 108);  // never goes back
  auto other = another();
  auto all = other->list_instances();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].id, "inst-a");
  EXPECT_EQ(all[1].id, "inst-b");
  EXPECT_EQ(all[1].started_at, 100);
  EXPECT_EQ(all[1].last_seen, 110);
  other->remove_instance("inst-a");
  ASSERT_EQ(store_->list_instances().size(), 1u);
}

TEST_P(StoreConformance, ASweeperClaimsOnlyExpiredIntentsOfDeadOwners) {
  store_->heartbeat("inst-a", 100);
  store_->add_intent(Intent{"obj-a", "l", 100, "inst-a", 150});
  auto sweeper = another();
  // Within its lease: nobody may claim it, whoever is alive.
  EXPECT_FALSE(sweeper->claim_intent("obj-a", "inst-b", 140, 200));
  // Lease over, but its owner's heartbeat (100) is recent enough (alive since 90).
  EXPECT_FALSE(sweeper->claim_intent("obj-a", "inst-b", 160, 90));
  EXPECT_FALSE(store_->list_intents()[0].doomed);
  // The owner renews while it works; then stops and misses its heartbeats.
  store_->renew_intents("inst-a", {"obj-a"}, 170);
  EXPECT_FALSE(sweeper->claim_intent("obj-a", "inst-b", 165, 101));
  EXPECT_TRUE(sweeper->claim_intent("obj-a", "inst-b", 171, 101));
  EXPECT_TRUE(store_->list_intents()[0].doomed);
  EXPECT_TRUE(sweeper->claim_intent("obj-a", "inst-c", 0, 0));  // doomed: anyone may finish it
  store_->renew_intents("inst-a", {"obj-a"}, 999);              // a doomed intent stays doomed
  EXPECT_EQ(store_->list_intents()[0].lease_expires, 170);
  // An owner settles its own expired intents without waiting for heartbeats; an owner without
  // any heartbeat row (a clean shutdown, or an intent from before schema 5) is not alive.
  store_->add_intent(Intent{"obj-own", "l", 100, "inst-a", 150});
  EXPECT_FALSE(store_->claim_intent("obj-own", "inst-a", 149, 0));
  EXPECT_TRUE(store_->claim_intent("obj-own", "inst-a", 150, 0));
  store_->add_intent(Intent{"obj-old", "l", 1});
  EXPECT_TRUE(sweeper->claim_intent("obj-old", "inst-b", 10, 5));
  EXPECT_FALSE(sweeper->claim_intent("obj-none", "inst-b", 10, 5));  // no such intent
}

TEST_P(StoreConformance, MetadataNamingAClaimedObjectIsNeverCommitted) {
  store_->create_key(key("root", "k", 1));
  // The creator's lease ran out while it was cut off; a sweeper claimed its intents.
  store_->add_intent(Intent{"obj-1-2", "p11kms/root/k/v2", 100, "inst-a", 110});
  store_->add_intent(Intent{"obj-2-1", "p11kms/root/new/v1", 100, "inst-a", 110});
  store_->add_intent(Intent{"hmac-obj", "p11kms/root/k/v1/hmac", 100, "inst-a", 110});
  auto sweeper = another();
  for (const char* id : {"obj-1-2", "obj-2-1", "hmac-obj"}) EXPECT_TRUE(sweeper->claim_intent(id, "inst-b", 200, 150));
  auto g = store_->get_key("root", "k")->generation;
  EXPECT_THROW(store_->add_version("root", "k", object_version(2, 1)), StoreError);
  EXPECT_THROW(store_->create_key(key("root", "new", 2)), StoreError);
  EXPECT_THROW(store_->set_version_hmac("root", "k", 1, "hmac-obj", ""), StoreError);
  // Nothing of the refused writes landed; the intents stay for the sweeper.
  EXPECT_EQ(store_->get_key("root", "k")->latest_version(), 1);
  EXPECT_EQ(store_->get_key("root", "k")->generation, g);
  EXPECT_TRUE(store_->get_key("root", "k")->versions.at(1).hmac_object_id.empty());
  EXPECT_FALSE(store_->get_key("root", "new").has_value());
  EXPECT_EQ(store_->list_intents().size(), 3u);
  // An intent its owner settles first cannot be claimed afterwards.
  store_->add_intent(Intent{"obj-1-3", "p11kms/root/k/v3", 100, "inst-a", 110});
  store_->add_version("root", "k", object_version(3, 1));
  EXPECT_FALSE(sweeper->claim_intent("obj-1-3", "inst-b", 200, 150));
}

TEST_P(StoreConformance, ASettingNamingAnObjectSettlesItsIntentAtomically) {
  store_->add_intent(Intent{"obj-kong", "p11kms-kong/root/k", 100, "inst-a", 110});
  store_->put_setting_settling_intent("kong/root/keys/1", "{}", "obj-kong");
  EXPECT_EQ(store_->get_setting("kong/root/keys/1"), std::optional<std::string>("{}"));
  EXPECT_TRUE(store_->list_intents().empty());
  // A sweeper claimed the next one first: nothing is written and the intent stays doomed.
  store_->add_intent(Intent{"obj-late", "p11kms-kong/root/late", 100, "inst-a", 110});
  EXPECT_TRUE(another()->claim_intent("obj-late", "inst-b", 200, 150));
  EXPECT_THROW(store_->put_setting_settling_intent("kong/root/keys/2", "{}", "obj-late"), StoreError);
  EXPECT_FALSE(store_->get_setting("kong/root/keys/2").has_value());
  ASSERT_EQ(store_->list_intents().size(), 1u);
  EXPECT_TRUE(store_->list_intents()[0].doomed);
}

void populate(MetadataStore& s, const std::function<VersionRecord(int, int)>& object_version,
              const std::function<VersionRecord(int, int)>& sealed_version) {
  KeyRecord live;
  live.id = uuid_for(70001);
  live.ns = "team-a";
  live.name = "live";
  live.type = "aes256-gcm96";
  live.created_at = 10;
  live.auto_rotate_period = 3600;
  live.versions[1] = object_version(1, 7);
  live.versions[2] = sealed_version(2, 7);
  s.create_key(live);
  KeyRecord gone = live;
  gone.id = uuid_for(70002);
  gone.name = "gone";
  gone.versions = {{1, object_version(1, 8)}};
  s.create_key(gone);
  s.delete_key("team-a", "gone");  // leaves a tombstone and an intent
  s.put_setting("keys.master_key_id", "00ff");
  ByokKeyRecord b;
  b.id = "cck-abc12345";
  b.ns = "team-a";
  b.provider = "P11KMS";
  b.kind = "P11kmsKey";
  b.key_json = "{}";
  b.created_at = b.updated_at = b.validation_since = 10;
  s.create_byok_key(b, 100);
}

void expect_same(const StoreSnapshot& a, const StoreSnapshot& b) {
  ASSERT_EQ(a.keys.size(), b.keys.size());
  EXPECT_EQ(a.version_count(), b.version_count());
  EXPECT_EQ(a.intents.size(), b.intents.size());
  EXPECT_EQ(a.settings, b.settings);
  ASSERT_EQ(a.byok_keys.size(), b.byok_keys.size());
  EXPECT_EQ(a.max_deleted_generation, b.max_deleted_generation);
  for (size_t i = 0; i < a.keys.size(); ++i) {
    EXPECT_EQ(a.keys[i].id, b.keys[i].id);
    EXPECT_EQ(a.keys[i].state, b.keys[i].state);
    EXPECT_EQ(a.keys[i].deleted_at, b.keys[i].deleted_at);
    EXPECT_EQ(a.keys[i].generation, b.keys[i].generation);
    EXPECT_EQ(a.keys[i].auto_rotate_period, b.keys[i].auto_rotate_period);
    for (const auto& [n, v] : a.keys[i].versions) {
      EXPECT_EQ(v.id, b.keys[i].versions.at(n).id);
      EXPECT_EQ(v.object_id, b.keys[i].versions.at(n).object_id);
      EXPECT_EQ(v.sealed, b.keys[i].versions.at(n).sealed);
    }
  }
  EXPECT_EQ(a.byok_keys[0].id, b.byok_keys[0].id);
}

TEST_P(StoreConformance, SnapshotRestoresIntoAnEmptyStoreOnly) {
  populate(*store_, [&](int v, int t) { return object_version(v, t); }, [&](int v, int t) { return sealed_version(v, t); });
  auto snap = store_->snapshot();
  EXPECT_EQ(snap.keys.size(), 2u);
  EXPECT_EQ(snap.intents.size(), 1u);
  EXPECT_THROW(store_->restore(snap, /*replace=*/false), ConflictError);
  std::string elsewhere = GetParam().make_location();
  auto target = GetParam().open(elsewhere);
  target->put_setting("stale", "x");
  EXPECT_THROW(target->restore(snap, false), ConflictError);
  EXPECT_EQ(target->get_setting("stale"), std::optional<std::string>("x"));  // refused: untouched
  target->restore(snap, /*replace=*/true);
  expect_same(snap, target->snapshot());
  EXPECT_FALSE(target->get_setting("stale").has_value());
  // The copy is a working store: the tombstone's name is free, its id is not.
  EXPECT_EQ(target->get_key_by_id("team-a", uuid_for(70002))->state, kDestroyed);
  EXPECT_TRUE(target->get_key("team-a", "live").has_value());
  target.reset();
  if (GetParam().name == "sqlite") test_support::remove_tree(elsewhere.substr(0, elsewhere.rfind('/')));
}

const Driver kSqlite{"sqlite",
                     [] { return test_support::make_temp_dir("p11kms-conf") + "/p11kms.db"; },
                     [](const std::string& path) { return open_sqlite_store(path); }};
const Driver kPostgres{"postgres", [] { return test_support::TempPostgres::shared().new_database(); },
                       [](const std::string& dsn) { return open_postgres_store(dsn); }};

INSTANTIATE_TEST_SUITE_P(Drivers, StoreConformance, ::testing::Values(kSqlite, kPostgres),
                         [](const ::testing::TestParamInfo<Driver>& info) { return info.param.name; });

// What `p11kms store copy` relies on: SQLite -> PostgreSQL -> SQLite loses nothing.
TEST(StoreCopy, SqliteToPostgresAndBackLosesNothing) {
  std::string dir = test_support::make_temp_dir("p11kms-copy");
  auto sqlite = open_sqlite_store(dir + "/a.db");
  auto ver = [](int v, int t) {
    VersionRecord r;
    r.version = v;
    r.id = uuid_for(t * 100 + v);
    r.object_id = "obj-" + std::to_string(t) + "-" + std::to_string(v);
    r.created_at = 1000 + v;
    return r;
  };
  auto sealed = [&](int v, int t) {
    auto r = ver(v, t);
    r.object_id.clear();
    r.sealed = "c2VhbGVk";
    return r;
  };
  populate(*sqlite, ver, sealed);
  auto original = sqlite->snapshot();
  auto pg = open_postgres_store(test_support::TempPostgres::shared().new_database());
  pg->restore(original, false);
  auto back = open_sqlite_store(dir + "/b.db");
  back->restore(pg->snapshot(), false);
  expect_same(original, back->snapshot());
  test_support::remove_tree(dir);
}

}  // namespace
