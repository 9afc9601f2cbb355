#include "keys/byok_registry.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/time.hpp"

namespace p11kms::keys {
namespace {

constexpr const char* kPageKeySetting = "byok.page_token_key";
constexpr size_t kPageMacBytes = 16;

// "cck-" + 12 characters of [a-z0-9], from OpenSSL's DRBG (ids are public, not secrets).
std::string new_byok_id() {
  static const char alphabet[] = "abcdefghijklmnopqrstuvwxyz0123456789";
  unsigned char bytes[12];
  if (RAND_bytes(bytes, sizeof bytes) != 1) throw KeyError(ErrorKind::internal, "internal", "random id generation failed");
  std::string id = "cck-";
  for (unsigned char b : bytes) id += alphabet[b % 36];
  return id;
}

std::string base64url(const std::vector<uint8_t>& v) {
  std::string s = encoding::base64_encode(v);
  while (!s.empty() && s.back() == '=') s.pop_back();
  for (char& c : s) c = c == '+' ? '-' : c == '/' ? '_' : c;
  return s;
}

std::optional<std::vector<uint8_t>> unbase64url(std::string s) {
  for (char c : s)
    if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_'))
      return std::nullopt;
  for (char& c : s) c = c == '-' ? '+' : c == '_' ? '/' : c;
  while (s.size() % 4) s += '=';
  return encoding::base64_decode(s);
}

}  // namespace

ByokRegistry::ByokRegistry(store::MetadataStore& store, KeyService& keys, hsm::Token& token, ByokOptions options)
    : store_(store), keys_(keys), token_(token), options_(std::move(options)) {}

bool ByokRegistry::in_use(const store::ByokKeyRecord& r) const {
  return !r.target_key_id.empty() && keys_.usage().used_within(r.ns, r.target_key_id, options_.in_use_window_s);
}

ByokRegistry::Entry ByokRegistry::entry(store::ByokKeyRecord r) const {
  bool used = in_use(r);
  return Entry{std::move(r), used};
}

// Store failures become the service's 503, as in KeyService.
template <typename F>
auto store_guard(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const KeyError&) {
    throw;
  } catch (const store::StoreError& e) {
    log::error(std::string("store: ") + e.what());
    throw unavailable("the metadata store is unavailable");
  }
}

void ByokRegistry::record_validation(const store::ByokKeyRecord& r) {
  if (r.kind != kP11kmsKeyKind || r.target_key_id.empty()) return;
  auto probe = keys_.probe_root_key(r.ns, r.target_key_id);
  store_.set_byok_validation(r.ns, r.id, probe.ok ? "VALID" : "INVALID", probe.message,
                             probe.ok ? options_.region : std::string(), timefmt::now_unix());
}

ByokRegistry::Entry ByokRegistry::create(store::ByokKeyRecord r) {
  int64_t now = timefmt::now_unix();
  r.created_at = r.updated_at = now;
  r.deleted_at = 0;
  r.validation_phase = "INITIALIZING";
  r.validation_since = now;
  r.validation_region.clear();
  if (r.kind != kP11kmsKeyKind) r.validation_message = "no validator configured for provider " + r.provider;
  else r.validation_message.clear();
  store_guard([&] {
    for (int attempt = 0;; ++attempt) {
      r.id = new_byok_id();
      try {
        if (!store_.create_byok_key(r, options_.max_keys))
          throw conflict("quota exceeded: namespace \"" + r.ns + "\" already has " + std::to_string(options_.max_keys) +
                             " BYOK keys (byok.max_keys)",
                         "quota_exceeded");
        return;
      } catch (const store::ConflictError&) {
        if (attempt >= 4) throw;  // 36^12 ids: a repeat is a broken random generator
      }
    }
  });
  log::info("byok: registered " + r.ns + "/" + r.id + " (" + r.kind + ")");
  record_validation(r);
  auto stored = store_guard([&] { return store_.get_byok_key(r.ns, r.id); });
  if (!stored) throw KeyError(ErrorKind::internal, "internal", "a created BYOK key could not be read back");
  return entry(std::move(*stored));
}

std::optional<ByokRegistry::Entry> ByokRegistry::get(const std::string& ns, const std::string& id) {
  auto r = store_guard([&] { return store_.get_byok_key(ns, id); });
  if (!r || r->deleted_at) return std::nullopt;
  return entry(std::move(*r));
}

std::optional<ByokRegistry::Entry> ByokRegistry::validate(const std::string& ns, const std::string& id) {
  auto r = get(ns, id);
  if (!r) return std::nullopt;
  store_guard([&] { record_validation(r->record); });
  return get(ns, id);
}

std::vector<ByokRegistry::Entry> ByokRegistry::list(const std::string& ns) {
  auto rows = store_guard([&] { return store_.list_byok_keys(ns, "", 0); });
  std::vector<Entry> out;
  out.reserve(rows.size());
  for (auto& r : rows) out.push_back(entry(std::move(r)));
  return out;
}

std::optional<ByokRegistry::Entry> ByokRegistry::rename(const std::string& ns, const std::string& id,
                                                        const std::string& display_name) {
  bool ok = store_guard([&] { return store_.update_byok_display_name(ns, id, display_name, timefmt::now_unix()); });
  if (!ok) return std::nullopt;
  return get(ns, id);
}

