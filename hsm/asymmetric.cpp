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
  // Modifiable only so that SoftHSM will copy it (TokenOptions::session_copies).
  priv.set(CKA_TOKEN, true).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, options_.session_copies);
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

// -- Vault's secure import (BYOK) ------------------------------------------------------------

#include <openssl/ec.h>
#include <openssl/rsa.h>

#include "hsm/errors.hpp"

namespace p11kms::hsm {
namespace {

CK_RSA_PKCS_MGF_TYPE mgf_of(CK_MECHANISM_TYPE hash) {
  switch (hash) {
    case CKM_SHA224: return CKG_MGF1_SHA224;
    case CKM_SHA256: return CKG_MGF1_SHA256;
    case CKM_SHA384: return CKG_MGF1_SHA384;
    case CKM_SHA512: return CKG_MGF1_SHA512;
    default: return CKG_MGF1_SHA1;
  }
}

const EVP_MD* md_of(CK_MECHANISM_TYPE hash) {
  switch (hash) {
    case CKM_SHA224: return EVP_sha224();
    case CKM_SHA256: return EVP_sha256();
    case CKM_SHA384: return EVP_sha384();
    case CKM_SHA512: return EVP_sha512();
    default: return EVP_sha1();
  }
}

// A refusal of the caller's blob, unless the token itself is gone (then the pool reconnects).
[[noreturn]] void reject(SessionPool::Lease& l, CK_RV rv, const char* function, const std::string& what) {
  if (is_connection_failure(rv)) l.check(rv, function);
  throw ImportRejected(what + " (" + function + ": " + rv_name(rv) + ")");
}

struct GroupFree { void operator()(EC_GROUP* p) const { EC_GROUP_free(p); } };
struct PointFree { void operator()(EC_POINT* p) const { EC_POINT_free(p); } };
struct BnCtxFree { void operator()(BN_CTX* p) const { BN_CTX_free(p); } };

Bytes ecdsa_sign_raw(SessionPool::Lease& l, CK_OBJECT_HANDLE h, const Bytes& digest) {
  CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
  l.check(l.fn()->C_SignInit(l.session(), &mech, h), "C_SignInit");
  Bytes sig(132);
  CK_ULONG n = sig.size();
  CK_RV rv = l.fn()->C_Sign(l.session(), const_cast<uint8_t*>(digest.data()), digest.size(), sig.data(), &n);
  if (rv != CKR_OK) l.discard();
  l.check(rv, "C_Sign");
  sig.resize(n);
  return sig;
}

bool ecdsa_verifies(EVP_PKEY* pub, const Bytes& digest, const Bytes& raw) {
  size_t half = raw.size() / 2;
  Bn r = bn(Bytes(raw.begin(), raw.begin() + half)), s = bn(Bytes(raw.begin() + half, raw.end()));
  ECDSA_SIG* sig = ECDSA_SIG_new();
  if (!sig) return false;
  ECDSA_SIG_set0(sig, r.release(), s.release());
  unsigned char* der = nullptr;
  int der_len = i2d_ECDSA_SIG(sig, &der);
  ECDSA_SIG_free(sig);
  if (der_len <= 0) return false;
  std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx(EVP_PKEY_CTX_new(pub, nullptr));
  bool ok = ctx && EVP_PKEY_verify_init(ctx.get()) == 1 &&
            EVP_PKEY_verify(ctx.get(), der, static_cast<size_t>(der_len), digest.data(), digest.size()) == 1;
  OPENSSL_free(der);
  return ok;
}

// The public key of an EC private key object the token will not reveal a point for (an
// unwrapped key has only its scalar): recovered from one ECDSA signature (two candidates) and
// decided by a second signature. Only public values leave the token.
Bytes ec_public_of_private(SessionPool::Lease& l, CK_OBJECT_HANDLE h, PairKind kind) {
  std::unique_ptr<EC_GROUP, GroupFree> group(
      EC_GROUP_new_by_curve_name(kind == PairKind::ec_p384 ? NID_secp384r1 : NID_X9_62_prime256v1));
  std::unique_ptr<BN_CTX, BnCtxFree> ctx(BN_CTX_new());
  if (!group || !ctx) fail("out of memory");
  const BIGNUM* order = EC_GROUP_get0_order(group.get());
  Bytes e1(32, 0x5a), e2(32, 0xa5);
  Bytes sig1 = ecdsa_sign_raw(l, h, e1), sig2 = ecdsa_sign_raw(l, h, e2);
  size_t half = sig1.size() / 2;
  Bn r = bn(Bytes(sig1.begin(), sig1.begin() + half)), s = bn(Bytes(sig1.begin() + half, sig1.end()));
  Bn e = bn(e1), rinv(BN_new()), u1(BN_new()), u2(BN_new());
  if (!BN_mod_inverse(rinv.get(), r.get(), order, ctx.get())) fail("bad ECDSA signature from the token");
  BN_mod_mul(u2.get(), s.get(), rinv.get(), order, ctx.get());
  BN_mod_mul(u1.get(), e.get(), rinv.get(), order, ctx.get());
  BN_sub(u1.get(), order, u1.get());  // -e / r mod n
  for (int y_bit = 0; y_bit < 2; ++y_bit) {
    std::unique_ptr<EC_POINT, PointFree> R(EC_POINT_new(group.get())), Q(EC_POINT_new(group.get()));
    if (EC_POINT_set_compressed_coordinates(group.get(), R.get(), r.get(), y_bit, ctx.get()) != 1) continue;
    if (EC_POINT_mul(group.get(), Q.get(), u1.get(), R.get(), u2.get(), ctx.get()) != 1) continue;
    Bytes point(1 + 2 * ((EC_GROUP_get_degree(group.get()) + 7) / 8));
    if (EC_POINT_point2oct(group.get(), Q.get(), POINT_CONVERSION_UNCOMPRESSED, point.data(), point.size(), ctx.get()) !=
        point.size())
      continue;
    auto pub = ec_public(kind, point);
    if (ecdsa_verifies(pub.get(), e2, sig2)) return spki_of(pub.get());
  }
  fail("cannot recover the public key of the imported EC key");
}

}  // namespace

AttributeTemplate token_private_key_template(PairKind kind, const ObjectId& id, const std::string& label) {
  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_PRIVATE_KEY).set_ulong(CKA_KEY_TYPE, pair_key_type(kind));
  // No CKA_MODIFIABLE: SoftHSM's C_UnwrapKey refuses it (CKR_ATTRIBUTE_READ_ONLY, measured).
  t.set(CKA_TOKEN, true).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false);
  private_usages(t, kind);
  t.set_bytes(CKA_ID, id).set_string(CKA_LABEL, label);
  return t;
}

