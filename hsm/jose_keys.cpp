// JOSE keys (Kong's /keys): caller-supplied private keys put into the token as non-extractable
// objects, and the ECDH-ES key agreement with its Concat KDF run in the token.
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "hsm/errors.hpp"
#include "hsm/token.hpp"

namespace p11kms::hsm {
namespace {

struct PkeyFree { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
struct P8Free { void operator()(PKCS8_PRIV_KEY_INFO* p) const { PKCS8_PRIV_KEY_INFO_free(p); } };
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

// Big-endian bytes of a key parameter, left-padded to `width` (0: minimal); the caller wipes.
SecureBytes bn_bytes(EVP_PKEY* key, const char* name, size_t width = 0) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(key, name, &raw) != 1 || !raw) fail(std::string("the key has no ") + name);
  size_t n = static_cast<size_t>(BN_num_bytes(raw));
  SecureBytes out(width > n ? width : n);
  BN_bn2binpad(raw, out.data(), static_cast<int>(out.size()));
  BN_clear_free(raw);
  return out;
}

}  // namespace

Bytes Token::import_private_key(const ObjectId& id, const std::string& label, const SecureBytes& pkcs8) {
  const unsigned char* p = pkcs8.data();
  std::unique_ptr<PKCS8_PRIV_KEY_INFO, P8Free> p8(d2i_PKCS8_PRIV_KEY_INFO(nullptr, &p, static_cast<long>(pkcs8.size())));
  if (!p8) fail("the key material is not PKCS#8 DER");
  Pkey key(EVP_PKCS82PKEY(p8.get()));
  if (!key) fail("the key material is not a private key OpenSSL can read");

  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_PRIVATE_KEY);
  t.set(CKA_TOKEN, true).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, false).set(CKA_UNWRAP, false).set(CKA_SIGN, true);
  t.set_bytes(CKA_ID, id).set_string(CKA_LABEL, label);
  int type = EVP_PKEY_get_base_id(key.get());
  if (type == EVP_PKEY_RSA) {
    int bits = EVP_PKEY_get_bits(key.get());
    if (bits < 2048 || bits > 4096) fail("RSA keys must have 2048 to 4096 bits");
    t.set_ulong(CKA_KEY_TYPE, CKK_RSA);
    t.set(CKA_DECRYPT, true).set(CKA_DERIVE, false).set(CKA_SIGN_RECOVER, false);
    const std::pair<CK_ATTRIBUTE_TYPE, const char*> parts[] = {
        {CKA_MODULUS, OSSL_PKEY_PARAM_RSA_N},           {CKA_PUBLIC_EXPONENT, OSSL_PKEY_PARAM_RSA_E},
        {CKA_PRIVATE_EXPONENT, OSSL_PKEY_PARAM_RSA_D},  {CKA_PRIME_1, OSSL_PKEY_PARAM_RSA_FACTOR1},
        {CKA_PRIME_2, OSSL_PKEY_PARAM_RSA_FACTOR2},     {CKA_EXPONENT_1, OSSL_PKEY_PARAM_RSA_EXPONENT1},
        {CKA_EXPONENT_2, OSSL_PKEY_PARAM_RSA_EXPONENT2}, {CKA_COEFFICIENT, OSSL_PKEY_PARAM_RSA_COEFFICIENT1}};
    for (const auto& [attr, name] : parts) {
      SecureBytes v = bn_bytes(key.get(), name);
      t.set_bytes(attr, v.data(), v.size());  // the template wipes its copy
    }
  } else if (type == EVP_PKEY_EC) {
    char group[64] = {0};
    size_t glen = 0;
    if (EVP_PKEY_get_utf8_string_param(key.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &glen) != 1)
      fail("the EC key names no curve");
    std::string g(group, glen);
    Bytes oid;
    size_t width = 0;
    if (g == "prime256v1" || g == "P-256") {
      oid = {0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07};
      width = 32;
    } else if (g == "secp384r1" || g == "P-384") {
      oid = {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22};
      width = 48;
    } else if (g == "secp521r1" || g == "P-521") {
      oid = {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x23};
      width = 66;
    } else {
      fail("unsupported EC curve " + g);
    }
    t.set_ulong(CKA_KEY_TYPE, CKK_EC);
    t.set(CKA_DECRYPT, false).set(CKA_DERIVE, true);
    t.set_bytes(CKA_EC_PARAMS, oid);
    SecureBytes d = bn_bytes(key.get(), OSSL_PKEY_PARAM_PRIV_KEY, width);
    t.set_bytes(CKA_VALUE, d.data(), d.size());
  } else if (type == EVP_PKEY_ED25519) {
    t.set_ulong(CKA_KEY_TYPE, CKK_EC_EDWARDS);
    t.set(CKA_DECRYPT, false).set(CKA_DERIVE, false);
    t.set_bytes(CKA_EC_PARAMS, Bytes{0x06, 0x03, 0x2B, 0x65, 0x70});
    SecureBytes seed(32);
    size_t n = seed.size();
    if (EVP_PKEY_get_raw_private_key(key.get(), seed.data(), &n) != 1 || n != 32) fail("bad Ed25519 key");
    t.set_bytes(CKA_VALUE, seed.data(), n);
  } else {
    fail("unsupported private key type");
  }
  int n = i2d_PUBKEY(key.get(), nullptr);
  Bytes spki(n > 0 ? static_cast<size_t>(n) : 0);
  uint8_t* out = spki.data();
  if (n <= 0 || i2d_PUBKEY(key.get(), &out) != n) fail("cannot encode the public key");
  auto l = pool_.lease();
  CK_OBJECT_HANDLE h = 0;
  l.check(l.fn()->C_CreateObject(l.session(), t.data(), t.size(), &h), "C_CreateObject");
  return spki;
}

