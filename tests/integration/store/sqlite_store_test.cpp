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
#include <regex>
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

// A well-formed v4 UUID, different on every call (threads included), so keys and versions made
// by the helpers never collide on their ids unless a test reuses one on purpose.
std::string fresh_uuid() {
  static std::atomic<unsigned long long> next{1};
  char buf[37];
  std::snprintf(buf, sizeof buf, "00000000-0000-4000-8000-%012llx", next.fetch_add(1));
  return buf;
}

bool is_v4_uuid(const std::string& s) {
  static const std::regex shape(
      "^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$");
  return std::regex_match(s, shape);
}

VersionRecord version(int number, const std::string& object_id, int64_t created_at = 1000) {
  VersionRecord v;
  v.version = number;
  v.id = fresh_uuid();
  v.object_id = object_id;
  v.created_at = created_at;
  return v;
}

// A version whose material is sealed in the store instead of living in a token object.
VersionRecord sealed_version(int number, const std::string& sealed, int64_t created_at = 1000) {
  VersionRecord v;
  v.version = number;
  v.id = fresh_uuid();
  v.sealed = sealed;
  v.created_at = created_at;
  return v;
}

// A key with versions 1..n whose objects are oid(tag, 1..n).
KeyRecord make_key(const std::string& ns, const std::string& name, int n, int tag) {
  KeyRecord k;
  k.id = fresh_uuid();
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

TEST_F(SqliteStoreTest, SettingsListByLiteralPrefixAndDelete) {
  auto s = open();
  s->put_setting("mounts/root/b", "2");
  s->put_setting("mounts/root/a", "1");
  s->put_setting("mounts/rootx/c", "3");
  s->put_setting("mounts%/root/d", "4");  // % is not a wildcard here
  auto listed = s->list_settings("mounts/root/");
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0], (std::pair<std::string, std::string>{"mounts/root/a", "1"}));
  EXPECT_EQ(listed[1], (std::pair<std::string, std::string>{"mounts/root/b", "2"}));
  EXPECT_EQ(s->list_settings("mounts%").size(), 1u);
  EXPECT_TRUE(s->delete_setting("mounts/root/a"));
  EXPECT_FALSE(s->delete_setting("mounts/root/a"));
  EXPECT_FALSE(s->get_setting("mounts/root/a").has_value());
  EXPECT_EQ(s->list_settings("mounts/root/").size(), 1u);
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

// ---- Key ids, Key Protect metadata, sealed material and tombstones (schema 2) ----

KeyRecord full_key(const std::string& ns, const std::string& name, int tag) {
  KeyRecord k = make_key(ns, name, 1, tag);
  k.type = "aes256-gcm96";
  k.created_at = 1711111111;
  k.min_decryption_version = 1;
  k.min_encryption_version = 2;
  k.deletion_allowed = true;
  k.exportable = true;
  k.description = "payments root key \xc3\xa9";  // UTF-8 survives
  k.expires_at = 1999999999;
  k.state = kSuspended;
  k.imported = true;
  k.created_by = "token-ops";
  k.updated_at = 1722222222;
  k.versions[2] = sealed_version(2, "c2VhbGVkLWJsb2ItMg==", 1711111112);
  return k;
}

void expect_same_key(const KeyRecord& got, const KeyRecord& want) {
  EXPECT_EQ(got.id, want.id);
  EXPECT_EQ(got.ns, want.ns);
  EXPECT_EQ(got.name, want.name);
  EXPECT_EQ(got.type, want.type);
  EXPECT_EQ(got.created_at, want.created_at);
  EXPECT_EQ(got.min_decryption_version, want.min_decryption_version);
  EXPECT_EQ(got.min_encryption_version, want.min_encryption_version);
  EXPECT_EQ(got.deletion_allowed, want.deletion_allowed);
  EXPECT_EQ(got.exportable, want.exportable);
  EXPECT_EQ(got.description, want.description);
  EXPECT_EQ(got.expires_at, want.expires_at);
  EXPECT_EQ(got.state, want.state);
  EXPECT_EQ(got.imported, want.imported);
  EXPECT_EQ(got.created_by, want.created_by);
  EXPECT_EQ(got.updated_at, want.updated_at);
  EXPECT_EQ(got.deleted_at, want.deleted_at);
  ASSERT_EQ(got.versions.size(), want.versions.size());
  for (const auto& [n, v] : want.versions) {
    ASSERT_EQ(got.versions.count(n), 1u) << n;
    const VersionRecord& g = got.versions.at(n);
    EXPECT_EQ(g.version, v.version);
    EXPECT_EQ(g.id, v.id);
    EXPECT_EQ(g.object_id, v.object_id);
    EXPECT_EQ(g.sealed, v.sealed);
    EXPECT_EQ(g.created_at, v.created_at);
  }
}

