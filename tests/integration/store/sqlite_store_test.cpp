// Integration tests for the SQLite metadata store, against real database files in a fresh
// temporary directory per test.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "store/metadata_store.hpp"

namespace p11kms::store {
namespace {

// 32 hex chars, like a real 16-byte CKA_ID; distinct for distinct (tag, n).
std::string oid(int tag, int n) {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%016x%016x", static_cast<unsigned>(tag),
                static_cast<unsigned>(n));
  return buf;
}

VersionRecord version(int number, const std::string& object_id, int64_t created_at = 1000) {
  VersionRecord v;
  v.version = number;
  v.object_id = object_id;
  v.created_at = created_at;
  return v;
}

// A key with versions 1..n whose objects are oid(tag, 1..n).
KeyRecord make_key(const std::string& ns, const std::string& name, int n, int tag) {
  KeyRecord k;
  k.ns = ns;
  k.name = name;
  k.type = "aes256-gcm96";
  k.created_at = 1700000000;
  for (int i = 1; i <= n; ++i) k.versions[i] = version(i, oid(tag, i), 1700000000 + i);
  return k;
}

Intent intent(const std::string& object_id, const std::string& label = "l", int64_t at = 5) {
  return Intent{object_id, label, at};
}

std::vector<std::string> intent_ids(MetadataStore& s) {
  std::vector<std::string> ids;
  for (const Intent& i : s.list_intents()) ids.push_back(i.object_id);
  std::sort(ids.begin(), ids.end());
  return ids;
}

// Direct access to the database file, to look at what the store wrote.
class RawDb {
 public:
  explicit RawDb(const std::string& path) {
    if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) throw std::runtime_error("raw open");
    sqlite3_busy_timeout(db_, 5000);
  }
  ~RawDb() { sqlite3_close(db_); }
  void exec(const std::string& sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : "?";
      sqlite3_free(err);
      throw std::runtime_error("raw exec: " + msg);
    }
  }
  std::string text(const std::string& sql) {
    sqlite3_stmt* s = nullptr;
    if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &s, nullptr) != SQLITE_OK) {
      throw std::runtime_error(std::string("raw prepare: ") + sqlite3_errmsg(db_));
    }
    std::string out;
    if (sqlite3_step(s) == SQLITE_ROW && sqlite3_column_text(s, 0) != nullptr) {
      out = reinterpret_cast<const char*>(sqlite3_column_text(s, 0));
    }
    sqlite3_finalize(s);
    return out;
  }
  int64_t integer(const std::string& sql) { return std::stoll(text(sql)); }

 private:
  sqlite3* db_ = nullptr;
};

class SqliteStoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/p11kms-store-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/metadata.db";
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  std::unique_ptr<MetadataStore> open() { return open_sqlite_store(path_); }

  std::string dir_;
  std::string path_;
};

TEST_F(SqliteStoreTest, MigrationsAppliedOnCreateInWalMode) {
  auto s = open();
  const int v = s->schema_version();
  EXPECT_GE(v, 1);
  RawDb raw(path_);
  // Every migration 1..latest recorded exactly once, none beyond what the code reports.
  EXPECT_EQ(raw.integer("SELECT count(*) FROM schema_migrations"), v);
  EXPECT_EQ(raw.integer("SELECT max(version) FROM schema_migrations"), v);
  EXPECT_EQ(raw.integer("SELECT min(version) FROM schema_migrations"), 1);
  for (const char* table : {"keys", "key_versions", "intents", "settings"}) {
    EXPECT_EQ(raw.integer(std::string("SELECT count(*) FROM sqlite_master WHERE type='table' "
                                      "AND name='") + table + "'"),
              1)
        << table;
  }
  EXPECT_EQ(raw.text("PRAGMA journal_mode"), "wal");
}

TEST_F(SqliteStoreTest, ReopenKeepsDataAndDoesNotReapplyMigrations) {
  int version = 0;
  {
    auto s = open();
    version = s->schema_version();
    s->create_key(make_key("root", "k", 1, 1));
  }
  {
    RawDb raw(path_);
    // Mark the recorded migrations; a re-applied one would add rows or fail on CREATE TABLE.
    raw.exec("UPDATE schema_migrations SET applied_at = 42");
  }
  auto s = open();
  EXPECT_EQ(s->schema_version(), version);
  ASSERT_TRUE(s->get_key("root", "k").has_value());
  RawDb raw(path_);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM schema_migrations"), version);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM schema_migrations WHERE applied_at <> 42"), 0);
}

