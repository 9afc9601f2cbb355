#include "hsm/token.hpp"

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "hsm/attributes.hpp"
#include "hsm/composed_gcm.hpp"
#include "hsm/errors.hpp"

#include <algorithm>

namespace p11kms::hsm {
namespace {

std::string cache_key(const ObjectId& id) { return std::string(id.begin(), id.end()); }

bool is_stale_handle(CK_RV rv) { return rv == CKR_KEY_HANDLE_INVALID || rv == CKR_OBJECT_HANDLE_INVALID; }

class FindGuard {  // C_FindObjectsFinal on every path out
 public:
  explicit FindGuard(SessionPool::Lease& l) : l_(l) {}
  ~FindGuard() { l_.fn()->C_FindObjectsFinal(l_.session()); }
 private:
  SessionPool::Lease& l_;
};

std::vector<CK_OBJECT_HANDLE> find_all(SessionPool::Lease& l, AttributeTemplate& t, size_t max = SIZE_MAX) {
  l.check(l.fn()->C_FindObjectsInit(l.session(), t.data(), t.size()), "C_FindObjectsInit");
  FindGuard guard(l);
  std::vector<CK_OBJECT_HANDLE> out;
  CK_OBJECT_HANDLE batch[64];
  while (out.size() < max) {
    CK_ULONG n = 0;
    l.check(l.fn()->C_FindObjects(l.session(), batch, 64, &n), "C_FindObjects");
    if (n == 0) break;
    out.insert(out.end(), batch, batch + n);
  }
  return out;
}

}  // namespace

bool serializes_calls_in_process(const std::string& library_manufacturer) {
  return library_manufacturer.rfind("SoftHSM", 0) == 0;  // SoftHSM 2.x: "SoftHSM"
}

Bytes Token::random(size_t n) {
  Bytes out(n);
  if (n == 0) return out;
  auto l = pool_.lease();
  l.check(l.fn()->C_GenerateRandom(l.session(), out.data(), out.size()), "C_GenerateRandom");
  return out;
}

SecureBytes Token::random_secret(size_t n) {
  SecureBytes out(n);
  if (n == 0) return out;
  auto l = pool_.lease();
  l.check(l.fn()->C_GenerateRandom(l.session(), out.data(), out.size()), "C_GenerateRandom");
  return out;
}

// Every secret key the service keeps on the token: persistent, private, sensitive and
// non-extractable, with every usage boolean set explicitly (SoftHSM turns several on by
// default) and only the given ones true. Unmodifiable unless `copyable`: SoftHSM copies only
// modifiable keys (TokenOptions::session_copies), and CKA_SENSITIVE and CKA_EXTRACTABLE can
// never be weakened on a modifiable key either.
// bytes == 0 leaves CKA_VALUE_LEN out (C_CreateObject takes the length from CKA_VALUE).
static AttributeTemplate secret_key_template(CK_KEY_TYPE type, size_t bytes, const ObjectId& id, const std::string& label,
                                      std::initializer_list<CK_ATTRIBUTE_TYPE> usages, bool copyable = false) {
  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, type);
  if (bytes != 0) t.set_ulong(CKA_VALUE_LEN, bytes);
  t.set(CKA_TOKEN, true)
      .set(CKA_PRIVATE, true)
      .set(CKA_SENSITIVE, true)
      .set(CKA_EXTRACTABLE, false)
      .set(CKA_MODIFIABLE, copyable);
  for (CK_ATTRIBUTE_TYPE usage : {CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE}) {
    bool on = std::find(usages.begin(), usages.end(), usage) != usages.end();
    t.set(usage, on);
  }
  t.set_bytes(CKA_ID, id).set_string(CKA_LABEL, label);
  return t;
}

void Token::generate_secret(CK_MECHANISM_TYPE mechanism, AttributeTemplate& t, const ObjectId& id) {
  CK_MECHANISM mech{mechanism, nullptr, 0};
  auto l = pool_.lease();
  CK_OBJECT_HANDLE h = 0;
  l.check(l.fn()->C_GenerateKey(l.session(), &mech, t.data(), t.size(), &h), "C_GenerateKey");
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (cache_generation_ == l.generation()) cache_[cache_key(id)] = h;
}

void Token::generate_aes_key(const ObjectId& id, size_t bytes, const std::string& label) {
  auto t = secret_key_template(CKK_AES, bytes, id, label, {CKA_ENCRYPT, CKA_DECRYPT}, options_.session_copies);
  generate_secret(CKM_AES_KEY_GEN, t, id);
}

