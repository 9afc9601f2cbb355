#include "keys/master_seal.hpp"

#include <openssl/crypto.h>
#include <openssl/rand.h>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "keys/errors.hpp"

namespace p11kms::keys {
namespace {

constexpr size_t kGcmIv = 12, kGcmTag = 16;
constexpr size_t kCtrNonce = 16, kMac = 32;
constexpr size_t kMacKeyBytes = 32;  // HMAC-SHA-256: SoftHSM wants at least the digest size
constexpr const char* kCtrMacDomain = "p11kms master seal aes-ctr-hmac v1";

hsm::Bytes random_bytes(size_t n, const char* what) {
  // Public values that only need uniqueness; OpenSSL's DRBG saves a token round trip.
  hsm::Bytes out(n);
  if (RAND_bytes(out.data(), static_cast<int>(n)) != 1)
    throw KeyError(ErrorKind::internal, "internal", std::string("random ") + what + " generation failed");
  return out;
}

void put_u64(hsm::Bytes& out, uint64_t v) {
  for (int i = 7; i >= 0; --i) out.push_back(static_cast<uint8_t>(v >> (8 * i)));
}

std::vector<hsm::MechanismNeed> scheme_needs(MasterSeal::Scheme s) {
  if (s == MasterSeal::Scheme::aes_gcm) return {{CKM_AES_GCM, CKF_ENCRYPT | CKF_DECRYPT, 0}};
  return {{CKM_AES_ECB, CKF_ENCRYPT, 0}, {CKM_SHA256_HMAC, CKF_SIGN, 0}};
}

const char* scheme_name(MasterSeal::Scheme s) {
  return s == MasterSeal::Scheme::aes_gcm ? "aes-gcm" : "aes-ctr-hmac";
}

}  // namespace

MasterSeal::MasterSeal(store::MetadataStore& store, hsm::Token& token, CapabilitySource capabilities)
    : store_(store), token_(token), capabilities_(std::move(capabilities)) {}

std::shared_ptr<const hsm::Capabilities> MasterSeal::caps() const {
  auto c = capabilities_ ? capabilities_() : token_.capabilities();
  return c ? c : std::make_shared<const hsm::Capabilities>();
}

MasterSeal::Scheme MasterSeal::scheme_for_sealing() const {
  auto c = caps();
  auto met = [&](Scheme s) {
    if (!c->has(CKM_AES_KEY_GEN, CKF_GENERATE)) return false;  // the master key is made in the token
    if (s == Scheme::aes_ctr_hmac && !c->has(CKM_GENERIC_SECRET_KEY_GEN, CKF_GENERATE)) return false;
    for (const auto& n : scheme_needs(s))
      if (!c->has(n.type, n.flags)) return false;
    return true;
  };
  if (met(Scheme::aes_gcm)) return Scheme::aes_gcm;
  if (met(Scheme::aes_ctr_hmac)) return Scheme::aes_ctr_hmac;
  std::string why = c->refusal(hsm::CapabilityKind::key_type, hsm::cap::kExportable,
                               "sealing key material under the master key");
  if (why.empty()) why = "sealing key material under the master key needs CKM_AES_GCM, or CKM_AES_ECB and "
                         "CKM_SHA256_HMAC, which the token's PKCS#11 module does not offer";
  throw invalid(why, "mechanism_unavailable");
}

std::optional<MasterSeal::Scheme> MasterSeal::scheme_of(const std::string& blob) {
  size_t colon = blob.find(':');
  if (colon == std::string::npos) return Scheme::aes_gcm;  // legacy: no prefix
  std::string prefix = blob.substr(0, colon + 1);
  if (prefix == kGcmPrefix) return Scheme::aes_gcm;
  if (prefix == kCtrHmacPrefix) return Scheme::aes_ctr_hmac;
  return std::nullopt;
}

void MasterSeal::require(Scheme scheme, const std::string& what) const {
  auto c = caps();
  std::string list;
  auto needs = scheme_needs(scheme);
  std::vector<hsm::MechanismNeed> missing;
  for (const auto& n : needs) {
    // Opening a GCM blob only decrypts.
    CK_FLAGS flags = scheme == Scheme::aes_gcm ? CKF_DECRYPT : n.flags;
    if (!c->has(n.type, flags)) missing.push_back({n.type, flags, 0});
  }
  if (missing.empty()) return;
  for (size_t i = 0; i < missing.size(); ++i) {
    if (i) list += i + 1 == missing.size() ? " and " : ", ";
    list += missing[i].describe();
  }
  throw invalid(what + " needs " + list + ", which the token's PKCS#11 module does not offer; p11kms never does it "
                "outside the token",
                "mechanism_unavailable");
}

const hsm::ObjectId& MasterSeal::key(const char* setting, bool create) {
  bool mac = std::string(setting) == kMacKeySetting;
  std::lock_guard<std::mutex> lk(mu_);
  hsm::ObjectId& cached = mac ? mac_key_id_ : master_key_id_;
  if (!cached.empty()) return cached;
  if (auto hex = store_.get_setting(setting)) {
    auto id = encoding::hex_decode(*hex);
    if (!id || id->empty())
      throw KeyError(ErrorKind::internal, "internal", std::string("corrupt ") + setting + " in the store");
    cached = *id;
    return cached;
  }
  if (!create) return cached;  // empty: nothing was ever sealed under such a key
  // Created on first use. A crash between the two steps leaves one unreferenced system key on
  // the token (never a key without its object): the setting is written only after it exists.
  auto id = token_.new_object_id();
  if (mac)
    token_.generate_hmac_key(id, kMacKeyBytes, "p11kms-system/master-mac-key");
  else
    token_.generate_aes_key(id, 32, "p11kms-system/master-key");
  // Another instance may have made one at the same moment: the first recorded wins and the
  // other is destroyed, so every instance seals under the same key.
  std::string mine = encoding::hex_encode(id);
  std::string stored = store_.put_setting_if_absent(setting, mine);
  if (stored != mine) {
    token_.destroy_own(id);
    auto theirs = encoding::hex_decode(stored);
    if (!theirs || theirs->empty())
      throw KeyError(ErrorKind::internal, "internal", std::string("corrupt ") + setting + " in the store");
    cached = *theirs;
    return cached;
  }
  log::info(mac ? "keys: created the master MAC key that authenticates aes-ctr-hmac sealed material"
                : "keys: created the master key that seals exportable key material");
  cached = id;
  return cached;
}

// Counter blocks nonce, nonce+1, ... (a 128-bit big-endian counter) encrypted with AES-ECB in
// the token: the AES-CTR keystream for `len` bytes.
hsm::SecureBytes MasterSeal::ctr_keystream(const hsm::ObjectId& aes_key, const uint8_t* nonce, size_t len) {
  size_t blocks = (len + 15) / 16;
  hsm::Bytes counters(blocks * 16);
  uint8_t ctr[16];
  std::copy(nonce, nonce + 16, ctr);
  for (size_t b = 0; b < blocks; ++b) {
    std::copy(ctr, ctr + 16, counters.data() + b * 16);
    for (int i = 15; i >= 0 && ++ctr[i] == 0; --i) {
    }
  }
  return token_.aes_ecb_encrypt(aes_key, counters.data(), counters.size());
}

hsm::Bytes MasterSeal::ctr_mac(const hsm::ObjectId& mac_key, const std::vector<uint8_t>& aad, const uint8_t* nonce,
                               const uint8_t* ct, size_t ct_len) {
  std::string domain = kCtrMacDomain;
  hsm::Bytes input(domain.begin(), domain.end());
  input.push_back(0);
  put_u64(input, aad.size());
  input.insert(input.end(), aad.begin(), aad.end());
  input.insert(input.end(), nonce, nonce + kCtrNonce);
  put_u64(input, ct_len);
  input.insert(input.end(), ct, ct + ct_len);
  return token_.hmac_sha256(mac_key, input.data(), input.size());
}

std::string MasterSeal::seal(const std::vector<uint8_t>& aad, const uint8_t* plaintext, size_t len) {
  Scheme scheme = scheme_for_sealing();
  if (scheme == Scheme::aes_gcm) {
    auto iv = random_bytes(kGcmIv, "IV");
    auto sealed = token_.aes_gcm_encrypt(master_key(), iv, aad, plaintext, len);
    iv.insert(iv.end(), sealed.begin(), sealed.end());
    return kGcmPrefix + encoding::base64_encode(iv);
  }
  const hsm::ObjectId& aes = master_key();
  const hsm::ObjectId& mac = key(kMacKeySetting, true);
  auto blob = random_bytes(kCtrNonce, "nonce");
  auto ks = ctr_keystream(aes, blob.data(), len);
  blob.resize(kCtrNonce + len);
  for (size_t i = 0; i < len; ++i) blob[kCtrNonce + i] = plaintext[i] ^ ks.data()[i];
  ks.wipe();
  auto tag = ctr_mac(mac, aad, blob.data(), blob.data() + kCtrNonce, len);
  if (tag.size() != kMac) throw KeyError(ErrorKind::internal, "internal", "the token's HMAC-SHA-256 has a wrong size");
  blob.insert(blob.end(), tag.begin(), tag.end());
  return kCtrHmacPrefix + encoding::base64_encode(blob);
}

std::optional<hsm::SecureBytes> MasterSeal::unseal(const std::vector<uint8_t>& aad, const std::string& text) {
  auto scheme = scheme_of(text);
  if (!scheme) {
    throw KeyError(ErrorKind::internal, "internal",
                   "sealed material in the store uses an unknown scheme \"" + text.substr(0, text.find(':')) +
                       "\" (written by a newer p11kms?)");
  }
  size_t colon = text.find(':');
  std::string body = colon == std::string::npos ? text : text.substr(colon + 1);
  require(*scheme, std::string("opening material sealed with ") + scheme_name(*scheme) + " under the master key");
  auto blob = encoding::base64_decode(body);
  if (!blob) return std::nullopt;
  if (*scheme == Scheme::aes_gcm) {
    if (blob->size() < kGcmIv + kGcmTag) return std::nullopt;
    const hsm::ObjectId& aes = key(kMasterKeySetting, false);
    if (aes.empty()) return std::nullopt;
    hsm::Bytes iv(blob->begin(), blob->begin() + kGcmIv);
    return token_.aes_gcm_decrypt(aes, iv, aad, blob->data() + kGcmIv, blob->size() - kGcmIv);
  }
  if (blob->size() < kCtrNonce + kMac) return std::nullopt;
  const hsm::ObjectId& aes = key(kMasterKeySetting, false);
  const hsm::ObjectId& mac = key(kMacKeySetting, false);
  if (aes.empty() || mac.empty()) return std::nullopt;
  size_t ct_len = blob->size() - kCtrNonce - kMac;
  const uint8_t* nonce = blob->data();
  const uint8_t* ct = nonce + kCtrNonce;
  auto expected = ctr_mac(mac, aad, nonce, ct, ct_len);
  if (expected.size() != kMac || CRYPTO_memcmp(expected.data(), ct + ct_len, kMac) != 0) return std::nullopt;
  auto ks = ctr_keystream(aes, nonce, ct_len);
  hsm::SecureBytes pt(ct_len);
  for (size_t i = 0; i < ct_len; ++i) pt.data()[i] = ct[i] ^ ks.data()[i];
  return pt;
}

}  // namespace p11kms::keys
