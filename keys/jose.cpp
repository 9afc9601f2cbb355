#include "keys/jose.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/params.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <memory>

#include "common/encoding.hpp"
#include "keys/errors.hpp"

namespace p11kms::keys::jose {
namespace {

using json = nlohmann::json;

struct PkeyFree { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
struct CtxFree { void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); } };
struct BldFree { void operator()(OSSL_PARAM_BLD* p) const { OSSL_PARAM_BLD_free(p); } };
struct ParamFree { void operator()(OSSL_PARAM* p) const { OSSL_PARAM_free(p); } };
struct BnFree { void operator()(BIGNUM* p) const { BN_clear_free(p); } };
struct BioFree { void operator()(BIO* p) const { BIO_free(p); } };
struct P8Free { void operator()(PKCS8_PRIV_KEY_INFO* p) const { PKCS8_PRIV_KEY_INFO_free(p); } };
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;
using Bn = std::unique_ptr<BIGNUM, BnFree>;

[[noreturn]] void bad(const std::string& field, const std::string& message) {
  ERR_clear_error();
  throw invalid(message, "invalid_" + field);
}

struct Curve {
  const char* jwk;
  const char* group;
  size_t bytes;
};
const Curve kCurves[] = {{"P-256", "prime256v1", 32}, {"P-384", "secp384r1", 48}, {"P-521", "secp521r1", 66}};

const Curve* curve_by_jwk(const std::string& crv) {
  for (const auto& c : kCurves)
    if (crv == c.jwk) return &c;
  return nullptr;
}
const Curve* curve_by_group(const std::string& g) {
  for (const auto& c : kCurves)
    if (g == c.group || g == c.jwk) return &c;
  return nullptr;
}

std::string group_of(EVP_PKEY* key) {
  char group[64] = {0};
  size_t glen = 0;
  if (EVP_PKEY_get_utf8_string_param(key, OSSL_PKEY_PARAM_GROUP_NAME, group, sizeof group, &glen) != 1) return {};
  return std::string(group, glen);
}

hsm::Bytes spki_of(EVP_PKEY* key) {
  int n = i2d_PUBKEY(key, nullptr);
  if (n <= 0) throw KeyError(ErrorKind::internal, "internal", "cannot encode a public key");
  hsm::Bytes out(static_cast<size_t>(n));
  unsigned char* p = out.data();
  i2d_PUBKEY(key, &p);
  return out;
}

hsm::SecureBytes pkcs8_of(EVP_PKEY* key) {
  std::unique_ptr<PKCS8_PRIV_KEY_INFO, P8Free> p8(EVP_PKEY2PKCS8(key));
  int n = p8 ? i2d_PKCS8_PRIV_KEY_INFO(p8.get(), nullptr) : 0;
  if (n <= 0) throw KeyError(ErrorKind::internal, "internal", "cannot encode a private key");
  hsm::SecureBytes out(static_cast<size_t>(n));
  unsigned char* p = out.data();
  i2d_PKCS8_PRIV_KEY_INFO(p8.get(), &p);
  return out;
}

hsm::Bytes bn_bytes(EVP_PKEY* key, const char* name, size_t width = 0) {
  BIGNUM* raw = nullptr;
  if (EVP_PKEY_get_bn_param(key, name, &raw) != 1 || !raw)
    throw KeyError(ErrorKind::internal, "internal", std::string("the key has no ") + name);
  Bn b(raw);
  size_t n = static_cast<size_t>(BN_num_bytes(b.get()));
  hsm::Bytes out(width > n ? width : n);
  BN_bn2binpad(b.get(), out.data(), static_cast<int>(out.size()));
  return out;
}

// What the service supports: RSA 2048-4096, EC P-256/P-384/P-521, Ed25519.
void describe(EVP_PKEY* key, ParsedKey& out, const std::string& field) {
  int id = EVP_PKEY_get_base_id(key);
  if (id == EVP_PKEY_RSA) {
    out.kty = "RSA";
    out.bits = EVP_PKEY_get_bits(key);
    if (out.bits < 2048 || out.bits > 4096)
      bad(field, "RSA keys must have 2048 to 4096 bits (this one has " + std::to_string(out.bits) + ")");
  } else if (id == EVP_PKEY_EC) {
    out.kty = "EC";
    const Curve* c = curve_by_group(group_of(key));
    if (!c) bad(field, "unsupported EC curve: use P-256, P-384 or P-521");
    out.crv = c->jwk;
  } else if (id == EVP_PKEY_ED25519) {
    out.kty = "OKP";
    out.crv = "Ed25519";
  } else {
    bad(field, "unsupported key type: use RSA (2048 to 4096 bits), EC (P-256, P-384, P-521) or Ed25519");
  }
}

Pkey fromdata(const char* type, OSSL_PARAM_BLD* bld, int selection, const std::string& field) {
  std::unique_ptr<OSSL_PARAM, ParamFree> params(OSSL_PARAM_BLD_to_param(bld));
  std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx(EVP_PKEY_CTX_new_from_name(nullptr, type, nullptr));
  EVP_PKEY* key = nullptr;
  if (!params || !ctx || EVP_PKEY_fromdata_init(ctx.get()) != 1 ||
      EVP_PKEY_fromdata(ctx.get(), &key, selection, params.get()) != 1)
    bad(field, std::string("not a valid ") + type + " key");
  return Pkey(key);
}

bool pairwise_ok(EVP_PKEY* key) {
  std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  bool ok = ctx && EVP_PKEY_pairwise_check(ctx.get()) == 1;
  ERR_clear_error();
  return ok;
}

bool public_ok(EVP_PKEY* key) {
  std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx(EVP_PKEY_CTX_new_from_pkey(nullptr, key, nullptr));
  bool ok = ctx && EVP_PKEY_public_check(ctx.get()) == 1;
  ERR_clear_error();
  return ok;
}

std::string member(const json& j, const char* name, bool required) {
  auto it = j.find(name);
  if (it == j.end() || it->is_null()) {
    if (required) bad("jwk", std::string("missing member \"") + name + "\"");
    return {};
  }
  if (!it->is_string()) bad("jwk", std::string("member \"") + name + "\" must be a string");
  return it->get<std::string>();
}

hsm::SecureBytes decoded(const json& j, const char* name, size_t exact = 0) {
  std::string text = member(j, name, true);
  auto v = b64url_decode(text);
  OPENSSL_cleanse(text.data(), text.size());
  if (!v || v->empty()) bad("jwk", std::string("member \"") + name + "\" is not base64url");
  if (exact && v->size() != exact)
    bad("jwk", std::string("member \"") + name + "\" must be " + std::to_string(exact) + " bytes");
  return std::move(*v);
}

Bn secret_bn(const hsm::SecureBytes& v) {
  Bn b(BN_secure_new());
  if (!b || !BN_bin2bn(v.data(), static_cast<int>(v.size()), b.get()))
    throw KeyError(ErrorKind::internal, "internal", "out of memory");
  return b;
}

// Wipes the private members of a parsed JWK before it is released.
struct WipeJson {
  json& j;
  ~WipeJson() {
    if (!j.is_object()) return;
    for (const char* m : {"d", "p", "q", "dp", "dq", "qi", "k"}) {
      auto it = j.find(m);
      if (it != j.end() && it->is_string()) {
        auto& s = it->get_ref<std::string&>();
        if (!s.empty()) OPENSSL_cleanse(s.data(), s.size());
      }
    }
  }
};

int no_passphrase(char*, int, int, void*) { return 0; }

}  // namespace

