// MasterSeal over a real SoftHSM token and a real SQLite file: both schemes round trip with the
// crypto in the token, tampering is refused, legacy unprefixed AES-GCM blobs still open, and one
// process reads blobs of both schemes. SoftHSM offers AES-GCM directly, so the aes-ctr-hmac
// scheme is forced by giving the seal a capability table without CKM_AES_GCM (as p11-kit's
// remoting reports); the scheme choice is all that table decides.
#include <gtest/gtest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <algorithm>
#include <functional>
#include <set>

#include "common/encoding.hpp"
#include "keys/errors.hpp"
#include "keys/master_seal.hpp"
#include "support/temp_token.hpp"

using namespace p11kms;
using keys::MasterSeal;

namespace {

class MasterSealTest : public ::testing::Test {
 protected:
  test_support::TempToken token_;
  std::string db_dir_ = test_support::make_temp_dir("p11kms-db");
  std::unique_ptr<store::MetadataStore> store_ = store::open_sqlite_store(db_dir_ + "/p11kms.db");
  hsm::SessionPool pool_{token_.pool_config()};
  hsm::Token hsm_{pool_};

  ~MasterSealTest() override { test_support::remove_tree(db_dir_); }

  // The token's real capability table without the given mechanisms.
  MasterSeal::CapabilitySource without(std::initializer_list<CK_MECHANISM_TYPE> gone) {
    std::vector<hsm::MechanismInfo> mechs;
    for (const auto& m : hsm_.capabilities()->mechanisms())
      if (std::find(gone.begin(), gone.end(), m.type) == gone.end()) mechs.push_back(m);
    auto caps = std::make_shared<const hsm::Capabilities>(std::move(mechs));
    return [caps] { return caps; };
  }
  static std::vector<uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }
  static hsm::SecureBytes secret(const std::string& s) {
    return hsm::SecureBytes(reinterpret_cast<const uint8_t*>(s.data()), s.size());
  }
  static std::string text(const hsm::SecureBytes& b) { return std::string(b.data(), b.data() + b.size()); }
  std::set<std::string> object_labels() {
    std::set<std::string> out;
    for (const auto& o : hsm_.list_key_objects()) out.insert(o.label);
    return out;
  }
  // The blob with one byte of its decoded body flipped at `at` (negative: from the end).
  static std::string flipped(const std::string& blob, long at) {
    size_t colon = blob.find(':');
    auto raw = *encoding::base64_decode(blob.substr(colon + 1));
    size_t i = at >= 0 ? static_cast<size_t>(at) : raw.size() - static_cast<size_t>(-at);
    raw[i] ^= 0x01;
    return blob.substr(0, colon + 1) + encoding::base64_encode(raw);
  }
  // The code of the KeyError f throws, with its kind checked to be a 400.
  static std::string refusal_code(const std::function<void()>& f, std::string* message = nullptr) {
    try {
      f();
    } catch (const keys::KeyError& e) {
      EXPECT_EQ(e.kind(), keys::ErrorKind::invalid_argument) << e.what();
      if (message) *message = e.what();
      return e.code();
    }
    ADD_FAILURE() << "no KeyError thrown";
    return "";
  }
};

TEST_F(MasterSealTest, AesGcmIsTheDefaultAndRoundTrips) {
  MasterSeal seal(*store_, hsm_);
  EXPECT_EQ(seal.scheme_for_sealing(), MasterSeal::Scheme::aes_gcm);
  auto blob = seal.seal(bytes("aad-1"), secret("the material"));
  ASSERT_EQ(blob.rfind("aes-gcm:", 0), 0u) << blob;
  EXPECT_EQ(encoding::base64_decode(blob.substr(8))->size(), 12u + 12u + 16u);
  auto pt = seal.unseal(bytes("aad-1"), blob);
  ASSERT_TRUE(pt);
  EXPECT_EQ(text(*pt), "the material");
  EXPECT_FALSE(seal.unseal(bytes("aad-2"), blob));
  EXPECT_FALSE(seal.unseal(bytes("aad-1"), flipped(blob, 0)));   // iv
  EXPECT_FALSE(seal.unseal(bytes("aad-1"), flipped(blob, 14)));  // ciphertext
  EXPECT_FALSE(seal.unseal(bytes("aad-1"), flipped(blob, -1)));  // tag
  // Only the AES master key exists: no MAC key is made while AES-GCM is there.
  EXPECT_TRUE(store_->get_setting("keys.master_key_id"));
  EXPECT_FALSE(store_->get_setting("keys.master_mac_key_id"));
  EXPECT_EQ(object_labels(), (std::set<std::string>{"p11kms-system/master-key"}));
}