Bytes Token::generate_wrapping_key_pair(const ObjectId& id, const std::string& label, int bits) {
  PairSpec spec{PairKind::rsa, bits};
  AttributeTemplate pub, priv;
  public_template(pub, spec);
  priv.set_ulong(CKA_CLASS, CKO_PRIVATE_KEY).set_ulong(CKA_KEY_TYPE, CKK_RSA);
  priv.set(CKA_TOKEN, true).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, false);
  // CKA_UNWRAP for RSA-OAEP unwrapping; CKA_DECRYPT because SoftHSM's OAEP takes only SHA-1, so
  // other hashes need raw RSA (CKM_RSA_X_509, a C_Decrypt) in the token. Never CKA_SIGN.
  priv.set(CKA_UNWRAP, true).set(CKA_DECRYPT, true).set(CKA_SIGN, false).set(CKA_SIGN_RECOVER, false)
      .set(CKA_DERIVE, false);
  priv.set_bytes(CKA_ID, id).set_string(CKA_LABEL, label);
  CK_MECHANISM mech{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
  auto l = pool_.lease();
  CK_OBJECT_HANDLE hpub = 0, hpriv = 0;
  l.check(l.fn()->C_GenerateKeyPair(l.session(), &mech, pub.data(), pub.size(), priv.data(), priv.size(), &hpub, &hpriv),
          "C_GenerateKeyPair");
  ObjectGuard guard(l);
  guard.add(hpub);
  try {
    return public_spki(l, hpub, spec);
  } catch (...) {
    l.fn()->C_DestroyObject(l.session(), hpriv);
    throw;
  }
}