std::string b64url(const uint8_t* p, size_t n) {
  std::string s = encoding::base64_encode(p, n);
  while (!s.empty() && s.back() == '=') s.pop_back();
  for (char& c : s) c = c == '+' ? '-' : c == '/' ? '_' : c;
  return s;
}

std::optional<hsm::SecureBytes> b64url_decode(const std::string& text) {
  if (text.size() % 4 == 1) return std::nullopt;
  std::string s(text);
  for (char& c : s) {
    if (c == '-') c = '+';
    else if (c == '_') c = '/';
    else if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) {
      OPENSSL_cleanse(s.data(), s.size());
      return std::nullopt;
    }
  }
  while (s.size() % 4) s.push_back('=');
  auto v = encoding::base64_decode(s);
  OPENSSL_cleanse(s.data(), s.size());
  if (!v) return std::nullopt;
  hsm::SecureBytes out(v->data(), v->size());
  if (!v->empty()) OPENSSL_cleanse(v->data(), v->size());
  return out;
}

ParsedKey parse_jwk(const std::string& text, const std::string& kid_field) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception&) {
    bad("jwk", "not a valid JSON Web Key (malformed JSON)");
  }
  WipeJson wipe{j};
  if (!j.is_object()) bad("jwk", "not a valid JSON Web Key (not a JSON object)");
  std::string kty = member(j, "kty", true);
  if (j.contains("kid") && !j["kid"].is_null()) {
    std::string kid = member(j, "kid", false);
    if (kid != kid_field) bad("kid", "the kid of the jwk (\"" + kid + "\") does not match the kid field");
  }
  ParsedKey out;
  out.alg = member(j, "alg", false);
  out.use = member(j, "use", false);
  bool priv = j.contains("d") && !j["d"].is_null();
  Pkey key;
  if (kty == "oct") {
    bad("jwk", "symmetric (oct) keys are not supported here: keys and key sets hold asymmetric keys");
  } else if (kty == "RSA") {
    hsm::SecureBytes n = decoded(j, "n"), e = decoded(j, "e");
    std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
    Bn bn_n = secret_bn(n), bn_e = secret_bn(e);
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_N, bn_n.get());
    OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_RSA_E, bn_e.get());
    std::vector<Bn> keep;
    if (priv) {
      for (const char* m : {"p", "q", "dp", "dq", "qi"})
        if (!j.contains(m)) bad("jwk", std::string("an RSA private JWK needs d, p, q, dp, dq and qi (missing ") + m + ")");
      const std::pair<const char*, const char*> parts[] = {{"d", OSSL_PKEY_PARAM_RSA_D},
                                                           {"p", OSSL_PKEY_PARAM_RSA_FACTOR1},
                                                           {"q", OSSL_PKEY_PARAM_RSA_FACTOR2},
                                                           {"dp", OSSL_PKEY_PARAM_RSA_EXPONENT1},
                                                           {"dq", OSSL_PKEY_PARAM_RSA_EXPONENT2},
                                                           {"qi", OSSL_PKEY_PARAM_RSA_COEFFICIENT1}};
      for (const auto& [m, name] : parts) {
        hsm::SecureBytes v = decoded(j, m);
        keep.push_back(secret_bn(v));
        OSSL_PARAM_BLD_push_BN(bld.get(), name, keep.back().get());
      }
    }
    key = fromdata("RSA", bld.get(), priv ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY, "jwk");
  } else if (kty == "EC") {
    std::string crv = member(j, "crv", true);
    const Curve* c = curve_by_jwk(crv);
    if (!c) bad("jwk", "unsupported curve \"" + crv + "\": use P-256, P-384 or P-521");
    hsm::SecureBytes x = decoded(j, "x", c->bytes), y = decoded(j, "y", c->bytes);
    hsm::Bytes point(1 + 2 * c->bytes);
    point[0] = 0x04;
    std::copy(x.data(), x.data() + x.size(), point.begin() + 1);
    std::copy(y.data(), y.data() + y.size(), point.begin() + 1 + c->bytes);
    std::unique_ptr<OSSL_PARAM_BLD, BldFree> bld(OSSL_PARAM_BLD_new());
    OSSL_PARAM_BLD_push_utf8_string(bld.get(), OSSL_PKEY_PARAM_GROUP_NAME, c->group, 0);
    OSSL_PARAM_BLD_push_octet_string(bld.get(), OSSL_PKEY_PARAM_PUB_KEY, point.data(), point.size());
    Bn d;
    if (priv) {
      hsm::SecureBytes dv = decoded(j, "d", c->bytes);
      d = secret_bn(dv);
      OSSL_PARAM_BLD_push_BN(bld.get(), OSSL_PKEY_PARAM_PRIV_KEY, d.get());
    }
    key = fromdata("EC", bld.get(), priv ? EVP_PKEY_KEYPAIR : EVP_PKEY_PUBLIC_KEY, "jwk");
    if (!public_ok(key.get())) bad("jwk", "the point (x, y) is not on curve " + crv);
  } else if (kty == "OKP") {
    std::string crv = member(j, "crv", true);
    if (crv != "Ed25519") bad("jwk", "unsupported curve \"" + crv + "\": OKP keys must be Ed25519");
    hsm::SecureBytes x = decoded(j, "x", 32);
    if (priv) {
      hsm::SecureBytes d = decoded(j, "d", 32);
      key.reset(EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, nullptr, d.data(), d.size()));
      if (!key) bad("jwk", "not a valid Ed25519 private key");
      hsm::Bytes pub(32);
      size_t n = pub.size();
      if (EVP_PKEY_get_raw_public_key(key.get(), pub.data(), &n) != 1 || n != 32 ||
          CRYPTO_memcmp(pub.data(), x.data(), 32) != 0)
        bad("jwk", "the private key (d) does not match the public key (x)");
    } else {
      key.reset(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr, x.data(), x.size()));
      if (!key) bad("jwk", "not a valid Ed25519 public key");
    }
  } else {
    bad("jwk", "unsupported key type (kty) \"" + kty + "\": use RSA, EC or OKP");
  }
  if (priv && kty != "OKP" && !pairwise_ok(key.get()))
    bad("jwk", "the private key does not match the public key");
  describe(key.get(), out, "jwk");
  out.spki = spki_of(key.get());
  out.public_jwk = jwk_of_spki(out.spki);
  if (priv) out.pkcs8 = pkcs8_of(key.get());
  ERR_clear_error();
  return out;
}

