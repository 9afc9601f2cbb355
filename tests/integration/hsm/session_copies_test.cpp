// Session copies of token keys (hsm::TokenOptions::session_copies) against a real SoftHSM token:
// what the copy is, that operations use it and agree with the token object, and that it never
// outlives its key.
#include <gtest/gtest.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <chrono>
#include <thread>
#include <vector>

#include "hsm/attributes.hpp"
#include "hsm/errors.hpp"
#include "hsm/token.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

// The objects with this CKA_ID and CKA_TOKEN, as the module lists them.
std::vector<CK_OBJECT_HANDLE> objects(hsm::SessionPool& pool, const hsm::ObjectId& id, bool on_token) {
  auto l = pool.lease();
  hsm::AttributeTemplate t;
  t.set_bytes(CKA_ID, id).set(CKA_TOKEN, on_token);
  l.check(l.fn()->C_FindObjectsInit(l.session(), t.data(), t.size()), "init");
  std::vector<CK_OBJECT_HANDLE> out(16);
  CK_ULONG n = 0;
  l.check(l.fn()->C_FindObjects(l.session(), out.data(), out.size(), &n), "find");
  l.fn()->C_FindObjectsFinal(l.session());
  out.resize(n);
  return out;
}

bool bool_attr(hsm::SessionPool& pool, CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type) {
  auto l = pool.lease();
  CK_BBOOL v = CK_FALSE;
  CK_ATTRIBUTE a{type, &v, sizeof v};
  l.check(l.fn()->C_GetAttributeValue(l.session(), h, &a, 1), "get");
  return v == CK_TRUE;
}

// An ECDSA r || s signature over `digest` checked with OpenSSL against the SPKI DER.
bool p256_signature_verifies(const hsm::Bytes& spki, const hsm::Bytes& digest, const hsm::Bytes& rs) {
  if (rs.size() != 64) return false;
  const unsigned char* p = spki.data();
  EVP_PKEY* key = d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size()));
  ECDSA_SIG* sig = ECDSA_SIG_new();
  ECDSA_SIG_set0(sig, BN_bin2bn(rs.data(), 32, nullptr), BN_bin2bn(rs.data() + 32, 32, nullptr));
  unsigned char* der = nullptr;
  int der_len = i2d_ECDSA_SIG(sig, &der);
  EVP_PKEY_CTX* ctx = key ? EVP_PKEY_CTX_new(key, nullptr) : nullptr;
  bool ok = ctx && der_len > 0 && EVP_PKEY_verify_init(ctx) == 1 &&
            EVP_PKEY_verify(ctx, der, static_cast<size_t>(der_len), digest.data(), digest.size()) == 1;
  EVP_PKEY_CTX_free(ctx);
  OPENSSL_free(der);
  ECDSA_SIG_free(sig);
  EVP_PKEY_free(key);
  return ok;
}

class SessionCopiesTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token copies_{pool_, hsm::TokenOptions{true}};
  hsm::Token plain_{pool_};  // the same token without copies, as a process with them off
  hsm::Bytes iv_ = hsm::Bytes(12, 7);
  hsm::Bytes aad_ = {'a', 'a', 'd'};
  hsm::Bytes message_ = {'h', 'e', 'l', 'l', 'o'};

  // A new AES key that has been used once, so it has its one copy.
  hsm::ObjectId used_aes_key(const std::string& label) {
    auto id = copies_.new_object_id();
    copies_.generate_aes_key(id, 32, label);
    copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
    EXPECT_EQ(objects(pool_, id, false).size(), 1u);
    return id;
  }
};