TEST_F(SqliteStoreTest, EveryNewFieldRoundTripsThroughEveryRead) {
  auto s = open();
  KeyRecord k = full_key("team-a", "payments", 7);
  s->create_key(k);

  auto by_name = s->get_key("team-a", "payments");
  ASSERT_TRUE(by_name.has_value());
  expect_same_key(*by_name, k);
  EXPECT_EQ(by_name->generation, 1);

  auto by_id = s->get_key_by_id("team-a", k.id);
  ASSERT_TRUE(by_id.has_value());
  expect_same_key(*by_id, k);

  auto listed = s->list_key_records("team-a", false);
  ASSERT_EQ(listed.size(), 1u);
  expect_same_key(listed[0], k);

  // Survives a reopen too (nothing lives only in the statement cache).
  s.reset();
  s = open();
  expect_same_key(*s->get_key("team-a", "payments"), k);
}

TEST_F(SqliteStoreTest, UpdatedAtDefaultsToCreatedAtAndStateToActive) {
  auto s = open();
  KeyRecord k = make_key("root", "k", 1, 1);
  k.created_at = 1700000123;
  s->create_key(k);
  auto got = s->get_key("root", "k");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->updated_at, 1700000123);
  EXPECT_EQ(got->state, kActive);
  EXPECT_EQ(got->deleted_at, 0);
  EXPECT_EQ(got->expires_at, 0);
  EXPECT_EQ(got->description, "");
  EXPECT_EQ(got->created_by, "");
  EXPECT_FALSE(got->imported);
}

TEST_F(SqliteStoreTest, SealedVersionsStoreNullObjectIdsAndDoNotCollide) {
  auto s = open();
  KeyRecord a = make_key("root", "a", 0, 1);
  a.versions[1] = sealed_version(1, "YWFhYQ==");
  a.versions[2] = sealed_version(2, "YmJiYg==");
  KeyRecord b = make_key("root", "b", 0, 2);
  b.versions[1] = sealed_version(1, "Y2NjYw==");
  s->create_key(a);
  s->create_key(b);  // would break UNIQUE (object_id) if absent objects were stored as ''
  s->add_version("root", "b", sealed_version(2, "ZGRkZA=="));

  EXPECT_EQ(s->get_key("root", "a")->versions[2].sealed, "YmJiYg==");
  EXPECT_EQ(s->get_key("root", "a")->versions[2].object_id, "");
  EXPECT_EQ(s->get_key("root", "b")->versions[2].sealed, "ZGRkZA==");
  EXPECT_EQ(s->get_key("root", "b")->generation, 2);

  RawDb raw(path_);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM key_versions WHERE object_id IS NULL"), 4);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM key_versions WHERE object_id = ''"), 0);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM key_versions WHERE sealed IS NOT NULL"), 4);
}

TEST_F(SqliteStoreTest, AddVersionOfSealedMaterialLeavesIntentsAlone) {
  auto s = open();
  KeyRecord k = make_key("root", "k", 0, 1);
  k.versions[1] = sealed_version(1, "AAAA");
  s->add_intent(intent(oid(9, 9)));
  s->create_key(k);
  s->add_version("root", "k", sealed_version(2, "BBBB"));
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(9, 9)});
}

TEST_F(SqliteStoreTest, MalformedRecordsAreRejectedBeforeAnyWrite) {
  auto s = open();
  KeyRecord no_id = make_key("root", "k", 1, 1);
  no_id.id.clear();
  EXPECT_THROW(s->create_key(no_id), std::invalid_argument);

  KeyRecord no_version_id = make_key("root", "k", 1, 1);
  no_version_id.versions[1].id.clear();
  EXPECT_THROW(s->create_key(no_version_id), std::invalid_argument);

  KeyRecord both = make_key("root", "k", 1, 1);
  both.versions[1].sealed = "AAAA";
  EXPECT_THROW(s->create_key(both), std::invalid_argument);

  KeyRecord neither = make_key("root", "k", 1, 1);
  neither.versions[1].object_id.clear();
  EXPECT_THROW(s->create_key(neither), std::invalid_argument);

  KeyRecord destroyed = make_key("root", "k", 1, 1);
  destroyed.state = kDestroyed;  // only delete_key makes tombstones
  EXPECT_THROW(s->create_key(destroyed), std::invalid_argument);

  KeyRecord bad_state = make_key("root", "k", 1, 1);
  bad_state.state = 4;
  EXPECT_THROW(s->create_key(bad_state), std::invalid_argument);

  EXPECT_FALSE(s->get_key("root", "k").has_value());

  s->create_key(make_key("root", "k", 1, 1));
  VersionRecord v = version(2, oid(1, 2));
  v.sealed = "AAAA";
  EXPECT_THROW(s->add_version("root", "k", v), std::invalid_argument);
  v.object_id.clear();
  v.id.clear();
  EXPECT_THROW(s->add_version("root", "k", v), std::invalid_argument);

  KeyRecord change = *s->get_key("root", "k");
  change.state = kDestroyed;
  EXPECT_THROW(s->update_config(change), std::invalid_argument);

  auto got = s->get_key("root", "k");
  EXPECT_EQ(got->versions.size(), 1u);
  EXPECT_EQ(got->state, kActive);
  EXPECT_EQ(got->generation, 1);
}

