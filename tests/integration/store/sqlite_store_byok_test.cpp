// Schema 4 of the SQLite store: the BYOK key registry (ids never reused, quota, keyset paging,
// validation `since` that moves only with the phase or the message).
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>
#include <atomic>
#include <thread>
#include <vector>

#include "store/metadata_store.hpp"

namespace p11kms::store {
namespace {

class SqliteByokTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/p11kms-store-byok-test-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    path_ = dir_ + "/metadata.db";
    s_ = open_sqlite_store(path_);
  }
  void TearDown() override {
    s_.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  static ByokKeyRecord rec(const std::string& ns, const std::string& id, const std::string& kind = "AwsKey") {
    ByokKeyRecord r;
    r.id = id;
    r.ns = ns;
    r.display_name = "name " + id;
    r.kind = kind;
    r.provider = kind == "P11kmsKey" ? "P11KMS" : "AWS";
    r.key_json = "{\"kind\":\"" + kind + "\"}";
    r.target_key_id = kind == "P11kmsKey" ? "00000000-0000-4000-8000-000000000001" : "";
    r.validation_message = "m";
    r.created_at = 1700000000;
    return r;
  }
  std::vector<std::string> ids(const std::vector<ByokKeyRecord>& rows) {
    std::vector<std::string> out;
    for (const auto& r : rows) out.push_back(r.id);
    return out;
  }
  std::string dir_, path_;
  std::unique_ptr<MetadataStore> s_;
};

TEST_F(SqliteByokTest, CreateAndReadBackEveryField) {
  EXPECT_EQ(s_->schema_version(), 5);
  auto r = rec("root", "cck-a", "P11kmsKey");
  r.validation_region = "local";
  ASSERT_TRUE(s_->create_byok_key(r, 10));
  auto got = s_->get_byok_key("root", "cck-a");
  ASSERT_TRUE(got);
  EXPECT_EQ(got->ns, "root");
  EXPECT_EQ(got->display_name, "name cck-a");
  EXPECT_EQ(got->provider, "P11KMS");
  EXPECT_EQ(got->kind, "P11kmsKey");
  EXPECT_EQ(got->key_json, "{\"kind\":\"P11kmsKey\"}");
  EXPECT_EQ(got->target_key_id, r.target_key_id);
  EXPECT_EQ(got->validation_phase, "INITIALIZING");
  EXPECT_EQ(got->validation_message, "m");
  EXPECT_EQ(got->validation_since, 1700000000);  // defaults to created_at
  EXPECT_EQ(got->validation_region, "local");
  EXPECT_EQ(got->created_at, 1700000000);
  EXPECT_EQ(got->updated_at, 1700000000);
  EXPECT_EQ(got->deleted_at, 0);
  // Namespaces are separate.
  EXPECT_FALSE(s_->get_byok_key("other", "cck-a"));
}

TEST_F(SqliteByokTest, IdsAreNeverReusedEvenAfterDeletion) {
  ASSERT_TRUE(s_->create_byok_key(rec("root", "cck-a"), 10));
  EXPECT_THROW(s_->create_byok_key(rec("root", "cck-a"), 10), ConflictError);
  EXPECT_THROW(s_->create_byok_key(rec("other", "cck-a"), 10), ConflictError);
  EXPECT_TRUE(s_->delete_byok_key("root", "cck-a", 1700000100));
  EXPECT_FALSE(s_->delete_byok_key("root", "cck-a", 1700000200));  // already deleted
  auto gone = s_->get_byok_key("root", "cck-a");
  ASSERT_TRUE(gone);
  EXPECT_EQ(gone->deleted_at, 1700000100);
  EXPECT_EQ(gone->updated_at, 1700000100);
  EXPECT_THROW(s_->create_byok_key(rec("root", "cck-a"), 10), ConflictError);
  EXPECT_EQ(s_->count_byok_keys("root"), 0u);
  EXPECT_TRUE(s_->list_byok_keys("root", "", 0).empty());
}

TEST_F(SqliteByokTest, QuotaCountsLiveEntriesPerNamespace) {
  ASSERT_TRUE(s_->create_byok_key(rec("root", "cck-1"), 2));
  ASSERT_TRUE(s_->create_byok_key(rec("root", "cck-2"), 2));
  EXPECT_FALSE(s_->create_byok_key(rec("root", "cck-3"), 2));
  EXPECT_FALSE(s_->get_byok_key("root", "cck-3"));  // nothing written
  EXPECT_TRUE(s_->create_byok_key(rec("team", "cck-4"), 2));  // another namespace has its own
  EXPECT_TRUE(s_->delete_byok_key("root", "cck-1", 1700000100));
  EXPECT_TRUE(s_->create_byok_key(rec("root", "cck-3"), 2));  // a deleted entry frees its place
  EXPECT_EQ(s_->count_byok_keys("root"), 2u);
}

TEST_F(SqliteByokTest, KeysetPagingBySortedId) {
  for (const char* id : {"cck-c", "cck-a", "cck-e", "cck-b", "cck-d"}) ASSERT_TRUE(s_->create_byok_key(rec("root", id), 100));
  ASSERT_TRUE(s_->create_byok_key(rec("team", "cck-0"), 100));
  EXPECT_EQ(ids(s_->list_byok_keys("root", "", 0)),
            (std::vector<std::string>{"cck-a", "cck-b", "cck-c", "cck-d", "cck-e"}));
  EXPECT_EQ(ids(s_->list_byok_keys("root", "", 2)), (std::vector<std::string>{"cck-a", "cck-b"}));
  EXPECT_EQ(ids(s_->list_byok_keys("root", "cck-b", 2)), (std::vector<std::string>{"cck-c", "cck-d"}));
  // A deleted entry between pages is skipped; one created after the cursor is seen.
  EXPECT_TRUE(s_->delete_byok_key("root", "cck-c", 1700000100));
  ASSERT_TRUE(s_->create_byok_key(rec("root", "cck-bb"), 100));
  EXPECT_EQ(ids(s_->list_byok_keys("root", "cck-b", 2)), (std::vector<std::string>{"cck-bb", "cck-d"}));
  EXPECT_EQ(ids(s_->list_byok_keys("root", "cck-e", 2)), std::vector<std::string>{});
  EXPECT_EQ(s_->count_byok_keys("root"), 5u);
  EXPECT_EQ(s_->count_byok_keys("team"), 1u);
}

TEST_F(SqliteByokTest, ValidationSinceMovesOnlyWithPhaseOrMessage) {
  ASSERT_TRUE(s_->create_byok_key(rec("root", "cck-v", "P11kmsKey"), 10));
  ASSERT_TRUE(s_->set_byok_validation("root", "cck-v", "VALID", "", "local", 1700000100));
  auto a = s_->get_byok_key("root", "cck-v");
  EXPECT_EQ(a->validation_phase, "VALID");
  EXPECT_EQ(a->validation_since, 1700000100);
  EXPECT_EQ(a->validation_region, "local");
  ASSERT_TRUE(s_->set_byok_validation("root", "cck-v", "VALID", "", "local", 1700000200));
  EXPECT_EQ(s_->get_byok_key("root", "cck-v")->validation_since, 1700000100);  // unchanged
  ASSERT_TRUE(s_->set_byok_validation("root", "cck-v", "INVALID", "disabled", "", 1700000300));
  auto b = s_->get_byok_key("root", "cck-v");
  EXPECT_EQ(b->validation_phase, "INVALID");
  EXPECT_EQ(b->validation_message, "disabled");
  EXPECT_EQ(b->validation_since, 1700000300);
  EXPECT_EQ(b->validation_region, "local");  // an empty region keeps the last one
  ASSERT_TRUE(s_->set_byok_validation("root", "cck-v", "INVALID", "unreachable", "", 1700000400));
  EXPECT_EQ(s_->get_byok_key("root", "cck-v")->validation_since, 1700000400);  // message changed
  ASSERT_TRUE(s_->set_byok_validation("root", "cck-v", "INVALID", "unreachable", "", 1700000500));
  EXPECT_EQ(s_->get_byok_key("root", "cck-v")->validation_since, 1700000400);
  EXPECT_FALSE(s_->set_byok_validation("root", "cck-none", "VALID", "", "", 1));
  EXPECT_TRUE(s_->delete_byok_key("root", "cck-v", 1700000600));
  EXPECT_FALSE(s_->set_byok_validation("root", "cck-v", "VALID", "", "", 1700000700));  // deleted stays as is
}

TEST_F(SqliteByokTest, RenameAndKindListing) {
  ASSERT_TRUE(s_->create_byok_key(rec("b", "cck-2", "P11kmsKey"), 10));
  ASSERT_TRUE(s_->create_byok_key(rec("a", "cck-3", "P11kmsKey"), 10));
  ASSERT_TRUE(s_->create_byok_key(rec("a", "cck-1", "AwsKey"), 10));
  ASSERT_TRUE(s_->create_byok_key(rec("a", "cck-4", "P11kmsKey"), 10));
  ASSERT_TRUE(s_->delete_byok_key("a", "cck-4", 1700000100));
  auto p = s_->live_byok_keys_of_kind("P11kmsKey");
  ASSERT_EQ(p.size(), 2u);
  EXPECT_EQ(p[0].ns + "/" + p[0].id, "a/cck-3");
  EXPECT_EQ(p[1].ns + "/" + p[1].id, "b/cck-2");
  EXPECT_TRUE(s_->update_byok_display_name("a", "cck-1", "renamed", 1700000200));
  auto r = s_->get_byok_key("a", "cck-1");
  EXPECT_EQ(r->display_name, "renamed");
  EXPECT_EQ(r->updated_at, 1700000200);
  EXPECT_EQ(r->created_at, 1700000000);
  EXPECT_FALSE(s_->update_byok_display_name("b", "cck-1", "x", 1));  // wrong namespace
  EXPECT_FALSE(s_->update_byok_display_name("a", "cck-4", "x", 1));  // deleted
}

TEST_F(SqliteByokTest, ConcurrentCreatesNeverExceedTheQuota) {
  std::vector<std::thread> threads;
  std::atomic<int> created{0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      auto s = open_sqlite_store(path_);  // another connection, as another instance
      for (int i = 0; i < 10; ++i)
        if (s->create_byok_key(rec("root", "cck-" + std::to_string(t) + "-" + std::to_string(i)), 15)) ++created;
    });
  for (auto& th : threads) th.join();
  EXPECT_EQ(created.load(), 15);
  EXPECT_EQ(s_->count_byok_keys("root"), 15u);
}

TEST_F(SqliteByokTest, SurvivesReopening) {
  ASSERT_TRUE(s_->create_byok_key(rec("root", "cck-r"), 10));
  s_.reset();
  s_ = open_sqlite_store(path_);
  EXPECT_EQ(s_->schema_version(), 5);
  EXPECT_TRUE(s_->get_byok_key("root", "cck-r"));
}

}  // namespace
}  // namespace p11kms::store
