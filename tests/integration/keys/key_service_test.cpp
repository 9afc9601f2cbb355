// KeyService over a real SoftHSM token and a real SQLite file: lifecycle, version rules and
// crash safety (what the start-up sweep does with what a crash leaves behind).
#include <gtest/gtest.h>

#include <set>
#include <thread>

#include "common/encoding.hpp"
#include "keys/key_service.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

class KeyServiceTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  std::string db_dir_ = test_support::make_temp_dir("p11kms-db");
  std::unique_ptr<store::MetadataStore> store_ = store::open_sqlite_store(db_dir_ + "/p11kms.db");
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token hsm_{pool_};
  keys::KeyService ks_{*store_, hsm_};
  keys::KeyRef ref_{"root", "orders"};

  ~KeyServiceTest() override { test_support::remove_tree(db_dir_); }

  std::string enc(const std::string& text, int version = 0) {
    return ks_.encrypt(ref_, reinterpret_cast<const uint8_t*>(text.data()), text.size(), version).ciphertext;
  }
  std::string dec(const std::string& ct) {
    auto pt = ks_.decrypt(ref_, ct);
    return std::string(pt.data(), pt.data() + pt.size());
  }
  std::set<std::string> object_labels() {
    std::set<std::string> out;
    for (const auto& o : hsm_.list_key_objects()) out.insert(o.label);
    return out;
  }
  // The kind of KeyError f throws (a test failure if it throws none).
  keys::ErrorKind kind_of(const std::function<void()>& f) {
    try {
      f();
    } catch (const keys::KeyError& e) {
      return e.kind();
    }
    ADD_FAILURE() << "no KeyError thrown";
    return keys::ErrorKind::internal;
  }
};

TEST_F(KeyServiceTest, CreateEncryptDecryptAndIdempotentCreate) {
  auto r = ks_.create_key(ref_, "aes128-gcm96");
  EXPECT_TRUE(r.created);
  EXPECT_EQ(r.key.type, "aes128-gcm96");
  std::string ct = enc("hello");
  EXPECT_EQ(ct.rfind("vault:v1:", 0), 0u);
  EXPECT_EQ(dec(ct), "hello");
  auto again = ks_.create_key(ref_, "aes256-gcm96");
  EXPECT_FALSE(again.created);
  EXPECT_EQ(again.key.type, "aes128-gcm96");  // unchanged, as Vault
  EXPECT_EQ(object_labels(), (std::set<std::string>{"p11kms/root/orders/v1"}));
}

TEST_F(KeyServiceTest, BadNamesAndTypesChangeNothing) {
  EXPECT_EQ(kind_of([&] { ks_.create_key({"root", "a b"}, "aes256-gcm96"); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.create_key({"root", std::string(129, 'a')}, "aes256-gcm96"); }),
            keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.create_key(ref_, "rsa-9999"); }), keys::ErrorKind::invalid_argument);
  EXPECT_TRUE(ks_.list_keys("root").empty());
  EXPECT_TRUE(hsm_.list_key_objects().empty());
  EXPECT_TRUE(store_->list_intents().empty());
}