CK_OBJECT_HANDLE Token::open_ephemeral(SessionPool::Lease& l, const ObjectId& wrapping_key, const Bytes& rsa_part,
                                       CK_MECHANISM_TYPE oaep_hash) {
  CK_OBJECT_HANDLE priv = handle(l, wrapping_key);
  auto eph_template = [](const SecureBytes* value) {
    AttributeTemplate t;
    t.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, CKK_AES);
    t.set(CKA_TOKEN, false).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false);
    for (CK_ATTRIBUTE_TYPE usage : {CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE}) t.set(usage, false);
    t.set(CKA_UNWRAP, true);
    if (value) t.set_bytes(CKA_VALUE, value->data(), value->size());
    return t;
  };
  CK_RSA_PKCS_OAEP_PARAMS params{oaep_hash, mgf_of(oaep_hash), CKZ_DATA_SPECIFIED, nullptr, 0};
  CK_MECHANISM oaep{CKM_RSA_PKCS_OAEP, &params, sizeof params};
  auto t = eph_template(nullptr);
  CK_OBJECT_HANDLE eph = 0;
  CK_RV rv = l.fn()->C_UnwrapKey(l.session(), &oaep, priv, const_cast<uint8_t*>(rsa_part.data()), rsa_part.size(),
                                 t.data(), t.size(), &eph);
  if (rv == CKR_OK) return eph;
  if (rv != CKR_ARGUMENTS_BAD && rv != CKR_MECHANISM_PARAM_INVALID && rv != CKR_MECHANISM_INVALID)
    reject(l, rv, "C_UnwrapKey", "the RSA-OAEP part of the ciphertext does not open with the wrapping key");
  // The module's OAEP refuses this hash (SoftHSM 2.6.1: SHA-1 only). Raw RSA in the token, the
  // OAEP decoding here; the ephemeral key goes back into the token at once and is wiped.
  CK_MECHANISM raw{CKM_RSA_X_509, nullptr, 0};
  l.check(l.fn()->C_DecryptInit(l.session(), &raw, priv), "C_DecryptInit");
  SecureBytes block(rsa_part.size());
  CK_ULONG n = block.size();
  rv = l.fn()->C_Decrypt(l.session(), const_cast<uint8_t*>(rsa_part.data()), rsa_part.size(), block.data(), &n);
  if (rv != CKR_OK) {
    l.discard();
    reject(l, rv, "C_Decrypt", "the RSA-OAEP part of the ciphertext does not open with the wrapping key");
  }
  // Raw RSA drops leading zero bytes in some modules: put them back.
  SecureBytes em(rsa_part.size());
  std::copy(block.data(), block.data() + n, em.data() + (em.size() - n));
  SecureBytes key(em.size());
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
  int len = RSA_padding_check_PKCS1_OAEP_mgf1(key.data(), static_cast<int>(key.size()), em.data(),
                                              static_cast<int>(em.size()), static_cast<int>(em.size()), nullptr, 0,
                                              md_of(oaep_hash), md_of(oaep_hash));
#pragma GCC diagnostic pop
  if (len != 32)
    throw ImportRejected("the RSA-OAEP part of the ciphertext does not open with the wrapping key and hash_function, "
                         "or does not hold a 256-bit AES key");
  key.shrink(static_cast<size_t>(len));
  auto kt = eph_template(&key);
  key.wipe();
  l.check(l.fn()->C_CreateObject(l.session(), kt.data(), kt.size(), &eph), "C_CreateObject");
  return eph;
}

namespace {
// Splits Vault's import ciphertext at the wrapping key's modulus size.
std::pair<Bytes, Bytes> split_import(SessionPool::Lease& l, CK_OBJECT_HANDLE priv, const Bytes& blob) {
  size_t k = read_attr(l, priv, CKA_MODULUS).size();
  if (blob.size() <= k + 8)
    throw ImportRejected("the ciphertext is too short: it must be RSA-OAEP (" + std::to_string(k) +
                         " bytes) followed by the AES-KWP wrapped key");
  return {Bytes(blob.begin(), blob.begin() + k), Bytes(blob.begin() + k, blob.end())};
}
}  // namespace

