// The PKCS#11 layer against a real SoftHSM token.
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include <atomic>
#include <map>
#include <thread>

#include "hsm/attributes.hpp"
#include "hsm/token.hpp"
#include "hsm/token_admin.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

bool bool_attr(hsm::SessionPool& pool, const hsm::ObjectId& id, CK_ATTRIBUTE_TYPE type) {
  auto l = pool.lease();
  hsm::AttributeTemplate t;
  t.set_bytes(CKA_ID, id);
  l.check(l.fn()->C_FindObjectsInit(l.session(), t.data(), t.size()), "init");
  CK_OBJECT_HANDLE h = 0;
  CK_ULONG n = 0;
  l.check(l.fn()->C_FindObjects(l.session(), &h, 1, &n), "find");
  l.fn()->C_FindObjectsFinal(l.session());
  EXPECT_EQ(n, 1u);
  CK_BBOOL v = CK_FALSE;
  CK_ATTRIBUTE a{type, &v, sizeof v};
  l.check(l.fn()->C_GetAttributeValue(l.session(), h, &a, 1), "get");
  return v == CK_TRUE;
}

class TokenTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token ops_{pool_};
};

TEST_F(TokenTest, AesKeyHasCustodyAttributes) {
  auto id = ops_.new_object_id();
  ASSERT_EQ(id.size(), 16u);
  ops_.generate_aes_key(id, 32, "p11kms/root/t/v1");
  EXPECT_FALSE(bool_attr(pool_, id, CKA_EXTRACTABLE));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_SENSITIVE));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_TOKEN));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_PRIVATE));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_ENCRYPT));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_DECRYPT));
  for (auto a : {CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE}) EXPECT_FALSE(bool_attr(pool_, id, a));
}

// An imported key is as locked down as a generated one, and it is the caller's key: a
// ciphertext made in the token opens with OpenSSL under the same material.
TEST_F(TokenTest, ImportedAesKeyHasCustodyAttributesAndTheGivenValue) {
  auto id = ops_.new_object_id();
  hsm::SecureBytes value(32);
  for (size_t i = 0; i < value.size(); ++i) value.data()[i] = static_cast<uint8_t>(i * 7 + 1);
  ops_.import_aes_key(id, value, "p11kms/root/imported/v1");
  EXPECT_FALSE(bool_attr(pool_, id, CKA_EXTRACTABLE));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_SENSITIVE));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_TOKEN));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_ENCRYPT));
  for (auto a : {CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE}) EXPECT_FALSE(bool_attr(pool_, id, a));

  hsm::Bytes iv(12, 0x42), aad;
  std::string msg = "imported";
  auto ct = ops_.aes_gcm_encrypt(id, iv, aad, reinterpret_cast<const uint8_t*>(msg.data()), msg.size());
  ASSERT_EQ(ct.size(), msg.size() + 16);
  EVP_CIPHER_CTX* c = EVP_CIPHER_CTX_new();
  ASSERT_EQ(EVP_DecryptInit_ex(c, EVP_aes_256_gcm(), nullptr, value.data(), iv.data()), 1);
  std::vector<uint8_t> pt(msg.size());
  int n = 0;
  ASSERT_EQ(EVP_DecryptUpdate(c, pt.data(), &n, ct.data(), static_cast<int>(msg.size())), 1);
  EVP_CIPHER_CTX_ctrl(c, EVP_CTRL_GCM_SET_TAG, 16, ct.data() + msg.size());
  int fin = 0;
  EXPECT_EQ(EVP_DecryptFinal_ex(c, pt.data() + n, &fin), 1);
  EVP_CIPHER_CTX_free(c);
  EXPECT_EQ(std::string(pt.begin(), pt.end()), msg);
}

TEST_F(TokenTest, GcmRoundTripAndTamperDetection) {
  auto id = ops_.new_object_id();
  ops_.generate_aes_key(id, 16, "p11kms/root/g/v1");
  hsm::Bytes iv = ops_.random(12), aad = {1, 2, 3};
  std::string msg = "attack at dawn";
  auto ct = ops_.aes_gcm_encrypt(id, iv, aad, reinterpret_cast<const uint8_t*>(msg.data()), msg.size());
  ASSERT_EQ(ct.size(), msg.size() + 16);
  auto pt = ops_.aes_gcm_decrypt(id, iv, aad, ct.data(), ct.size());
  ASSERT_TRUE(pt.has_value());
  EXPECT_EQ(std::string(pt->data(), pt->data() + pt->size()), msg);
  ct[0] ^= 1;
  EXPECT_FALSE(ops_.aes_gcm_decrypt(id, iv, aad, ct.data(), ct.size()).has_value());
  ct[0] ^= 1;
  hsm::Bytes other_aad = {9};
  EXPECT_FALSE(ops_.aes_gcm_decrypt(id, iv, other_aad, ct.data(), ct.size()).has_value());
  // The session is usable after a failed decrypt.
  EXPECT_TRUE(ops_.aes_gcm_decrypt(id, iv, aad, ct.data(), ct.size()).has_value());
}