void Token::generate_derivation_key(const ObjectId& id, size_t bytes, const std::string& label) {
  auto t = secret_key_template(CKK_AES, bytes, id, label, {CKA_DERIVE});
  generate_secret(CKM_AES_KEY_GEN, t, id);
}

// No CKA_MODIFIABLE: SoftHSM's C_UnwrapKey refuses it (CKR_ATTRIBUTE_READ_ONLY, measured).
AttributeTemplate token_secret_template(CK_KEY_TYPE type, const ObjectId& id, const std::string& label,
                                        std::initializer_list<CK_ATTRIBUTE_TYPE> usages) {
  AttributeTemplate t;
  t.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, type);
  t.set(CKA_TOKEN, true).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false);
  for (CK_ATTRIBUTE_TYPE usage : {CKA_ENCRYPT, CKA_DECRYPT, CKA_WRAP, CKA_UNWRAP, CKA_SIGN, CKA_VERIFY, CKA_DERIVE})
    t.set(usage, std::find(usages.begin(), usages.end(), usage) != usages.end());
  t.set_bytes(CKA_ID, id).set_string(CKA_LABEL, label);
  return t;
}

KeyHandle derived_key_handle(ObjectId cache_id, KeyHandle base, Bytes data, CK_KEY_TYPE type, size_t bytes) {
  KeyHandle h(std::move(cache_id));
  h.base = std::make_shared<const KeyHandle>(std::move(base));
  h.derive_data = std::move(data);
  h.derived_type = type;
  h.derived_bytes = bytes;
  return h;
}

void Token::import_aes_key(const ObjectId& id, const SecureBytes& value, const std::string& label) {
  auto t = secret_key_template(CKK_AES, 0, id, label, {CKA_ENCRYPT, CKA_DECRYPT}, options_.session_copies);
  t.set_bytes(CKA_VALUE, value.data(), value.size());
  auto l = pool_.lease();
  CK_OBJECT_HANDLE h = 0;
  l.check(l.fn()->C_CreateObject(l.session(), t.data(), t.size(), &h), "C_CreateObject");
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (cache_generation_ == l.generation()) cache_[cache_key(id)] = h;
}

void Token::generate_hmac_key(const ObjectId& id, size_t bytes, const std::string& label) {
  auto t = secret_key_template(CKK_GENERIC_SECRET, bytes, id, label, {CKA_SIGN, CKA_VERIFY}, options_.session_copies);
  generate_secret(CKM_GENERIC_SECRET_KEY_GEN, t, id);
}

Bytes Token::hmac_sha256(const ObjectId& key, const uint8_t* data, size_t len) {
  return hmac(key, CKM_SHA256_HMAC, data, len);
}

void Token::import_hmac_key(const ObjectId& id, const SecureBytes& value, const std::string& label) {
  auto t = secret_key_template(CKK_GENERIC_SECRET, 0, id, label, {CKA_SIGN, CKA_VERIFY}, options_.session_copies);
  t.set_bytes(CKA_VALUE, value.data(), value.size());
  auto l = pool_.lease();
  CK_OBJECT_HANDLE h = 0;
  l.check(l.fn()->C_CreateObject(l.session(), t.data(), t.size(), &h), "C_CreateObject");
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (cache_generation_ == l.generation()) cache_[cache_key(id)] = h;
}

template <typename Init>
void Token::init_operation(SessionPool::Lease& l, const KeyHandle& key, Init&& init, const char* what) {
  for (int attempt = 0;; ++attempt) {
    CK_OBJECT_HANDLE h = resolve(l, key);
    CK_RV rv = init(h);
    if (is_stale_handle(rv) && attempt == 0) {
      forget(key.id);
      continue;
    }
    // p11kms picks the mechanism from the key's type and usage, so these codes mean the object
    // is not the key it should be. A copy lives as long as the process: one made from a view of
    // the token object that was wrong at that moment (another process was writing the token;
    // seen once as CKR_KEY_TYPE_INCONSISTENT in test_cluster_crash) would fail every later
    // operation. It is replaced by a fresh copy, once per operation.
    if ((rv == CKR_KEY_TYPE_INCONSISTENT || rv == CKR_KEY_FUNCTION_NOT_PERMITTED) && attempt == 0 &&
        drop_copy(l, key.id, h)) {
      log::warn(std::string("hsm: ") + what + " refused the session copy of object " + encoding::hex_encode(key.id) +
                " (" + rv_name(rv) + "); it is made again from the token object");
      continue;
    }
    l.check(rv, what);
    return;
  }
}