TEST_F(MasterSealTest, AesCtrHmacRoundTripsInTheToken) {
  MasterSeal seal(*store_, hsm_, without({CKM_AES_GCM}));
  EXPECT_EQ(seal.scheme_for_sealing(), MasterSeal::Scheme::aes_ctr_hmac);
  // Lengths around the block size, and a PKCS#8 RSA-4096 key's size.
  for (size_t n : {0, 1, 15, 16, 17, 32, 33, 100, 2400}) {
    std::string material(n, '\0');
    for (size_t i = 0; i < n; ++i) material[i] = static_cast<char>(i * 7 + 3);
    auto blob = seal.seal(bytes("key/v1"), secret(material));
    ASSERT_EQ(blob.rfind("aes-ctr-hmac:", 0), 0u) << blob;
    auto raw = encoding::base64_decode(blob.substr(13));
    ASSERT_TRUE(raw);
    ASSERT_EQ(raw->size(), 16u + n + 32u);
    if (n >= 16) {
      // Really encrypted: the ciphertext is not the plaintext.
      EXPECT_NE(std::string(raw->begin() + 16, raw->begin() + 16 + static_cast<long>(n)), material);
    }
    auto pt = seal.unseal(bytes("key/v1"), blob);
    ASSERT_TRUE(pt) << n;
    EXPECT_EQ(text(*pt), material) << n;
  }
  // A fresh nonce each time: the same plaintext seals differently.
  EXPECT_NE(seal.seal(bytes("a"), secret("same")), seal.seal(bytes("a"), secret("same")));
  // The MAC key: its own setting and token object (a generic secret, sign/verify only).
  EXPECT_TRUE(store_->get_setting("keys.master_key_id"));
  EXPECT_TRUE(store_->get_setting("keys.master_mac_key_id"));
  EXPECT_EQ(object_labels(),
            (std::set<std::string>{"p11kms-system/master-key", "p11kms-system/master-mac-key"}));
}

// The aes-ctr-hmac format is plain AES-256-CTR and HMAC-SHA-256, checkable with OpenSSL: master
// keys of known value are put in the token and recorded as the store's master keys, and the
// blob is recomputed here. MAC input: "p11kms master seal aes-ctr-hmac v1" 0x00 || u64be(|aad|) ||
// aad || nonce || u64be(|ct|) || ct.
TEST_F(MasterSealTest, AesCtrHmacIsStandardCtrAndHmac) {
  hsm::SecureBytes aes_key(32), mac_key(32);
  for (int i = 0; i < 32; ++i) aes_key.data()[i] = static_cast<uint8_t>(i), mac_key.data()[i] = static_cast<uint8_t>(0xa0 + i);
  auto aes_id = hsm_.new_object_id(), mac_id = hsm_.new_object_id();
  hsm_.import_aes_key(aes_id, aes_key, "kat-aes");
  hsm_.import_hmac_key(mac_id, mac_key, "kat-mac");
  store_->put_setting("keys.master_key_id", encoding::hex_encode(aes_id));
  store_->put_setting("keys.master_mac_key_id", encoding::hex_encode(mac_id));
  MasterSeal seal(*store_, hsm_, without({CKM_AES_GCM}));
  std::string material(70, 'm');  // five blocks, the last partial
  auto aad = bytes("ns/k/v9");
  auto blob = seal.seal(aad, secret(material));
  auto raw = *encoding::base64_decode(blob.substr(13));
  ASSERT_EQ(raw.size(), 16u + 70u + 32u);

  std::vector<uint8_t> ct(70);
  int n = 0;
  EVP_CIPHER_CTX* ctx = EVP_CIPHER_CTX_new();
  ASSERT_EQ(EVP_EncryptInit_ex(ctx, EVP_aes_256_ctr(), nullptr, aes_key.data(), raw.data()), 1);
  ASSERT_EQ(EVP_EncryptUpdate(ctx, ct.data(), &n, reinterpret_cast<const uint8_t*>(material.data()), 70), 1);
  EVP_CIPHER_CTX_free(ctx);
  EXPECT_EQ(std::vector<uint8_t>(raw.begin() + 16, raw.begin() + 86), ct);

  std::string domain = "p11kms master seal aes-ctr-hmac v1";
  std::vector<uint8_t> in(domain.begin(), domain.end());
  in.push_back(0);
  auto u64 = [&](uint64_t v) { for (int i = 7; i >= 0; --i) in.push_back(static_cast<uint8_t>(v >> (8 * i))); };
  u64(aad.size());
  in.insert(in.end(), aad.begin(), aad.end());
  in.insert(in.end(), raw.begin(), raw.begin() + 16);
  u64(70);
  in.insert(in.end(), ct.begin(), ct.end());
  uint8_t mac[32];
  unsigned mac_len = 0;
  HMAC(EVP_sha256(), mac_key.data(), 32, in.data(), in.size(), mac, &mac_len);
  EXPECT_EQ(std::vector<uint8_t>(raw.begin() + 86, raw.end()), std::vector<uint8_t>(mac, mac + 32));
  EXPECT_EQ(text(*seal.unseal(aad, blob)), material);
}

