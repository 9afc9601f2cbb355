// KeyService over a real SoftHSM token and a real SQLite file: lifecycle, version rules and
// crash safety (what the start-up sweep does with what a crash leaves behind).
#include <gtest/gtest.h>

#include <chrono>
#include <ctime>
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

// ---- Key Protect operations (wrap/unwrap/rotate/states/standard keys/tombstones) ----

namespace {
hsm::SecureBytes bytes_of(const std::string& s) {
  return hsm::SecureBytes(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}
std::string text_of(const hsm::SecureBytes& b) { return std::string(b.data(), b.data() + b.size()); }
}  // namespace

TEST_F(KeyServiceTest, WrapUnwrapBindsAadAndSurvivesRotationWithRewrap) {
  auto created = ks_.create_key(ref_, keys::KeySpec{});
  ASSERT_TRUE(created.created);
  keys::KeyRef ref{"root", "orders", created.key.id};
  auto dek = bytes_of("a data key of 32 bytes exactly!!");
  auto w1 = ks_.wrap(ref, &dek, {"tenant-a", ""});
  EXPECT_EQ(w1.wrapped.version_id, created.key.versions.at(1).id);
  EXPECT_FALSE(w1.generated.has_value());

  auto u = ks_.unwrap(ref, w1.wrapped.ciphertext, {"tenant-a", ""});
  EXPECT_EQ(text_of(u.plaintext), text_of(dek));
  EXPECT_FALSE(u.rewrapped.has_value());
  // AAD is bound: a different list, order or split is refused.
  for (std::vector<std::string> aad : std::vector<std::vector<std::string>>{{}, {"tenant-a"}, {"", "tenant-a"}, {"tenant-", "a"}})
    EXPECT_EQ(kind_of([&] { ks_.unwrap(ref, w1.wrapped.ciphertext, aad); }), keys::ErrorKind::invalid_argument);

  auto rotated = ks_.rotate_key(ref);
  auto u2 = ks_.unwrap(ref, w1.wrapped.ciphertext, {"tenant-a", ""});
  EXPECT_EQ(u2.version_id, created.key.versions.at(1).id);
  ASSERT_TRUE(u2.rewrapped.has_value());
  EXPECT_EQ(u2.rewrapped->version_id, rotated.versions.at(2).id);
  auto u3 = ks_.unwrap(ref, u2.rewrapped->ciphertext, {"tenant-a", ""});
  EXPECT_EQ(text_of(u3.plaintext), text_of(dek));
  EXPECT_FALSE(u3.rewrapped.has_value());
}

TEST_F(KeyServiceTest, AnotherKeysCiphertextAndGeneratedDeksAreHandled) {
  keys::KeyRef other{"root", "other"};
  ks_.create_key(ref_, keys::KeySpec{});
  ks_.create_key(other, keys::KeySpec{});
  auto w = ks_.wrap(ref_, nullptr, {});
  ASSERT_TRUE(w.generated.has_value());
  EXPECT_EQ(w.generated->size(), keys::kGeneratedDekBytes);
  EXPECT_EQ(kind_of([&] { ks_.unwrap(other, w.wrapped.ciphertext, {}); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(text_of(ks_.unwrap(ref_, w.wrapped.ciphertext, {}).plaintext), text_of(*w.generated));
}

TEST_F(KeyServiceTest, WrapLimitsAreEnforced) {
  ks_.create_key(ref_, keys::KeySpec{});
  hsm::SecureBytes big(keys::kMaxWrapPlaintextBytes + 1), max(keys::kMaxWrapPlaintextBytes), empty;
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref_, &big, {}); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref_, &empty, {}); }), keys::ErrorKind::invalid_argument);
  ks_.wrap(ref_, &max, std::vector<std::string>(keys::kMaxWrapAadEntries, std::string(255, 'x')));
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref_, &max, std::vector<std::string>(keys::kMaxWrapAadEntries + 1)); }),
            keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref_, &max, {std::string(256, 'x')}); }), keys::ErrorKind::invalid_argument);
}

TEST_F(KeyServiceTest, ImportedRootKeyIsTheCallersKeyAndRotatesOnlyWithMaterial) {
  auto material = bytes_of(std::string(32, 'k'));
  keys::KeySpec spec;
  spec.material = &material;
  auto created = ks_.create_key(ref_, spec);
  EXPECT_TRUE(created.key.imported);
  // The imported object serves transit too (tests/integration/hsm checks it is the caller's key).
  std::string ct = enc("hello");
  EXPECT_EQ(dec(ct), "hello");
  EXPECT_EQ(kind_of([&] { ks_.rotate_key(ref_); }), keys::ErrorKind::invalid_argument);
  auto short_material = bytes_of(std::string(16, 'k'));
  EXPECT_EQ(kind_of([&] { ks_.rotate_key(ref_, &short_material); }), keys::ErrorKind::invalid_argument);
  auto next = bytes_of(std::string(32, 'n'));
  EXPECT_EQ(ks_.rotate_key(ref_, &next).latest_version(), 2);
  EXPECT_EQ(dec(ct), "hello");

  keys::KeyRef generated{"root", "generated"};
  ks_.create_key(generated, keys::KeySpec{});
  EXPECT_EQ(kind_of([&] { ks_.rotate_key(generated, &next); }), keys::ErrorKind::invalid_argument);
  auto wrong = bytes_of(std::string(31, 'k'));
  keys::KeySpec bad;
  bad.material = &wrong;
  EXPECT_EQ(kind_of([&] { ks_.create_key(keys::KeyRef{"root", "bad"}, bad); }), keys::ErrorKind::invalid_argument);
  EXPECT_FALSE(ks_.key_exists(keys::KeyRef{"root", "bad"}));
}