TEST_F(SqliteStoreTest, NewerSchemaVersionIsRefused) {
  int version = open()->schema_version();
  {
    RawDb raw(path_);
    raw.exec("INSERT INTO schema_migrations (version, applied_at) VALUES (" +
             std::to_string(version + 1) + ", 0)");
  }
  try {
    open();
    FAIL() << "opened a database with a newer schema";
  } catch (const StoreError& e) {
    EXPECT_NE(std::string(e.what()).find("newer"), std::string::npos) << e.what();
  }
}

TEST_F(SqliteStoreTest, UnusablePathsAreStoreErrors) {
  {
    std::ofstream garbage(path_, std::ios::binary);
    garbage << std::string(8192, 'x');
  }
  EXPECT_THROW(open(), StoreError);
  EXPECT_THROW(open_sqlite_store(dir_ + "/no/such/dir/metadata.db"), StoreError);
}

TEST_F(SqliteStoreTest, CreateAndGetRoundTrip) {
  auto s = open();
  KeyRecord k = make_key("team-a", "payments", 3, 7);
  k.type = "ecdsa-p256";
  k.created_at = 1711111111;
  k.min_decryption_version = 2;
  k.min_encryption_version = 3;
  k.deletion_allowed = true;
  k.exportable = true;
  s->create_key(k);

  auto got = s->get_key("team-a", "payments");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->ns, "team-a");
  EXPECT_EQ(got->name, "payments");
  EXPECT_EQ(got->type, "ecdsa-p256");
  EXPECT_EQ(got->created_at, 1711111111);
  EXPECT_EQ(got->min_decryption_version, 2);
  EXPECT_EQ(got->min_encryption_version, 3);
  EXPECT_TRUE(got->deletion_allowed);
  EXPECT_TRUE(got->exportable);
  EXPECT_EQ(got->generation, 1);
  ASSERT_EQ(got->versions.size(), 3u);
  EXPECT_EQ(got->latest_version(), 3);
  for (int i = 1; i <= 3; ++i) {
    ASSERT_EQ(got->versions.count(i), 1u);
    EXPECT_EQ(got->versions[i].version, i);
    EXPECT_EQ(got->versions[i].object_id, oid(7, i));
    EXPECT_EQ(got->versions[i].created_at, 1700000000 + i);
  }

  EXPECT_FALSE(s->get_key("team-a", "other").has_value());
  EXPECT_FALSE(s->get_key("root", "payments").has_value());
}

TEST_F(SqliteStoreTest, DefaultsRoundTripAndKeyWithoutVersions) {
  auto s = open();
  KeyRecord k = make_key("root", "empty", 0, 1);
  s->create_key(k);
  auto got = s->get_key("root", "empty");
  ASSERT_TRUE(got.has_value());
  EXPECT_TRUE(got->versions.empty());
  EXPECT_EQ(got->min_decryption_version, 1);
  EXPECT_EQ(got->min_encryption_version, 0);
  EXPECT_FALSE(got->deletion_allowed);
  EXPECT_FALSE(got->exportable);
}

TEST_F(SqliteStoreTest, DuplicateCreateConflictsAndChangesNothing) {
  auto s = open();
  s->create_key(make_key("root", "k", 1, 1));
  s->add_intent(intent(oid(2, 1)));

  KeyRecord dup = make_key("root", "k", 1, 2);
  dup.type = "rsa-2048";
  EXPECT_THROW(s->create_key(dup), ConflictError);

  auto got = s->get_key("root", "k");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->type, "aes256-gcm96");
  ASSERT_EQ(got->versions.size(), 1u);
  EXPECT_EQ(got->versions[1].object_id, oid(1, 1));
  EXPECT_EQ(got->generation, 1);
  // The rejected key's intent stays, so its object will still be swept.
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(2, 1)});
  EXPECT_EQ(s->all_object_ids(), std::vector<std::string>{oid(1, 1)});
}