SecureBytes Token::ecdh_concat_kdf(const ObjectId& private_key, const Bytes& peer_point, size_t z_bytes,
                                   const Bytes& other_info, size_t out_bytes) {
  auto l = pool_.lease();
  CK_OBJECT_HANDLE priv = handle(l, private_key);
  CK_ECDH1_DERIVE_PARAMS params{CKD_NULL, 0, nullptr, static_cast<CK_ULONG>(peer_point.size()),
                                const_cast<uint8_t*>(peer_point.data())};
  CK_MECHANISM mech{CKM_ECDH1_DERIVE, &params, sizeof params};
  AttributeTemplate z;
  z.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
  z.set(CKA_TOKEN, false).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false);
  z.set(CKA_ENCRYPT, false).set(CKA_DECRYPT, false).set(CKA_SIGN, false).set(CKA_VERIFY, false)
      .set(CKA_WRAP, false).set(CKA_UNWRAP, false).set(CKA_DERIVE, false);
  z.set_ulong(CKA_VALUE_LEN, static_cast<CK_ULONG>(z_bytes));
  CK_OBJECT_HANDLE hz = 0;
  CK_RV rv = l.fn()->C_DeriveKey(l.session(), &mech, priv, z.data(), z.size(), &hz);
  if (rv != CKR_OK) {
    if (is_connection_failure(rv)) l.check(rv, "C_DeriveKey");
    throw ImportRejected(std::string("the ephemeral public key is refused (C_DeriveKey: ") + rv_name(rv) + ")");
  }
  struct Destroy {
    SessionPool::Lease& l;
    CK_OBJECT_HANDLE h;
    ~Destroy() { l.fn()->C_DestroyObject(l.session(), h); }
  } destroy{l, hz};
  SecureBytes out((out_bytes + 31) / 32 * 32);
  for (uint32_t i = 1; (i - 1) * 32 < out_bytes; ++i) {
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    uint8_t counter[4] = {static_cast<uint8_t>(i >> 24), static_cast<uint8_t>(i >> 16), static_cast<uint8_t>(i >> 8),
                          static_cast<uint8_t>(i)};
    l.check(l.fn()->C_DigestInit(l.session(), &sha), "C_DigestInit");
    rv = l.fn()->C_DigestUpdate(l.session(), counter, 4);
    if (rv == CKR_OK) rv = l.fn()->C_DigestKey(l.session(), hz);
    if (rv == CKR_OK && !other_info.empty())
      rv = l.fn()->C_DigestUpdate(l.session(), const_cast<uint8_t*>(other_info.data()), other_info.size());
    CK_ULONG n = 32;
    if (rv == CKR_OK) rv = l.fn()->C_DigestFinal(l.session(), out.data() + (i - 1) * 32, &n);
    if (rv != CKR_OK) l.discard();
    l.check(rv, "C_DigestKey");
  }
  out.shrink(out_bytes);
  return out;
}

}  // namespace p11kms::hsm
