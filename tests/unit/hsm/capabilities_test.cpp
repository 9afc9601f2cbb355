// The capability table from synthetic mechanism lists: which key types and operations a
// module can run inside the token, and what a refusal says.
#include <gtest/gtest.h>

#include <algorithm>

#include "hsm/capabilities.hpp"

using namespace p11kms::hsm;

namespace {

constexpr CK_FLAGS kEncDec = CKF_ENCRYPT | CKF_DECRYPT;

MechanismInfo m(CK_MECHANISM_TYPE t, CK_FLAGS f, CK_ULONG min = 0, CK_ULONG max = 0) {
  return MechanismInfo{t, min, max, f};
}

// What SoftHSM 2.6.1 offers directly (the subset the table looks at), with its flags.
std::vector<MechanismInfo> softhsm_like() {
  return {m(CKM_AES_KEY_GEN, CKF_GENERATE, 16, 32),
          m(CKM_AES_GCM, kEncDec, 16, 32),
          m(CKM_AES_ECB, kEncDec, 16, 32),
          m(CKM_AES_KEY_WRAP_PAD, CKF_WRAP | CKF_UNWRAP, 16, 32),
          m(CKM_AES_ECB_ENCRYPT_DATA, CKF_DERIVE),
          m(CKM_EC_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 256, 521),
          m(CKM_ECDSA, CKF_SIGN | CKF_VERIFY, 256, 521),
          m(CKM_EC_EDWARDS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR),
          m(CKM_EDDSA, CKF_SIGN | CKF_VERIFY),
          m(CKM_RSA_PKCS_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR, 512, 16384),
          m(CKM_RSA_PKCS, kEncDec | CKF_SIGN | CKF_VERIFY | CKF_WRAP | CKF_UNWRAP, 512, 16384),
          m(CKM_RSA_PKCS_PSS, CKF_SIGN | CKF_VERIFY, 512, 16384),
          m(CKM_SHA256_RSA_PKCS_PSS, CKF_SIGN | CKF_VERIFY, 512, 16384),
          m(CKM_RSA_PKCS_OAEP, kEncDec | CKF_WRAP | CKF_UNWRAP, 512, 16384),
          m(CKM_GENERIC_SECRET_KEY_GEN, CKF_GENERATE, 1, 0x80000000),
          m(CKM_SHA256_HMAC, CKF_SIGN | CKF_VERIFY, 32, 512),
          m(CKM_SHA384_HMAC, CKF_SIGN | CKF_VERIFY, 48, 512)};
}

// The same through p11-kit 0.24's remoting: the mechanisms it does not forward are gone.
std::vector<MechanismInfo> remoting_like() {
  auto all = softhsm_like();
  std::vector<MechanismInfo> out;
  for (const auto& x : all) {
    switch (x.type) {
      case CKM_AES_GCM: case CKM_AES_KEY_WRAP_PAD: case CKM_AES_ECB_ENCRYPT_DATA: case CKM_EC_EDWARDS_KEY_PAIR_GEN:
      case CKM_EDDSA: case CKM_SHA256_RSA_PKCS_PSS:
        continue;
      default:
        out.push_back(x);
    }
  }
  return out;
}

bool contains(const std::vector<std::string>& v, const std::string& s) {
  return std::find(v.begin(), v.end(), s) != v.end();
}

using K = CapabilityKind;

}  // namespace

TEST(Capabilities, EverythingAvailableOnAFullModule) {
  Capabilities c(softhsm_like());
  EXPECT_TRUE(c.unavailable().empty()) << c.unavailable().front();
  for (const auto& cap : c.table()) EXPECT_TRUE(cap.available()) << cap.id();
  EXPECT_EQ(c.refusal(K::key_type, cap::kEd25519, "creating an ed25519 key"), "");
}

