// RSA-OAEP decryption with a token-resident private key (the keyring's import key). The RSA
// private operation always runs in the token; only when the module refuses OAEP with the
// requested hash (SoftHSM 2.6.1: SHA-1 only, CKR_ARGUMENTS_BAD otherwise, for C_Decrypt as for
// C_UnwrapKey) is the OAEP *decoding* of the raw RSA result done here, with OpenSSL.
#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/rsa.h>

#include <openssl/bn.h>

#include <algorithm>
#include <memory>
#include <stdexcept>

#include "hsm/errors.hpp"
#include "hsm/token.hpp"

namespace p11kms::hsm {
namespace {

CK_RSA_PKCS_MGF_TYPE oaep_mgf(CK_MECHANISM_TYPE hash) {
  switch (hash) {
    case CKM_SHA224: return CKG_MGF1_SHA224;
    case CKM_SHA256: return CKG_MGF1_SHA256;
    case CKM_SHA384: return CKG_MGF1_SHA384;
    case CKM_SHA512: return CKG_MGF1_SHA512;
    default: return CKG_MGF1_SHA1;
  }
}

const EVP_MD* oaep_md(CK_MECHANISM_TYPE hash) {
  switch (hash) {
    case CKM_SHA224: return EVP_sha224();
    case CKM_SHA256: return EVP_sha256();
    case CKM_SHA384: return EVP_sha384();
    case CKM_SHA512: return EVP_sha512();
    default: return EVP_sha1();
  }
}

[[noreturn]] void refuse(SessionPool::Lease& l, CK_RV rv, const char* function) {
  if (is_connection_failure(rv)) l.check(rv, function);
  throw ImportRejected(std::string("the RSA-OAEP part does not open with this instance's key (") + function + ": " +
                       rv_name(rv) + ")");
}

}  // namespace

Bytes Token::import_rsa_decryption_key(const ObjectId& id, const std::string& label, const SecretString& pem) {
  const std::string& text = pem.reveal();
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())), BIO_free);
  std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)> key(
      bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr) : nullptr, EVP_PKEY_free);
  if (!key) throw std::invalid_argument("the file is not a PEM private key (unencrypted PKCS#8 or PKCS#1)");
  if (EVP_PKEY_get_base_id(key.get()) != EVP_PKEY_RSA || EVP_PKEY_get_bits(key.get()) < 2048)
    throw std::invalid_argument("the key is not an RSA key of at least 2048 bits");
  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_PRIVATE_KEY).set_ulong(CKA_KEY_TYPE, CKK_RSA);
  t.set(CKA_TOKEN, true).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, false);
  t.set(CKA_DECRYPT, true).set(CKA_UNWRAP, true).set(CKA_SIGN, false).set(CKA_SIGN_RECOVER, false)
      .set(CKA_DERIVE, false);
  t.set_bytes(CKA_ID, id).set_string(CKA_LABEL, label);
  const std::pair<CK_ATTRIBUTE_TYPE, const char*> parts[] = {
      {CKA_MODULUS, OSSL_PKEY_PARAM_RSA_N},           {CKA_PUBLIC_EXPONENT, OSSL_PKEY_PARAM_RSA_E},
      {CKA_PRIVATE_EXPONENT, OSSL_PKEY_PARAM_RSA_D},  {CKA_PRIME_1, OSSL_PKEY_PARAM_RSA_FACTOR1},
      {CKA_PRIME_2, OSSL_PKEY_PARAM_RSA_FACTOR2},     {CKA_EXPONENT_1, OSSL_PKEY_PARAM_RSA_EXPONENT1},
      {CKA_EXPONENT_2, OSSL_PKEY_PARAM_RSA_EXPONENT2}, {CKA_COEFFICIENT, OSSL_PKEY_PARAM_RSA_COEFFICIENT1}};
  for (const auto& [attr, name] : parts) {
    BIGNUM* bn = nullptr;
    if (EVP_PKEY_get_bn_param(key.get(), name, &bn) != 1 || !bn)
      throw std::invalid_argument("the RSA key lacks its CRT parameters");
    Bytes v(static_cast<size_t>(BN_num_bytes(bn)));
    BN_bn2bin(bn, v.data());
    BN_clear_free(bn);
    t.set_bytes(attr, v);  // the template wipes its copy
    OPENSSL_cleanse(v.data(), v.size());
  }
  int n = i2d_PUBKEY(key.get(), nullptr);
  Bytes spki(n > 0 ? static_cast<size_t>(n) : 0);
  uint8_t* p = spki.data();
  if (n <= 0 || i2d_PUBKEY(key.get(), &p) != n) throw std::invalid_argument("cannot encode the RSA public key");
  auto l = pool_.lease();
  CK_OBJECT_HANDLE h = 0;
  l.check(l.fn()->C_CreateObject(l.session(), t.data(), t.size(), &h), "C_CreateObject");
  return spki;
}

