// Key pairs in the token (generation, signing) and the conversions between PKCS#11 attributes
// and the DER forms the store and clients see (SubjectPublicKeyInfo, PKCS#8).
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/params.h>
#include <openssl/x509.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "hsm/token.hpp"

namespace p11kms::hsm {
namespace {

// DER OIDs for CKA_EC_PARAMS: prime256v1, secp384r1, id-Ed25519.
const Bytes kP256Oid = {0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07};
const Bytes kP384Oid = {0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22};
const Bytes kEd25519Oid = {0x06, 0x03, 0x2B, 0x65, 0x70};

struct PkeyFree { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
struct CtxFree { void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); } };
struct BldFree { void operator()(OSSL_PARAM_BLD* p) const { OSSL_PARAM_BLD_free(p); } };
struct ParamFree { void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); } };
struct BnFree { void operator()(BIGNUM* p) const { BN_clear_free(p); } };
struct P8Free { void operator()(PKCS8_PRIV_KEY_INFO* p) const { PKCS8_PRIV_KEY_INFO_free(p); } };
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using Bn = std::unique_ptr<BIGNUM, BnFree>;

[[noreturn]] void fail(const std::string& what) { throw std::invalid_argument(what); }

const char* group_name(PairKind k) { return k == PairKind::ec_p384 ? "P-384" : "P-256"; }
const Bytes& ec_oid(PairKind k) {
  return k == PairKind::ec_p384 ? kP384Oid : k == PairKind::ed25519 ? kEd25519Oid : kP256Oid;
}

// CKA_EC_POINT is a DER OCTET STRING (SoftHSM) or, in some modules, the raw point.
Bytes unwrap_point(const Bytes& v, size_t raw_len) {
  if (v.size() == raw_len) return v;
  if (v.size() == raw_len + 2 && v[0] == 0x04 && v[1] == raw_len) return Bytes(v.begin() + 2, v.end());
  if (v.size() == raw_len + 3 && v[0] == 0x04 && v[1] == 0x81 && v[2] == raw_len) return Bytes(v.begin() + 3, v.end());
  fail("unexpected CKA_EC_POINT encoding");
}

Bytes spki_of(EVP_PKEY* key) {
  int n = i2d_PUBKEY(key, nullptr);
  if (n <= 0) fail("cannot encode the public key");
  Bytes out(static_cast<size_t>(n));
  unsigned char* p = out.data();
  i2d_PUBKEY(key, &p);
  return out;
}

Pkey from_params(const char* type, OSSL_PARAM_BLD* bld, int selection) {
  std::unique_ptr<OSSL_PARAM, ParamFree> params(OSSL_PARAM_BLD_to_param(bld));
  std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* key = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &key, selection, params.get()) != 1)
    fail(std::string("cannot build a ") + type + " key");
  return Pkey(key);
}

Pkey ec_public(PairKind kind, const Bytes& point) {
  std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
  OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group_name(kind), 0);
  OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
  return from_params("EC", bld.get(), EVP_PKEY_PUBLIC_KEY);
}

Bn bn(const Bytes& big_endian) { return Bn(BN_bin2bn(big_endian.data(), static_cast<int>(big_endian.size()), nullptr)); }

SecureBytes pkcs8_of(EVP_PKEY* key) {
  std::unique_ptr<PKCS8_PRIV_KEY_INFO, P8Free> p8(EVP_PKEY2PKCS8(key));
  if (!p8) fail("cannot encode the private key");
  int n = i2d_PKCS8_PRIV_KEY_INFO(p8.get(), nullptr);
  if (n <= 0) fail("cannot encode the private key");
  SecureBytes out(static_cast<size_t>(n));
  unsigned char* p = out.data();
  i2d_PKCS8_PRIV_KEY_INFO(p8.get(), &p);
  return out;
}

Pkey parse_pkcs8(const SecureBytes& der) {
  const unsigned char* p = der.data();
  std::unique_ptr<PKCS8_PRIV_KEY_INFO, P8Free> p8(d2i_PKCS8_PRIV_KEY_INFO(nullptr, &p, static_cast<long>(der.size())));
  if (!p8 || p != der.data() + der.size()) fail("the key material is not PKCS#8 DER");
  Pkey key(EVP_PKCS82PKEY(p8.get()));
  if (!key) fail("the key material is not a private key OpenSSL can read");
  return key;
}

