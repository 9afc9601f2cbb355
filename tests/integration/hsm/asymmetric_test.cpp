// Key pairs, signing, HMAC and session-loaded keys against a real SoftHSM token.
#include <gtest/gtest.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "hsm/attributes.hpp"
#include "hsm/token.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;

namespace {

struct PkeyFree { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

Pkey parse_spki(const hsm::Bytes& der) {
  const unsigned char* p = der.data();
  return Pkey(d2i_PUBKEY(nullptr, &p, static_cast<long>(der.size())));
}

hsm::Bytes sha256(const std::string& msg) {
  hsm::Bytes out(32);
  unsigned int n = 0;
  EVP_Digest(msg.data(), msg.size(), out.data(), &n, EVP_sha256(), nullptr);
  return out;
}

// r || s -> DER, for OpenSSL's verify.
hsm::Bytes ecdsa_der(const hsm::Bytes& raw) {
  size_t half = raw.size() / 2;
  ECDSA_SIG* sig = ECDSA_SIG_new();
  ECDSA_SIG_set0(sig, BN_bin2bn(raw.data(), static_cast<int>(half), nullptr),
                 BN_bin2bn(raw.data() + half, static_cast<int>(half), nullptr));
  int n = i2d_ECDSA_SIG(sig, nullptr);
  hsm::Bytes out(static_cast<size_t>(n));
  unsigned char* p = out.data();
  i2d_ECDSA_SIG(sig, &p);
  ECDSA_SIG_free(sig);
  return out;
}

bool verify_digest(EVP_PKEY* key, const hsm::Bytes& digest, const hsm::Bytes& sig, int padding = 0) {
  EVP_PKEY_CTX* ctx = EVP_PKEY_CTX_new(key, nullptr);
  EVP_PKEY_verify_init(ctx);
  if (padding) {
    EVP_PKEY_CTX_set_rsa_padding(ctx, padding);
    EVP_PKEY_CTX_set_signature_md(ctx, EVP_sha256());
    if (padding == RSA_PKCS1_PSS_PADDING) EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx, RSA_PSS_SALTLEN_AUTO);
  }
  int rc = EVP_PKEY_verify(ctx, sig.data(), sig.size(), digest.data(), digest.size());
  EVP_PKEY_CTX_free(ctx);
  return rc == 1;
}

bool bool_attr(hsm::SessionPool& pool, const hsm::ObjectId& id, CK_ATTRIBUTE_TYPE type, CK_OBJECT_CLASS cls) {
  auto l = pool.lease();
  hsm::AttributeTemplate t;
  t.set_bytes(CKA_ID, id).set_ulong(CKA_CLASS, cls);
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

class AsymmetricTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token ops_{pool_};
};

TEST_F(AsymmetricTest, EcKeyPairsSignInTheTokenAndVerifyWithOpenSsl) {
  for (auto kind : {hsm::PairKind::ec_p256, hsm::PairKind::ec_p384}) {
    auto id = ops_.new_object_id();
    auto spki = ops_.generate_key_pair({kind, 0}, id, "p11kms/root/ec/v1");
    auto pub = parse_spki(spki);
    ASSERT_TRUE(pub);
    EXPECT_EQ(EVP_PKEY_get_base_id(pub.get()), EVP_PKEY_EC);
    EXPECT_EQ(EVP_PKEY_get_bits(pub.get()), kind == hsm::PairKind::ec_p384 ? 384 : 256);
    auto digest = sha256("message");
    auto raw = ops_.sign(id, CKM_ECDSA, nullptr, 0, digest.data(), digest.size());
    EXPECT_EQ(raw.size(), kind == hsm::PairKind::ec_p384 ? 96u : 64u);
    EXPECT_TRUE(verify_digest(pub.get(), digest, ecdsa_der(raw)));
    EXPECT_FALSE(verify_digest(pub.get(), sha256("other"), ecdsa_der(raw)));
    // custody: private, sensitive, non-extractable token object that can only sign
    EXPECT_FALSE(bool_attr(pool_, id, CKA_EXTRACTABLE, CKO_PRIVATE_KEY));
    EXPECT_TRUE(bool_attr(pool_, id, CKA_SENSITIVE, CKO_PRIVATE_KEY));
    EXPECT_TRUE(bool_attr(pool_, id, CKA_TOKEN, CKO_PRIVATE_KEY));
    EXPECT_TRUE(bool_attr(pool_, id, CKA_PRIVATE, CKO_PRIVATE_KEY));
    EXPECT_TRUE(bool_attr(pool_, id, CKA_SIGN, CKO_PRIVATE_KEY));
    for (auto a : {CKA_DECRYPT, CKA_UNWRAP, CKA_DERIVE}) EXPECT_FALSE(bool_attr(pool_, id, a, CKO_PRIVATE_KEY));
  }
  // the public halves were session objects: only the private keys stay on the token
  for (const auto& o : ops_.list_key_objects()) EXPECT_EQ(o.object_class, CKO_PRIVATE_KEY);
}

TEST_F(AsymmetricTest, Ed25519SignsMessagesInTheToken) {
  auto id = ops_.new_object_id();
  auto pub = parse_spki(ops_.generate_key_pair({hsm::PairKind::ed25519, 0}, id, "p11kms/root/ed/v1"));
  ASSERT_TRUE(pub);
  EXPECT_EQ(EVP_PKEY_get_base_id(pub.get()), EVP_PKEY_ED25519);
  std::string msg = "ed25519 message";
  auto sig = ops_.sign(id, CKM_EDDSA, nullptr, 0, reinterpret_cast<const uint8_t*>(msg.data()), msg.size());
  ASSERT_EQ(sig.size(), 64u);
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, pub.get());
  EXPECT_EQ(EVP_DigestVerify(ctx, sig.data(), sig.size(), reinterpret_cast<const uint8_t*>(msg.data()), msg.size()), 1);
  EVP_MD_CTX_free(ctx);
  EXPECT_FALSE(bool_attr(pool_, id, CKA_EXTRACTABLE, CKO_PRIVATE_KEY));
}