TEST_F(KeyServiceTest, RotateKeepsOldVersionsUsableUntilMinDecryptionVersion) {
  ks_.create_key(ref_, "aes256-gcm96");
  std::string v1 = enc("one");
  auto rec = ks_.rotate_key(ref_);
  EXPECT_EQ(rec.latest_version(), 2);
  std::string v2 = enc("two");
  EXPECT_EQ(v2.rfind("vault:v2:", 0), 0u);
  EXPECT_EQ(enc("old", 1).rfind("vault:v1:", 0), 0u);  // key_version honoured
  EXPECT_EQ(dec(v1), "one");
  auto rewrapped = ks_.rewrap(ref_, v1, 0);
  EXPECT_EQ(rewrapped.key_version, 2);
  EXPECT_EQ(dec(rewrapped.ciphertext), "one");

  keys::KeyConfigChange c;
  c.min_decryption_version = 2;
  ks_.configure_key(ref_, c);
  EXPECT_EQ(kind_of([&] { dec(v1); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(dec(v2), "two");
  // The old version's object stays on the token: rotation never touches old versions.
  EXPECT_EQ(object_labels().size(), 2u);
}

TEST_F(KeyServiceTest, TamperedCiphertextIsRefused) {
  ks_.create_key(ref_, "aes256-gcm96");
  std::string ct = enc("secret");
  auto blob = *encoding::base64_decode(ct.substr(9));
  blob.back() ^= 0x01;
  std::string bad = "vault:v1:" + encoding::base64_encode(blob);
  EXPECT_EQ(kind_of([&] { dec(bad); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { dec("vault:v9:" + ct.substr(9)); }), keys::ErrorKind::invalid_argument);
}

TEST_F(KeyServiceTest, DeleteNeedsPermissionAndDestroysEveryVersionObject) {
  ks_.create_key(ref_, "aes256-gcm96");
  ks_.rotate_key(ref_);
  ks_.create_key({"root", "other"}, "aes256-gcm96");
  EXPECT_EQ(kind_of([&] { ks_.delete_key(ref_); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(hsm_.list_key_objects().size(), 3u);
  keys::KeyConfigChange c;
  c.deletion_allowed = true;
  ks_.configure_key(ref_, c);
  ks_.delete_key(ref_);
  EXPECT_EQ(object_labels(), (std::set<std::string>{"p11kms/root/other/v1"}));
  EXPECT_TRUE(store_->list_intents().empty());
  EXPECT_EQ(kind_of([&] { ks_.read_key(ref_); }), keys::ErrorKind::not_found);
  EXPECT_EQ(kind_of([&] { enc("x"); }), keys::ErrorKind::invalid_argument);  // Vault: 400 for a missing key
  EXPECT_TRUE(ks_.create_key(ref_, "aes256-gcm96").created);  // the name is free again
}

TEST_F(KeyServiceTest, SweepDestroysObjectsWhoseMetadataNeverCommitted) {
  // A crash between C_GenerateKey and the metadata commit leaves an intent and an object.
  auto id = hsm_.new_object_id();
  store_->add_intent({encoding::hex_encode(id), "p11kms/root/crashed/v1", 1});
  hsm_.generate_aes_key(id, 32, "p11kms/root/crashed/v1");
  // A crash before C_GenerateKey leaves an intent alone.
  store_->add_intent({encoding::hex_encode(hsm_.new_object_id()), "p11kms/root/early/v1", 1});
  ks_.create_key(ref_, "aes256-gcm96");

  auto report = ks_.sweep();
  EXPECT_EQ(report.orphans_destroyed, 1u);
  EXPECT_FALSE(hsm_.exists(id));
  EXPECT_TRUE(store_->list_intents().empty());
  EXPECT_EQ(object_labels(), (std::set<std::string>{"p11kms/root/orders/v1"}));
  EXPECT_EQ(dec(enc("still works")), "still works");
}

TEST_F(KeyServiceTest, SweepKeepsObjectsWhoseMetadataCommitted) {
  ks_.create_key(ref_, "aes256-gcm96");
  auto rec = ks_.read_key(ref_);
  // An intent that outlived its commit (crash right after it) must not cost the key.
  store_->add_intent({rec.versions.at(1).object_id, "p11kms/root/orders/v1", 1});
  auto report = ks_.sweep();
  EXPECT_EQ(report.intents_settled, 1u);
  EXPECT_EQ(report.orphans_destroyed, 0u);
  EXPECT_TRUE(store_->list_intents().empty());
  EXPECT_EQ(dec(enc("kept")), "kept");
}

TEST_F(KeyServiceTest, SweepReportsVersionsWhoseObjectIsGone) {
  ks_.create_key(ref_, "aes256-gcm96");
  ks_.rotate_key(ref_);
  auto rec = ks_.read_key(ref_);
  hsm_.destroy(*encoding::hex_decode(rec.versions.at(1).object_id));  // someone else destroyed it
  auto report = ks_.sweep();
  ASSERT_EQ(report.missing.size(), 1u);
  EXPECT_EQ(report.missing[0].name, "orders");
  EXPECT_EQ(report.missing[0].version, 1);
  auto health = ks_.health();
  EXPECT_TRUE(health.token.reachable);
  ASSERT_EQ(health.missing_objects.size(), 1u);
  // v2 still works; v1 is a clean 503, not a crash.
  EXPECT_EQ(dec(enc("v2 ok")), "v2 ok");
  EXPECT_EQ(kind_of([&] { enc("x", 1); }), keys::ErrorKind::unavailable);
}

TEST_F(KeyServiceTest, UnknownTokenObjectsAreLeftInPlace) {
  // Another deployment may share the token: objects nobody here knows are never destroyed.
  auto id = hsm_.new_object_id();
  hsm_.generate_aes_key(id, 32, "p11kms/root/foreign/v1");
  auto report = ks_.sweep();
  EXPECT_EQ(report.unknown_objects, 1u);
  EXPECT_TRUE(hsm_.exists(id));
}

TEST_F(KeyServiceTest, ConcurrentRotationsGiveConsecutiveVersions) {
  ks_.create_key(ref_, "aes256-gcm96");
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int i = 0; i < 3; ++i) ks_.rotate_key(ref_);
    });
  for (auto& t : threads) t.join();
  auto rec = ks_.read_key(ref_);
  EXPECT_EQ(rec.latest_version(), 13);
  EXPECT_EQ(rec.versions.size(), 13u);
  std::set<std::string> ids;
  for (const auto& [v, r] : rec.versions) ids.insert(r.object_id);
  EXPECT_EQ(ids.size(), 13u);
  EXPECT_EQ(hsm_.list_key_objects().size(), 13u);
}

TEST_F(KeyServiceTest, DataKeyIsWrappedByTheNamedKey) {
  ks_.create_key(ref_, "aes256-gcm96");
  auto dk = ks_.generate_data_key(ref_, 512, 0);
  EXPECT_EQ(dk.plaintext.size(), 64u);
  auto unwrapped = ks_.decrypt(ref_, dk.sealed.ciphertext);
  EXPECT_EQ(std::vector<uint8_t>(unwrapped.data(), unwrapped.data() + unwrapped.size()),
            std::vector<uint8_t>(dk.plaintext.data(), dk.plaintext.data() + dk.plaintext.size()));
  EXPECT_EQ(kind_of([&] { ks_.generate_data_key(ref_, 100, 0); }), keys::ErrorKind::invalid_argument);
}

TEST_F(KeyServiceTest, NamespacesAreSeparate) {
  ks_.create_key({"team-a", "shared-name"}, "aes256-gcm96");
  ks_.create_key({"team-b", "shared-name"}, "aes128-gcm96");
  EXPECT_EQ(ks_.read_key({"team-a", "shared-name"}).type, "aes256-gcm96");
  EXPECT_EQ(ks_.read_key({"team-b", "shared-name"}).type, "aes128-gcm96");
  auto ct = ks_.encrypt({"team-a", "shared-name"}, reinterpret_cast<const uint8_t*>("x"), 1, 0).ciphertext;
  EXPECT_EQ(kind_of([&] { ks_.decrypt({"team-b", "shared-name"}, ct); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(object_labels(), (std::set<std::string>{"p11kms/team-a/shared-name/v1", "p11kms/team-b/shared-name/v1"}));
}

}  // namespace