Bytes bn_param(EVP_PKEY* key, const char* name) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(key, name, &raw) != 1) fail(std::string("the key has no ") + name);
  Bn b(raw);
  Bytes out(static_cast<size_t>(BN_num_bytes(b.get())));
  BN_bn2bin(b.get(), out.data());
  return out;
}

Bytes read_attr(SessionPool::Lease& l, CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE a{type, nullptr, 0};
  l.check(l.fn()->C_GetAttributeValue(l.session(), h, &a, 1), "C_GetAttributeValue");
  Bytes out(a.ulValueLen);
  a.pValue = out.data();
  l.check(l.fn()->C_GetAttributeValue(l.session(), h, &a, 1), "C_GetAttributeValue");
  out.resize(a.ulValueLen);
  return out;
}

SecureBytes read_secret_attr(SessionPool::Lease& l, CK_OBJECT_HANDLE h, CK_ATTRIBUTE_TYPE type) {
  CK_ATTRIBUTE a{type, nullptr, 0};
  l.check(l.fn()->C_GetAttributeValue(l.session(), h, &a, 1), "C_GetAttributeValue");
  SecureBytes out(a.ulValueLen);
  a.pValue = out.data();
  l.check(l.fn()->C_GetAttributeValue(l.session(), h, &a, 1), "C_GetAttributeValue");
  out.shrink(a.ulValueLen);
  return out;
}

Bn secret_bn(const SecureBytes& v) {
  Bn b(BN_secure_new());
  if (!b || !BN_bin2bn(v.data(), static_cast<int>(v.size()), b.get())) fail("out of memory");
  return b;
}

Bytes public_spki(SessionPool::Lease& l, CK_OBJECT_HANDLE pub, const PairSpec& spec) {
  switch (spec.kind) {
    case PairKind::ec_p256:
    case PairKind::ec_p384: {
      size_t raw = spec.kind == PairKind::ec_p384 ? 97 : 65;
      auto key = ec_public(spec.kind, unwrap_point(read_attr(l, pub, CKA_EC_POINT), raw));
      return spki_of(key.get());
    }
    case PairKind::ed25519: {
      auto point = unwrap_point(read_attr(l, pub, CKA_EC_POINT), 32);
      Pkey key(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, point.data(), point.size()));
      if (!key) fail("cannot build the Ed25519 public key");
      return spki_of(key.get());
    }
    case PairKind::rsa: {
      auto n = bn(read_attr(l, pub, CKA_MODULUS)), e = bn(read_attr(l, pub, CKA_PUBLIC_EXPONENT));
      std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, n.get());
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, e.get());
      auto key = from_params("RSA", bld.get(), EVP_PKEY_PUBLIC_KEY);
      return spki_of(key.get());
    }
  }
  fail("unknown key pair kind");
}

CK_MECHANISM_TYPE pair_mechanism(PairKind k) {
  return k == PairKind::rsa ? CKM_RSA_PKCS_KEY_PAIR_GEN
         : k == PairKind::ed25519 ? CKM_EC_EDWARDS_KEY_PAIR_GEN : CKM_EC_KEY_PAIR_GEN;
}

CK_KEY_TYPE pair_key_type(PairKind k) {
  return k == PairKind::rsa ? CKK_RSA : k == PairKind::ed25519 ? CKK_EC_EDWARDS : CKK_EC;
}

void public_template(AttributeTemplate& t, const PairSpec& spec) {
  t.set_ulong(CKA_CLASS, CKO_PUBLIC_KEY).set_ulong(CKA_KEY_TYPE, pair_key_type(spec.kind));
  t.set(CKA_TOKEN, false).set(CKA_PRIVATE, false).set(CKA_VERIFY, true).set(CKA_ENCRYPT, false)
      .set(CKA_WRAP, false).set(CKA_DERIVE, false);
  if (spec.kind == PairKind::rsa) {
    t.set(CKA_VERIFY_RECOVER, false);
    t.set_ulong(CKA_MODULUS_BITS, static_cast<CK_ULONG>(spec.rsa_bits));
    t.set_bytes(CKA_PUBLIC_EXPONENT, Bytes{0x01, 0x00, 0x01});
  } else {
    t.set_bytes(CKA_EC_PARAMS, ec_oid(spec.kind));
  }
}

// Usage booleans of every private key: CKA_SIGN only.
void private_usages(AttributeTemplate& t, PairKind kind) {
  t.set(CKA_SIGN, true).set(CKA_DECRYPT, false).set(CKA_UNWRAP, false).set(CKA_DERIVE, false);
  if (kind == PairKind::rsa) t.set(CKA_SIGN_RECOVER, false);
}

