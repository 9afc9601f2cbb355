// Unit tests for keys/key.hpp (version rules over a store::KeyRecord) and keys/digest.hpp.
#include "keys/key.hpp"

#include <gtest/gtest.h>

#include "support/expect_key_error.hpp"

#include <string>
#include <vector>

#include "common/encoding.hpp"
#include "keys/digest.hpp"
#include "keys/errors.hpp"

namespace keys = p11kms::keys;
namespace store = p11kms::store;

namespace {

// A key named "orders" in namespace root with versions 1..latest.
store::KeyRecord record(int latest, int min_dec = 1, int min_enc = 0) {
  store::KeyRecord r;
  r.name = "orders";
  r.type = "aes256-gcm96";
  r.created_at = 1700000000;
  r.min_decryption_version = min_dec;
  r.min_encryption_version = min_enc;
  for (int v = 1; v <= latest; ++v) {
    store::VersionRecord vr;
    vr.version = v;
    vr.object_id = std::string(31, '0') + std::to_string(v);
    vr.created_at = 1700000000 + v;
    r.versions[v] = vr;
  }
  return r;
}

using p11kms::test_support::contains;

template <typename F>
std::string expect_invalid(F&& f) { return p11kms::test_support::expect_key_error(std::forward<F>(f)); }

void expect_same_record(const store::KeyRecord& a, const store::KeyRecord& b) {
  EXPECT_EQ(a.ns, b.ns);
  EXPECT_EQ(a.name, b.name);
  EXPECT_EQ(a.type, b.type);
  EXPECT_EQ(a.min_decryption_version, b.min_decryption_version);
  EXPECT_EQ(a.min_encryption_version, b.min_encryption_version);
  EXPECT_EQ(a.deletion_allowed, b.deletion_allowed);
  EXPECT_EQ(a.exportable, b.exportable);
  EXPECT_EQ(a.generation, b.generation);
  EXPECT_EQ(a.versions.size(), b.versions.size());
}

}  // namespace

TEST(Key, BasicAccessors) {
  keys::Key k(record(3));
  EXPECT_EQ(k.name(), "orders");
  EXPECT_EQ(k.latest_version(), 3);
  EXPECT_EQ(k.type(), keys::KeyType::aes256_gcm96);
}

TEST(Key, UnknownStoredTypeIsInternal) {
  auto r = record(1);
  r.type = "rot13";
  keys::Key k(r);
  try {
    k.type();
    FAIL() << "unknown type accepted";
  } catch (const keys::KeyError& e) {
    EXPECT_EQ(e.kind(), keys::ErrorKind::internal);
  }
}

TEST(KeyEncryptionVersion, ZeroMeansLatest) {
  keys::Key k(record(3));
  EXPECT_EQ(k.encryption_version(0).version, 3);
  EXPECT_EQ(k.encryption_version(0).object_id, k.record().versions.at(3).object_id);
}

TEST(KeyEncryptionVersion, ExplicitVersionsUpToLatest) {
  keys::Key k(record(3));
  EXPECT_EQ(k.encryption_version(1).version, 1);
  EXPECT_EQ(k.encryption_version(2).version, 2);
  EXPECT_EQ(k.encryption_version(3).version, 3);
}

TEST(KeyEncryptionVersion, AboveLatestRefused) {
  keys::Key k(record(3));
  auto msg = expect_invalid([&] { k.encryption_version(4); });
  EXPECT_TRUE(contains(msg, "4")) << msg;
  EXPECT_TRUE(contains(msg, "latest")) << msg;
}

TEST(KeyEncryptionVersion, NegativeRefused) {
  keys::Key k(record(3));
  expect_invalid([&] { k.encryption_version(-1); });
}

TEST(KeyEncryptionVersion, BelowMinEncryptionRefused) {
  keys::Key k(record(4, 1, 3));
  auto msg = expect_invalid([&] { k.encryption_version(2); });
  EXPECT_TRUE(contains(msg, "minimum encryption")) << msg;
  expect_invalid([&] { k.encryption_version(1); });
  EXPECT_EQ(k.encryption_version(3).version, 3);
  EXPECT_EQ(k.encryption_version(4).version, 4);
  EXPECT_EQ(k.encryption_version(0).version, 4);
}

TEST(KeyEncryptionVersion, NoVersionsRefused) {
  store::KeyRecord r;
  r.name = "empty";
  keys::Key k(r);
  expect_invalid([&] { k.encryption_version(0); });
}

TEST(KeyDecryptionVersion, WithinRangeAllowed) {
  keys::Key k(record(3));
  EXPECT_EQ(k.decryption_version(1).version, 1);
  EXPECT_EQ(k.decryption_version(3).version, 3);
}