bool Token::drop_copy(SessionPool::Lease& l, const ObjectId& id, CK_OBJECT_HANDLE copy) {
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    auto it = copies_.find(cache_key(id));
    if (it == copies_.end() || it->second != copy) return false;
    copies_.erase(it);
    l.fn()->C_DestroyObject(l.session(), copy);
  }
  pool_.end_streams(cache_key(id));  // started on the copy refused now
  return true;
}

Bytes Token::hmac(const KeyHandle& key, CK_MECHANISM_TYPE mechanism, const uint8_t* data, size_t len) {
  return sign(key, mechanism, nullptr, 0, data, len);  // an HMAC is a C_Sign without parameters
}

Bytes Token::sign(const KeyHandle& key, CK_MECHANISM_TYPE mechanism, void* params, size_t params_len,
                  const uint8_t* data, size_t len) {
  CK_MECHANISM mech{mechanism, params, static_cast<CK_ULONG>(params_len)};
  auto l = pool_.lease();
  init_operation(l, key, [&](CK_OBJECT_HANDLE h) { return l.fn()->C_SignInit(l.session(), &mech, h); }, "C_SignInit");
  Bytes out(1024);  // RSA-4096: 512 bytes; ECDSA P-384: 96; Ed25519: 64
  CK_ULONG out_len = out.size();
  uint8_t none = 0;
  CK_RV rv = l.fn()->C_Sign(l.session(), len ? const_cast<uint8_t*>(data) : &none, len, out.data(), &out_len);
  if (rv != CKR_OK) l.discard();
  l.check(rv, "C_Sign");
  out.resize(out_len);
  return out;
}

std::optional<CK_OBJECT_HANDLE> Token::find(SessionPool::Lease& l, const ObjectId& id) {
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    sync_generation(l);
    auto it = cache_.find(cache_key(id));
    if (it != cache_.end()) return it->second;
  }
  AttributeTemplate t;
  t.set_bytes(CKA_ID, id).set(CKA_TOKEN, true);
  auto found = find_all(l, t, 1);
  if (found.empty()) return std::nullopt;
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (cache_generation_ == l.generation()) cache_[cache_key(id)] = found.front();
  return found.front();
}

CK_OBJECT_HANDLE Token::handle(SessionPool::Lease& l, const ObjectId& id) {
  auto h = find_or_refresh(l, id);
  if (!h) throw ObjectMissing("token object " + encoding::hex_encode(id) + " is missing from the token");
  return *h;
}

// Objects are only looked up by ids the store holds, so a miss means another process made the
// object after this one last read the token, or it is really gone. The first is only cured by
// re-opening the module (SessionPool::Lease::refresh_view); an id still missing afterwards is
// remembered for a while, so a key whose object is really gone does not re-open the module on
// every request.
constexpr auto kConfirmedMissingFor = std::chrono::seconds(60);
constexpr size_t kMaxConfirmedMissing = 1024;

std::optional<CK_OBJECT_HANDLE> Token::find_or_refresh(SessionPool::Lease& l, const ObjectId& id) {
  auto h = find(l, id);
  if (h) return h;
  l.require_token_present();  // a vanished token loses every object: that is an outage
  const auto now = std::chrono::steady_clock::now();
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    auto it = confirmed_missing_.find(cache_key(id));
    if (it != confirmed_missing_.end() && now - it->second < kConfirmedMissingFor) return std::nullopt;
  }
  l.refresh_view();
  h = find(l, id);
  if (h) return h;
  l.require_token_present();
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (confirmed_missing_.size() >= kMaxConfirmedMissing) confirmed_missing_.clear();
  confirmed_missing_[cache_key(id)] = now;
  return std::nullopt;
}

void Token::forget(const ObjectId& id) {
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    cache_.erase(cache_key(id));
    session_cache_.erase(cache_key(id));
    copies_.erase(cache_key(id));
    no_ecb_.erase(cache_key(id));
  }
  pool_.end_streams(cache_key(id));  // a stream would keep the key's schedule in the module
}

void Token::sync_generation(const SessionPool::Lease& l) {
  if (cache_generation_ == l.generation()) return;
  cache_.clear();
  session_cache_.clear();
  copies_.clear();  // session objects went with the sessions
  not_copyable_.clear();
  cache_generation_ = l.generation();
}

// Copies are made for the keys in use, up to this many; past it further keys run on their token
// objects (never slower than without copies). Copies of keys deleted by another instance are
// dropped by the next listing (list_key_objects, the sweeper's), so they do not fill it.
constexpr size_t kMaxSessionCopies = 1024;

// A copy lives in the process and works on while the token is gone (SoftHSM: its directory
// removed), where the token object would fail the operation. So copies are used only while the
// token was seen present within this long; an outage fails operations (503) within it.
constexpr auto kTokenPresenceRecheck = std::chrono::seconds(1);

