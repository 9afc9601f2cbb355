// KeyService's transit signing, HMAC and export over a real SoftHSM token and SQLite file.
#include <gtest/gtest.h>

#include <set>

#include "common/encoding.hpp"
#include "keys/key_service.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

class TransitSigningTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  std::string db_dir_ = test_support::make_temp_dir("p11kms-db");
  std::unique_ptr<store::MetadataStore> store_ = store::open_sqlite_store(db_dir_ + "/p11kms.db");
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token hsm_{pool_};
  keys::KeyService ks_{*store_, hsm_};

  ~TransitSigningTest() override { test_support::remove_tree(db_dir_); }

  keys::CreateResult make(const std::string& name, const std::string& type, bool exportable = false, int key_size = 0) {
    keys::KeySpec spec;
    spec.type = type;
    spec.exportable = exportable;
    spec.key_size = key_size;
    return ks_.create_key(keys::KeyRef{"root", name}, spec);
  }
  std::vector<uint8_t> bytes(const std::string& s) { return std::vector<uint8_t>(s.begin(), s.end()); }
  std::set<std::string> labels() {
    std::set<std::string> out;
    for (const auto& o : hsm_.list_key_objects())
      if (o.label.rfind("p11kms/", 0) == 0) out.insert(o.label);  // not the system master key
    return out;
  }
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

TEST_F(TransitSigningTest, EveryAsymmetricTypeSignsAndVerifiesAndTamperingFails) {
  for (const char* type : {"ecdsa-p256", "ecdsa-p384", "ed25519", "rsa-2048"}) {
    SCOPED_TRACE(type);
    keys::KeyRef ref{"root", std::string("k-") + type};
    auto created = make(ref.name, type);
    ASSERT_TRUE(created.created);
    EXPECT_EQ(created.key.versions.at(1).public_key.rfind("-----BEGIN PUBLIC KEY-----", 0), 0u);
    EXPECT_FALSE(created.key.versions.at(1).object_id.empty());
    keys::SignOptions o;
    auto sig = ks_.sign(ref, bytes("hello"), o, 0);
    EXPECT_EQ(sig.value.rfind("vault:v1:", 0), 0u);
    EXPECT_TRUE(ks_.verify(ref, bytes("hello"), o, sig.value));
    EXPECT_FALSE(ks_.verify(ref, bytes("hellO"), o, sig.value));
    EXPECT_EQ(kind_of([&] { ks_.verify(ref, bytes("hello"), o, "vault:v1:%%%"); }), keys::ErrorKind::invalid_argument);
    EXPECT_EQ(kind_of([&] { ks_.verify(ref, bytes("hello"), o, "vault:v2:AAAA"); }), keys::ErrorKind::invalid_argument);
  }
  // private keys on the token, one per key, labelled like every version object
  auto l = labels();
  EXPECT_TRUE(l.count("p11kms/root/k-ed25519/v1"));
  EXPECT_EQ(l.size(), 4u);
}