TEST_F(SessionCopiesTest, AnOperationRunsOnAPrivateNonExtractableCopy) {
  auto id = copies_.new_object_id();
  copies_.generate_aes_key(id, 32, "p11kms/root/copied/v1");
  ASSERT_TRUE(objects(pool_, id, false).empty());  // made on first use, not at generation

  auto sealed = copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  auto copy = objects(pool_, id, false);
  ASSERT_EQ(copy.size(), 1u);
  EXPECT_TRUE(bool_attr(pool_, copy[0], CKA_PRIVATE));
  EXPECT_TRUE(bool_attr(pool_, copy[0], CKA_SENSITIVE));
  EXPECT_FALSE(bool_attr(pool_, copy[0], CKA_EXTRACTABLE));
  EXPECT_TRUE(bool_attr(pool_, copy[0], CKA_NEVER_EXTRACTABLE));
  EXPECT_FALSE(bool_attr(pool_, copy[0], CKA_WRAP));
  {  // its value cannot be read, like the original's
    auto l = pool_.lease();
    uint8_t buf[64];
    CK_ATTRIBUTE a{CKA_VALUE, buf, sizeof buf};
    EXPECT_EQ(l.fn()->C_GetAttributeValue(l.session(), copy[0], &a, 1), CKR_ATTRIBUTE_SENSITIVE);
  }
  // The original stays on the token, and one copy serves every later operation.
  auto original = objects(pool_, id, true);
  ASSERT_EQ(original.size(), 1u);
  EXPECT_TRUE(bool_attr(pool_, original[0], CKA_MODIFIABLE));
  EXPECT_FALSE(bool_attr(pool_, original[0], CKA_EXTRACTABLE));
  for (int i = 0; i < 5; ++i) copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  EXPECT_EQ(objects(pool_, id, false).size(), 1u);

  // The copy is the same key: what it seals the token object opens, and the other way round.
  auto opened = plain_.aes_gcm_decrypt(id, iv_, aad_, sealed.data(), sealed.size());
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(hsm::Bytes(opened->data(), opened->data() + opened->size()), message_);
  auto sealed_by_object = plain_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  EXPECT_EQ(sealed_by_object, sealed);
}

TEST_F(SessionCopiesTest, HmacKeysAreCopiedAndAgreeWithTheTokenObject) {
  auto id = copies_.new_object_id();
  copies_.generate_hmac_key(id, 32, "p11kms/root/mac/v1");
  auto mac = copies_.hmac(id, CKM_SHA256_HMAC, message_.data(), message_.size());
  ASSERT_EQ(objects(pool_, id, false).size(), 1u);
  EXPECT_EQ(plain_.hmac(id, CKM_SHA256_HMAC, message_.data(), message_.size()), mac);
}

TEST_F(SessionCopiesTest, SigningKeysAreCopiedAndTheirSignaturesVerify) {
  auto id = copies_.new_object_id();
  hsm::PairSpec spec;
  spec.kind = hsm::PairKind::ec_p256;
  auto spki = copies_.generate_key_pair(spec, id, "p11kms/root/signer/v1");
  hsm::Bytes digest(32, 0x5a);
  auto sig = copies_.sign(id, CKM_ECDSA, nullptr, 0, digest.data(), digest.size());
  auto copy = objects(pool_, id, false);
  ASSERT_EQ(copy.size(), 1u);
  EXPECT_TRUE(bool_attr(pool_, copy[0], CKA_SENSITIVE));
  EXPECT_FALSE(bool_attr(pool_, copy[0], CKA_EXTRACTABLE));
  EXPECT_TRUE(p256_signature_verifies(spki, digest, sig));
  hsm::Bytes other(32, 0x5b);
  EXPECT_FALSE(p256_signature_verifies(spki, other, sig));
}

// A key made unmodifiable (by a process with copies off) cannot be copied by SoftHSM: it keeps
// working on its token object, and the refusal is not retried on every operation.
TEST_F(SessionCopiesTest, AKeyTheModuleWillNotCopyRunsOnItsTokenObject) {
  auto id = plain_.new_object_id();
  plain_.generate_aes_key(id, 32, "p11kms/root/old/v1");
  auto original = objects(pool_, id, true);
  ASSERT_EQ(original.size(), 1u);
  EXPECT_FALSE(bool_attr(pool_, original[0], CKA_MODIFIABLE));

  auto sealed = copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  EXPECT_TRUE(objects(pool_, id, false).empty());
  auto opened = copies_.aes_gcm_decrypt(id, iv_, aad_, sealed.data(), sealed.size());
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(hsm::Bytes(opened->data(), opened->data() + opened->size()), message_);
  EXPECT_TRUE(objects(pool_, id, false).empty());
}

// A copy that is not the key it should be (here: its CKA_ENCRYPT cleared behind the service's
// back; in the field, a copy made from a wrong view of the token object) would fail every later
// operation for the life of the process. The operation replaces it from the token object.
TEST_F(SessionCopiesTest, ACopyTheModuleRefusesIsMadeAgain) {
  auto id = used_aes_key("p11kms/root/spoilt/v1");
  auto copy = objects(pool_, id, false);
  ASSERT_EQ(copy.size(), 1u);
  {
    auto l = pool_.lease();
    CK_BBOOL no = CK_FALSE;
    CK_ATTRIBUTE a{CKA_ENCRYPT, &no, sizeof no};
    ASSERT_EQ(l.fn()->C_SetAttributeValue(l.session(), copy[0], &a, 1), CKR_OK);
  }
  auto sealed = copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  auto now = objects(pool_, id, false);
  ASSERT_EQ(now.size(), 1u);  // the spoilt copy is gone, a new one serves
  EXPECT_NE(now[0], copy[0]);
  EXPECT_TRUE(bool_attr(pool_, now[0], CKA_ENCRYPT));
  auto opened = plain_.aes_gcm_decrypt(id, iv_, aad_, sealed.data(), sealed.size());
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(hsm::Bytes(opened->data(), opened->data() + opened->size()), message_);
}