ParsedKey parse_pem(const std::optional<std::string>& public_pem, const hsm::SecretString* private_pem) {
  ParsedKey out;
  Pkey pub, priv;
  if (public_pem) {
    std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(public_pem->data(), static_cast<int>(public_pem->size())));
    pub.reset(bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, no_passphrase, nullptr) : nullptr);
    if (!pub) bad("pem.public_key", "not a PEM public key (-----BEGIN PUBLIC KEY-----)");
    describe(pub.get(), out, "pem.public_key");
  }
  if (private_pem) {
    const std::string& text = private_pem->reveal();
    std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
    priv.reset(bio ? PEM_read_bio_PrivateKey(bio.get(), nullptr, no_passphrase, nullptr) : nullptr);
    if (!priv) bad("pem.private_key", "not an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC 1)");
    describe(priv.get(), out, "pem.private_key");
    if (EVP_PKEY_get_base_id(priv.get()) != EVP_PKEY_ED25519 && !pairwise_ok(priv.get()))
      bad("pem.private_key", "the private key is not consistent");
    hsm::Bytes derived = spki_of(priv.get());
    if (pub && spki_of(pub.get()) != derived) bad("pem.private_key", "the private key does not match pem.public_key");
    out.pkcs8 = pkcs8_of(priv.get());
  }
  if (!pub && !priv) bad("pem", "give pem.public_key, pem.private_key or both");
  out.spki = spki_of(pub ? pub.get() : priv.get());
  out.public_jwk = jwk_of_spki(out.spki);
  ERR_clear_error();
  return out;
}