ImportedObject Token::import_wrapped(const ObjectId& wrapping_key, const Bytes& blob, CK_MECHANISM_TYPE oaep_hash,
                                     AttributeTemplate& target, const PairSpec* kind, size_t aes_bytes) {
  auto l = pool_.lease();
  auto [rsa_part, kwp_part] = split_import(l, handle(l, wrapping_key), blob);
  // AES-KWP pads to 8 bytes and adds 8: an n-byte AES key wraps to exactly n + 8 bytes.
  if (aes_bytes != 0 && kwp_part.size() != aes_bytes + 8)
    throw ImportRejected("the wrapped key is not a " + std::to_string(aes_bytes) + "-byte AES key (its AES-KWP part is " +
                         std::to_string(kwp_part.size()) + " bytes, not " + std::to_string(aes_bytes + 8) + ")");
  if (!kind && aes_bytes == 0 && (kwp_part.size() < 24 || kwp_part.size() > 520))
    throw ImportRejected("the wrapped key is not 16 to 512 bytes");
  CK_OBJECT_HANDLE eph = open_ephemeral(l, wrapping_key, rsa_part, oaep_hash);
  ObjectGuard guard(l);
  guard.add(eph);
  CK_MECHANISM kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_OBJECT_HANDLE h = 0;
  CK_RV rv = l.fn()->C_UnwrapKey(l.session(), &kwp, eph, kwp_part.data(), kwp_part.size(), target.data(), target.size(), &h);
  if (rv != CKR_OK)
    reject(l, rv, "C_UnwrapKey",
           kind ? "the AES-KWP part of the ciphertext does not open, or is not a PKCS#8 private key of the declared type"
                : "the AES-KWP part of the ciphertext does not open with the ephemeral key");
  ImportedObject out;
  try {
    if (!kind && aes_bytes != 0) {
      // Within the KWP bound the only AES size is the declared one; a trial use in the token
      // refuses the other lengths (SoftHSM keeps any length as an AES key).
      CK_BBOOL can_encrypt = CK_FALSE;
      CK_ATTRIBUTE a{CKA_ENCRYPT, &can_encrypt, sizeof can_encrypt};
      l.check(l.fn()->C_GetAttributeValue(l.session(), h, &a, 1), "C_GetAttributeValue");
      CK_RV trial;
      if (can_encrypt) {
        CK_MECHANISM ecb{CKM_AES_ECB, nullptr, 0};
        uint8_t block[16] = {0}, out_block[16];
        CK_ULONG n = sizeof out_block;
        trial = l.fn()->C_EncryptInit(l.session(), &ecb, h);
        if (trial == CKR_OK) trial = l.fn()->C_Encrypt(l.session(), block, sizeof block, out_block, &n);
        if (trial != CKR_OK) l.discard();
      } else {  // a derivation key: one throwaway derivation
        uint8_t zero[16] = {0};
        CK_KEY_DERIVATION_STRING_DATA d{zero, sizeof zero};
        CK_MECHANISM m{CKM_AES_ECB_ENCRYPT_DATA, &d, sizeof d};
        AttributeTemplate dt;
        dt.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET).set_ulong(CKA_VALUE_LEN, 16);
        dt.set(CKA_TOKEN, false).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false);
        CK_OBJECT_HANDLE tmp = 0;
        trial = l.fn()->C_DeriveKey(l.session(), &m, h, dt.data(), dt.size(), &tmp);
        if (trial == CKR_OK) l.fn()->C_DestroyObject(l.session(), tmp);
      }
      if (is_connection_failure(trial)) l.check(trial, "C_EncryptInit");
      if (trial != CKR_OK)
        throw ImportRejected("the wrapped key is not a " + std::to_string(aes_bytes) + "-byte AES key (" + rv_name(trial) + ")");
      out.value_len = aes_bytes;
    } else if (!kind) {
      out.value_len = kwp_part.size() - 8;  // the material is 7 bytes shorter at most
    } else if (kind->kind == PairKind::rsa) {
      size_t bits = read_attr(l, h, CKA_MODULUS).size() * 8;
      if (bits != static_cast<size_t>(kind->rsa_bits))
        throw ImportRejected("the imported RSA key has a " + std::to_string(bits) + "-bit modulus, not " +
                             std::to_string(kind->rsa_bits));
      out.spki = public_spki(l, h, *kind);
    } else {
      if (read_attr(l, h, CKA_EC_PARAMS) != ec_oid(kind->kind))
        throw ImportRejected("the imported EC key is not on the declared curve");
      out.spki = ec_public_of_private(l, h, kind->kind);
    }
  } catch (const ImportRejected&) {
    l.fn()->C_DestroyObject(l.session(), h);
    throw;
  } catch (const std::invalid_argument& e) {
    l.fn()->C_DestroyObject(l.session(), h);
    throw ImportRejected(e.what());
  } catch (...) {
    l.fn()->C_DestroyObject(l.session(), h);
    throw;
  }
  return out;
}

SecureBytes Token::import_wrapped_material(const ObjectId& wrapping_key, const Bytes& blob, CK_MECHANISM_TYPE oaep_hash) {
  auto l = pool_.lease();
  auto [rsa_part, kwp_part] = split_import(l, handle(l, wrapping_key), blob);
  CK_OBJECT_HANDLE eph = open_ephemeral(l, wrapping_key, rsa_part, oaep_hash);
  ObjectGuard guard(l);
  guard.add(eph);
  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, CKK_GENERIC_SECRET);
  t.set(CKA_TOKEN, false).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, false).set(CKA_EXTRACTABLE, true);
  for (CK_ATTRIBUTE_TYPE usage : {CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE})
    t.set(usage, false);
  CK_MECHANISM kwp{CKM_AES_KEY_WRAP_PAD, nullptr, 0};
  CK_OBJECT_HANDLE h = 0;
  CK_RV rv = l.fn()->C_UnwrapKey(l.session(), &kwp, eph, kwp_part.data(), kwp_part.size(), t.data(), t.size(), &h);
  if (rv != CKR_OK) reject(l, rv, "C_UnwrapKey", "the AES-KWP part of the ciphertext does not open with the ephemeral key");
  guard.add(h);
  return read_secret_attr(l, h, CKA_VALUE);
}

}  // namespace p11kms::hsm