TEST_F(TransitSigningTest, WrongTypesAndOptionsAreClear400s) {
  make("aes", "aes256-gcm96");
  make("ec", "ecdsa-p256");
  make("ed", "ed25519");
  keys::SignOptions o;
  EXPECT_EQ(kind_of([&] { ks_.sign({"root", "aes"}, bytes("x"), o, 0); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.encrypt({"root", "ec"}, nullptr, 0, 0); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.sign({"root", "missing"}, bytes("x"), o, 0); }), keys::ErrorKind::invalid_argument);
  keys::SignOptions pre;
  pre.prehashed = true;
  EXPECT_EQ(kind_of([&] { ks_.sign({"root", "ed"}, bytes("x"), pre, 0); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.sign({"root", "ec"}, bytes("short"), pre, 0); }), keys::ErrorKind::invalid_argument);
  keys::SignOptions bad_hash;
  bad_hash.hash_algorithm = "md5";
  EXPECT_EQ(kind_of([&] { ks_.sign({"root", "ec"}, bytes("x"), bad_hash, 0); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { make("bad", "rsa-1024"); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { make("h", "hmac", false, 8); }), keys::ErrorKind::invalid_argument);
  EXPECT_FALSE(ks_.key_exists({"root", "bad"}));
  EXPECT_FALSE(ks_.key_exists({"root", "h"}));
}

TEST_F(TransitSigningTest, HmacKeysAreMadeOnceOnFirstUseAndSurviveSweepAndDelete) {
  keys::KeyRef ref{"root", "mac"};
  make(ref.name, "aes256-gcm96");
  EXPECT_EQ(labels(), (std::set<std::string>{"p11kms/root/mac/v1"}));
  auto a = ks_.hmac(ref, bytes("data"), "sha2-512", 0);
  EXPECT_EQ(labels(), (std::set<std::string>{"p11kms/root/mac/v1", "p11kms/root/mac/v1/hmac"}));
  EXPECT_EQ(ks_.hmac(ref, bytes("data"), "sha2-512", 0).value, a.value);  // same key reused
  EXPECT_TRUE(ks_.verify_hmac(ref, bytes("data"), "sha2-512", a.value));
  EXPECT_FALSE(ks_.verify_hmac(ref, bytes("data"), "sha2-256", a.value));
  EXPECT_EQ(labels().size(), 2u);
  auto report = ks_.sweep();
  EXPECT_TRUE(report.missing.empty());
  EXPECT_EQ(report.unknown_objects, 0u);
  EXPECT_EQ(report.orphans_destroyed, 0u);
  ks_.configure_key(ref, keys::KeyConfigChange{std::nullopt, std::nullopt, true});
  ks_.delete_key(ref);
  EXPECT_TRUE(labels().empty()) << "delete destroys the HMAC key object too";
}

TEST_F(TransitSigningTest, HmacTypeKeysUseTheirOwnMaterialAndRotate) {
  keys::KeyRef ref{"root", "h"};
  auto r = make(ref.name, "hmac", false, 16);
  EXPECT_EQ(r.key.key_size, 16);
  auto v1 = ks_.hmac(ref, bytes("x"), "sha2-384", 0);  // a 16-byte key with SHA-384 works (padded)
  ks_.rotate_key(ref);
  auto v2 = ks_.hmac(ref, bytes("x"), "sha2-384", 0);
  EXPECT_EQ(v2.key_version, 2);
  EXPECT_NE(v1.value.substr(9), v2.value.substr(9));
  EXPECT_TRUE(ks_.verify_hmac(ref, bytes("x"), "sha2-384", v1.value));
  EXPECT_EQ(labels(), (std::set<std::string>{"p11kms/root/h/v1", "p11kms/root/h/v2"}));
  EXPECT_EQ(kind_of([&] { ks_.hmac(ref, bytes("x"), "sha3-256", 0); }), keys::ErrorKind::invalid_argument);
}

TEST_F(TransitSigningTest, ExportableKeysLeaveNothingOnTheTokenAndExportTheirMaterial) {
  keys::KeyRef ec{"root", "xec"}, aes{"root", "xaes"};
  make(ec.name, "ecdsa-p256", true);
  make(aes.name, "aes256-gcm96", true);
  keys::SignOptions o;
  auto sig = ks_.sign(ec, bytes("m"), o, 0);
  EXPECT_TRUE(ks_.verify(ec, bytes("m"), o, sig.value));
  std::string text = "secret";
  auto ct = ks_.encrypt(aes, reinterpret_cast<const uint8_t*>(text.data()), text.size(), 0);
  auto pt = ks_.decrypt(aes, ct.ciphertext);
  EXPECT_EQ(std::string(pt.data(), pt.data() + pt.size()), text);
  ks_.hmac(aes, bytes("m"), "sha2-256", 0);
  EXPECT_TRUE(labels().empty()) << "exportable keys are sealed in the store, never token objects";

  auto exported = ks_.export_key(ec, "signing-key", "latest");
  ASSERT_EQ(exported.keys.size(), 1u);
  EXPECT_EQ(exported.keys.at(1).rfind("-----BEGIN EC PRIVATE KEY-----", 0), 0u);
  auto key = ks_.export_key(aes, "encryption-key", "");
  EXPECT_EQ(encoding::base64_decode(key.keys.at(1))->size(), 32u);
  auto hk = ks_.export_key(aes, "hmac-key", "1");
  EXPECT_EQ(encoding::base64_decode(hk.keys.at(1))->size(), 32u);
  EXPECT_EQ(kind_of([&] { ks_.export_key(aes, "signing-key", ""); }), keys::ErrorKind::invalid_argument);
  EXPECT_EQ(kind_of([&] { ks_.export_key(aes, "bogus", ""); }), keys::ErrorKind::invalid_argument);

  // exportability is fixed at creation: never granted later, never taken away
  keys::KeyRef plain{"root", "plain"};
  make(plain.name, "aes256-gcm96");
  keys::KeyConfigChange on;
  on.exportable = true;
  EXPECT_EQ(kind_of([&] { ks_.configure_key(plain, on); }), keys::ErrorKind::invalid_argument);
  EXPECT_FALSE(ks_.read_key(plain).exportable);
  EXPECT_EQ(kind_of([&] { ks_.export_key(plain, "encryption-key", ""); }), keys::ErrorKind::invalid_argument);
  keys::KeyConfigChange off;
  off.exportable = false;
  EXPECT_EQ(kind_of([&] { ks_.configure_key(aes, off); }), keys::ErrorKind::invalid_argument);
  EXPECT_NO_THROW(ks_.configure_key(aes, on));
}

TEST_F(TransitSigningTest, SessionLoadedKeysAreRecreatedWhenTheirSessionIsGone) {
  keys::KeyRef ref{"root", "xed"};
  make(ref.name, "ed25519", true);
  keys::SignOptions o;
  auto first = ks_.sign(ref, bytes("a"), o, 0);
  // Replace every pooled session: session objects die with them; the next use loads again.
  {
    std::vector<hsm::SessionPool::Lease> leases;
    for (int i = 0; i < 4; ++i) leases.push_back(pool_.lease());
    for (auto& l : leases) l.discard();
  }
  auto second = ks_.sign(ref, bytes("a"), o, 0);
  EXPECT_EQ(first.value, second.value) << "Ed25519 is deterministic: the same key signed";
}

}  // namespace