TEST(KeyDecryptionVersion, BelowMinDecryptionRefused) {
  keys::Key k(record(3, 2));
  auto msg = expect_invalid([&] { k.decryption_version(1); });
  EXPECT_TRUE(contains(msg, "min_decryption_version")) << msg;
  EXPECT_EQ(k.decryption_version(2).version, 2);
  expect_invalid([&] { k.decryption_version(0); });
}

TEST(KeyDecryptionVersion, AboveLatestRefused) {
  keys::Key k(record(3));
  expect_invalid([&] { k.decryption_version(4); });
  expect_invalid([&] { k.decryption_version(1000); });
}

TEST(KeyWithConfig, NegativeRefused) {
  keys::Key k(record(3));
  auto msg = expect_invalid([&] { k.with_config({-1, std::nullopt, std::nullopt}); });
  EXPECT_TRUE(contains(msg, "min_decryption_version")) << msg;
  msg = expect_invalid([&] { k.with_config({std::nullopt, -1, std::nullopt}); });
  EXPECT_TRUE(contains(msg, "min_encryption_version")) << msg;
}

TEST(KeyWithConfig, MinDecryptionZeroBecomesOne) {
  keys::Key k(record(3, 2));
  auto next = k.with_config({0, std::nullopt, std::nullopt});
  EXPECT_EQ(next.min_decryption_version, 1);
}

TEST(KeyWithConfig, AppliesValidMins) {
  keys::Key k(record(3));
  auto next = k.with_config({2, 3, std::nullopt});
  EXPECT_EQ(next.min_decryption_version, 2);
  EXPECT_EQ(next.min_encryption_version, 3);
  // The original Key is not modified by a successful change either.
  EXPECT_EQ(k.record().min_decryption_version, 1);
  EXPECT_EQ(k.record().min_encryption_version, 0);
}

TEST(KeyWithConfig, MinEncryptionZeroMeansLatestAndIsAlwaysAllowed) {
  keys::Key k(record(3, 3, 3));
  auto next = k.with_config({std::nullopt, 0, std::nullopt});
  EXPECT_EQ(next.min_encryption_version, 0);
  EXPECT_EQ(next.min_decryption_version, 3);
}

TEST(KeyWithConfig, AboveLatestRefused) {
  keys::Key k(record(3));
  auto msg = expect_invalid([&] { k.with_config({4, std::nullopt, std::nullopt}); });
  EXPECT_TRUE(contains(msg, "min_decryption_version")) << msg;
  msg = expect_invalid([&] { k.with_config({std::nullopt, 4, std::nullopt}); });
  EXPECT_TRUE(contains(msg, "min_encryption_version")) << msg;
  // Exactly latest is fine.
  EXPECT_EQ(k.with_config({3, 3, std::nullopt}).min_decryption_version, 3);
}

TEST(KeyWithConfig, MinEncryptionBelowMinDecryptionRefused) {
  keys::Key k(record(3));
  auto msg = expect_invalid([&] { k.with_config({3, 2, std::nullopt}); });
  EXPECT_TRUE(contains(msg, "min_encryption_version")) << msg;
  EXPECT_TRUE(contains(msg, "min_decryption_version")) << msg;

  // Against the stored value too: raising min_decryption above a stored min_encryption.
  keys::Key k2(record(3, 1, 2));
  expect_invalid([&] { k2.with_config({3, std::nullopt, std::nullopt}); });
  // And lowering min_encryption below a stored min_decryption.
  keys::Key k3(record(3, 3, 3));
  expect_invalid([&] { k3.with_config({std::nullopt, 2, std::nullopt}); });
  // Equal is fine.
  EXPECT_NO_THROW(k.with_config({2, 2, std::nullopt}));
}

TEST(KeyWithConfig, DeletionAllowedApplied) {
  keys::Key k(record(3));
  EXPECT_TRUE(k.with_config({std::nullopt, std::nullopt, true}).deletion_allowed);
  auto r = record(3);
  r.deletion_allowed = true;
  keys::Key k2(r);
  EXPECT_FALSE(k2.with_config({std::nullopt, std::nullopt, false}).deletion_allowed);
  // Not set in the change: kept.
  EXPECT_TRUE(k2.with_config({}).deletion_allowed);
}

TEST(KeyWithConfig, UnsetFieldsKept) {
  keys::Key k(record(3, 2, 3));
  auto next = k.with_config({});
  expect_same_record(next, k.record());
}