TEST_F(SqliteStoreTest, GetKeyByIdFindsLiveKeysAndTombstonesInTheirNamespaceOnly) {
  auto s = open();
  KeyRecord live = make_key("a", "live", 2, 1);
  KeyRecord gone = full_key("a", "gone", 2);
  s->create_key(live);
  s->create_key(gone);
  const int64_t before = static_cast<int64_t>(std::time(nullptr));
  s->delete_key("a", "gone");
  const int64_t after = static_cast<int64_t>(std::time(nullptr));

  auto got = s->get_key_by_id("a", live.id);
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->name, "live");
  EXPECT_EQ(got->state, kActive);
  EXPECT_EQ(got->deleted_at, 0);
  EXPECT_EQ(got->versions.at(2).object_id, oid(1, 2));

  auto tomb = s->get_key_by_id("a", gone.id);
  ASSERT_TRUE(tomb.has_value());
  EXPECT_EQ(tomb->id, gone.id);
  EXPECT_EQ(tomb->name, "gone");
  EXPECT_EQ(tomb->state, kDestroyed);
  EXPECT_GE(tomb->deleted_at, before);
  EXPECT_LE(tomb->deleted_at, after);
  EXPECT_EQ(tomb->updated_at, tomb->deleted_at);
  EXPECT_EQ(tomb->generation, 2);
  // Metadata stays for the record; the material in every form is gone.
  EXPECT_EQ(tomb->description, gone.description);
  EXPECT_EQ(tomb->created_at, gone.created_at);
  ASSERT_EQ(tomb->versions.size(), 2u);
  for (const auto& [n, v] : tomb->versions) {
    EXPECT_EQ(v.id, gone.versions.at(n).id);
    EXPECT_EQ(v.created_at, gone.versions.at(n).created_at);
    EXPECT_EQ(v.object_id, "") << n;
    EXPECT_EQ(v.sealed, "") << n;
  }
  RawDb raw(path_);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM key_versions v JOIN keys k ON k.id = v.key_id"
                        " WHERE k.uuid = '" + gone.id +
                        "' AND (v.object_id IS NOT NULL OR v.sealed IS NOT NULL)"),
            0);

  EXPECT_FALSE(s->get_key("a", "gone").has_value());
  EXPECT_FALSE(s->get_key_by_id("b", live.id).has_value());
  EXPECT_FALSE(s->get_key_by_id("b", gone.id).has_value());
  EXPECT_FALSE(s->get_key_by_id("a", fresh_uuid()).has_value());
  EXPECT_FALSE(s->get_key_by_id("a", "live").has_value());  // a name is not an id
}

TEST_F(SqliteStoreTest, DeletingSealedVersionsRecordsIntentsOnlyForObjects) {
  auto s = open();
  KeyRecord k = make_key("root", "mixed", 1, 1);
  k.versions[2] = sealed_version(2, "AAAA");
  s->create_key(k);
  s->add_version("root", "mixed", version(3, oid(1, 3)));
  std::vector<Intent> intents = s->delete_key("root", "mixed");
  ASSERT_EQ(intents.size(), 2u);
  EXPECT_EQ(intents[0].object_id, oid(1, 1));
  EXPECT_EQ(intents[0].label, "p11kms/root/mixed/v1");
  EXPECT_EQ(intents[1].object_id, oid(1, 3));
  EXPECT_EQ(intents[1].label, "p11kms/root/mixed/v3");
  EXPECT_EQ(intent_ids(*s), (std::vector<std::string>{oid(1, 1), oid(1, 3)}));
  EXPECT_EQ(s->get_key_by_id("root", k.id)->versions.at(2).sealed, "");
}

TEST_F(SqliteStoreTest, DeletedNameIsFreeForANewKeyAndTheOldIdStillNamesTheTombstone) {
  auto s = open();
  KeyRecord old_key = make_key("root", "k", 2, 1);
  s->create_key(old_key);
  s->update_config(*s->get_key("root", "k"));  // generation 2
  s->delete_key("root", "k");                  // tombstone at generation 3

  KeyRecord new_key = make_key("root", "k", 1, 2);
  new_key.type = "chacha20-poly1305";
  s->create_key(new_key);

  auto live = s->get_key("root", "k");
  ASSERT_TRUE(live.has_value());
  EXPECT_EQ(live->id, new_key.id);
  EXPECT_EQ(live->type, "chacha20-poly1305");
  EXPECT_EQ(live->state, kActive);
  EXPECT_EQ(live->versions.at(1).object_id, oid(2, 1));
  auto tomb = s->get_key_by_id("root", old_key.id);
  ASSERT_TRUE(tomb.has_value());
  EXPECT_EQ(tomb->state, kDestroyed);
  EXPECT_EQ(tomb->name, "k");
  EXPECT_EQ(tomb->generation, 3);
  EXPECT_GT(live->generation, tomb->generation);
  EXPECT_EQ(s->get_key_by_id("root", new_key.id)->generation, live->generation);

  EXPECT_EQ(s->list_keys("root"), std::vector<std::string>{"k"});
  // The name is taken again while the new key lives; the tombstone does not count.
  EXPECT_THROW(s->create_key(make_key("root", "k", 1, 3)), ConflictError);

  // Writes by name reach the live key, never the tombstone.
  s->add_version("root", "k", version(2, oid(2, 2)));
  KeyRecord change = *s->get_key("root", "k");
  change.description = "second life";
  s->update_config(change);
  EXPECT_EQ(s->get_key("root", "k")->description, "second life");
  EXPECT_EQ(s->get_key_by_id("root", old_key.id)->description, "");
  EXPECT_EQ(s->get_key_by_id("root", old_key.id)->versions.size(), 2u);
  EXPECT_EQ(s->get_key_by_id("root", old_key.id)->generation, 3);

  // And again: two tombstones may share a name.
  s->delete_key("root", "k");
  s->create_key(make_key("root", "k", 1, 4));
  EXPECT_EQ(s->list_key_records("root", true).size(), 3u);
  EXPECT_EQ(s->list_key_records("root", false).size(), 1u);
}