TEST_F(SessionCopiesTest, DestroyTakesTheCopyWithTheKey) {
  auto id = used_aes_key("p11kms/root/gone/v1");
  EXPECT_TRUE(copies_.destroy(id));
  EXPECT_TRUE(objects(pool_, id, true).empty());
  EXPECT_TRUE(objects(pool_, id, false).empty());
  EXPECT_THROW(copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size()), hsm::ObjectMissing);
}

// Another instance deletes a key: this process's copy would outlive it (the store no longer
// names the key, so nothing uses it). The sweeper's listing drops it.
TEST_F(SessionCopiesTest, AListingDropsCopiesOfKeysDeletedElsewhere) {
  auto kept = used_aes_key("p11kms/root/kept/v1");
  auto deleted = used_aes_key("p11kms/root/deleted/v1");
  {  // deleted behind this Token's back, as another process would
    auto l = pool_.lease();
    for (CK_OBJECT_HANDLE h : objects(pool_, deleted, true)) l.check(l.fn()->C_DestroyObject(l.session(), h), "destroy");
  }
  ASSERT_EQ(objects(pool_, deleted, false).size(), 1u);

  copies_.list_key_objects();
  EXPECT_TRUE(objects(pool_, deleted, false).empty());
  EXPECT_EQ(objects(pool_, kept, false).size(), 1u);
  copies_.aes_gcm_encrypt(kept, iv_, aad_, message_.data(), message_.size());
  EXPECT_EQ(objects(pool_, kept, false).size(), 1u);
}

// The sweeper's existence check looks the token object up afresh; it must not lose track of the
// key's copy (an untracked copy would stay in the token's memory, and a second one be made).
TEST_F(SessionCopiesTest, AnExistenceCheckKeepsTheOneCopy) {
  auto id = used_aes_key("p11kms/root/checked/v1");
  EXPECT_TRUE(copies_.exists(id));
  copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  EXPECT_EQ(objects(pool_, id, false).size(), 1u);
}

// Copies are session objects: when their session is replaced, they are made again on demand.
TEST_F(SessionCopiesTest, ACopyLostWithItsSessionIsMadeAgain) {
  auto id = copies_.new_object_id();
  copies_.generate_aes_key(id, 32, "p11kms/root/again/v1");
  auto sealed = copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  {
    auto l = pool_.lease();
    for (CK_OBJECT_HANDLE h : objects(pool_, id, false)) l.check(l.fn()->C_DestroyObject(l.session(), h), "destroy");
  }
  ASSERT_TRUE(objects(pool_, id, false).empty());
  auto opened = copies_.aes_gcm_decrypt(id, iv_, aad_, sealed.data(), sealed.size());
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(objects(pool_, id, false).size(), 1u);
}

// A copy would work on while the token is gone (it lives in the process). The token's absence
// must still fail operations, as it does on the token object: copies are used only while the
// token was seen present within the last second.
TEST_F(SessionCopiesTest, ATokenThatIsGoneFailsOperationsOnCopiesToo) {
  auto id = copies_.new_object_id();
  copies_.generate_aes_key(id, 32, "p11kms/root/outage/v1");
  auto sealed = copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size());
  ASSERT_EQ(objects(pool_, id, false).size(), 1u);

  token_.take_away();
  std::this_thread::sleep_for(std::chrono::milliseconds(1100));  // past the presence re-check
  EXPECT_THROW(copies_.aes_gcm_encrypt(id, iv_, aad_, message_.data(), message_.size()), hsm::TokenUnavailable);
  EXPECT_THROW(copies_.aes_gcm_decrypt(id, iv_, aad_, sealed.data(), sealed.size()), hsm::TokenUnavailable);
  token_.bring_back();

  // Back: the pool reconnects by itself and the key works (on a new copy).
  std::optional<hsm::SecureBytes> opened;
  for (int i = 0; i < 50 && !opened; ++i) {
    try {
      opened = copies_.aes_gcm_decrypt(id, iv_, aad_, sealed.data(), sealed.size());
    } catch (const hsm::TokenUnavailable&) {
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
  }
  ASSERT_TRUE(opened.has_value());
  EXPECT_EQ(hsm::Bytes(opened->data(), opened->data() + opened->size()), message_);
  EXPECT_EQ(objects(pool_, id, false).size(), 1u);
}

}  // namespace
