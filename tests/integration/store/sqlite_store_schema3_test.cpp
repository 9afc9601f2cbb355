// Schema 3 of the SQLite store: transit key options, public keys and per-version HMAC keys.
#include <gtest/gtest.h>
#include <sqlite3.h>
#include <unistd.h>

#include <cstdio>
#include <algorithm>
#include <filesystem>
#include <string>

#include "store/metadata_store.hpp"

namespace p11kms::store {
namespace {

std::string hex_id(int n) {
  char buf[33];
  std::snprintf(buf, sizeof buf, "%032x", static_cast<unsigned>(n));
  return buf;
}
std::string uuid(int n) {
  char buf[37];
  std::snprintf(buf, sizeof buf, "00000000-0000-4000-8000-%012x", static_cast<unsigned>(n));
  return buf;
}

class SqliteSchema3Test : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/p11kms-store3-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/metadata.db";
  }
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  KeyRecord key(const std::string& name, int versions, int tag) {
    KeyRecord k;
    k.id = uuid(tag * 100);
    k.name = name;
    k.type = "ecdsa-p256";
    k.created_at = 1700000000;
    for (int i = 1; i <= versions; ++i) {
      VersionRecord v;
      v.version = i;
      v.id = uuid(tag * 100 + i);
      v.object_id = hex_id(tag * 100 + i);
      v.created_at = 1700000000 + i;
      v.public_key = "-----BEGIN PUBLIC KEY-----\nv" + std::to_string(i) + "\n-----END PUBLIC KEY-----\n";
      k.versions[i] = v;
    }
    return k;
  }
  std::string dir_, path_;
};

TEST_F(SqliteSchema3Test, TransitOptionsAndPublicKeysRoundTrip) {
  auto s = open_sqlite_store(path_);
  EXPECT_EQ(s->schema_version(), 5);
  KeyRecord k = key("signer", 2, 1);
  k.derived = true;
  k.convergent = true;
  k.key_size = 48;
  k.auto_rotate_period = 3600;
  k.min_available_version = 0;
  s->create_key(k);
  auto got = s->get_key("root", "signer");
  ASSERT_TRUE(got);
  EXPECT_TRUE(got->derived);
  EXPECT_TRUE(got->convergent);
  EXPECT_EQ(got->key_size, 48);
  EXPECT_EQ(got->auto_rotate_period, 3600);
  EXPECT_EQ(got->versions.at(2).public_key, k.versions.at(2).public_key);
  EXPECT_EQ(got->versions.at(1).hmac_object_id, "");
  EXPECT_EQ(got->versions.at(1).hmac_sealed, "");

  got->auto_rotate_period = 86400;
  got->derived = false;  // not mutable: update_config leaves it
  s->update_config(*got);
  auto again = s->get_key("root", "signer");
  EXPECT_EQ(again->auto_rotate_period, 86400);
  EXPECT_TRUE(again->derived);
  EXPECT_GT(again->generation, got->generation);
}

