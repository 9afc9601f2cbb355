#include "keys/signing.hpp"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ecdsa.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include <memory>
#include <mutex>
#include <unordered_map>

#include "common/digest.hpp"
#include "common/encoding.hpp"
#include "keys/errors.hpp"

namespace p11kms::keys {
namespace {

struct PkeyFree { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
struct CtxFree { void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); } };
struct MdCtxFree { void operator()(EVP_MD_CTX* p) const { EVP_MD_CTX_free(p); } };
struct BioFree { void operator()(BIO* p) const { BIO_free(p); } };
struct SigFree { void operator()(ECDSA_SIG* p) const { ECDSA_SIG_free(p); } };
using Pkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

const EVP_MD* md_of(const std::string& a) {
  if (a == "sha1") return EVP_sha1();
  if (a == "sha2-224") return EVP_sha224();
  if (a == "sha2-256") return EVP_sha256();
  if (a == "sha2-384") return EVP_sha384();
  if (a == "sha2-512") return EVP_sha512();
  if (a == "sha3-224") return EVP_sha3_224();
  if (a == "sha3-256") return EVP_sha3_256();
  if (a == "sha3-384") return EVP_sha3_384();
  if (a == "sha3-512") return EVP_sha3_512();
  return nullptr;
}

const EVP_MD* require_md(const std::string& a) {
  const EVP_MD* md = md_of(a);
  if (!md)
    throw invalid("unsupported hash algorithm \"" + a +
                  "\": use sha1, sha2-224, sha2-256, sha2-384, sha2-512, sha3-224, sha3-256, sha3-384 or sha3-512");
  return md;
}

using SharedPkey = std::shared_ptr<EVP_PKEY>;

// A key version's public key, parsed once. OpenSSL 3's PEM decoder costs ~250 CPU-us per call
// and takes global read-write locks that two threads fight over (~450 us each): parsed per
// request it was a third of an RSA-2048 sign's CPU (measured with perf). Public keys only, so
// nothing secret is kept; a parsed EVP_PKEY is only read afterwards, which OpenSSL allows from
// several threads at once.
SharedPkey read_public(const std::string& pem) {
  constexpr size_t kMaxCached = 1024;
  static std::mutex mu;
  static std::unordered_map<std::string, SharedPkey> cache;
  {
    std::lock_guard<std::mutex> lk(mu);
    auto it = cache.find(pem);
    if (it != cache.end()) return it->second;
  }
  std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  SharedPkey key(PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr), PkeyFree());
  if (!key) throw KeyError(ErrorKind::internal, "internal", "corrupt public key in the store");
  std::lock_guard<std::mutex> lk(mu);
  if (cache.size() >= kMaxCached) cache.clear();
  cache.emplace(pem, key);
  return key;
}

Pkey read_pkcs8(const hsm::SecureBytes& der) {
  const unsigned char* p = der.data();
  Pkey key(d2i_AutoPrivateKey(nullptr, &p, static_cast<long>(der.size())));
  if (!key) throw KeyError(ErrorKind::internal, "internal", "corrupt key material");
  return key;
}

}  // namespace

size_t hash_size(const std::string& algorithm) { return static_cast<size_t>(EVP_MD_get_size(require_md(algorithm))); }

std::vector<uint8_t> hash_input(const std::string& algorithm, const std::vector<uint8_t>& input) {
  const EVP_MD* md = require_md(algorithm);
  std::vector<uint8_t> out(static_cast<size_t>(EVP_MD_get_size(md)));
  if (!p11kms::digest::compute(md, input.data(), input.size(), out.data()))
    throw KeyError(ErrorKind::internal, "internal", "hashing failed");
  return out;
}

CK_MECHANISM_TYPE hmac_mechanism(const std::string& a) {
  if (a == "sha1") return CKM_SHA_1_HMAC;
  if (a == "sha2-224") return CKM_SHA224_HMAC;
  if (a == "sha2-256") return CKM_SHA256_HMAC;
  if (a == "sha2-384") return CKM_SHA384_HMAC;
  if (a == "sha2-512") return CKM_SHA512_HMAC;
  if (md_of(a))
    throw invalid("HMAC with " + a + " is not available: the token's PKCS#11 module offers HMAC with sha1 and sha2-* only",
                  "mechanism_unavailable");
  throw invalid("unsupported algorithm \"" + a + "\": use sha1, sha2-224, sha2-256, sha2-384 or sha2-512");
}