TEST_F(AsymmetricTest, RsaPssAndPkcs1SignaturesVerify) {
  auto id = ops_.new_object_id();
  auto pub = parse_spki(ops_.generate_key_pair({hsm::PairKind::rsa, 2048}, id, "p11kms/root/rsa/v1"));
  ASSERT_TRUE(pub);
  EXPECT_EQ(EVP_PKEY_get_bits(pub.get()), 2048);
  auto digest = sha256("rsa message");
  CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA256, CKG_MGF1_SHA256, 256 - 32 - 2};
  auto sig = ops_.sign(id, CKM_RSA_PKCS_PSS, &pss, sizeof pss, digest.data(), digest.size());
  EXPECT_EQ(sig.size(), 256u);
  EXPECT_TRUE(verify_digest(pub.get(), digest, sig, RSA_PKCS1_PSS_PADDING));
  // PKCS#1 v1.5 over a DigestInfo
  hsm::Bytes info = {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20};
  info.insert(info.end(), digest.begin(), digest.end());
  auto sig2 = ops_.sign(id, CKM_RSA_PKCS, nullptr, 0, info.data(), info.size());
  EXPECT_TRUE(verify_digest(pub.get(), digest, sig2, RSA_PKCS1_PADDING));
  EXPECT_FALSE(verify_digest(pub.get(), digest, sig2, RSA_PKCS1_PSS_PADDING));
}

TEST_F(AsymmetricTest, ExportablePairsLoadAsSessionObjectsThatSign) {
  for (auto spec : {hsm::PairSpec{hsm::PairKind::ec_p256, 0}, hsm::PairSpec{hsm::PairKind::ed25519, 0},
                    hsm::PairSpec{hsm::PairKind::rsa, 2048}}) {
    auto pair = ops_.generate_exportable_key_pair(spec);
    ASSERT_FALSE(pair.pkcs8.empty());
    EXPECT_EQ(hsm::public_key_of_pkcs8(pair.pkcs8), pair.spki);
    hsm::SecureBytes pkcs8 = pair.pkcs8;
    hsm::KeyHandle key(hsm::ObjectId{1, 2, 3}, [pkcs8] { return hsm::session_private_key_template(pkcs8); });
    auto pub = parse_spki(pair.spki);
    if (spec.kind == hsm::PairKind::ed25519) {
      std::string msg = "m";
      auto sig = ops_.sign(key, CKM_EDDSA, nullptr, 0, reinterpret_cast<const uint8_t*>(msg.data()), 1);
      EVP_MD_CTX* ctx = EVP_MD_CTX_new();
      EVP_DigestVerifyInit(ctx, nullptr, nullptr, nullptr, pub.get());
      EXPECT_EQ(EVP_DigestVerify(ctx, sig.data(), sig.size(), reinterpret_cast<const uint8_t*>(msg.data()), 1), 1);
      EVP_MD_CTX_free(ctx);
    } else if (spec.kind == hsm::PairKind::rsa) {
      auto digest = sha256("x");
      CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA256, CKG_MGF1_SHA256, 32};
      auto sig = ops_.sign(key, CKM_RSA_PKCS_PSS, &pss, sizeof pss, digest.data(), digest.size());
      EXPECT_TRUE(verify_digest(pub.get(), digest, sig, RSA_PKCS1_PSS_PADDING));
    } else {
      auto digest = sha256("x");
      auto sig = ops_.sign(key, CKM_ECDSA, nullptr, 0, digest.data(), digest.size());
      EXPECT_TRUE(verify_digest(pub.get(), digest, ecdsa_der(sig)));
    }
    // nothing persistent was made
    EXPECT_TRUE(ops_.list_key_objects().empty());
    // the cache id is reused by the next spec: forget it by using a fresh one next time
    ops_.destroy(hsm::ObjectId{1, 2, 3});
  }
}