TEST_F(SqliteStoreTest, SameNameInAnotherNamespaceIsNotAConflict) {
  auto s = open();
  s->create_key(make_key("a", "k", 1, 1));
  EXPECT_NO_THROW(s->create_key(make_key("b", "k", 1, 2)));
  EXPECT_EQ(s->get_key("a", "k")->versions[1].object_id, oid(1, 1));
  EXPECT_EQ(s->get_key("b", "k")->versions[1].object_id, oid(2, 1));
}

TEST_F(SqliteStoreTest, CreateKeyRemovesIntentsOfItsVersionsOnly) {
  auto s = open();
  s->add_intent(intent(oid(1, 1)));
  s->add_intent(intent(oid(1, 2)));
  s->add_intent(intent(oid(9, 9)));
  s->create_key(make_key("root", "k", 2, 1));
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(9, 9)});
}

TEST_F(SqliteStoreTest, FailedCreateIsRolledBackCompletely) {
  auto s = open();
  s->create_key(make_key("root", "first", 1, 1));
  // v1 is new, v2 reuses first's object: the insert fails halfway through.
  KeyRecord bad = make_key("root", "second", 2, 2);
  bad.versions[2].object_id = oid(1, 1);
  s->add_intent(intent(oid(2, 1)));
  EXPECT_THROW(s->create_key(bad), StoreError);

  EXPECT_FALSE(s->get_key("root", "second").has_value());
  EXPECT_EQ(s->list_keys("root"), std::vector<std::string>{"first"});
  EXPECT_EQ(s->all_object_ids(), std::vector<std::string>{oid(1, 1)});
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(2, 1)});  // not removed
  // The store is still usable after the rollback.
  EXPECT_NO_THROW(s->create_key(make_key("root", "second", 1, 2)));
  EXPECT_TRUE(s->list_intents().empty());
}

TEST_F(SqliteStoreTest, CreateKeyRejectsMismatchedVersionNumbers) {
  auto s = open();
  KeyRecord k = make_key("root", "k", 1, 1);
  k.versions[1].version = 2;
  EXPECT_THROW(s->create_key(k), std::invalid_argument);
  EXPECT_FALSE(s->get_key("root", "k").has_value());
}

TEST_F(SqliteStoreTest, AddVersionAppendsRemovesIntentAndBumpsGeneration) {
  auto s = open();
  s->create_key(make_key("root", "k", 1, 1));
  s->add_intent(intent(oid(1, 2)));
  s->add_intent(intent(oid(9, 9)));
  s->add_version("root", "k", version(2, oid(1, 2), 1234));

  auto got = s->get_key("root", "k");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->latest_version(), 2);
  EXPECT_EQ(got->versions[2].object_id, oid(1, 2));
  EXPECT_EQ(got->versions[2].created_at, 1234);
  EXPECT_EQ(got->versions[1].object_id, oid(1, 1));  // old version untouched
  EXPECT_EQ(got->generation, 2);
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(9, 9)});
}

TEST_F(SqliteStoreTest, AddVersionToMissingKeyIsOutOfRange) {
  auto s = open();
  s->add_intent(intent(oid(1, 1)));
  EXPECT_THROW(s->add_version("root", "nope", version(1, oid(1, 1))), std::out_of_range);
  s->create_key(make_key("other-ns", "nope", 1, 2));
  EXPECT_THROW(s->add_version("root", "nope", version(2, oid(1, 1))), std::out_of_range);
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(1, 1)});
  EXPECT_EQ(s->all_object_ids(), std::vector<std::string>{oid(2, 1)});
}

TEST_F(SqliteStoreTest, DuplicateVersionConflictsAndChangesNothing) {
  auto s = open();
  s->create_key(make_key("root", "k", 2, 1));
  s->add_intent(intent(oid(5, 5)));
  EXPECT_THROW(s->add_version("root", "k", version(2, oid(5, 5))), ConflictError);

  auto got = s->get_key("root", "k");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->generation, 1);
  EXPECT_EQ(got->versions.size(), 2u);
  EXPECT_EQ(got->versions[2].object_id, oid(1, 2));
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(5, 5)});
}