void ByokRegistry::remove(const std::string& ns, const std::string& id) {
  auto r = get(ns, id);
  if (!r) throw not_found("key \"" + id + "\" not found");
  if (r->in_use)
    throw conflict("key " + id + " is IN_USE: its p11kms key served a client's operation within the last " +
                       std::to_string(options_.in_use_window_s) + " s (byok.in_use_window)",
                   "key_in_use");
  bool ok = store_guard([&] { return store_.delete_byok_key(ns, id, timefmt::now_unix()); });
  if (!ok) throw not_found("key \"" + id + "\" not found");
  log::info("byok: deleted " + ns + "/" + id);
}

size_t ByokRegistry::validate_all() {
  std::vector<store::ByokKeyRecord> rows;
  try {
    rows = store_.live_byok_keys_of_kind(kP11kmsKeyKind);
  } catch (const std::exception& e) {
    log::warn(std::string("byok: validation job could not list keys: ") + e.what());
    return 0;
  }
  size_t n = 0;
  for (const auto& r : rows) {
    try {
      record_validation(r);
      ++n;
    } catch (const std::exception& e) {
      log::warn("byok: validation of " + r.ns + "/" + r.id + " not recorded: " + e.what());
    }
  }
  return n;
}

const hsm::SecureBytes& ByokRegistry::page_key() {
  std::lock_guard<std::mutex> lk(page_key_mu_);
  if (!page_key_.empty()) return page_key_;
  try {
    hsm::ObjectId id;
    if (auto hex = store_.get_setting(kPageKeySetting); hex && encoding::hex_decode(*hex)) {
      id = *encoding::hex_decode(*hex);
    } else {
      id = token_.new_object_id();
      // Not labelled p11kms/<ns>/...: it is no key version, and the sweep must not touch it.
      token_.generate_hmac_key(id, 32, "p11kms-system/byok-page-hmac");
      // Instances starting together agree on the first key recorded, so page tokens made by
      // one are accepted by the others; a loser's key is destroyed.
      std::string stored = store_.put_setting_if_absent(kPageKeySetting, encoding::hex_encode(id));
      if (stored != encoding::hex_encode(id)) {
        token_.destroy_own(id);
        auto theirs = encoding::hex_decode(stored);
        if (!theirs) throw KeyError(ErrorKind::internal, "internal", "corrupt byok page key id in the store");
        id = *theirs;
      }
    }
    static const std::string label = "p11kms byok page tokens v1";
    auto derived = token_.hmac_sha256(id, reinterpret_cast<const uint8_t*>(label.data()), label.size());
    page_key_ = hsm::SecureBytes(derived.data(), derived.size());
    OPENSSL_cleanse(derived.data(), derived.size());
  } catch (const KeyError&) {
    throw;
  } catch (const std::exception& e) {
    log::warn(std::string("byok: page token key not available: ") + e.what());
    throw unavailable("the token is unavailable: page tokens cannot be made or checked");
  }
  return page_key_;
}

namespace {
std::vector<uint8_t> page_mac(const hsm::SecureBytes& key, const std::string& ns, const std::string& query,
                              const std::string& after_id) {
  std::string msg = "v1";
  for (const std::string* part : {&ns, &query, &after_id}) {
    msg += '\0';
    msg += std::to_string(part->size()) + ":" + *part;
  }
  unsigned char mac[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (!HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()), reinterpret_cast<const unsigned char*>(msg.data()),
            msg.size(), mac, &len))
    throw KeyError(ErrorKind::internal, "internal", "HMAC failed");
  return std::vector<uint8_t>(mac, mac + kPageMacBytes);
}
}  // namespace

std::string ByokRegistry::page_token(const std::string& ns, const std::string& query, const std::string& after_id) {
  if (after_id.size() > 120) throw KeyError(ErrorKind::internal, "internal", "id too long for a page token");
  std::vector<uint8_t> raw;
  raw.push_back(1);  // format
  raw.insert(raw.end(), after_id.begin(), after_id.end());
  auto mac = page_mac(page_key(), ns, query, after_id);
  raw.insert(raw.end(), mac.begin(), mac.end());
  return base64url(raw);
}

std::optional<std::string> ByokRegistry::open_page_token(const std::string& ns, const std::string& query,
                                                         const std::string& token) {
  if (token.empty() || token.size() > 255) return std::nullopt;
  auto raw = unbase64url(token);
  if (!raw || raw->size() < 1 + kPageMacBytes || (*raw)[0] != 1) return std::nullopt;
  if (base64url(*raw) != token) return std::nullopt;  // one spelling only: unused bits edited are an edit too
  std::string after_id(raw->begin() + 1, raw->end() - kPageMacBytes);
  auto expected = page_mac(page_key(), ns, query, after_id);
  if (CRYPTO_memcmp(expected.data(), raw->data() + raw->size() - kPageMacBytes, kPageMacBytes) != 0) return std::nullopt;
  return after_id;
}

}  // namespace p11kms::keys
