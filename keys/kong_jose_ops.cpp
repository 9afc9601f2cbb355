// What Kong does not have: the JWK Set of a key set, JWS signing and JWE decryption, with the
// private key's operation (signature, RSA decryption, ECDH + Concat KDF) in the token.
#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <nlohmann/json.hpp>

#include "common/encoding.hpp"
#include "common/json_text.hpp"
#include "keys/errors.hpp"
#include "keys/jose.hpp"
#include "keys/kong_keys.hpp"
#include "keys/signing.hpp"

namespace p11kms::keys {
namespace {

using json = nlohmann::json;
using json_text::dump;

struct CipherCtxFree { void operator()(EVP_CIPHER_CTX* p) const { EVP_CIPHER_CTX_free(p); } };

KeyError bad_jwe(const std::string& why) { return invalid("the JWE does not decrypt: " + why, "invalid_jwe"); }

std::string default_alg(const KongKey& k) {
  if (!k.alg.empty()) return k.alg;
  if (k.kty == "RSA") return "RS256";
  if (k.kty == "OKP") return "EdDSA";
  if (k.crv == "P-384") return "ES384";
  if (k.crv == "P-521") return "ES512";
  return "ES256";
}

// The hash name (signing.hpp) and mechanism of a JWS alg for this key; 400 when the key cannot make it.
struct JwsAlg {
  std::string hash;
  CK_MECHANISM_TYPE mech = 0;
  bool pss = false, pkcs1 = false;
};
JwsAlg jws_alg(const KongKey& k, const std::string& alg) {
  auto hash_of = [](const std::string& bits) { return "sha2-" + bits; };
  auto refuse = [&]() -> KeyError {
    return invalid("key \"" + k.name + "\" (" + k.kty + (k.crv.empty() ? "" : " " + k.crv) + ") cannot make alg \"" +
                       alg + "\"",
                   "invalid_alg");
  };
  JwsAlg a;
  if ((alg == "RS256" || alg == "RS384" || alg == "RS512" || alg == "PS256" || alg == "PS384" || alg == "PS512")) {
    if (k.kty != "RSA") throw refuse();
    a.hash = hash_of(alg.substr(2));
    a.pss = alg[0] == 'P';
    a.pkcs1 = !a.pss;
    a.mech = a.pss ? CKM_RSA_PKCS_PSS : CKM_RSA_PKCS;
  } else if (alg == "ES256" || alg == "ES384" || alg == "ES512") {
    const char* crv = alg == "ES256" ? "P-256" : alg == "ES384" ? "P-384" : "P-521";
    if (k.kty != "EC" || k.crv != crv) throw refuse();
    a.hash = hash_of(alg.substr(2));
    a.mech = CKM_ECDSA;
  } else if (alg == "EdDSA") {
    if (k.kty != "OKP") throw refuse();
    a.mech = CKM_EDDSA;
  } else {
    throw invalid("unsupported alg \"" + alg + "\": use RS256/384/512, PS256/384/512, ES256/384/512 or EdDSA",
                  "invalid_alg");
  }
  return a;
}

std::vector<std::string> split_compact(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  while (true) {
    size_t dot = s.find('.', start);
    parts.push_back(s.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return parts;
}

void put_len_prefixed(hsm::Bytes& out, const uint8_t* p, size_t n) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(n >> shift));
  out.insert(out.end(), p, p + n);
}

hsm::Bytes header_bytes(const json& h, const char* name) {
  auto it = h.find(name);
  if (it == h.end()) return {};
  if (!it->is_string()) throw bad_jwe(std::string(name) + " must be a base64url string");
  auto v = jose::b64url_decode(it->get<std::string>());
  if (!v) throw bad_jwe(std::string(name) + " is not base64url");
  return hsm::Bytes(v->data(), v->data() + v->size());
}

std::optional<hsm::SecureBytes> aes_key_unwrap(const hsm::SecureBytes& kek, const hsm::Bytes& wrapped) {
  const EVP_CIPHER* c = kek.size() == 16 ? EVP_aes_128_wrap() : kek.size() == 24 ? EVP_aes_192_wrap() : EVP_aes_256_wrap();
  if (wrapped.size() < 24 || wrapped.size() % 8) return std::nullopt;
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  hsm::SecureBytes out(wrapped.size());
  int n = 0, m = 0;
  if (!ctx || EVP_DecryptInit_ex(ctx.get(), c, nullptr, kek.data(), nullptr) != 1 ||
      EVP_DecryptUpdate(ctx.get(), out.data(), &n, wrapped.data(), static_cast<int>(wrapped.size())) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), out.data() + n, &m) != 1)
    return std::nullopt;
  out.shrink(static_cast<size_t>(n + m));
  return out;
}