std::vector<uint8_t> digest_info(const std::string& a, const std::vector<uint8_t>& digest) {
  // DER prefixes of DigestInfo (RFC 8017, section 9.2, note 1).
  static const std::vector<std::pair<std::string, std::vector<uint8_t>>> prefixes = {
      {"sha1", {0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04, 0x14}},
      {"sha2-224", {0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x04, 0x05, 0x00, 0x04, 0x1c}},
      {"sha2-256", {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01, 0x05, 0x00, 0x04, 0x20}},
      {"sha2-384", {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02, 0x05, 0x00, 0x04, 0x30}},
      {"sha2-512", {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03, 0x05, 0x00, 0x04, 0x40}},
      {"sha3-224", {0x30, 0x2d, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x07, 0x05, 0x00, 0x04, 0x1c}},
      {"sha3-256", {0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x08, 0x05, 0x00, 0x04, 0x20}},
      {"sha3-384", {0x30, 0x41, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x09, 0x05, 0x00, 0x04, 0x30}},
      {"sha3-512", {0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x0a, 0x05, 0x00, 0x04, 0x40}},
  };
  for (const auto& [name, prefix] : prefixes) {
    if (name != a) continue;
    std::vector<uint8_t> out = prefix;
    out.insert(out.end(), digest.begin(), digest.end());
    return out;
  }
  require_md(a);
  throw invalid("unsupported hash algorithm \"" + a + "\" for PKCS#1 v1.5");
}

CK_MECHANISM_TYPE pkcs11_hash(const std::string& a) {
  if (a == "sha1") return CKM_SHA_1;
  if (a == "sha2-224") return CKM_SHA224;
  if (a == "sha2-256") return CKM_SHA256;
  if (a == "sha2-384") return CKM_SHA384;
  if (a == "sha2-512") return CKM_SHA512;
  require_md(a);
  throw invalid("RSA-PSS with " + a + " is not available: the token's PKCS#11 module offers PSS with sha1 and sha2-* only",
                "mechanism_unavailable");
}

CK_RSA_PKCS_MGF_TYPE pkcs11_mgf(const std::string& a) {
  if (a == "sha1") return CKG_MGF1_SHA1;
  if (a == "sha2-224") return CKG_MGF1_SHA224;
  if (a == "sha2-384") return CKG_MGF1_SHA384;
  if (a == "sha2-512") return CKG_MGF1_SHA512;
  return CKG_MGF1_SHA256;
}

size_t pss_salt_length(const std::string& s, size_t modulus_bits, size_t digest_bytes) {
  size_t em_len = (modulus_bits - 1 + 7) / 8;
  size_t max = em_len - digest_bytes - 2;
  if (s.empty() || s == "auto") return max;
  if (s == "hash") return digest_bytes;
  size_t used = 0;
  long long n = -1;
  try {
    n = std::stoll(s, &used);
  } catch (const std::exception&) {
  }
  if (used != s.size() || n < 0 || static_cast<size_t>(n) > max)
    throw invalid("invalid salt_length \"" + s + "\": use auto, hash or a number of bytes from 0 to " + std::to_string(max));
  return static_cast<size_t>(n);
}

std::vector<uint8_t> ecdsa_raw_to_der(const std::vector<uint8_t>& raw) {
  size_t half = raw.size() / 2;
  std::unique_ptr<ECDSA_SIG, SigFree> sig(ECDSA_SIG_new());
  BIGNUM* r = BN_bin2bn(raw.data(), static_cast<int>(half), nullptr);
  BIGNUM* s = BN_bin2bn(raw.data() + half, static_cast<int>(half), nullptr);
  ECDSA_SIG_set0(sig.get(), r, s);
  int n = i2d_ECDSA_SIG(sig.get(), nullptr);
  std::vector<uint8_t> out(static_cast<size_t>(n));
  unsigned char* p = out.data();
  i2d_ECDSA_SIG(sig.get(), &p);
  return out;
}

std::optional<std::vector<uint8_t>> ecdsa_der_to_raw(const std::vector<uint8_t>& der, size_t field) {
  const unsigned char* p = der.data();
  std::unique_ptr<ECDSA_SIG, SigFree> sig(d2i_ECDSA_SIG(nullptr, &p, static_cast<long>(der.size())));
  if (!sig || p != der.data() + der.size()) return std::nullopt;
  const BIGNUM *r = nullptr, *s = nullptr;
  ECDSA_SIG_get0(sig.get(), &r, &s);
  std::vector<uint8_t> out(field * 2);
  if (BN_bn2binpad(r, out.data(), static_cast<int>(field)) < 0 ||
      BN_bn2binpad(s, out.data() + field, static_cast<int>(field)) < 0)
    return std::nullopt;
  return out;
}

std::string base64url_nopad(const std::vector<uint8_t>& bytes) {
  std::string s = encoding::base64_encode(bytes);
  while (!s.empty() && s.back() == '=') s.pop_back();
  for (char& c : s) c = c == '+' ? '-' : c == '/' ? '_' : c;
  return s;
}