void Token::require_recently_present(SessionPool::Lease& l) {
  const int64_t now = std::chrono::steady_clock::now().time_since_epoch().count();
  if (now - present_at_ns_.load(std::memory_order_relaxed) >
      std::chrono::duration_cast<std::chrono::nanoseconds>(kTokenPresenceRecheck).count()) {
    l.require_token_present();  // TokenUnavailable: a 503, and the pool reconnects (dropping copies)
    present_at_ns_.store(now, std::memory_order_relaxed);
  }
}

CK_OBJECT_HANDLE Token::copy_or_object(SessionPool::Lease& l, const ObjectId& id) {
  if (!options_.session_copies) return handle(l, id);
  require_recently_present(l);
  const std::string k = cache_key(id);
  bool may_copy = false;
  auto cached = [&]() -> std::optional<CK_OBJECT_HANDLE> {
    std::lock_guard<std::mutex> lk(cache_mu_);
    sync_generation(l);
    auto it = copies_.find(k);
    if (it != copies_.end()) return it->second;
    may_copy = !not_copyable_.count(k) && copies_.size() < kMaxSessionCopies;
    return std::nullopt;
  };
  if (auto h = cached()) return *h;
  CK_OBJECT_HANDLE object = handle(l, id);
  if (!may_copy) return object;
  std::lock_guard<std::mutex> create_lock(copy_mu_);
  if (auto h = cached()) return *h;
  if (!may_copy) return object;
  AttributeTemplate t;
  t.set(CKA_TOKEN, false);  // all else as the original: private, sensitive, non-extractable
  CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
  CK_RV rv = l.fn()->C_CopyObject(l.session(), object, t.data(), t.size(), &copy);
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (rv != CKR_OK) {
    // The module's refusal (SoftHSM: CKR_ATTRIBUTE_READ_ONLY for a key made unmodifiable) is
    // final for this key, which runs on its token object from now on. Anything else (a stale
    // handle, a failing device) shows up again, and is reported, in the operation itself.
    switch (rv) {
      case CKR_ATTRIBUTE_READ_ONLY:
      case CKR_ACTION_PROHIBITED:
      case CKR_TEMPLATE_INCONSISTENT:
      case CKR_ATTRIBUTE_TYPE_INVALID:
      case CKR_ATTRIBUTE_VALUE_INVALID:
      case CKR_FUNCTION_NOT_SUPPORTED:
        not_copyable_.insert(k);
        log::info("hsm: object " + encoding::hex_encode(id) + " runs on the token object: the module will not copy it (" +
                  rv_name(rv) + ")");
        break;
      default:
        log::warn(std::string("hsm: C_CopyObject failed: ") + rv_name(rv));
        break;
    }
    return object;
  }
  if (cache_generation_ == l.generation()) copies_[k] = copy;
  return copy;
}

// Session objects live until the session that made them closes (the pool keeps its sessions
// for the process's life, and replaces one that failed: then the handle is stale and the
// caller's retry makes the object again). Bounded: past kMaxSessionObjects they are all
// destroyed and made again on demand.
constexpr size_t kMaxSessionObjects = 4096;

void Token::evict_session_objects_if_full(SessionPool::Lease& l) {
  std::vector<std::string> evicted;
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    if (session_cache_.size() < kMaxSessionObjects) return;
    for (const auto& entry : session_cache_) {
      l.fn()->C_DestroyObject(l.session(), entry.second);
      evicted.push_back(entry.first);
    }
    session_cache_.clear();
  }
  for (const auto& id : evicted) pool_.end_streams(id);  // a stream would outlive its object
}

CK_OBJECT_HANDLE Token::resolve(SessionPool::Lease& l, const KeyHandle& key) {
  if (key.base) return derive(l, key);
  if (!key.load) return copy_or_object(l, key.id);
  std::lock_guard<std::mutex> create_lock(load_mu_);
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    sync_generation(l);
    auto it = session_cache_.find(cache_key(key.id));
    if (it != session_cache_.end()) return it->second;
  }
  evict_session_objects_if_full(l);
  AttributeTemplate t = key.load();
  CK_OBJECT_HANDLE h = 0;
  l.check(l.fn()->C_CreateObject(l.session(), t.data(), t.size(), &h), "C_CreateObject");
  std::lock_guard<std::mutex> lk(cache_mu_);
  if (cache_generation_ == l.generation()) session_cache_[cache_key(key.id)] = h;
  return h;
}