size_t Token::rsa_modulus_bytes(const ObjectId& private_key) {
  auto l = pool_.lease();
  CK_OBJECT_HANDLE priv = handle(l, private_key);
  CK_ATTRIBUTE a{CKA_MODULUS, nullptr, 0};
  l.check(l.fn()->C_GetAttributeValue(l.session(), priv, &a, 1), "C_GetAttributeValue");
  return a.ulValueLen;
}

SecureBytes Token::rsa_oaep_decrypt(const ObjectId& private_key, const Bytes& ciphertext, CK_MECHANISM_TYPE oaep_hash,
                                    bool* module_oaep) {
  auto l = pool_.lease();
  CK_OBJECT_HANDLE priv = handle(l, private_key);
  CK_RSA_PKCS_OAEP_PARAMS params{oaep_hash, oaep_mgf(oaep_hash), CKZ_DATA_SPECIFIED, nullptr, 0};
  CK_MECHANISM oaep{CKM_RSA_PKCS_OAEP, &params, sizeof params};
  CK_RV rv = l.fn()->C_DecryptInit(l.session(), &oaep, priv);
  if (rv == CKR_OK) {
    SecureBytes out(ciphertext.size());
    CK_ULONG n = out.size();
    rv = l.fn()->C_Decrypt(l.session(), const_cast<uint8_t*>(ciphertext.data()), ciphertext.size(), out.data(), &n);
    if (rv != CKR_OK) {
      l.discard();
      refuse(l, rv, "C_Decrypt");
    }
    out.shrink(n);
    if (module_oaep) *module_oaep = true;
    return out;
  }
  if (rv != CKR_ARGUMENTS_BAD && rv != CKR_MECHANISM_PARAM_INVALID && rv != CKR_MECHANISM_INVALID)
    refuse(l, rv, "C_DecryptInit");
  // The module's OAEP refuses this hash: raw RSA in the token, the OAEP decoding here.
  CK_MECHANISM raw{CKM_RSA_X_509, nullptr, 0};
  l.check(l.fn()->C_DecryptInit(l.session(), &raw, priv), "C_DecryptInit");
  SecureBytes block(ciphertext.size());
  CK_ULONG n = block.size();
  rv = l.fn()->C_Decrypt(l.session(), const_cast<uint8_t*>(ciphertext.data()), ciphertext.size(), block.data(), &n);
  if (rv != CKR_OK) {
    l.discard();
    refuse(l, rv, "C_Decrypt");
  }
  // Raw RSA drops leading zero bytes in some modules: put them back.
  SecureBytes em(ciphertext.size());
  std::copy(block.data(), block.data() + std::min<size_t>(n, em.size()), em.data() + (em.size() - std::min<size_t>(n, em.size())));
  SecureBytes out(em.size());
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  int len = RSA_padding_check_PKCS1_OAEP_mgf1(out.data(), static_cast<int>(out.size()), em.data(),
                                              static_cast<int>(em.size()), static_cast<int>(em.size()), nullptr, 0,
                                              oaep_md(oaep_hash), oaep_md(oaep_hash));
#pragma GCC diagnostic pop
  if (len < 0) throw ImportRejected("the RSA-OAEP part does not open with this instance's key (OAEP decoding failed)");
  out.shrink(static_cast<size_t>(len));
  if (module_oaep) *module_oaep = false;
  return out;
}

}  // namespace p11kms::hsm