TEST_F(TokenTest, DestroyRemovesObjectAndListing) {
  auto a = ops_.new_object_id(), b = ops_.new_object_id();
  ops_.generate_aes_key(a, 32, "p11kms/root/a/v1");
  ops_.generate_aes_key(b, 32, "p11kms/root/b/v1");
  EXPECT_EQ(ops_.list_key_objects().size(), 2u);
  EXPECT_TRUE(ops_.destroy(a));
  EXPECT_FALSE(ops_.exists(a));
  EXPECT_TRUE(ops_.exists(b));
  EXPECT_FALSE(ops_.destroy(a));
  auto objs = ops_.list_key_objects();
  ASSERT_EQ(objs.size(), 1u);
  EXPECT_EQ(objs[0].id, b);
  EXPECT_EQ(objs[0].label, "p11kms/root/b/v1");
  hsm::Bytes iv(12, 0);
  EXPECT_THROW(ops_.aes_gcm_encrypt(a, iv, {}, iv.data(), 1), hsm::ObjectMissing);
}

// The listing reads short labels in one call and longer ones in two: both come back whole.
TEST_F(TokenTest, ListingReturnsShortAndLongLabelsWhole) {
  auto a = ops_.new_object_id(), b = ops_.new_object_id();
  std::string long_label = "p11kms/root/" + std::string(400, 'k') + "/v1";
  ops_.generate_aes_key(a, 32, "p11kms/root/short/v1");
  ops_.generate_aes_key(b, 32, long_label);
  auto objs = ops_.list_key_objects();
  ASSERT_EQ(objs.size(), 2u);
  std::map<hsm::ObjectId, std::string> got;
  for (const auto& o : objs) got[o.id] = o.label;
  EXPECT_EQ(got[a], "p11kms/root/short/v1");
  EXPECT_EQ(got[b], long_label);
}

TEST_F(TokenTest, HmacKeyIsNonExtractableAndMacsAreKeyed) {
  auto id = ops_.new_object_id();
  ops_.generate_hmac_key(id, 32, "p11kms/system/audit");
  EXPECT_FALSE(bool_attr(pool_, id, CKA_EXTRACTABLE));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_SENSITIVE));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_SIGN));
  for (auto a : {CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_DERIVE}) EXPECT_FALSE(bool_attr(pool_, id, a));
  std::string a = "line one", b = "line two";
  auto ma = ops_.hmac_sha256(id, reinterpret_cast<const uint8_t*>(a.data()), a.size());
  EXPECT_EQ(ma.size(), 32u);
  EXPECT_EQ(ma, ops_.hmac_sha256(id, reinterpret_cast<const uint8_t*>(a.data()), a.size()));
  EXPECT_NE(ma, ops_.hmac_sha256(id, reinterpret_cast<const uint8_t*>(b.data()), b.size()));
  auto other = ops_.new_object_id();
  ops_.generate_hmac_key(other, 32, "p11kms/system/other");
  EXPECT_NE(ma, ops_.hmac_sha256(other, reinterpret_cast<const uint8_t*>(a.data()), a.size()));
}

TEST_F(TokenTest, RandomIsRandom) {
  auto x = ops_.random(32), y = ops_.random(32);
  EXPECT_EQ(x.size(), 32u);
  EXPECT_NE(x, y);
}

TEST_F(TokenTest, PoolServesMoreThreadsThanSessions) {
  auto id = ops_.new_object_id();
  ops_.generate_aes_key(id, 32, "p11kms/root/p/v1");
  std::atomic<int> ok{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&] {
      hsm::Bytes iv(12, 7);
      for (int i = 0; i < 50; ++i) {
        auto ct = ops_.aes_gcm_encrypt(id, iv, {}, iv.data(), iv.size());
        if (ops_.aes_gcm_decrypt(id, iv, {}, ct.data(), ct.size())) ++ok;
      }
    });
  for (auto& t : threads) t.join();
  EXPECT_EQ(ok.load(), 400);
  auto st = pool_.status();
  EXPECT_TRUE(st.reachable);
  EXPECT_EQ(st.sessions_total, 4u);
  EXPECT_EQ(st.sessions_in_use, 0u);
}