TEST(Capabilities, RemotingLosesAesGcmEd25519DerivationAndImport) {
  Capabilities c(remoting_like());
  for (const char* name : {cap::kAes128, cap::kAes256, cap::kEd25519, cap::kDerived, cap::kImport})
    EXPECT_FALSE(c.available(K::key_type, name)) << name;
  for (const char* name : {cap::kEncrypt, cap::kWrap, cap::kSignEd25519, cap::kDerive, cap::kConvergent, cap::kImportOp})
    EXPECT_FALSE(c.available(K::operation, name)) << name;
  // What passes: HMAC, ECDSA and RSA keys and their operations, PSS through CKM_RSA_PKCS_PSS
  // over a digest even though CKM_SHA256_RSA_PKCS_PSS is gone.
  for (const char* name : {cap::kEcdsaP256, cap::kEcdsaP384, cap::kRsa2048, cap::kRsa3072, cap::kRsa4096, cap::kHmac})
    EXPECT_TRUE(c.available(K::key_type, name)) << name;
  // Exportable keys too: sealed with AES-CTR (keystream by CKM_AES_ECB) + HMAC-SHA-256 instead.
  EXPECT_TRUE(c.available(K::key_type, cap::kExportable));
  for (const char* name : {cap::kSignEcdsa, cap::kSignRsaPss, cap::kSignRsaPkcs1, cap::kHmacOp})
    EXPECT_TRUE(c.available(K::operation, name)) << name;

  auto u = c.unavailable();
  EXPECT_TRUE(contains(u, "key type ed25519"));
  EXPECT_TRUE(contains(u, "operation encrypt/decrypt"));
  EXPECT_FALSE(contains(u, "key type hmac"));
  EXPECT_FALSE(contains(u, "operation sign rsa-pss"));
}

TEST(Capabilities, RefusalNamesTheRequestAndEachMissingMechanism) {
  Capabilities c(remoting_like());
  auto ed = c.refusal(K::key_type, cap::kEd25519, "creating an ed25519 key");
  EXPECT_EQ(ed.rfind("creating an ed25519 key needs ", 0), 0u) << ed;
  EXPECT_NE(ed.find("CKM_EC_EDWARDS_KEY_PAIR_GEN (generate_key_pair)"), std::string::npos) << ed;
  EXPECT_NE(ed.find("CKM_EDDSA (sign)"), std::string::npos) << ed;
  EXPECT_NE(ed.find("never does it outside the token"), std::string::npos) << ed;

  auto gcm = c.refusal(K::operation, cap::kEncrypt, "encrypting with key \"k\"");
  EXPECT_NE(gcm.find("CKM_AES_GCM (encrypt,decrypt)"), std::string::npos) << gcm;
  // Only the missing ones are named: CKM_AES_KEY_GEN is offered.
  auto aes = c.refusal(K::key_type, cap::kAes256, "creating an aes256-gcm96 key");
  EXPECT_NE(aes.find("CKM_AES_GCM"), std::string::npos) << aes;
  EXPECT_EQ(aes.find("CKM_AES_KEY_GEN"), std::string::npos) << aes;

  EXPECT_FALSE(c.refusal(K::operation, "no such thing", "x").empty());
}

TEST(Capabilities, FlagsMatterNotJustPresence) {
  auto mechs = softhsm_like();
  for (auto& x : mechs)
    if (x.type == CKM_AES_GCM) x.flags = CKF_ENCRYPT;  // a module that only encrypts with GCM
  Capabilities c(mechs);
  EXPECT_TRUE(c.has(CKM_AES_GCM));
  EXPECT_TRUE(c.has(CKM_AES_GCM, CKF_ENCRYPT));
  EXPECT_FALSE(c.has(CKM_AES_GCM, CKF_DECRYPT));
  EXPECT_FALSE(c.available(K::operation, cap::kEncrypt));
  EXPECT_NE(c.refusal(K::operation, cap::kEncrypt, "x").find("CKM_AES_GCM (encrypt,decrypt)"), std::string::npos);

  // A mechanism whose info could not be read (no flags) counts as offered for nothing.
  mechs = softhsm_like();
  for (auto& x : mechs)
    if (x.type == CKM_ECDSA) x.flags = 0;
  EXPECT_FALSE(Capabilities(mechs).available(K::operation, cap::kSignEcdsa));
}

TEST(Capabilities, RsaKeySizesOutsideTheModulesRangeAreUnavailable) {
  auto mechs = softhsm_like();
  for (auto& x : mechs)
    if (x.type == CKM_RSA_PKCS_KEY_PAIR_GEN) x.max_key_size = 3072;
  Capabilities c(mechs);
  EXPECT_TRUE(c.available(K::key_type, cap::kRsa2048));
  EXPECT_TRUE(c.available(K::key_type, cap::kRsa3072));
  EXPECT_FALSE(c.available(K::key_type, cap::kRsa4096));
  auto why = c.refusal(K::key_type, cap::kRsa4096, "creating an rsa-4096 key");
  EXPECT_NE(why.find("CKM_RSA_PKCS_KEY_PAIR_GEN (generate_key_pair, 4096-bit)"), std::string::npos) << why;
  // The import wrapping key is RSA-4096 too.
  EXPECT_FALSE(c.available(K::key_type, cap::kImport));
}