TEST(KeyWithConfig, RefusedChangeLeavesOriginalUntouched) {
  auto original = record(3, 2, 0);
  keys::Key k(original);
  // Valid min_decryption and deletion_allowed, but min_encryption below: the whole change fails.
  expect_invalid([&] { k.with_config({3, 2, true}); });
  expect_same_record(k.record(), original);
  expect_invalid([&] { k.with_config({2, 5, true}); });
  expect_same_record(k.record(), original);
  expect_invalid([&] { k.with_config({-1, std::nullopt, true}); });
  expect_same_record(k.record(), original);
  EXPECT_FALSE(k.record().deletion_allowed);
  // The key still answers with its original rules.
  EXPECT_EQ(k.encryption_version(0).version, 3);
  expect_invalid([&] { k.decryption_version(1); });
}

TEST(KeyLabel, Format) {
  keys::Key k(record(3));
  EXPECT_EQ(k.label_for(1), "p11kms/root/orders/v1");
  EXPECT_EQ(k.label_for(12), "p11kms/root/orders/v12");
  auto r = record(1);
  r.ns = "team-a";
  r.name = "payments";
  EXPECT_EQ(keys::Key(r).label_for(1), "p11kms/team-a/payments/v1");
}

namespace {
std::string hex_digest(const std::string& alg, const std::string& input) {
  return p11kms::encoding::hex_encode(keys::digest(alg, std::vector<uint8_t>(input.begin(), input.end())));
}
}  // namespace

TEST(Digest, Sha256OfAbc) {
  EXPECT_EQ(hex_digest("sha2-256", "abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Digest, Sha256OfEmpty) {
  EXPECT_EQ(hex_digest("sha2-256", ""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(Digest, Sha512OfAbc) {
  EXPECT_EQ(hex_digest("sha2-512", "abc"),
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
            "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f");
}

TEST(Digest, OutputSizes) {
  std::vector<uint8_t> in{'a', 'b', 'c'};
  EXPECT_EQ(keys::digest("sha2-224", in).size(), 28u);
  EXPECT_EQ(keys::digest("sha2-384", in).size(), 48u);
  EXPECT_EQ(keys::digest("sha3-224", in).size(), 28u);
  EXPECT_EQ(keys::digest("sha3-256", in).size(), 32u);
  EXPECT_EQ(keys::digest("sha3-384", in).size(), 48u);
  EXPECT_EQ(keys::digest("sha3-512", in).size(), 64u);
}

TEST(Digest, UnknownAlgorithmRefusedNamingIt) {
  std::vector<uint8_t> in{'a'};
  for (std::string alg : {"md5", "sha1", "sha256", ""}) {
    auto msg = expect_invalid([&] { keys::digest(alg, in); });
    EXPECT_TRUE(contains(msg, "\"" + alg + "\"")) << msg;
  }
}

// Key Protect's states: what each allows, and expiry turning an active key deactivated.
TEST(KeyState, ExpiryDeactivatesAndDecryptStillWorks) {
  auto r = record(1);
  r.expires_at = 1000;
  keys::Key k(r);
  EXPECT_EQ(k.state_at(999), store::kActive);
  EXPECT_EQ(k.state_at(1000), store::kDeactivated);
  k.require_state_for(keys::KeyUse::decrypt, 2000);  // allowed
  auto msg = p11kms::test_support::expect_key_error([&] { k.require_state_for(keys::KeyUse::encrypt, 2000); },
                                                    keys::ErrorKind::conflict);
  EXPECT_TRUE(contains(msg, "deactivated")) << msg;
  p11kms::test_support::expect_key_error([&] { k.require_state_for(keys::KeyUse::rotate, 2000); },
                                         keys::ErrorKind::conflict);
}

TEST(KeyState, SuspendedRefusesEverythingButMetadata) {
  auto r = record(1);
  r.state = store::kSuspended;
  keys::Key k(r);
  for (auto use : {keys::KeyUse::encrypt, keys::KeyUse::decrypt, keys::KeyUse::rotate, keys::KeyUse::read_material}) {
    auto msg = p11kms::test_support::expect_key_error([&] { k.require_state_for(use, 0); }, keys::ErrorKind::conflict);
    EXPECT_TRUE(contains(msg, "suspended")) << msg;
  }
}

TEST(KeyState, DestroyedIsGoneEvenIfExpired) {
  auto r = record(1);
  r.state = store::kDestroyed;
  r.expires_at = 10;
  keys::Key k(r);
  EXPECT_EQ(k.state_at(100), store::kDestroyed);
  p11kms::test_support::expect_key_error([&] { k.require_state_for(keys::KeyUse::decrypt, 100); },
                                         keys::ErrorKind::gone);
}