TEST_F(SqliteStoreTest, ReusedKeyIdConflictsEvenAgainstATombstone) {
  auto s = open();
  KeyRecord first = make_key("root", "first", 1, 1);
  s->create_key(first);

  KeyRecord same_id = make_key("other-ns", "second", 1, 2);
  same_id.id = first.id;
  s->add_intent(intent(oid(2, 1)));
  EXPECT_THROW(s->create_key(same_id), ConflictError);

  s->delete_key("root", "first");
  EXPECT_THROW(s->create_key(same_id), ConflictError);
  KeyRecord same_name_and_id = make_key("root", "first", 1, 2);
  same_name_and_id.id = first.id;
  EXPECT_THROW(s->create_key(same_name_and_id), ConflictError);

  EXPECT_FALSE(s->get_key("other-ns", "second").has_value());
  EXPECT_FALSE(s->get_key("root", "first").has_value());
  EXPECT_EQ(s->get_key_by_id("root", first.id)->state, kDestroyed);
  // The rejected key's intent stays, so its object will still be swept.
  EXPECT_EQ(intent_ids(*s), (std::vector<std::string>{oid(1, 1), oid(2, 1)}));
}

TEST_F(SqliteStoreTest, ReusedVersionIdConflictsEvenAgainstATombstone) {
  auto s = open();
  KeyRecord first = make_key("root", "first", 2, 1);
  s->create_key(first);
  const std::string used = first.versions.at(2).id;

  KeyRecord second = make_key("root", "second", 1, 2);
  second.versions[1].id = used;
  s->add_intent(intent(oid(2, 1)));
  EXPECT_THROW(s->create_key(second), ConflictError);

  s->create_key(make_key("root", "third", 1, 3));
  VersionRecord v = version(2, oid(3, 2));
  v.id = used;
  s->add_intent(intent(oid(3, 2)));
  EXPECT_THROW(s->add_version("root", "third", v), ConflictError);

  s->delete_key("root", "first");
  EXPECT_THROW(s->create_key(second), ConflictError);
  EXPECT_THROW(s->add_version("root", "third", v), ConflictError);

  // Two versions of one new key sharing an id conflict too, and nothing is left behind.
  KeyRecord twins = make_key("root", "twins", 2, 4);
  twins.versions[2].id = twins.versions[1].id;
  EXPECT_THROW(s->create_key(twins), ConflictError);

  EXPECT_FALSE(s->get_key("root", "second").has_value());
  EXPECT_FALSE(s->get_key("root", "twins").has_value());
  auto third = s->get_key("root", "third");
  EXPECT_EQ(third->versions.size(), 1u);
  EXPECT_EQ(third->generation, 1);
  std::vector<std::string> intents = intent_ids(*s);
  EXPECT_EQ(std::count(intents.begin(), intents.end(), oid(2, 1)), 1);
  EXPECT_EQ(std::count(intents.begin(), intents.end(), oid(3, 2)), 1);
}

TEST_F(SqliteStoreTest, AddVersionToATombstoneIsOutOfRange) {
  auto s = open();
  KeyRecord k = make_key("root", "k", 1, 1);
  s->create_key(k);
  s->delete_key("root", "k");
  s->add_intent(intent(oid(1, 2)));
  EXPECT_THROW(s->add_version("root", "k", version(2, oid(1, 2))), std::out_of_range);
  EXPECT_THROW(s->add_version("root", "k", sealed_version(2, "AAAA")), std::out_of_range);
  auto tomb = s->get_key_by_id("root", k.id);
  EXPECT_EQ(tomb->versions.size(), 1u);
  EXPECT_EQ(tomb->generation, 2);
  // The refused version's intent stays, so its object will still be swept.
  std::vector<std::string> intents = intent_ids(*s);
  EXPECT_EQ(std::count(intents.begin(), intents.end(), oid(1, 2)), 1);
}