TEST_F(MasterSealTest, AesCtrHmacRefusesTamperingAndOtherAad) {
  MasterSeal seal(*store_, hsm_, without({CKM_AES_GCM}));
  auto blob = seal.seal(bytes("ns/key/v3"), secret(std::string(40, 'k')));
  ASSERT_TRUE(seal.unseal(bytes("ns/key/v3"), blob));
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v4"), blob));           // aad
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3x"), blob));
  EXPECT_FALSE(seal.unseal({}, blob));
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), flipped(blob, 0)));    // nonce
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), flipped(blob, 15)));   // nonce, last byte
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), flipped(blob, 16)));   // ciphertext
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), flipped(blob, 55)));   // ciphertext, last byte
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), flipped(blob, -1)));   // mac
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), flipped(blob, -32)));  // mac, first byte
  auto raw = *encoding::base64_decode(blob.substr(13));
  // Truncated (a ciphertext byte moved into the MAC), too short, not base64.
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"),
                           "aes-ctr-hmac:" + encoding::base64_encode(raw.data(), raw.size() - 1)));
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), "aes-ctr-hmac:" + encoding::base64_encode(raw.data(), 47)));
  EXPECT_FALSE(seal.unseal(bytes("ns/key/v3"), "aes-ctr-hmac:!!!"));
  // The same body under the other scheme's prefix does not open either.
  EXPECT_FALSE(MasterSeal(*store_, hsm_).unseal(bytes("ns/key/v3"), "aes-gcm:" + blob.substr(13)));
}

TEST_F(MasterSealTest, LegacyUnprefixedGcmBlobsStillOpen) {
  MasterSeal seal(*store_, hsm_);
  // What p11kms wrote before blobs had a prefix: base64(iv || ct || tag) under the master key.
  hsm::Bytes iv(12, 0x42);
  auto pt = secret("legacy material");
  auto sealed = hsm_.aes_gcm_encrypt(seal.master_key(), iv, bytes("old/aad"), pt.data(), pt.size());
  iv.insert(iv.end(), sealed.begin(), sealed.end());
  std::string legacy = encoding::base64_encode(iv);
  ASSERT_EQ(legacy.find(':'), std::string::npos);
  auto got = seal.unseal(bytes("old/aad"), legacy);
  ASSERT_TRUE(got);
  EXPECT_EQ(text(*got), "legacy material");
  EXPECT_FALSE(seal.unseal(bytes("other"), legacy));
  // Read by a process without AES-GCM: a clear 400 naming the mechanism, not a silent failure.
  MasterSeal remote(*store_, hsm_, without({CKM_AES_GCM}));
  std::string why;
  EXPECT_EQ(refusal_code([&] { remote.unseal(bytes("old/aad"), legacy); }, &why), "mechanism_unavailable");
  EXPECT_NE(why.find("CKM_AES_GCM"), std::string::npos) << why;
  EXPECT_EQ(refusal_code([&] { remote.unseal(bytes("old/aad"), "aes-gcm:" + legacy); }), "mechanism_unavailable");
}