TEST_F(TokenTest, LostSessionsReconnectByThemselves) {
  auto id = ops_.new_object_id();
  ops_.generate_aes_key(id, 32, "p11kms/root/r/v1");
  hsm::Bytes iv(12, 1);
  auto ct = ops_.aes_gcm_encrypt(id, iv, {}, iv.data(), iv.size());
  {
    // Pull the sessions out from under the pool, as a token reset or network HSM drop would.
    auto l = pool_.lease();
    l.fn()->C_CloseAllSessions(pool_.slot());
  }
  // The first request that meets the dead session is a clean TokenUnavailable (HTTP 503) ...
  EXPECT_THROW(ops_.aes_gcm_decrypt(id, iv, {}, ct.data(), ct.size()), hsm::TokenUnavailable);
  EXPECT_FALSE(pool_.status().reachable);
  // ... and the pool reconnects on the next lease, with no restart.
  auto pt = ops_.aes_gcm_decrypt(id, iv, {}, ct.data(), ct.size());
  ASSERT_TRUE(pt.has_value());
  EXPECT_TRUE(pool_.status().reachable);
}

TEST(TokenAdminTest, InitIsIdempotentAndChecksThePin) {
  test_support::TempToken token("admin-test");
  hsm::InitTokenRequest r;
  r.module = test_support::TempToken::kModule;
  r.label = "admin-test";
  r.so_pin = hsm::SecretString(test_support::TempToken::kSoPin);
  r.user_pin = hsm::SecretString(test_support::TempToken::kUserPin);
  EXPECT_EQ(hsm::init_token(r), hsm::InitResult::already_initialized);
  r.user_pin = hsm::SecretString("wrong-pin");
  EXPECT_THROW(hsm::init_token(r), std::runtime_error);
  r.force = true;
  EXPECT_EQ(hsm::init_token(r), hsm::InitResult::reinitialized);
  r.force = false;
  EXPECT_EQ(hsm::init_token(r), hsm::InitResult::already_initialized);  // new user PIN set
}

TEST(SessionPoolTest, ASessionLeftMidOperationIsReplacedNotReused) {
  test_support::TempToken token("discard-test");
  hsm::SessionPool pool(token.pool_config(1));  // one session: the replacement must stay logged in
  hsm::Token ops(pool);
  auto id = ops.new_object_id();
  ops.generate_aes_key(id, 32, "p11kms/root/d/v1");
  hsm::Bytes iv(12, 3);
  {
    auto l = pool.lease();
    hsm::AttributeTemplate t;
    t.set_bytes(CKA_ID, id);
    CK_OBJECT_HANDLE h = 0;
    CK_ULONG n = 0;
    l.check(l.fn()->C_FindObjectsInit(l.session(), t.data(), t.size()), "init");
    l.check(l.fn()->C_FindObjects(l.session(), &h, 1, &n), "find");
    l.fn()->C_FindObjectsFinal(l.session());
    CK_GCM_PARAMS p{iv.data(), 12, 96, nullptr, 0, 128};
    CK_MECHANISM m{CKM_AES_GCM, &p, sizeof p};
    ASSERT_EQ(l.fn()->C_EncryptInit(l.session(), &m, h), CKR_OK);
    unsigned char out[32];
    CK_ULONG out_len = sizeof out;
    // SoftHSM 2.6.1 answers a NULL input with CKR_ARGUMENTS_BAD and keeps the operation active.
    EXPECT_EQ(l.fn()->C_Encrypt(l.session(), nullptr, 0, out, &out_len), CKR_ARGUMENTS_BAD);
    EXPECT_EQ(l.fn()->C_EncryptInit(l.session(), &m, h), CKR_OPERATION_ACTIVE);
    l.discard();
  }
  auto ct = ops.aes_gcm_encrypt(id, iv, {}, iv.data(), iv.size());
  auto pt = ops.aes_gcm_decrypt(id, iv, {}, ct.data(), ct.size());
  ASSERT_TRUE(pt.has_value());
  EXPECT_EQ(pt->size(), 12u);
  EXPECT_TRUE(pool.status().reachable);
  EXPECT_EQ(pool.status().sessions_in_use, 0u);
}

TEST(SessionPoolTest, UnknownTokenLabelIsAClearError) {
  test_support::TempToken token("present");
  auto cfg = token.pool_config();
  cfg.token_label = "absent";
  try {
    hsm::SessionPool pool(cfg);
    FAIL() << "expected an error";
  } catch (const hsm::TokenUnavailable& e) {
    EXPECT_NE(std::string(e.what()).find("absent"), std::string::npos);
  }
}

TEST(SessionPoolTest, WrongPinIsRefusedWithoutLeakingIt) {
  test_support::TempToken token("pin-test");
  auto cfg = token.pool_config();
  cfg.user_pin = hsm::SecretString("98765");
  try {
    hsm::SessionPool pool(cfg);
    FAIL() << "expected an error";
  } catch (const std::runtime_error& e) {
    std::string m = e.what();
    EXPECT_NE(m.find("PIN"), std::string::npos);
    EXPECT_EQ(m.find("98765"), std::string::npos);
  }
}

}  // namespace