TEST_F(SqliteStoreTest, UpdateConfigWritesEveryMutableFieldButNeverATombstone) {
  auto s = open();
  KeyRecord k = make_key("root", "k", 2, 1);
  k.created_by = "creator";
  s->create_key(k);

  KeyRecord change = *s->get_key("root", "k");
  change.min_decryption_version = 2;
  change.min_encryption_version = 2;
  change.deletion_allowed = true;
  change.exportable = true;
  change.description = "rotated monthly";
  change.expires_at = 1800000000;
  change.state = kSuspended;
  change.updated_at = 1755555555;
  // Not mutable through update_config:
  change.id = fresh_uuid();
  change.type = "ignored";
  change.created_at = 1;
  change.imported = true;
  change.created_by = "someone else";
  change.deleted_at = 99;
  change.generation = 77;
  change.versions.clear();
  s->update_config(change);

  auto got = s->get_key("root", "k");
  ASSERT_TRUE(got.has_value());
  EXPECT_EQ(got->min_decryption_version, 2);
  EXPECT_EQ(got->min_encryption_version, 2);
  EXPECT_TRUE(got->deletion_allowed);
  EXPECT_TRUE(got->exportable);
  EXPECT_EQ(got->description, "rotated monthly");
  EXPECT_EQ(got->expires_at, 1800000000);
  EXPECT_EQ(got->state, kSuspended);
  EXPECT_EQ(got->updated_at, 1755555555);
  EXPECT_EQ(got->generation, 2);
  EXPECT_EQ(got->id, k.id);
  EXPECT_EQ(got->type, "aes256-gcm96");
  EXPECT_EQ(got->created_at, 1700000000);
  EXPECT_FALSE(got->imported);
  EXPECT_EQ(got->created_by, "creator");
  EXPECT_EQ(got->deleted_at, 0);
  EXPECT_EQ(got->versions.size(), 2u);

  for (int state : {kPreActive, kActive, kDeactivated}) {
    change = *s->get_key("root", "k");
    change.state = state;
    s->update_config(change);
    EXPECT_EQ(s->get_key("root", "k")->state, state);
  }

  s->delete_key("root", "k");
  auto tomb_before = s->get_key_by_id("root", k.id);
  change = *tomb_before;
  change.state = kActive;
  change.description = "resurrected?";
  EXPECT_THROW(s->update_config(change), std::out_of_range);
  auto tomb_after = s->get_key_by_id("root", k.id);
  EXPECT_EQ(tomb_after->state, kDestroyed);
  EXPECT_EQ(tomb_after->description, "rotated monthly");
  EXPECT_EQ(tomb_after->generation, tomb_before->generation);
  EXPECT_EQ(tomb_after->deleted_at, tomb_before->deleted_at);
}

TEST_F(SqliteStoreTest, ListKeyRecordsIsInCreationOrderWithOptionalTombstones) {
  auto s = open();
  auto add = [&](const std::string& name, int64_t created_at, const std::string& id, int tag) {
    KeyRecord k = make_key("root", name, 2, tag);
    k.created_at = created_at;
    k.id = id;
    s->create_key(k);
  };
  // Creation time first, then insertion order (never the random id): not name order.
  add("c", 300, "00000000-0000-4000-8000-00000000000a", 1);
  add("a", 100, "00000000-0000-4000-8000-00000000000f", 2);
  add("b", 200, "00000000-0000-4000-8000-00000000000c", 3);
  add("z", 200, "00000000-0000-4000-8000-00000000000b", 4);
  add("d", 400, "00000000-0000-4000-8000-00000000000e", 5);
  KeyRecord elsewhere = make_key("other", "a", 1, 6);
  elsewhere.created_at = 150;
  s->create_key(elsewhere);
  s->delete_key("root", "c");
  s->add_version("root", "d", sealed_version(3, "AAAA"));

  auto names = [](const std::vector<KeyRecord>& records) {
    std::vector<std::string> out;
    for (const auto& r : records) out.push_back(r.name);
    return out;
  };
  auto live = s->list_key_records("root", false);
  EXPECT_EQ(names(live), (std::vector<std::string>{"a", "b", "z", "d"}));
  auto all = s->list_key_records("root", true);
  EXPECT_EQ(names(all), (std::vector<std::string>{"a", "b", "z", "c", "d"}));
  ASSERT_EQ(all.size(), 5u);
  EXPECT_EQ(all[3].state, kDestroyed);
  EXPECT_NE(all[3].deleted_at, 0);
  EXPECT_EQ(all[3].versions.size(), 2u);
  EXPECT_EQ(all[3].versions.at(1).object_id, "");
  // Each record carries its own versions, not a neighbour's.
  EXPECT_EQ(all[0].versions.at(2).object_id, oid(2, 2));
  EXPECT_EQ(all[2].versions.at(1).object_id, oid(4, 1));
  ASSERT_EQ(all[4].versions.size(), 3u);
  EXPECT_EQ(all[4].versions.at(3).sealed, "AAAA");
  for (const auto& r : all) EXPECT_EQ(r.ns, "root");

  EXPECT_EQ(names(s->list_key_records("other", true)), std::vector<std::string>{"a"});
  EXPECT_TRUE(s->list_key_records("nobody", true).empty());
}