// A derived key: the base first (a token object or a loaded session object), then one
// C_DeriveKey; cached and bounded like loaded session objects.
CK_OBJECT_HANDLE Token::derive(SessionPool::Lease& l, const KeyHandle& key) {
  auto cached = [&]() -> std::optional<CK_OBJECT_HANDLE> {
    std::lock_guard<std::mutex> lk(cache_mu_);
    sync_generation(l);
    auto it = session_cache_.find(cache_key(key.id));
    if (it != session_cache_.end()) return it->second;
    return std::nullopt;
  };
  if (auto h = cached()) return *h;
  for (int attempt = 0;; ++attempt) {
    CK_OBJECT_HANDLE base = resolve(l, *key.base);
    std::lock_guard<std::mutex> create_lock(load_mu_);
    if (auto h = cached()) return *h;
    evict_session_objects_if_full(l);
    CK_KEY_DERIVATION_STRING_DATA data{const_cast<uint8_t*>(key.derive_data.data()),
                                       static_cast<CK_ULONG>(key.derive_data.size())};
    CK_MECHANISM mech{CKM_AES_ECB_ENCRYPT_DATA, &data, sizeof data};
    AttributeTemplate t;
    t.set_ulong(CKA_CLASS, CKO_SECRET_KEY).set_ulong(CKA_KEY_TYPE, key.derived_type);
    t.set_ulong(CKA_VALUE_LEN, key.derived_bytes);
    // No CKA_MODIFIABLE: SoftHSM's C_DeriveKey refuses it (CKR_ATTRIBUTE_READ_ONLY, measured).
    t.set(CKA_TOKEN, false).set(CKA_PRIVATE, true).set(CKA_SENSITIVE, true).set(CKA_EXTRACTABLE, false);
    bool aes = key.derived_type == CKK_AES;
    t.set(CKA_ENCRYPT, aes).set(CKA_DECRYPT, aes).set(CKA_SIGN, !aes).set(CKA_VERIFY, !aes)
        .set(CKA_WRAP, false).set(CKA_UNWRAP, false).set(CKA_DERIVE, false);
    CK_OBJECT_HANDLE h = 0;
    CK_RV rv = l.fn()->C_DeriveKey(l.session(), &mech, base, t.data(), t.size(), &h);
    if (is_stale_handle(rv) && attempt == 0) {  // the base's session object went away
      forget(key.base->id);
      continue;
    }
    l.check(rv, "C_DeriveKey");
    std::lock_guard<std::mutex> lk(cache_mu_);
    if (cache_generation_ == l.generation()) session_cache_[cache_key(key.id)] = h;
    return h;
  }
}

void Token::drop_session_objects(const ObjectId& prefix) {
  std::string p = cache_key(prefix);
  pool_.end_streams(p);
  auto l = pool_.lease();
  std::lock_guard<std::mutex> create_lock(load_mu_);
  std::lock_guard<std::mutex> lk(cache_mu_);
  for (auto it = no_ecb_.begin(); it != no_ecb_.end();) {
    if (it->compare(0, p.size(), p) == 0) it = no_ecb_.erase(it); else ++it;
  }
  if (cache_generation_ != l.generation()) return;  // they went with their sessions
  for (auto it = session_cache_.begin(); it != session_cache_.end();) {
    if (it->first.compare(0, p.size(), p) == 0) {
      l.fn()->C_DestroyObject(l.session(), it->second);
      it = session_cache_.erase(it);
    } else {
      ++it;
    }
  }
}

// Decryption composed this way runs on the key's encrypt permission (CTR mode encrypts the
// counter blocks either way): a decrypt-only key (CKA_ENCRYPT false) is refused AES-ECB and
// runs CKM_AES_GCM in the token. p11kms's stored AES keys allow both.
std::optional<SecureBytes> Token::gcm_keystream(const KeyHandle& key, const Bytes& iv, size_t len) {
  if (!options_.compose_gcm || iv.size() != 12 || len > kComposedGcmMaxBytes) return std::nullopt;
  return ecb_keystream(key, composed_gcm::counter_blocks(iv, len));
}