// SoftHSM 2.6.1 refuses an HMAC key shorter than the digest (CKR_KEY_SIZE_RANGE for a 32-byte
// key with SHA-384/512). HMAC zero-pads short keys to the block size, so a key zero-padded to 64
// bytes gives the same HMAC as the short key with every SHA-2: that is how short keys are kept.
TEST_F(AsymmetricTest, ShortHmacKeysAreRefusedUnlessPaddedAndPaddingKeepsTheHmac) {
  hsm::SecureBytes short_key(32);
  auto short_id = ops_.new_object_id();
  ops_.import_hmac_key(short_id, short_key, "p11kms/root/s/v1/hmac");
  std::string m = "x";
  EXPECT_THROW(ops_.hmac(short_id, CKM_SHA512_HMAC, reinterpret_cast<const uint8_t*>(m.data()), 1), hsm::Pkcs11Error);
  hsm::SecureBytes big(512);
  auto big_id = ops_.new_object_id();
  ops_.import_hmac_key(big_id, big, "p11kms/root/b/v1/hmac");
  EXPECT_EQ(ops_.hmac(big_id, CKM_SHA224_HMAC, reinterpret_cast<const uint8_t*>(m.data()), 1).size(), 28u);
}

TEST_F(AsymmetricTest, HmacKeysComputeEveryShaHmacAndSessionKeysMatchImportedOnes) {
  hsm::SecureBytes value(64);  // 32 key bytes, zero-padded to 64
  for (size_t i = 0; i < 32; ++i) value.data()[i] = static_cast<uint8_t>(i + 1);
  auto id = ops_.new_object_id();
  ops_.import_hmac_key(id, value, "p11kms/root/h/v1/hmac");
  EXPECT_FALSE(bool_attr(pool_, id, CKA_EXTRACTABLE, CKO_SECRET_KEY));
  EXPECT_TRUE(bool_attr(pool_, id, CKA_SIGN, CKO_SECRET_KEY));
  EXPECT_FALSE(bool_attr(pool_, id, CKA_ENCRYPT, CKO_SECRET_KEY));
  std::string msg = "hmac input";
  const uint8_t* data = reinterpret_cast<const uint8_t*>(msg.data());
  hsm::KeyHandle session(hsm::ObjectId{9}, [value] {
    return hsm::session_secret_template(CKK_GENERIC_SECRET, value, {CKA_SIGN, CKA_VERIFY});
  });
  const std::pair<CK_MECHANISM_TYPE, const EVP_MD*> mechs[] = {
      {CKM_SHA224_HMAC, EVP_sha224()}, {CKM_SHA256_HMAC, EVP_sha256()},
      {CKM_SHA384_HMAC, EVP_sha384()}, {CKM_SHA512_HMAC, EVP_sha512()}};
  for (const auto& [mech, md] : mechs) {
    auto in_token = ops_.hmac(id, mech, data, msg.size());
    unsigned char expected[64];
    unsigned int n = 0;
    HMAC(md, value.data(), 32, data, msg.size(), expected, &n);  // the unpadded key
    EXPECT_EQ(in_token, hsm::Bytes(expected, expected + n));
    EXPECT_EQ(ops_.hmac(session, mech, data, msg.size()), in_token);
  }
}

}  // namespace