std::optional<std::vector<uint8_t>> base64url_decode(const std::string& text) {
  std::string s = text;
  for (char& c : s) {
    if (c == '+' || c == '/') return std::nullopt;
    c = c == '-' ? '+' : c == '_' ? '/' : c;
  }
  while (s.size() % 4) s.push_back('=');
  return encoding::base64_decode(s);
}

std::string public_key_pem(const std::vector<uint8_t>& spki) {
  std::string b64 = encoding::base64_encode(spki);
  std::string out = "-----BEGIN PUBLIC KEY-----\n";
  for (size_t i = 0; i < b64.size(); i += 64) out += b64.substr(i, 64) + "\n";
  return out + "-----END PUBLIC KEY-----\n";
}

size_t rsa_modulus_bits(const std::string& pem) {
  auto key = read_public(pem);
  return static_cast<size_t>(EVP_PKEY_get_bits(key.get()));
}

bool verify_signature(KeyType type, const std::string& pem, const SignOptions& o, const std::vector<uint8_t>& input,
                      const std::vector<uint8_t>& signature) {
  auto key = read_public(pem);
  if (type == KeyType::ed25519) {
    std::unique_ptr<EVP_MD_CTX, MdCtxFree> ctx(EVP_MD_CTX_new());
    if (EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key.get()) != 1) return false;
    return EVP_DigestVerify(ctx.get(), signature.data(), signature.size(), input.data(), input.size()) == 1;
  }
  std::vector<uint8_t> digest;
  const EVP_MD* md = nullptr;
  if (o.hash_algorithm == "none") {
    digest = input;
  } else {
    md = require_md(o.hash_algorithm);
    digest = o.prehashed ? input : hash_input(o.hash_algorithm, input);
  }
  std::vector<uint8_t> sig = signature;
  if (is_ecdsa(type) && o.marshaling_algorithm == "jws") {
    size_t field = type == KeyType::ecdsa_p384 ? 48 : 32;
    if (sig.size() != field * 2) return false;
    sig = ecdsa_raw_to_der(sig);
  }
  std::unique_ptr<EVP_PKEY_CTX, CtxFree> ctx(EVP_PKEY_CTX_new(key.get(), nullptr));
  if (!ctx || EVP_PKEY_verify_init(ctx.get()) != 1) return false;
  if (is_rsa(type)) {
    bool pss = o.signature_algorithm.empty() || o.signature_algorithm == "pss";
    if (EVP_PKEY_CTX_set_rsa_padding(ctx.get(), pss ? RSA_PKCS1_PSS_PADDING : RSA_PKCS1_PADDING) != 1) return false;
    if (md && EVP_PKEY_CTX_set_signature_md(ctx.get(), md) != 1) return false;
    if (pss) {
      int salt = RSA_PSS_SALTLEN_AUTO;
      if (o.salt_length == "hash") salt = RSA_PSS_SALTLEN_DIGEST;
      else if (!o.salt_length.empty() && o.salt_length != "auto")
        salt = static_cast<int>(pss_salt_length(o.salt_length, static_cast<size_t>(EVP_PKEY_get_bits(key.get())),
                                                static_cast<size_t>(EVP_MD_get_size(md))));
      if (EVP_PKEY_CTX_set_rsa_pss_saltlen(ctx.get(), salt) != 1) return false;
    }
  }
  return EVP_PKEY_verify(ctx.get(), sig.data(), sig.size(), digest.data(), digest.size()) == 1;
}

std::string export_private_key(KeyType type, const hsm::SecureBytes& pkcs8) {
  auto key = read_pkcs8(pkcs8);
  if (type == KeyType::ed25519) {
    hsm::SecureBytes both(64);
    size_t n = 32, m = 32;
    if (EVP_PKEY_get_raw_private_key(key.get(), both.data(), &n) != 1 ||
        EVP_PKEY_get_raw_public_key(key.get(), both.data() + 32, &m) != 1 || n != 32 || m != 32)
      throw KeyError(ErrorKind::internal, "internal", "corrupt Ed25519 key material");
    return encoding::base64_encode(both.data(), both.size());
  }
  std::unique_ptr<BIO, BioFree> bio(BIO_new(BIO_s_secmem()));
  if (!bio || PEM_write_bio_PrivateKey_traditional(bio.get(), key.get(), nullptr, nullptr, 0, nullptr, nullptr) != 1)
    throw KeyError(ErrorKind::internal, "internal", "cannot encode the private key");
  char* data = nullptr;
  long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

}  // namespace p11kms::keys