std::optional<SecureBytes> Token::ecb_keystream(const KeyHandle& key, const Bytes& blocks) {
  const std::string tag = cache_key(key.id);
  {
    std::lock_guard<std::mutex> lk(cache_mu_);
    if (no_ecb_.count(tag)) return std::nullopt;
  }
  for (int attempt = 0;; ++attempt) {
    auto l = pool_.lease_stream(tag);
    require_recently_present(l);
    if (!l.stream_active()) {
      CK_MECHANISM ecb{CKM_AES_ECB, nullptr, 0};
      try {
        init_operation(l, key, [&](CK_OBJECT_HANDLE h) { return l.fn()->C_EncryptInit(l.session(), &ecb, h); },
                       "C_EncryptInit");
      } catch (const Pkcs11Error& e) {
        // The module's answer for this key (SoftHSM: CKR_MECHANISM_INVALID when
        // CKA_ALLOWED_MECHANISMS leaves AES-ECB out) is final: it runs CKM_AES_GCM from now on.
        switch (e.rv()) {
          case CKR_MECHANISM_INVALID:
          case CKR_KEY_FUNCTION_NOT_PERMITTED:
          case CKR_KEY_TYPE_INCONSISTENT:
          case CKR_FUNCTION_NOT_SUPPORTED: {
            {
              std::lock_guard<std::mutex> lk(cache_mu_);
              no_ecb_.insert(tag);  // erased with the key (forget, drop_session_objects)
            }
            const std::string why = "hsm: object " + encoding::hex_encode(key.id) +
                                    " runs AES-GCM in the token: the module will not run AES-ECB with it (" +
                                    rv_name(e.rv()) + ")";
            // Expected for a loaded decrypt-only key (the keyring's import): not worth an info line.
            if (key.load || key.base) log::debug(why); else log::info(why);
            return std::nullopt;
          }
          default:
            throw;
        }
      }
      l.keep_stream(tag);
    }
    SecureBytes out(blocks.size());
    CK_ULONG out_len = out.size();
    CK_RV rv = l.fn()->C_EncryptUpdate(l.session(), const_cast<uint8_t*>(blocks.data()), blocks.size(), out.data(), &out_len);
    if (rv == CKR_OK && out_len == blocks.size()) return out;
    l.discard();  // whatever state the operation is in, the session goes with it
    // A module that ended the kept operation on its own: start it again, once.
    if (rv == CKR_OPERATION_NOT_INITIALIZED && attempt == 0) continue;
    l.check(rv, "C_EncryptUpdate");
    throw Pkcs11Error("C_EncryptUpdate (AES-ECB returned a short result)", CKR_GENERAL_ERROR);
  }
}

Bytes Token::aes_gcm_encrypt(const KeyHandle& key, const Bytes& iv, const Bytes& aad,
                             const uint8_t* plaintext, size_t len) {
  if (auto keystream = gcm_keystream(key, iv, len)) {
    try {
      return composed_gcm::seal(*keystream, iv, aad, plaintext, len);
    } catch (const composed_gcm::Mismatch& e) {
      log::error(std::string("hsm: composed AES-GCM failed (") + e.what() + "); running it in the token");
    }
  }
  CK_GCM_PARAMS params{const_cast<uint8_t*>(iv.data()), iv.size(), iv.size() * 8,
                       const_cast<uint8_t*>(aad.data()), aad.size(), 128};
  CK_MECHANISM mech{CKM_AES_GCM, &params, sizeof params};
  auto l = pool_.lease();
  init_operation(l, key, [&](CK_OBJECT_HANDLE h) { return l.fn()->C_EncryptInit(l.session(), &mech, h); }, "C_EncryptInit");
  Bytes out(len + 16);
  CK_ULONG out_len = out.size();
  // An empty plaintext is valid (GCM gives just a tag), but modules refuse a null pointer
  // even for zero bytes (SoftHSM: CKR_ARGUMENTS_BAD; found by the fuzzer).
  uint8_t none = 0;
  uint8_t* in = len ? const_cast<uint8_t*>(plaintext) : &none;
  CK_RV rv = l.fn()->C_Encrypt(l.session(), in, len, out.data(), &out_len);
  if (rv != CKR_OK) l.discard();  // SoftHSM may leave the operation active (seen with ARGUMENTS_BAD)
  l.check(rv, "C_Encrypt");
  out.resize(out_len);
  return out;
}