TEST_F(SqliteStoreTest, ListKeyRecordsIncludesKeysWithoutVersions) {
  auto s = open();
  KeyRecord empty = make_key("root", "empty", 0, 1);
  empty.created_at = 1;
  s->create_key(empty);
  KeyRecord full = make_key("root", "full", 1, 2);
  full.created_at = 2;
  s->create_key(full);
  auto all = s->list_key_records("root", false);
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].name, "empty");
  EXPECT_TRUE(all[0].versions.empty());
  EXPECT_EQ(all[1].name, "full");
  EXPECT_EQ(all[1].versions.size(), 1u);
}

TEST_F(SqliteStoreTest, AllVersionsAndObjectIdsSkipSealedVersionsAndTombstones) {
  auto s = open();
  KeyRecord mixed = make_key("root", "mixed", 1, 1);
  mixed.versions[2] = sealed_version(2, "AAAA");
  s->create_key(mixed);
  KeyRecord sealed_only = make_key("root", "sealed", 0, 2);
  sealed_only.versions[1] = sealed_version(1, "BBBB");
  s->create_key(sealed_only);
  s->create_key(make_key("root", "doomed", 2, 3));
  s->delete_key("root", "doomed");
  s->create_key(make_key("root", "doomed", 1, 4));  // same name, new key

  EXPECT_EQ(s->all_object_ids(), (std::vector<std::string>{oid(1, 1), oid(4, 1)}));
  auto refs = s->all_versions();
  ASSERT_EQ(refs.size(), 2u);
  EXPECT_EQ(refs[0].name, "doomed");
  EXPECT_EQ(refs[0].version, 1);
  EXPECT_EQ(refs[0].object_id, oid(4, 1));
  EXPECT_EQ(refs[1].name, "mixed");
  EXPECT_EQ(refs[1].version, 1);
  EXPECT_EQ(refs[1].object_id, oid(1, 1));
}

TEST_F(SqliteStoreTest, LiveNameUniquenessIsEnforcedByTheSchemaToo) {
  auto s = open();
  KeyRecord k = make_key("root", "k", 1, 1);
  s->create_key(k);
  RawDb raw(path_);
  const std::string columns =
      "INSERT INTO keys (uuid, ns, name, type, created_at, min_decryption_version,"
      " min_encryption_version, deletion_allowed, exportable, generation, state, deleted_at)"
      " VALUES ";
  EXPECT_THROW(raw.exec(columns + "('" + fresh_uuid() + "', 'root', 'k', 't', 1, 1, 0, 0, 0, 1, 1, 0)"),
               std::runtime_error);
  // Tombstones may share a name with the live key and with each other.
  raw.exec(columns + "('" + fresh_uuid() + "', 'root', 'k', 't', 1, 1, 0, 0, 0, 1, 5, 10)");
  raw.exec(columns + "('" + fresh_uuid() + "', 'root', 'k', 't', 1, 1, 0, 0, 0, 1, 5, 11)");
  // A key id is unique across live keys and tombstones.
  EXPECT_THROW(raw.exec(columns + "('" + k.id + "', 'root', 'k2', 't', 1, 1, 0, 0, 0, 1, 5, 12)"),
               std::runtime_error);
  // A tombstone is exactly a key with state 5 and a deletion time.
  EXPECT_THROW(raw.exec(columns + "('" + fresh_uuid() + "', 'root', 'k3', 't', 1, 1, 0, 0, 0, 1, 5, 0)"),
               std::runtime_error);
  EXPECT_THROW(raw.exec(columns + "('" + fresh_uuid() + "', 'root', 'k4', 't', 1, 1, 0, 0, 0, 1, 1, 9)"),
               std::runtime_error);
  EXPECT_EQ(s->list_keys("root"), std::vector<std::string>{"k"});
  EXPECT_EQ(s->list_key_records("root", true).size(), 3u);
}

// ---- Migration from schema 1 ----