TEST_F(SqliteSchema3Test, VersionHmacKeyIsSetOnceAndItsObjectIsSweptAndDeleted) {
  auto s = open_sqlite_store(path_);
  s->create_key(key("k", 2, 2));
  const std::string hmac_obj = hex_id(999);
  s->add_intent(Intent{hmac_obj, "p11kms/root/k/v1/hmac", 5});
  int64_t gen = s->get_key("root", "k")->generation;
  EXPECT_TRUE(s->set_version_hmac("root", "k", 1, hmac_obj, ""));
  EXPECT_TRUE(s->list_intents().empty()) << "the hmac object's intent is settled with it";
  EXPECT_FALSE(s->set_version_hmac("root", "k", 1, hex_id(998), "")) << "a second writer loses";
  EXPECT_TRUE(s->set_version_hmac("root", "k", 2, "", "c2VhbGVk"));
  EXPECT_THROW(s->set_version_hmac("root", "k", 3, "", "x"), std::out_of_range);
  EXPECT_THROW(s->set_version_hmac("root", "k", 1, "a", "b"), std::invalid_argument);
  auto k = s->get_key("root", "k");
  EXPECT_EQ(k->versions.at(1).hmac_object_id, hmac_obj);
  EXPECT_EQ(k->versions.at(2).hmac_sealed, "c2VhbGVk");
  EXPECT_GT(k->generation, gen);

  auto ids = s->all_object_ids();
  EXPECT_EQ(ids, (std::vector<std::string>{hex_id(201), hex_id(202), hmac_obj}));
  auto refs = s->all_versions();
  ASSERT_EQ(refs.size(), 3u);
  EXPECT_EQ(refs[0].version, 1);
  EXPECT_EQ(refs[1].version, 1);
  EXPECT_EQ(refs[2].version, 2);

  auto intents = s->delete_key("root", "k");
  std::vector<std::string> got;
  for (const auto& i : intents) got.push_back(i.object_id);
  std::sort(got.begin(), got.end());
  EXPECT_EQ(got, ids);
  bool labelled = false;
  for (const auto& i : intents) labelled = labelled || i.label == "p11kms/root/k/v1/hmac";
  EXPECT_TRUE(labelled);
  auto tomb = s->get_key_by_id("root", uuid(200));
  ASSERT_TRUE(tomb);
  EXPECT_EQ(tomb->versions.at(1).hmac_object_id, "");
  EXPECT_EQ(tomb->versions.at(2).hmac_sealed, "");
}

TEST_F(SqliteSchema3Test, Schema2DatabaseGainsDefaultsWithoutLosingData) {
  {
    // Build a schema-2 database by hand: the store's own migrations 1-2, then roll back 3.
    auto s = open_sqlite_store(path_);
    KeyRecord k = key("old", 1, 3);
    k.type = "aes256-gcm96";
    k.versions.at(1).public_key.clear();
    s->create_key(k);
  }
  {
    sqlite3* db = nullptr;
    ASSERT_EQ(sqlite3_open(path_.c_str(), &db), SQLITE_OK);
    // Undo migration 3 (SQLite 3.35+ drops columns), as a schema-2 file written by an older build.
    const char* undo =
        "DROP TABLE instances; ALTER TABLE intents DROP COLUMN doomed; ALTER TABLE intents DROP COLUMN lease_expires;"
        "ALTER TABLE intents DROP COLUMN owner; DELETE FROM schema_migrations WHERE version = 5;"  // and 5,
        "DROP TABLE byok_keys; DELETE FROM schema_migrations WHERE version = 4;"  // and 4 after it
        "DROP INDEX key_versions_hmac_object;"
        "ALTER TABLE key_versions DROP COLUMN hmac_sealed;"
        "ALTER TABLE key_versions DROP COLUMN hmac_object_id;"
        "ALTER TABLE key_versions DROP COLUMN public_key;"
        "ALTER TABLE keys DROP COLUMN min_available_version;"
        "ALTER TABLE keys DROP COLUMN auto_rotate_period;"
        "ALTER TABLE keys DROP COLUMN key_size;"
        "ALTER TABLE keys DROP COLUMN convergent;"
        "ALTER TABLE keys DROP COLUMN derived;"
        "DELETE FROM schema_migrations WHERE version = 3;";
    char* err = nullptr;
    ASSERT_EQ(sqlite3_exec(db, undo, nullptr, nullptr, &err), SQLITE_OK) << (err ? err : "");
    sqlite3_close(db);
  }
  auto s = open_sqlite_store(path_);
  EXPECT_EQ(s->schema_version(), 5);
  auto k = s->get_key("root", "old");
  ASSERT_TRUE(k);
  EXPECT_EQ(k->type, "aes256-gcm96");
  EXPECT_FALSE(k->derived);
  EXPECT_EQ(k->auto_rotate_period, 0);
  EXPECT_EQ(k->key_size, 0);
  EXPECT_EQ(k->versions.at(1).object_id, hex_id(301));
  EXPECT_EQ(k->versions.at(1).public_key, "");
  EXPECT_EQ(k->versions.at(1).hmac_object_id, "");
}

}  // namespace
}  // namespace p11kms::store