class ObjectGuard {  // destroys session objects on every path out
 public:
  explicit ObjectGuard(SessionPool::Lease& l) : l_(l) {}
  ~ObjectGuard() {
    for (auto h : handles_) l_.fn()->C_DestroyObject(l_.session(), h);
  }
  void add(CK_OBJECT_HANDLE h) { handles_.push_back(h); }
 private:
  SessionPool::Lease& l_;
  std::vector<CK_OBJECT_HANDLE> handles_;
};

}  // namespace

Bytes Token::generate_key_pair(const PairSpec& spec, const ObjectId& id, const std::string& label) {
  AttributeTemplate pub, priv;
  public_template(pub, spec);
  priv.set_ulong(CKA_CLASS, CKO_PRIVATE_KEY).set_ulong(CKA_KEY_TYPE, pair_key_type(spec.kind));
  priv.set(CKA_TOKEN, true).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, false);
  private_usages(priv, spec.kind);
  priv.set_bytes(CKA_ID, id).set_string(CKA_LABEL, label);
  CK_MECHANISM mech{pair_mechanism(spec.kind), nullptr, 0};
  auto l = pool_.lease();
  CK_OBJECT_HANDLE hpub = 0, hpriv = 0;
  l.check(l.fn()->C_GenerateKeyPair(l.session(), &mech, pub.data(), pub.size(), priv.data(), priv.size(), &hpub, &hpriv),
          "C_GenerateKeyPair");
  ObjectGuard guard(l);
  guard.add(hpub);
  Bytes spki;
  try {
    spki = public_spki(l, hpub, spec);
  } catch (...) {
    l.fn()->C_DestroyObject(l.session(), hpriv);
    throw;
  }
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (cache_generation_ == l.generation()) cache_[std::string(id.begin(), id.end())] = hpriv;
  return spki;
}

ExportablePair Token::generate_exportable_key_pair(const PairSpec& spec) {
  AttributeTemplate pub, priv;
  public_template(pub, spec);
  priv.set_ulong(CKA_CLASS, CKO_PRIVATE_KEY).set_ulong(CKA_KEY_TYPE, pair_key_type(spec.kind));
  priv.set(CKA_TOKEN, false).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, false).set(CKA_EXTRACTABLE, true);
  private_usages(priv, spec.kind);
  CK_MECHANISM mech{pair_mechanism(spec.kind), nullptr, 0};
  auto l = pool_.lease();
  CK_OBJECT_HANDLE hpub = 0, hpriv = 0;
  l.check(l.fn()->C_GenerateKeyPair(l.session(), &mech, pub.data(), pub.size(), priv.data(), priv.size(), &hpub, &hpriv),
          "C_GenerateKeyPair");
  ObjectGuard guard(l);
  guard.add(hpub);
  guard.add(hpriv);
  ExportablePair out;
  out.spki = public_spki(l, hpub, spec);
  Pkey key;
  switch (spec.kind) {
    case PairKind::ec_p256:
    case PairKind::ec_p384: {
      size_t raw = spec.kind == PairKind::ec_p384 ? 97 : 65;
      auto point = unwrap_point(read_attr(l, hpub, CKA_EC_POINT), raw);
      auto d = read_secret_attr(l, hpriv, CKA_VALUE);
      Bn dbn = secret_bn(d);
      std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
      OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, group_name(spec.kind), 0);
      OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, dbn.get());
      key = from_params("EC", bld.get(), EVP_PKEY_KEYPAIR);
      break;
    }
    case PairKind::ed25519: {
      auto seed = read_secret_attr(l, hpriv, CKA_VALUE);
      key.reset(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, seed.data(), seed.size()));
      if (!key) fail("cannot build the Ed25519 private key");
      break;
    }
    case PairKind::rsa: {
      std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
      std::vector<Bn> keep;
      const std::pair<CK_ATTRIBUTE_TYPE, const char*> parts[] = {
          {CKA_MODULUS, OSSL_PKEY_PARAM_RSA_N},           {CKA_PUBLIC_EXPONENT, OSSL_PKEY_PARAM_RSA_E},
          {CKA_PRIVATE_EXPONENT, OSSL_PKEY_PARAM_RSA_D},  {CKA_PRIME_1, OSSL_PKEY_PARAM_RSA_FACTOR1},
          {CKA_PRIME_2, OSSL_PKEY_PARAM_RSA_FACTOR2},     {CKA_EXPONENT_1, OSSL_PKEY_PARAM_RSA_EXPONENT1},
          {CKA_EXPONENT_2, OSSL_PKEY_PARAM_RSA_EXPONENT2}, {CKA_COEFFICIENT, OSSL_PKEY_PARAM_RSA_COEFFICIENT1}};
      for (const auto& [attr, name] : parts) {
        auto v = read_secret_attr(l, hpriv, attr);
        keep.push_back(secret_bn(v));
        OSSL_PARAM_BLD_push_BN(bld.get(), name, keep.back().get());
      }
      key = from_params("RSA", bld.get(), EVP_PKEY_KEYPAIR);
      break;
    }
  }
  out.pkcs8 = pkcs8_of(key.get());
  return out;
}