std::optional<hsm::SecureBytes> aes_gcm_open(const hsm::SecureBytes& key, const hsm::Bytes& iv, const std::string& aad,
                                             const hsm::Bytes& ct, const hsm::Bytes& tag) {
  const EVP_CIPHER* c = key.size() == 16 ? EVP_aes_128_gcm() : key.size() == 24 ? EVP_aes_192_gcm() : EVP_aes_256_gcm();
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  hsm::SecureBytes out(ct.size() + 16);
  int n = 0, m = 0;
  if (!ctx || EVP_DecryptInit_ex(ctx.get(), c, nullptr, nullptr, nullptr) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(iv.size()), nullptr) != 1 ||
      EVP_DecryptInit_ex(ctx.get(), nullptr, nullptr, key.data(), iv.data()) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &n, reinterpret_cast<const uint8_t*>(aad.data()), static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), out.data(), &n, ct.data(), static_cast<int>(ct.size())) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, 16, const_cast<uint8_t*>(tag.data())) != 1 ||
      EVP_DecryptFinal_ex(ctx.get(), out.data() + n, &m) != 1)
    return std::nullopt;
  out.shrink(static_cast<size_t>(n + m));
  return out;
}

hsm::Bytes part_bytes(const std::string& s, const char* what) {
  auto v = jose::b64url_decode(s);
  if (!v) throw bad_jwe(std::string(what) + " is not base64url");
  return hsm::Bytes(v->data(), v->data() + v->size());
}

}  // namespace

std::string KongKeys::jwks(const std::string& ns, const std::string& x) {
  KongKeySet s = get_set(ns, x);
  json keys = json::array();
  for (const auto& k : list_keys(ns, s.id)) keys.push_back(json::parse(k.public_jwk));
  return dump(json{{"keys", keys}});
}

std::string KongKeys::sign(const std::string& ns, const std::string& x, const std::string& payload_b64url,
                           const std::string& alg_in, const std::string& header_json) {
  KongKey k = get_key(ns, x);
  if (!jose::b64url_decode(payload_b64url)) throw invalid("must be base64url without padding", "invalid_payload");
  json header = json::object();
  if (!header_json.empty()) header = json::parse(header_json);
  std::string alg = alg_in;
  if (alg.empty() && header.contains("alg") && header["alg"].is_string()) alg = header["alg"];
  if (alg.empty()) alg = default_alg(k);
  if (header.contains("alg") && header["alg"] != alg) throw invalid("header.alg differs from alg", "invalid_header");
  JwsAlg a = jws_alg(k, alg);
  if (k.object_id.empty())
    throw invalid("key \"" + k.name + "\" has no private key (public key only): it cannot sign", "invalid_key");
  header["alg"] = alg;
  header["kid"] = k.kid;
  std::string input = jose::b64url(dump(header)) + "." + payload_b64url;
  std::vector<uint8_t> data(input.begin(), input.end());
  auto oid = encoding::hex_decode(k.object_id);
  hsm::Bytes sig;
  if (a.mech == CKM_EDDSA) {
    sig = token_.sign(hsm::KeyHandle(*oid), CKM_EDDSA, nullptr, 0, data.data(), data.size());
  } else {
    auto digest = hash_input(a.hash, data);
    if (a.pkcs1) {
      auto di = digest_info(a.hash, digest);
      sig = token_.sign(hsm::KeyHandle(*oid), CKM_RSA_PKCS, nullptr, 0, di.data(), di.size());
    } else if (a.pss) {
      CK_RSA_PKCS_PSS_PARAMS pss{pkcs11_hash(a.hash), pkcs11_mgf(a.hash), static_cast<CK_ULONG>(digest.size())};
      sig = token_.sign(hsm::KeyHandle(*oid), CKM_RSA_PKCS_PSS, &pss, sizeof pss, digest.data(), digest.size());
    } else {
      sig = token_.sign(hsm::KeyHandle(*oid), CKM_ECDSA, nullptr, 0, digest.data(), digest.size());  // r || s
    }
  }
  return input + "." + jose::b64url(sig);
}