std::vector<Bytes> Token::aes_gcm_encrypt_batch(const KeyHandle& key, const std::vector<GcmMessage>& batch,
                                                BatchGate::Scope& turn) {
  std::vector<Bytes> out(batch.size());
  auto composable = [](const GcmMessage& m) { return m.iv->size() == 12 && m.len <= kComposedGcmMaxBytes; };
  size_t i = 0;
  while (i < batch.size()) {
    // A run of messages whose counter blocks go to the token in one C_EncryptUpdate.
    size_t end = i, blocks = 1;
    if (options_.compose_gcm)
      while (end < batch.size() && composable(batch[end]) &&
             (end == i || blocks + composed_gcm::blocks_of(batch[end].len) <= kComposedBatchBlocks))
        blocks += composed_gcm::blocks_of(batch[end++].len);
    if (end > i) {
      const std::vector<GcmMessage> run(batch.begin() + i, batch.begin() + end);
      turn.next_item();
      if (auto keystream = ecb_keystream(key, composed_gcm::counter_blocks(run))) {
        try {
          auto sealed = composed_gcm::seal(*keystream, run);
          for (size_t k = 0; k < sealed.size(); ++k) out[i + k] = std::move(sealed[k]);
          i = end;
          continue;
        } catch (const composed_gcm::Mismatch& e) {
          log::error(std::string("hsm: composed AES-GCM failed (") + e.what() + "); running it in the token");
        }
      }
    } else {
      end = i + 1;
    }
    for (; i < end; ++i) {
      turn.next_item();
      out[i] = aes_gcm_encrypt(key, *batch[i].iv, *batch[i].aad, batch[i].data, batch[i].len);
    }
  }
  return out;
}

std::optional<SecureBytes> Token::aes_gcm_decrypt(const KeyHandle& key, const Bytes& iv, const Bytes& aad,
                                                  const uint8_t* ciphertext, size_t len) {
  if (len < 16) return std::nullopt;
  if (auto keystream = gcm_keystream(key, iv, len - 16)) {
    try {
      return composed_gcm::open(*keystream, iv, aad, ciphertext, len);
    } catch (const composed_gcm::Mismatch& e) {
      log::error(std::string("hsm: composed AES-GCM failed (") + e.what() + "); running it in the token");
    }
  }
  CK_GCM_PARAMS params{const_cast<uint8_t*>(iv.data()), iv.size(), iv.size() * 8,
                       const_cast<uint8_t*>(aad.data()), aad.size(), 128};
  CK_MECHANISM mech{CKM_AES_GCM, &params, sizeof params};
  auto l = pool_.lease();
  init_operation(l, key, [&](CK_OBJECT_HANDLE h) { return l.fn()->C_DecryptInit(l.session(), &mech, h); }, "C_DecryptInit");
  SecureBytes out(len);
  CK_ULONG out_len = out.size();
  CK_RV rv = l.fn()->C_Decrypt(l.session(), const_cast<uint8_t*>(ciphertext), len, out.data(), &out_len);
  // A failed tag check ends the operation; these codes are how modules report it (SoftHSM
  // 2.6.1 answers CKR_GENERAL_ERROR, measured; connection-class failures are not among them).
  if (rv == CKR_ENCRYPTED_DATA_INVALID || rv == CKR_ENCRYPTED_DATA_LEN_RANGE || rv == CKR_DATA_INVALID ||
      rv == CKR_FUNCTION_FAILED || rv == CKR_GENERAL_ERROR)
    return std::nullopt;
  if (rv != CKR_OK) l.discard();
  l.check(rv, "C_Decrypt");
  out.shrink(out_len);
  return out;
}

SecureBytes Token::aes_ecb_encrypt(const KeyHandle& key, const uint8_t* blocks, size_t len) {
  if (len % 16 != 0) throw std::invalid_argument("AES-ECB input must be whole 16-byte blocks");
  SecureBytes out(len);
  if (len == 0) return out;  // modules refuse empty input; nothing to compute
  CK_MECHANISM mech{CKM_AES_ECB, nullptr, 0};
  auto l = pool_.lease();
  init_operation(l, key, [&](CK_OBJECT_HANDLE h) { return l.fn()->C_EncryptInit(l.session(), &mech, h); }, "C_EncryptInit");
  CK_ULONG out_len = out.size();
  CK_RV rv = l.fn()->C_Encrypt(l.session(), const_cast<uint8_t*>(blocks), len, out.data(), &out_len);
  if (rv != CKR_OK) l.discard();
  l.check(rv, "C_Encrypt");
  if (out_len != len) throw Pkcs11Error("C_Encrypt (AES-ECB returned a short result)", CKR_GENERAL_ERROR);
  return out;
}

bool Token::destroy(const ObjectId& id) { return destroy(id, true); }
bool Token::destroy_own(const ObjectId& id) { return destroy(id, false); }