TEST_F(KeyServiceTest, StandardKeysAreSealedOffTokenAndReadBack) {
  auto labels_before = object_labels();
  auto material = bytes_of(std::string(48, 's'));
  keys::KeySpec spec;
  spec.type = "standard";
  spec.material = &material;
  auto created = ks_.create_key(ref_, spec);
  EXPECT_TRUE(created.key.exportable);
  EXPECT_TRUE(created.key.versions.at(1).object_id.empty());
  EXPECT_FALSE(created.key.versions.at(1).sealed.empty());
  EXPECT_EQ(text_of(ks_.read_material(ref_)), std::string(48, 's'));
  // No per-key object: at most the one master key appeared on the token.
  auto labels_after = object_labels();
  EXPECT_LE(labels_after.size(), labels_before.size() + 1);
  EXPECT_TRUE(labels_after.count("p11kms-system/master-key"));

  keys::KeyRef gen{"root", "gen"};
  keys::KeySpec gspec;
  gspec.type = "standard";
  ks_.create_key(gen, gspec);
  EXPECT_EQ(ks_.read_material(gen).size(), 32u);
  EXPECT_NE(text_of(ks_.read_material(gen)), std::string(32, '\0'));
  // Standard keys do not wrap, encrypt or rotate.
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref_, nullptr, {}); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { enc("x"); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.rotate_key(gen); }), keys::ErrorKind::invalid_argument);
  // Root keys are not exportable.
  keys::KeyRef root_key{"root", "rootkey"};
  ks_.create_key(root_key, keys::KeySpec{});
  EXPECT_EQ(kind_of([&] { ks_.read_material(root_key); }), keys::ErrorKind::invalid_argument);
}

TEST_F(KeyServiceTest, DisableEnableAndDeleteLeaveATombstone) {
  auto created = ks_.create_key(ref_, keys::KeySpec{});
  keys::KeyRef ref{"root", "orders", created.key.id};
  auto w = ks_.wrap(ref, nullptr, {});
  EXPECT_EQ(ks_.set_enabled(ref, false).state, store::kSuspended);
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref, nullptr, {}); }), keys::ErrorKind::conflict);
  EXPECT_EQ(kind_of([&] { ks_.unwrap(ref, w.wrapped.ciphertext, {}); }), keys::ErrorKind::conflict);
  EXPECT_EQ(kind_of([&] { ks_.set_enabled(ref, false); }), keys::ErrorKind::conflict);
  EXPECT_EQ(ks_.set_enabled(ref, true).state, store::kActive);
  EXPECT_EQ(kind_of([&] { ks_.set_enabled(ref, true); }), keys::ErrorKind::conflict);

  ks_.rotate_key(ref);
  auto tomb = ks_.delete_key(ref, /*require_deletion_allowed=*/false);
  EXPECT_EQ(tomb.state, store::kDestroyed);
  EXPECT_EQ(tomb.id, created.key.id);
  EXPECT_EQ(object_labels().count("p11kms/root/orders/v1") + object_labels().count("p11kms/root/orders/v2"), 0u);
  auto found = ks_.find_key("root", created.key.id);
  ASSERT_TRUE(found.has_value());
  EXPECT_EQ(found->state, store::kDestroyed);
  EXPECT_FALSE(ks_.find_key("root", "orders").has_value());
  // The name is free again; the old id still names the tombstone, not the new key.
  auto again = ks_.create_key(ref_, keys::KeySpec{});
  EXPECT_NE(again.key.id, created.key.id);
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref, nullptr, {}); }), keys::ErrorKind::not_found);
  EXPECT_EQ(ks_.find_key("root", created.key.id)->state, store::kDestroyed);
}

TEST_F(KeyServiceTest, ExpiredKeyUnwrapsButNoLongerWraps) {
  keys::KeySpec spec;
  spec.expires_at = std::time(nullptr) + 2;
  ks_.create_key(ref_, spec);
  auto w = ks_.wrap(ref_, nullptr, {});
  std::this_thread::sleep_for(std::chrono::milliseconds(2100));
  // Expiry is a function of time, not a write: read straight away.
  if (std::time(nullptr) < spec.expires_at) std::this_thread::sleep_for(std::chrono::seconds(1));
  EXPECT_EQ(kind_of([&] { ks_.wrap(ref_, nullptr, {}); }), keys::ErrorKind::conflict);
  EXPECT_EQ(text_of(ks_.unwrap(ref_, w.wrapped.ciphertext, {}).plaintext), text_of(*w.generated));
}