KongDecrypted KongKeys::decrypt(const std::string& ns, const std::string& x, const std::string& compact) {
  KongKey k = get_key(ns, x);
  auto parts = split_compact(compact);
  if (parts.size() != 5) throw bad_jwe("a compact JWE has five base64url parts");
  hsm::Bytes hb = part_bytes(parts[0], "the protected header");
  json h;
  try {
    h = json::parse(hb.begin(), hb.end());
  } catch (const json::exception&) {
    throw bad_jwe("the protected header is not JSON");
  }
  if (!h.is_object() || !h.contains("alg") || !h["alg"].is_string() || !h.contains("enc") || !h["enc"].is_string())
    throw bad_jwe("the protected header needs alg and enc");
  std::string alg = h["alg"], enc = h["enc"];
  if (h.contains("zip")) throw bad_jwe("compressed (zip) JWEs are not supported");
  size_t cek_len = enc == "A128GCM" ? 16 : enc == "A192GCM" ? 24 : enc == "A256GCM" ? 32 : 0;
  if (!cek_len) throw bad_jwe("unsupported enc \"" + enc + "\": use A128GCM, A192GCM or A256GCM");
  if (k.object_id.empty()) throw invalid("key \"" + k.name + "\" has no private key (public key only)", "invalid_key");
  auto oid = encoding::hex_decode(k.object_id);
  hsm::Bytes ek = part_bytes(parts[1], "the encrypted key");
  hsm::Bytes iv = part_bytes(parts[2], "the iv"), ct = part_bytes(parts[3], "the ciphertext"),
             tag = part_bytes(parts[4], "the tag");
  if (iv.size() != 12 || tag.size() != 16) throw bad_jwe("AES-GCM needs a 96-bit iv and a 128-bit tag");

  hsm::SecureBytes cek;
  if (alg == "RSA-OAEP" || alg == "RSA-OAEP-256") {
    if (k.kty != "RSA") throw invalid("alg " + alg + " needs an RSA key", "invalid_jwe");
    try {
      cek = token_.rsa_oaep_decrypt(*oid, ek, alg == "RSA-OAEP" ? CKM_SHA_1 : CKM_SHA256);
    } catch (const hsm::ImportRejected&) {
      throw bad_jwe("the encrypted key does not open with this key");
    }
  } else if (alg == "ECDH-ES" || alg == "ECDH-ES+A128KW" || alg == "ECDH-ES+A256KW") {
    if (k.kty != "EC") throw invalid("alg " + alg + " needs an EC key", "invalid_jwe");
    if (!h.contains("epk") || !h["epk"].is_object()) throw bad_jwe("ECDH-ES needs an epk");
    const json& epk = h["epk"];
    if (epk.value("kty", "") != "EC" || epk.value("crv", "") != k.crv) throw bad_jwe("the epk is not on the key's curve");
    size_t fb = k.crv == "P-256" ? 32 : k.crv == "P-384" ? 48 : 66;
    hsm::Bytes ex = header_bytes(epk, "x"), ey = header_bytes(epk, "y");
    if (ex.size() != fb || ey.size() != fb) throw bad_jwe("the epk's x and y have the wrong size");
    // The point is checked to be on the curve (a public value) before it reaches the token.
    json pub = {{"kty", "EC"}, {"crv", k.crv}, {"x", jose::b64url(ex)}, {"y", jose::b64url(ey)}};
    try {
      jose::parse_jwk(dump(pub), "");
    } catch (const KeyError&) {
      throw bad_jwe("the epk is not a valid point");
    }
    hsm::Bytes point{0x04};
    point.insert(point.end(), ex.begin(), ex.end());
    point.insert(point.end(), ey.begin(), ey.end());
    bool direct = alg == "ECDH-ES";
    if (direct && !ek.empty()) throw bad_jwe("ECDH-ES (direct key agreement) must have an empty encrypted key");
    size_t out_len = direct ? cek_len : alg == "ECDH-ES+A128KW" ? 16 : 32;
    const std::string& algid = direct ? enc : alg;
    hsm::Bytes apu = header_bytes(h, "apu"), apv = header_bytes(h, "apv");
    hsm::Bytes other;
    put_len_prefixed(other, reinterpret_cast<const uint8_t*>(algid.data()), algid.size());
    put_len_prefixed(other, apu.data(), apu.size());
    put_len_prefixed(other, apv.data(), apv.size());
    uint32_t bits = static_cast<uint32_t>(out_len * 8);
    for (int shift = 24; shift >= 0; shift -= 8) other.push_back(static_cast<uint8_t>(bits >> shift));
    hsm::SecureBytes derived;
    try {
      derived = token_.ecdh_concat_kdf(*oid, point, fb, other, out_len);
    } catch (const hsm::ImportRejected&) {
      throw bad_jwe("the epk is refused by the token");
    }
    if (direct) {
      cek = std::move(derived);
    } else {
      auto unwrapped = aes_key_unwrap(derived, ek);
      if (!unwrapped) throw bad_jwe("the encrypted key does not unwrap");
      cek = std::move(*unwrapped);
    }
  } else {
    throw bad_jwe("unsupported alg \"" + alg + "\": use RSA-OAEP, RSA-OAEP-256, ECDH-ES, ECDH-ES+A128KW or ECDH-ES+A256KW");
  }
  if (cek.size() != cek_len) throw bad_jwe("the content key has the wrong size for " + enc);
  auto plain = aes_gcm_open(cek, iv, parts[0], ct, tag);
  cek.wipe();
  if (!plain) throw bad_jwe("the authentication tag does not verify (tampered, or not for this key)");
  return KongDecrypted{std::move(*plain), dump(h)};
}

}  // namespace p11kms::keys