AttributeTemplate session_secret_template(CK_KEY_TYPE type, const SecureBytes& value,
                                          std::initializer_list<CK_ATTRIBUTE_TYPE> usages) {
  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, type);
  t.set(CKA_TOKEN, false).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, false);
  for (CK_ATTRIBUTE_TYPE usage : {CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE}) {
    bool on = std::find(usages.begin(), usages.end(), usage) != usages.end();
    t.set(usage, on);
  }
  t.set_bytes(CKA_VALUE, value.data(), value.size());
  return t;
}

AttributeTemplate session_private_key_template(const SecureBytes& pkcs8) {
  Pkey key = parse_pkcs8(pkcs8);
  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_PRIVATE_KEY);
  t.set(CKA_TOKEN, false).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, false);
  int id = EVP_PKEY_get_base_id(key.get());
  if (id == EVP_PKEY_ED25519) {
    t.set_ulong(CKA_KEY_TYPE, CKK_EC_EDWARDS);
    private_usages(t, PairKind::ed25519);
    t.set_bytes(CKA_EC_PARAMS, kEd25519Oid);
    SecureBytes seed(32);
    size_t n = seed.size();
    if (EVP_PKEY_get_raw_private_key(key.get(), seed.data(), &n) != 1 || n != 32) fail("bad Ed25519 key");
    t.set_bytes(CKA_VALUE, seed.data(), n);
  } else if (id == EVP_PKEY_EC) {
    char group[64] = {0};
    size_t glen = 0;
    if (EVP_PKEY_get_utf8_string_param(key.get(), OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &glen) != 1)
      fail("the EC key names no curve");
    std::string g(group, glen);
    PairKind kind = (g == "P-256" || g == "prime256v1") ? PairKind::ec_p256
                    : (g == "P-384" || g == "secp384r1") ? PairKind::ec_p384
                                                         : (fail("unsupported EC curve " + g), PairKind::ec_p256);
    t.set_ulong(CKA_KEY_TYPE, CKK_EC);
    private_usages(t, kind);
    t.set_bytes(CKA_EC_PARAMS, ec_oid(kind));
    Bytes d = bn_param(key.get(), OSSL_PKEY_PARAM_PRIV_KEY);
    t.set_bytes(CKA_VALUE, d);
    OPENSSL_cleanse(d.data(), d.size());
  } else if (id == EVP_PKEY_RSA) {
    t.set_ulong(CKA_KEY_TYPE, CKK_RSA);
    private_usages(t, PairKind::rsa);
    const std::pair<CK_ATTRIBUTE_TYPE, const char*> parts[] = {
        {CKA_MODULUS, OSSL_PKEY_PARAM_RSA_N},           {CKA_PUBLIC_EXPONENT, OSSL_PKEY_PARAM_RSA_E},
        {CKA_PRIVATE_EXPONENT, OSSL_PKEY_PARAM_RSA_D},  {CKA_PRIME_1, OSSL_PKEY_PARAM_RSA_FACTOR1},
        {CKA_PRIME_2, OSSL_PKEY_PARAM_RSA_FACTOR2},     {CKA_EXPONENT_1, OSSL_PKEY_PARAM_RSA_EXPONENT1},
        {CKA_EXPONENT_2, OSSL_PKEY_PARAM_RSA_EXPONENT2}, {CKA_COEFFICIENT, OSSL_PKEY_PARAM_RSA_COEFFICIENT1}};
    for (const auto& [attr, name] : parts) {
      Bytes v = bn_param(key.get(), name);
      t.set_bytes(attr, v);
      OPENSSL_cleanse(v.data(), v.size());
    }
  } else {
    fail("unsupported private key type");
  }
  return t;
}

Bytes public_key_of_pkcs8(const SecureBytes& pkcs8) {
  Pkey key = parse_pkcs8(pkcs8);
  return spki_of(key.get());
}

}  // namespace p11kms::hsm