TEST_F(MasterSealTest, OneProcessReadsBothSchemes) {
  // First through a module without AES-GCM (p11-kit remoting)...
  MasterSeal remote(*store_, hsm_, without({CKM_AES_GCM}));
  auto ctr = remote.seal(bytes("k/v1"), secret("sealed remotely"));
  ASSERT_EQ(ctr.rfind("aes-ctr-hmac:", 0), 0u);
  // ...then with AES-GCM available too (the module loaded directly, another instance): the old
  // blob opens, new blobs are AES-GCM, and both open side by side.
  MasterSeal direct(*store_, hsm_);
  auto got = direct.unseal(bytes("k/v1"), ctr);
  ASSERT_TRUE(got);
  EXPECT_EQ(text(*got), "sealed remotely");
  auto gcm = direct.seal(bytes("k/v2"), secret("sealed directly"));
  ASSERT_EQ(gcm.rfind("aes-gcm:", 0), 0u);
  EXPECT_EQ(text(*direct.unseal(bytes("k/v2"), gcm)), "sealed directly");
  EXPECT_EQ(text(*direct.unseal(bytes("k/v1"), ctr)), "sealed remotely");
  // The remote process still reads its own blobs, and refuses the GCM one by name.
  EXPECT_EQ(text(*remote.unseal(bytes("k/v1"), ctr)), "sealed remotely");
  EXPECT_EQ(refusal_code([&] { remote.unseal(bytes("k/v2"), gcm); }), "mechanism_unavailable");
}

TEST_F(MasterSealTest, EachSchemeNeedsItsOwnMechanisms) {
  MasterSeal remote(*store_, hsm_, without({CKM_AES_GCM}));
  auto ctr = remote.seal(bytes("a"), secret("x"));
  // A module with AES-GCM but without the ECB keystream or the HMAC cannot open a CTR blob.
  for (CK_MECHANISM_TYPE lost : {CKM_AES_ECB, CKM_SHA256_HMAC}) {
    MasterSeal other(*store_, hsm_, without({lost}));
    std::string why;
    EXPECT_EQ(refusal_code([&] { other.unseal(bytes("a"), ctr); }, &why), "mechanism_unavailable");
    EXPECT_NE(why.find(hsm::mechanism_name(lost)), std::string::npos) << why;
    // It still seals with AES-GCM.
    EXPECT_EQ(other.seal(bytes("b"), secret("y")).rfind("aes-gcm:", 0), 0u);
  }
  // Neither scheme possible: sealing is refused naming what is missing.
  MasterSeal none(*store_, hsm_, without({CKM_AES_GCM, CKM_AES_ECB}));
  std::string why;
  EXPECT_EQ(refusal_code([&] { none.seal(bytes("c"), secret("z")); }, &why), "mechanism_unavailable");
  EXPECT_NE(why.find("CKM_AES_GCM"), std::string::npos) << why;
  EXPECT_NE(why.find("CKM_AES_ECB"), std::string::npos) << why;
  // An unknown scheme prefix is reported, not guessed at.
  try {
    none.unseal(bytes("c"), "aes-siv:AAAA");
    ADD_FAILURE() << "no error for an unknown scheme";
  } catch (const keys::KeyError& e) {
    EXPECT_NE(std::string(e.what()).find("aes-siv"), std::string::npos) << e.what();
  }
}

TEST_F(MasterSealTest, InstancesAgreeOnOneMasterKeyOfEachKind) {
  // Two seals on one store (two instances): whichever makes a key first, the other uses it.
  MasterSeal a(*store_, hsm_, without({CKM_AES_GCM}));
  MasterSeal b(*store_, hsm_, without({CKM_AES_GCM}));
  auto from_a = a.seal(bytes("x"), secret("from a"));
  auto from_b = b.seal(bytes("x"), secret("from b"));
  EXPECT_EQ(text(*b.unseal(bytes("x"), from_a)), "from a");
  EXPECT_EQ(text(*a.unseal(bytes("x"), from_b)), "from b");
  EXPECT_EQ(hsm_.list_key_objects().size(), 2u);
  // Nothing sealed before and no key recorded: a blob does not open (and no key is made).
  std::string other_dir = test_support::make_temp_dir("p11kms-db");
  {
    auto empty_store = store::open_sqlite_store(other_dir + "/p11kms.db");
    MasterSeal fresh(*empty_store, hsm_);
    EXPECT_FALSE(fresh.unseal(bytes("x"), from_a));
    EXPECT_FALSE(empty_store->get_setting("keys.master_key_id"));
  }
  test_support::remove_tree(other_dir);
}

}  // namespace