bool Token::destroy(const ObjectId& id, bool maybe_foreign) {
  auto l = pool_.lease();
  forget(id);
  if (options_.session_copies) {  // this process's copies go first: they would outlive the key
    AttributeTemplate c;
    c.set_bytes(CKA_ID, id).set(CKA_TOKEN, false);
    for (CK_OBJECT_HANDLE h : find_all(l, c)) l.fn()->C_DestroyObject(l.session(), h);
  }
  AttributeTemplate t;
  t.set_bytes(CKA_ID, id).set(CKA_TOKEN, true);
  auto handles = find_all(l, t);
  if (handles.empty() && maybe_foreign) {
    // Possibly made by another process after this one last read the token: re-read it rather
    // than leave the object behind as an orphan.
    if (!find_or_refresh(l, id)) return false;
    forget(id);
    handles = find_all(l, t);
  }
  bool destroyed = false;
  for (CK_OBJECT_HANDLE h : handles) {
    CK_RV rv = l.fn()->C_DestroyObject(l.session(), h);
    if (rv == CKR_OBJECT_HANDLE_INVALID) continue;
    l.check(rv, "C_DestroyObject");
    destroyed = true;
  }
  return destroyed;
}

bool Token::exists(const ObjectId& id) {
  auto l = pool_.lease();
  {  // a fresh look for the object itself; its copy, if any, stays valid and tracked
    std::lock_guard<std::mutex> lk(cache_mu_);
    cache_.erase(cache_key(id));
  }
  return find_or_refresh(l, id).has_value();  // "missing" only about a token that is there
}

std::vector<ObjectInfo> Token::list_key_objects() {
  auto l = pool_.lease();
  std::vector<ObjectInfo> out;
  for (CK_OBJECT_CLASS cls : {CKO_SECRET_KEY, CKO_PRIVATE_KEY}) {
    AttributeTemplate t;
    t.set_ulong(CKA_CLASS, cls).set(CKA_TOKEN, true);
    for (CK_OBJECT_HANDLE h : find_all(l, t)) {
      // One call into buffers that fit what the service writes (16-byte ids, short labels); only
      // a larger attribute costs a second call. With 10,000 keys the sweep's listing was
      // measured at ~0.9 CPU-s, half of it in C_GetAttributeValue.
      uint8_t id_buf[64];
      char label_buf[256];
      CK_ATTRIBUTE attrs[2] = {{CKA_ID, id_buf, sizeof id_buf}, {CKA_LABEL, label_buf, sizeof label_buf}};
      CK_RV rv = l.fn()->C_GetAttributeValue(l.session(), h, attrs, 2);
      ObjectInfo info;
      info.object_class = cls;
      if (rv == CKR_OK) {
        info.id.assign(id_buf, id_buf + attrs[0].ulValueLen);
        info.label.assign(label_buf, attrs[1].ulValueLen);
      } else {
        if (rv != CKR_BUFFER_TOO_SMALL) continue;
        attrs[0] = {CKA_ID, nullptr, 0};
        attrs[1] = {CKA_LABEL, nullptr, 0};
        if (l.fn()->C_GetAttributeValue(l.session(), h, attrs, 2) != CKR_OK) continue;
        info.id.resize(attrs[0].ulValueLen);
        info.label.assign(attrs[1].ulValueLen, '\0');
        attrs[0].pValue = info.id.data();
        attrs[1].pValue = info.label.data();
        if (l.fn()->C_GetAttributeValue(l.session(), h, attrs, 2) != CKR_OK) continue;
      }
      // Seed the handle cache: the start-up sweep lists every key, so no first request on a
      // key pays a C_FindObjects over the whole token (~160 ms with 10,000 keys, measured).
      {
        std::lock_guard<std::mutex> lk(cache_mu_);
        sync_generation(l);
        if (!info.id.empty()) cache_.emplace(cache_key(info.id), h);
      }
      out.push_back(std::move(info));
    }
  }
  if (options_.session_copies) drop_orphan_copies(l, out);
  return out;
}

// A key deleted by another instance leaves this process's copy behind (the store stops naming
// it, so it is never used); drop copies whose token object the listing no longer shows.
void Token::drop_orphan_copies(SessionPool::Lease& l, const std::vector<ObjectInfo>& listed) {
  std::unordered_set<std::string> ids;
  for (const auto& info : listed) ids.insert(cache_key(info.id));
  std::vector<CK_OBJECT_HANDLE> orphans;
  std::vector<std::string> orphan_ids;
  {
    std::lock_guard<std::mutex> create_lock(copy_mu_);
    std::lock_guard<std::mutex> lk(cache_mu_);
    if (cache_generation_ != l.generation()) return;
    for (auto it = copies_.begin(); it != copies_.end();) {
      if (ids.count(it->first)) {
        ++it;
      } else {
        orphans.push_back(it->second);
        orphan_ids.push_back(it->first);
        it = copies_.erase(it);
      }
    }
  }
  for (CK_OBJECT_HANDLE h : orphans) l.fn()->C_DestroyObject(l.session(), h);
  for (const auto& id : orphan_ids) pool_.end_streams(id);
}

}  // namespace p11kms::hsm