TEST_F(SqliteStoreTest, UpdateConfigWritesPolicyAndBumpsGeneration) {
  auto s = open();
  s->create_key(make_key("root", "k", 3, 1));
  KeyRecord change = *s->get_key("root", "k");
  change.min_decryption_version = 2;
  change.min_encryption_version = 3;
  change.deletion_allowed = true;
  change.exportable = true;
  change.type = "ignored";   // not part of the config
  change.created_at = 1;     // not part of the config
  change.versions.clear();   // versions are not touched by update_config
  s->update_config(change);

  auto got = s->get_key("root", "k");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->min_decryption_version, 2);
  EXPECT_EQ(got->min_encryption_version, 3);
  EXPECT_TRUE(got->deletion_allowed);
  EXPECT_TRUE(got->exportable);
  EXPECT_EQ(got->generation, 2);
  EXPECT_EQ(got->type, "aes256-gcm96");
  EXPECT_EQ(got->created_at, 1700000000);
  EXPECT_EQ(got->versions.size(), 3u);

  s->update_config(*got);
  EXPECT_EQ(s->get_key("root", "k")->generation, 3);

  KeyRecord missing = make_key("root", "missing", 0, 0);
  EXPECT_THROW(s->update_config(missing), std::out_of_range);
}

TEST_F(SqliteStoreTest, DeleteKeyRecordsIntentsAndFreesTheName) {
  auto s = open();
  s->create_key(make_key("ns1", "k", 3, 1));
  s->create_key(make_key("ns1", "keep", 1, 2));
  s->update_config(*s->get_key("ns1", "k"));  // generation 2
  const int64_t before = static_cast<int64_t>(std::time(nullptr));
  std::vector<Intent> intents = s->delete_key("ns1", "k");
  const int64_t after = static_cast<int64_t>(std::time(nullptr));

  ASSERT_EQ(intents.size(), 3u);
  std::vector<std::string> returned;
  for (const Intent& i : intents) {
    returned.push_back(i.object_id);
    EXPECT_GE(i.created_at, before);
    EXPECT_LE(i.created_at, after);
  }
  std::sort(returned.begin(), returned.end());
  EXPECT_EQ(returned, (std::vector<std::string>{oid(1, 1), oid(1, 2), oid(1, 3)}));
  EXPECT_EQ(intents[0].label, "p11kms/ns1/k/v1");
  // The same intents are committed in the store.
  EXPECT_EQ(intent_ids(*s), returned);

  EXPECT_FALSE(s->get_key("ns1", "k").has_value());
  EXPECT_EQ(s->list_keys("ns1"), std::vector<std::string>{"keep"});
  EXPECT_EQ(s->all_object_ids(), std::vector<std::string>{oid(2, 1)});
  for (const auto& ref : s->all_versions()) EXPECT_NE(ref.name, "k");

  EXPECT_THROW(s->delete_key("ns1", "k"), std::out_of_range);

  // The name is free again; the new key must not reuse a generation a cache may still hold
  // for the deleted one.
  s->create_key(make_key("ns1", "k", 1, 3));
  auto again = s->get_key("ns1", "k");
  ASSERT_TRUE(again.has_value());
  EXPECT_EQ(again->versions.size(), 1u);
  EXPECT_EQ(again->versions[1].object_id, oid(3, 1));
  EXPECT_GT(again->generation, 2);
}

TEST_F(SqliteStoreTest, ListKeysIsSortedAndPerNamespace) {
  auto s = open();
  int tag = 1;
  for (const char* name : {"zeta", "alpha", "Mike", "beta", "alpha2"}) {
    s->create_key(make_key("root", name, 1, tag++));
  }
  s->create_key(make_key("other", "gamma", 1, tag++));
  s->create_key(make_key("other", "delta", 1, tag++));

  EXPECT_EQ(s->list_keys("root"),
            (std::vector<std::string>{"Mike", "alpha", "alpha2", "beta", "zeta"}));
  EXPECT_EQ(s->list_keys("other"), (std::vector<std::string>{"delta", "gamma"}));
  EXPECT_TRUE(s->list_keys("nobody").empty());
}