json jwk_of_spki(const hsm::Bytes& spki) {
  const unsigned char* p = spki.data();
  Pkey key(d2i_PUBKEY(nullptr, &p, static_cast<long>(spki.size())));
  if (!key) throw KeyError(ErrorKind::internal, "internal", "corrupt public key");
  json j = json::object();
  int id = EVP_PKEY_get_base_id(key.get());
  if (id == EVP_PKEY_RSA) {
    j["kty"] = "RSA";
    j["n"] = b64url(bn_bytes(key.get(), OSSL_PKEY_PARAM_RSA_N));
    j["e"] = b64url(bn_bytes(key.get(), OSSL_PKEY_PARAM_RSA_E));
  } else if (id == EVP_PKEY_EC) {
    const Curve* c = curve_by_group(group_of(key.get()));
    if (!c) throw KeyError(ErrorKind::internal, "internal", "unsupported curve in the store");
    j["kty"] = "EC";
    j["crv"] = c->jwk;
    j["x"] = b64url(bn_bytes(key.get(), OSSL_PKEY_PARAM_EC_PUB_X, c->bytes));
    j["y"] = b64url(bn_bytes(key.get(), OSSL_PKEY_PARAM_EC_PUB_Y, c->bytes));
  } else if (id == EVP_PKEY_ED25519) {
    hsm::Bytes raw(32);
    size_t n = raw.size();
    EVP_PKEY_get_raw_public_key(key.get(), raw.data(), &n);
    j["kty"] = "OKP";
    j["crv"] = "Ed25519";
    j["x"] = b64url(raw);
  }
  return j;
}

}  // namespace p11kms::keys::jose