// Migration 1 exactly as it shipped; a database made with it is what older releases left.
const char* const kSchema1 = R"sql(
CREATE TABLE keys (
  id                     INTEGER PRIMARY KEY,
  ns                     TEXT    NOT NULL,
  name                   TEXT    NOT NULL,
  type                   TEXT    NOT NULL,
  created_at             INTEGER NOT NULL,
  min_decryption_version INTEGER NOT NULL,
  min_encryption_version INTEGER NOT NULL,
  deletion_allowed       INTEGER NOT NULL,
  exportable             INTEGER NOT NULL,
  generation             INTEGER NOT NULL,
  UNIQUE (ns, name)
);
CREATE TABLE key_versions (
  key_id     INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
  version    INTEGER NOT NULL CHECK (version >= 1),
  object_id  TEXT    NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (key_id, version)
) WITHOUT ROWID;
CREATE TABLE intents (
  object_id  TEXT    PRIMARY KEY,
  label      TEXT    NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE TABLE settings (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
-- Internal counters. 'max_deleted_generation' is the highest generation any deleted key had;
-- a newly created key starts above it, so a key deleted and created again under the same name
-- never reuses a generation a cache may still hold.
CREATE TABLE counters (
  name  TEXT    PRIMARY KEY,
  value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('max_deleted_generation', 0);
)sql";

class SqliteStoreMigrationTest : public SqliteStoreTest {
 protected:
  // A schema-1 database as an older p11kms left it: key "payments" (2 versions, config
  // changed, generation 5), key "empty" without versions, a second namespace, an intent, a
  // setting and a deleted key's generation.
  void make_schema1_database() {
    RawDb raw(path_);
    raw.exec("CREATE TABLE schema_migrations ("
             " version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)");
    raw.exec(std::string("BEGIN;") + kSchema1 +
             "INSERT INTO schema_migrations (version, applied_at) VALUES (1, 1690000000);"
             "COMMIT;");
    raw.exec(
        "INSERT INTO keys VALUES (1, 'root', 'payments', 'aes256-gcm96', 1700000000, 2, 0, 1, 0, 5);"
        "INSERT INTO keys VALUES (2, 'root', 'empty', 'aes128-gcm96', 1700000100, 1, 0, 0, 1, 1);"
        "INSERT INTO keys VALUES (3, 'team', 'payments', 'aes256-gcm96', 1700000200, 1, 0, 0, 0, 9);"
        "INSERT INTO key_versions VALUES (1, 1, '" + oid(1, 1) + "', 1700000001);"
        "INSERT INTO key_versions VALUES (1, 2, '" + oid(1, 2) + "', 1700000002);"
        "INSERT INTO key_versions VALUES (3, 1, '" + oid(3, 1) + "', 1700000201);"
        "INSERT INTO intents VALUES ('" + oid(8, 8) + "', 'p11kms/root/x/v1', 1700000300);"
        "INSERT INTO settings VALUES ('instance_id', 'abc');"
        "UPDATE counters SET value = 12 WHERE name = 'max_deleted_generation';");
  }
};

TEST_F(SqliteStoreMigrationTest, Schema1DatabaseMigratesInPlaceWithoutLosingData) {
  make_schema1_database();
  auto s = open();
  EXPECT_EQ(s->schema_version(), 5);  // 1 -> 2 -> 3 -> 4 -> 5

  auto k = s->get_key("root", "payments");
  ASSERT_TRUE(k.has_value());
  EXPECT_TRUE(is_v4_uuid(k->id)) << k->id;
  EXPECT_EQ(k->type, "aes256-gcm96");
  EXPECT_EQ(k->created_at, 1700000000);
  EXPECT_EQ(k->updated_at, 1700000000);
  EXPECT_EQ(k->min_decryption_version, 2);
  EXPECT_EQ(k->min_encryption_version, 0);
  EXPECT_TRUE(k->deletion_allowed);
  EXPECT_FALSE(k->exportable);
  EXPECT_EQ(k->generation, 5);
  EXPECT_EQ(k->state, kActive);
  EXPECT_EQ(k->description, "");
  EXPECT_EQ(k->expires_at, 0);
  EXPECT_FALSE(k->imported);
  EXPECT_EQ(k->created_by, "");
  EXPECT_EQ(k->deleted_at, 0);
  ASSERT_EQ(k->versions.size(), 2u);
  for (int n : {1, 2}) {
    const VersionRecord& v = k->versions.at(n);
    EXPECT_EQ(v.version, n);
    EXPECT_EQ(v.object_id, oid(1, n));
    EXPECT_EQ(v.sealed, "");
    EXPECT_EQ(v.created_at, 1700000000 + n);
    EXPECT_TRUE(is_v4_uuid(v.id)) << v.id;
  }

  auto empty = s->get_key("root", "empty");
  ASSERT_TRUE(empty.has_value());
  EXPECT_TRUE(empty->versions.empty());
  EXPECT_TRUE(empty->exportable);
  auto team = s->get_key("team", "payments");
  ASSERT_TRUE(team.has_value());
  EXPECT_EQ(team->generation, 9);
  EXPECT_EQ(team->versions.at(1).object_id, oid(3, 1));

  std::set<std::string> ids{k->id, empty->id, team->id, k->versions.at(1).id,
                            k->versions.at(2).id, team->versions.at(1).id};
  EXPECT_EQ(ids.size(), 6u);
  EXPECT_EQ(s->get_key_by_id("root", k->id)->name, "payments");
  EXPECT_FALSE(s->get_key_by_id("team", k->id).has_value());

  EXPECT_EQ(s->list_keys("root"), (std::vector<std::string>{"empty", "payments"}));
  EXPECT_EQ(s->all_object_ids(), (std::vector<std::string>{oid(1, 1), oid(1, 2), oid(3, 1)}));
  EXPECT_EQ(intent_ids(*s), std::vector<std::string>{oid(8, 8)});
  EXPECT_EQ(s->get_setting("instance_id"), std::optional<std::string>("abc"));

  // Name uniqueness still holds among live keys, and is released by deletion.
  EXPECT_THROW(s->create_key(make_key("root", "payments", 1, 5)), ConflictError);
  s->add_version("root", "payments", version(3, oid(1, 3)));
  EXPECT_EQ(s->get_key("root", "payments")->generation, 6);
  std::vector<Intent> intents = s->delete_key("root", "payments");
  EXPECT_EQ(intents.size(), 3u);
  s->create_key(make_key("root", "payments", 1, 6));
  // The counter carried over: the new key starts above the old deleted generation (12).
  EXPECT_GT(s->get_key("root", "payments")->generation, 12);
  EXPECT_EQ(s->get_key_by_id("root", k->id)->state, kDestroyed);
}

TEST_F(SqliteStoreMigrationTest, MigratedSchemaIsWellFormed) {
  make_schema1_database();
  open()->schema_version();
  RawDb raw(path_);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM schema_migrations"), 5);
  EXPECT_EQ(raw.integer("SELECT applied_at FROM schema_migrations WHERE version = 1"), 1690000000);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM sqlite_master WHERE name LIKE '%\\_new' ESCAPE '\\'"),
            0);
  // The rename rewrote the versions table's reference from keys_new to keys.
  const std::string versions_sql =
      raw.text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'key_versions'");
  EXPECT_EQ(versions_sql.find("keys_new"), std::string::npos) << versions_sql;
  EXPECT_EQ(raw.text("SELECT \"table\" FROM pragma_foreign_key_list('key_versions')"), "keys");
  EXPECT_EQ(raw.text("SELECT on_delete FROM pragma_foreign_key_list('key_versions')"), "CASCADE");
  EXPECT_EQ(raw.text("PRAGMA integrity_check"), "ok");
  EXPECT_EQ(raw.text("SELECT count(*) FROM pragma_foreign_key_check"), "0");
  EXPECT_EQ(raw.integer("SELECT count(*) FROM keys WHERE state <> 1 OR updated_at <> created_at"),
            0);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM keys"), 3);
  EXPECT_EQ(raw.integer("SELECT count(*) FROM key_versions"), 3);
  // Deleting a key row still takes its versions with it.
  raw.exec("PRAGMA foreign_keys = ON; DELETE FROM keys WHERE name = 'payments' AND ns = 'root'");
  EXPECT_EQ(raw.integer("SELECT count(*) FROM key_versions"), 1);
}

TEST_F(SqliteStoreTest, FreshSchemaMatchesTheMigratedOne) {
  open()->schema_version();
  RawDb raw(path_);
  EXPECT_EQ(raw.text("SELECT \"table\" FROM pragma_foreign_key_list('key_versions')"), "keys");
  EXPECT_EQ(raw.text("SELECT on_delete FROM pragma_foreign_key_list('key_versions')"), "CASCADE");
  for (const char* index : {"keys_live_name", "keys_ns_created"}) {
    EXPECT_EQ(raw.integer(std::string("SELECT count(*) FROM sqlite_master WHERE type = 'index'"
                                      " AND tbl_name = 'keys' AND name = '") + index + "'"),
              1)
        << index;
  }
}

TEST_F(SqliteStoreMigrationTest, MigrationGivesEveryRowItsOwnV4Uuid) {
  {
    RawDb raw(path_);
    raw.exec("CREATE TABLE schema_migrations ("
             " version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)");
    raw.exec(std::string("BEGIN;") + kSchema1 +
             "INSERT INTO schema_migrations (version, applied_at) VALUES (1, 0);");
    for (int i = 1; i <= 200; ++i) {
      raw.exec("INSERT INTO keys VALUES (" + std::to_string(i) + ", 'root', 'k" +
               std::to_string(i) + "', 'aes256-gcm96', " + std::to_string(1700000000 + i) +
               ", 1, 0, 0, 0, 1);"
               "INSERT INTO key_versions VALUES (" + std::to_string(i) + ", 1, '" + oid(i, 1) +
               "', 1);"
               "INSERT INTO key_versions VALUES (" + std::to_string(i) + ", 2, '" + oid(i, 2) +
               "', 2);");
    }
    raw.exec("COMMIT");
  }
  auto s = open();
  ASSERT_EQ(s->schema_version(), 5);
  std::set<std::string> ids;
  std::set<char> variants;
  auto records = s->list_key_records("root", false);
  ASSERT_EQ(records.size(), 200u);
  for (const KeyRecord& k : records) {
    EXPECT_TRUE(is_v4_uuid(k.id)) << k.id;
    ids.insert(k.id);
    variants.insert(k.id[19]);
    ASSERT_EQ(k.versions.size(), 2u) << k.name;
    for (const auto& [n, v] : k.versions) {
      EXPECT_TRUE(is_v4_uuid(v.id)) << v.id;
      ids.insert(v.id);
      variants.insert(v.id[19]);
    }
  }
  EXPECT_EQ(ids.size(), 600u);
  // All four variant nibbles turn up among 600 random ones (failure odds ~1e-74).
  EXPECT_EQ(variants, (std::set<char>{'8', '9', 'a', 'b'}));
}

}  // namespace
}  // namespace p11kms::store