TEST_F(SqliteStoreTest, AllObjectIdsAndAllVersionsCoverEveryVersion) {
  auto s = open();
  EXPECT_TRUE(s->all_object_ids().empty());
  EXPECT_TRUE(s->all_versions().empty());
  s->create_key(make_key("a", "x", 2, 1));
  s->create_key(make_key("b", "y", 1, 2));
  s->add_version("b", "y", version(2, oid(2, 2)));
  s->add_intent(intent(oid(8, 8)));  // intents are not referenced objects

  std::vector<std::string> ids = s->all_object_ids();
  std::sort(ids.begin(), ids.end());
  EXPECT_EQ(ids, (std::vector<std::string>{oid(1, 1), oid(1, 2), oid(2, 1), oid(2, 2)}));

  auto refs = s->all_versions();
  ASSERT_EQ(refs.size(), 4u);
  std::set<std::string> seen;
  for (const auto& r : refs) {
    if (r.ns == "a") {
      EXPECT_EQ(r.name, "x");
      EXPECT_EQ(r.object_id, oid(1, r.version));
    } else {
      EXPECT_EQ(r.ns, "b");
      EXPECT_EQ(r.name, "y");
      EXPECT_EQ(r.object_id, oid(2, r.version));
    }
    seen.insert(r.ns + "/" + r.name + "/" + std::to_string(r.version));
  }
  EXPECT_EQ(seen, (std::set<std::string>{"a/x/1", "a/x/2", "b/y/1", "b/y/2"}));
}

TEST_F(SqliteStoreTest, IntentsAddListRemove) {
  auto s = open();
  EXPECT_TRUE(s->list_intents().empty());
  s->add_intent(intent(oid(1, 1), "p11kms/root/k/v1", 100));
  s->add_intent(intent(oid(1, 2), "p11kms/root/k/v2", 200));
  s->add_intent(intent(oid(1, 1), "again", 300));  // idempotent

  auto all = s->list_intents();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].object_id, oid(1, 1));
  EXPECT_EQ(all[0].label, "p11kms/root/k/v1");
  EXPECT_EQ(all[0].created_at, 100);
  EXPECT_EQ(all[1].object_id, oid(1, 2));

  s->remove_intent(oid(1, 1));
  s->remove_intent(oid(7, 7));  // absent: no-op
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(1, 2)});
}

TEST_F(SqliteStoreTest, SettingsUpsertAndPersist) {
  {
    auto s = open();
    EXPECT_FALSE(s->get_setting("instance_id").has_value());
    s->put_setting("instance_id", "abc");
    EXPECT_EQ(s->get_setting("instance_id"), std::optional<std::string>("abc"));
    s->put_setting("instance_id", "def");
    EXPECT_EQ(s->get_setting("instance_id"), std::optional<std::string>("def"));
    s->put_setting("empty", "");
    EXPECT_EQ(s->get_setting("empty"), std::optional<std::string>(""));
  }
  auto s = open();
  EXPECT_EQ(s->get_setting("instance_id"), std::optional<std::string>("def"));
  EXPECT_EQ(s->get_setting("empty"), std::optional<std::string>(""));
  RawDb raw(path_);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM settings WHERE name = 'instance_id'"), 1);
}

TEST_F(SqliteStoreTest, EverythingSurvivesCloseAndReopen) {
  {
    auto s = open();
    s->create_key(make_key("root", "a", 2, 1));
    s->add_version("root", "a", version(3, oid(1, 3)));
    KeyRecord cfg = *s->get_key("root", "a");
    cfg.min_decryption_version = 2;
    s->update_config(cfg);
    s->create_key(make_key("root", "b", 1, 2));
    s->delete_key("root", "b");
    s->add_intent(intent(oid(9, 1), "pending", 77));
  }
  auto s = open();
  auto a = s->get_key("root", "a");
  ASSERT_TRUE(a.has_value());
  EXPECT_EQ(a->latest_version(), 3);
  EXPECT_EQ(a->versions[3].object_id, oid(1, 3));
  EXPECT_EQ(a->min_decryption_version, 2);
  EXPECT_EQ(a->generation, 3);
  EXPECT_FALSE(s->get_key("root", "b").has_value());
  EXPECT_EQ(intent_ids(*s), (std::vector<std::string>{oid(2, 1), oid(9, 1)}));
}