// Exportable keys: AES-GCM, or else CKM_AES_ECB (encrypt) + CKM_SHA256_HMAC (sign) with their key
// generation; available when either set is met, refused naming both otherwise.
TEST(Capabilities, ExportableNeedsGcmOrElseEcbAndHmac) {
  auto without = [](std::vector<MechanismInfo> mechs, std::initializer_list<CK_MECHANISM_TYPE> gone) {
    std::vector<MechanismInfo> out;
    for (const auto& x : mechs)
      if (std::find(gone.begin(), gone.end(), x.type) == gone.end()) out.push_back(x);
    return out;
  };
  // GCM alone is enough (no ECB, no HMAC).
  EXPECT_TRUE(Capabilities(without(softhsm_like(), {CKM_AES_ECB, CKM_SHA256_HMAC}))
                  .available(K::key_type, cap::kExportable));
  // No GCM: ECB + HMAC + generic secret generation.
  EXPECT_TRUE(Capabilities(without(softhsm_like(), {CKM_AES_GCM})).available(K::key_type, cap::kExportable));
  for (CK_MECHANISM_TYPE lost : {CKM_AES_ECB, CKM_SHA256_HMAC, CKM_GENERIC_SECRET_KEY_GEN}) {
    Capabilities c(without(softhsm_like(), {CKM_AES_GCM, lost}));
    EXPECT_FALSE(c.available(K::key_type, cap::kExportable)) << mechanism_name(lost);
    auto why = c.refusal(K::key_type, cap::kExportable, "creating an exportable key");
    EXPECT_NE(why.find("CKM_AES_GCM (encrypt,decrypt)"), std::string::npos) << why;
    EXPECT_NE(why.find("or else " + mechanism_name(lost)), std::string::npos) << why;
    EXPECT_TRUE(contains(c.unavailable(), "key type exportable"));
  }
  // ECB that only decrypts does not give a keystream.
  auto mechs = without(softhsm_like(), {CKM_AES_GCM});
  for (auto& x : mechs)
    if (x.type == CKM_AES_ECB) x.flags = CKF_DECRYPT;
  EXPECT_FALSE(Capabilities(mechs).available(K::key_type, cap::kExportable));
  // Without AES key generation neither scheme can make its master key.
  EXPECT_FALSE(Capabilities(without(softhsm_like(), {CKM_AES_KEY_GEN})).available(K::key_type, cap::kExportable));
}

TEST(Capabilities, EmptyModuleOffersNothing) {
  Capabilities c;
  EXPECT_TRUE(c.mechanisms().empty());
  EXPECT_EQ(c.unavailable().size(), c.table().size());
  EXPECT_FALSE(c.has(CKM_AES_GCM));
}

TEST(Capabilities, LookupIsIndependentOfInputOrder) {
  auto mechs = softhsm_like();
  std::reverse(mechs.begin(), mechs.end());
  Capabilities c(mechs);
  ASSERT_TRUE(c.info(CKM_RSA_PKCS_KEY_PAIR_GEN));
  EXPECT_EQ(c.info(CKM_RSA_PKCS_KEY_PAIR_GEN)->max_key_size, 16384u);
  EXPECT_FALSE(c.info(CKM_AES_CMAC));
  EXPECT_TRUE(std::is_sorted(c.mechanisms().begin(), c.mechanisms().end(),
                             [](const MechanismInfo& a, const MechanismInfo& b) { return a.type < b.type; }));
}

TEST(Capabilities, Names) {
  EXPECT_EQ(mechanism_name(CKM_AES_GCM), "CKM_AES_GCM");
  EXPECT_EQ(mechanism_name(CKM_SHA256_RSA_PKCS_PSS), "CKM_SHA256_RSA_PKCS_PSS");
  EXPECT_EQ(mechanism_name(0x8000abcdUL), "CKM_0x8000ABCD");
  EXPECT_EQ(mechanism_flag_names(CKF_SIGN | CKF_VERIFY), "sign,verify");
  EXPECT_EQ(mechanism_flag_names(CKF_GENERATE_KEY_PAIR | CKF_DERIVE | CKF_HW), "generate_key_pair,derive");
  EXPECT_EQ(mechanism_flag_names(0), "-");
  EXPECT_EQ((MechanismNeed{CKM_AES_KEY_GEN, CKF_GENERATE, 0}).describe(), "CKM_AES_KEY_GEN (generate)");
}