// Rotates `key` `count` times the way the keys layer does: read latest, write latest + 1, and on
// ConflictError (someone else got there first) read again and retry.
void rotate_with_retry(MetadataStore& s, const std::string& key, int tag, int count,
                       std::atomic<int>& conflicts, std::atomic<bool>& failed) {
  try {
    for (int i = 0; i < count; ++i) {
      const std::string object_id = oid(tag, i);
      for (;;) {
        int next = s.get_key("root", key)->latest_version() + 1;
        try {
          s.add_version("root", key, version(next, object_id));
          break;
        } catch (const ConflictError&) {
          ++conflicts;
        }
      }
    }
  } catch (...) {
    failed = true;
  }
}

void expect_consecutive_versions(MetadataStore& s, const std::string& key, int threads,
                                 int per_thread) {
  auto got = s.get_key("root", key);
  ASSERT_TRUE(got.has_value());
  const int total = 1 + threads * per_thread;
  ASSERT_EQ(static_cast<int>(got->versions.size()), total);
  EXPECT_EQ(got->versions.begin()->first, 1);
  EXPECT_EQ(got->latest_version(), total);  // n distinct numbers from 1 to n: consecutive
  EXPECT_EQ(got->generation, total);       // one bump per added version
  std::set<std::string> objects;
  for (const auto& [n, v] : got->versions) objects.insert(v.object_id);
  EXPECT_EQ(static_cast<int>(objects.size()), total);  // each object used exactly once
}

TEST_F(SqliteStoreTest, ConcurrentRotationsWithRetryGiveConsecutiveVersions) {
  auto s = open();
  s->create_key(make_key("root", "hot", 1, 100));
  constexpr int kThreads = 4;
  constexpr int kPerThread = 25;
  std::atomic<int> conflicts{0};
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(rotate_with_retry, std::ref(*s), "hot", t + 1, kPerThread,
                         std::ref(conflicts), std::ref(failed));
  }
  for (auto& th : threads) th.join();
  EXPECT_FALSE(failed.load());
  expect_consecutive_versions(*s, "hot", kThreads, kPerThread);
}

// Two stores on one file behave like two processes: each write takes SQLite's write lock and
// waits for the other under the busy timeout; readers always see a consistent key.
TEST_F(SqliteStoreTest, TwoConnectionsOnOneFileStayConsistent) {
  auto s1 = open();
  auto s2 = open();
  s1->create_key(make_key("root", "shared", 1, 100));
  constexpr int kPerThread = 20;
  std::atomic<int> conflicts{0};
  std::atomic<bool> failed{false};
  std::atomic<bool> done{false};
  std::atomic<bool> inconsistent{false};
  std::vector<std::thread> threads;
  threads.emplace_back(rotate_with_retry, std::ref(*s1), "shared", 1, kPerThread,
                       std::ref(conflicts), std::ref(failed));
  threads.emplace_back(rotate_with_retry, std::ref(*s2), "shared", 2, kPerThread,
                       std::ref(conflicts), std::ref(failed));
  threads.emplace_back(rotate_with_retry, std::ref(*s1), "shared", 3, kPerThread,
                       std::ref(conflicts), std::ref(failed));
  threads.emplace_back(rotate_with_retry, std::ref(*s2), "shared", 4, kPerThread,
                       std::ref(conflicts), std::ref(failed));
  std::thread reader([&] {
    try {
      auto s3 = open_sqlite_store(path_);
      while (!done) {
        auto k = s3->get_key("root", "shared");
        if (!k || k->generation != k->latest_version() ||
            static_cast<int>(k->versions.size()) != k->latest_version()) {
          inconsistent = true;
        }
      }
    } catch (...) {
      failed = true;
    }
  });
  for (auto& th : threads) th.join();
  done = true;
  reader.join();
  EXPECT_FALSE(failed.load());
  EXPECT_FALSE(inconsistent.load());
  expect_consecutive_versions(*s2, "shared", 4, kPerThread);
}

}  // namespace
}  // namespace p11kms::store
