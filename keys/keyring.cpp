// The Kong keyring, cluster strategy (see keyring.hpp for storage, docs/api/keyring.md for the
// export format).
#include "keys/keyring.hpp"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/time.hpp"
#include "hsm/errors.hpp"
#include "keys/errors.hpp"
#include "keys/signing.hpp"

namespace p11kms::keys {
namespace {

using json = nlohmann::json;

constexpr const char* kImportKeySetting = "keyring.import_key";
constexpr size_t kIvBytes = 12, kTagBytes = 16;

std::string prefix_of(const std::string& ns) { return "keyring/" + ns + "/keys/"; }
std::string active_setting(const std::string& ns) { return "keyring/" + ns + "/active"; }
std::string seal_aad(const std::string& ns, const std::string& id) { return "p11kms-keyring/" + ns + "/" + id; }

// Failures of the layers below as the service's one error type (as KeyService::guarded).
template <typename F>
auto guard(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const KeyError&) {
    throw;
  } catch (const hsm::ImportRejected& e) {
    throw invalid(std::string("the keyring export does not open: ") + e.what(), "invalid_data");
  } catch (const hsm::TokenUnavailable& e) {
    throw unavailable(e.what());
  } catch (const hsm::ObjectMissing& e) {
    throw unavailable(std::string("the keyring import key's token object is missing: ") + e.what());
  } catch (const hsm::Pkcs11Error& e) {
    log::error(std::string("hsm: ") + e.what());
    throw unavailable(std::string("the HSM refused the operation: ") + e.what());
  } catch (const store::StoreError& e) {
    log::error(std::string("store: ") + e.what());
    throw unavailable("the metadata store is unavailable");
  }
}

struct PkeyFree { void operator()(EVP_PKEY* p) const { EVP_PKEY_free(p); } };
struct PkeyCtxFree { void operator()(EVP_PKEY_CTX* p) const { EVP_PKEY_CTX_free(p); } };
struct CipherCtxFree { void operator()(EVP_CIPHER_CTX* p) const { EVP_CIPHER_CTX_free(p); } };
struct BioFree { void operator()(BIO* p) const { BIO_free(p); } };

std::unique_ptr<EVP_PKEY, PkeyFree> recipient_key(const std::string& pem) {
  std::unique_ptr<BIO, BioFree> bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::unique_ptr<EVP_PKEY, PkeyFree> key(bio ? PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  return key;
}

// RSA-OAEP (SHA-256, MGF1-SHA-256, no label) with the recipient's public key: a public-key
// operation, done here.
hsm::Bytes oaep_sha256_encrypt(EVP_PKEY* pub, const hsm::SecureBytes& data) {
  std::unique_ptr<EVP_PKEY_CTX, PkeyCtxFree> ctx(EVP_PKEY_CTX_new(pub, nullptr));
  size_t n = 0;
  if (!ctx || EVP_PKEY_encrypt_init(ctx.get()) != 1 || EVP_PKEY_CTX_set_rsa_padding(ctx.get(), RSA_PKCS1_OAEP_PADDING) != 1 ||
      EVP_PKEY_CTX_set_rsa_oaep_md(ctx.get(), EVP_sha256()) != 1 || EVP_PKEY_CTX_set_rsa_mgf1_md(ctx.get(), EVP_sha256()) != 1 ||
      EVP_PKEY_encrypt(ctx.get(), nullptr, &n, data.data(), data.size()) != 1)
    throw KeyError(ErrorKind::internal, "internal", "RSA-OAEP encryption to the keyring recipient key failed");
  hsm::Bytes out(n);
  if (EVP_PKEY_encrypt(ctx.get(), out.data(), &n, data.data(), data.size()) != 1)
    throw KeyError(ErrorKind::internal, "internal", "RSA-OAEP encryption to the keyring recipient key failed");
  out.resize(n);
  return out;
}

// AES-256-GCM, no AAD: iv || ciphertext || tag.
hsm::Bytes gcm_encrypt(const hsm::SecureBytes& key, const hsm::Bytes& iv, const std::string& plaintext) {
  std::unique_ptr<EVP_CIPHER_CTX, CipherCtxFree> ctx(EVP_CIPHER_CTX_new());
  hsm::Bytes out(iv);
  out.resize(iv.size() + plaintext.size() + kTagBytes);
  int n = 0, m = 0;
  bool ok = ctx && EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, nullptr, nullptr) == 1 &&
            EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_IVLEN, static_cast<int>(iv.size()), nullptr) == 1 &&
            EVP_EncryptInit_ex(ctx.get(), nullptr, nullptr, key.data(), iv.data()) == 1 &&
            EVP_EncryptUpdate(ctx.get(), out.data() + iv.size(), &n, reinterpret_cast<const uint8_t*>(plaintext.data()),
                              static_cast<int>(plaintext.size())) == 1 &&
            EVP_EncryptFinal_ex(ctx.get(), out.data() + iv.size() + n, &m) == 1 &&
            EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kTagBytes, out.data() + iv.size() + n + m) == 1;
  if (!ok) throw KeyError(ErrorKind::internal, "internal", "AES-GCM encryption of the keyring export failed");
  return out;
}

std::string b64(const hsm::SecureBytes& b) { return encoding::base64_encode(b.data(), b.size()); }

}  // namespace

Keyring::Keyring(store::MetadataStore& store, KeyService& keys, hsm::Token& token, KeyringOptions options)
    : store_(store), keys_(keys), token_(token), options_(std::move(options)) {}

bool Keyring::valid_id(const std::string& id) {
  if (id.size() != kIdLength) return false;
  for (char c : id)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))) return false;
  return true;
}

std::vector<Keyring::Entry> Keyring::entries(const std::string& ns) {
  std::vector<Entry> out;
  std::string prefix = prefix_of(ns);
  for (const auto& [name, value] : store_.list_settings(prefix)) {
    if (name.rfind(prefix, 0) != 0) continue;
    Entry e;
    e.id = name.substr(prefix.size());
    size_t space = value.find(' ');
    if (space == std::string::npos) continue;
    try {
      e.created_at = std::stoll(value.substr(0, space));
    } catch (...) {
      continue;
    }
    e.sealed = value.substr(space + 1);
    out.push_back(std::move(e));
  }
  std::sort(out.begin(), out.end(),
            [](const Entry& a, const Entry& b) { return a.created_at != b.created_at ? a.created_at < b.created_at : a.id < b.id; });
  return out;
}

std::optional<std::string> Keyring::active_of(const std::string& ns) { return store_.get_setting(active_setting(ns)); }

hsm::SecureBytes Keyring::unseal(const std::string& ns, const Entry& e) {
  auto key = keys_.unseal_secret(seal_aad(ns, e.id), e.sealed);
  if (!key) throw KeyError(ErrorKind::internal, "internal", "sealed keyring key " + e.id + " does not open");
  return std::move(*key);
}

std::string Keyring::new_id() {
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  std::string id;
  while (id.size() < kIdLength) {
    for (uint8_t b : token_.random(16)) {
      if (b < 248 && id.size() < kIdLength) id += alphabet[b % 62];  // 248 = 4 * 62: no modulo bias
    }
  }
  return id;
}

void Keyring::put_key(const std::string& ns, const std::string& id, const hsm::SecureBytes& key) {
  // Microseconds, so keys added within one second still list in the order they came.
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::system_clock::now().time_since_epoch()).count();
  std::string value = std::to_string(us) + " " + keys_.seal_secret(seal_aad(ns, id), key);
  if (store_.put_setting_if_absent(prefix_of(ns) + id, value) != value)
    throw conflict("keyring key \"" + id + "\" already exists", "keyring_id_exists");
}

Keyring::View Keyring::view(const std::string& ns) {
  return guard([&] {
    View v;
    for (auto& e : entries(ns)) v.ids.push_back(e.id);
    v.active = active_of(ns);
    return v;
  });
}

void Keyring::require_cluster() const {
  if (options_.strategy != KeyringStrategy::cluster)
    throw invalid("only available with the cluster keyring strategy", "wrong_strategy");
}

Keyring::Generated Keyring::generate(const std::string& ns) {
  require_cluster();
  return guard([&] {
    std::lock_guard<std::mutex> lk(mu_);
    Generated g;
    g.key = token_.random_secret(kKeyBytes);  // C_GenerateRandom in the token
    for (int attempt = 0;; ++attempt) {
      g.id = new_id();
      try {
        put_key(ns, g.id, g.key);
        break;
      } catch (const KeyError& e) {
        if (e.kind() != ErrorKind::conflict || attempt >= 4) throw;
      }
    }
    store_.put_setting(active_setting(ns), g.id);
    log::info("keyring: generated key " + g.id + " in namespace " + ns + " (now active)");
    return g;
  });
}

void Keyring::remove(const std::string& ns, const std::string& id) {
  require_cluster();
  guard([&] {
    std::lock_guard<std::mutex> lk(mu_);
    if (!valid_id(id) || !store_.get_setting(prefix_of(ns) + id))
      throw not_found("keyring key \"" + id + "\" not found");
    if (active_of(ns) == id)
      throw conflict("keyring key \"" + id + "\" is the active key; generate or import another key first",
                     "keyring_active_key");
    store_.delete_setting(prefix_of(ns) + id);
    log::info("keyring: removed key " + id + " from namespace " + ns);
  });
}

void Keyring::import_raw(const std::string& ns, const std::string& id, const hsm::SecureBytes& key) {
  require_cluster();
  if (!valid_id(id)) throw invalid("id must be 8 characters of [A-Za-z0-9]", "invalid_id");
  if (key.size() != kKeyBytes)
    throw invalid("data must be the base64 of a 32-byte (256-bit) key, not " + std::to_string(key.size()) + " bytes",
                  "invalid_data");
  guard([&] {
    std::lock_guard<std::mutex> lk(mu_);
    bool was_empty = entries(ns).empty();
    put_key(ns, id, key);
    if (was_empty || !active_of(ns)) store_.put_setting(active_setting(ns), id);
    log::info("keyring: imported key " + id + " into namespace " + ns);
  });
}

std::string Keyring::export_keyring(const std::string& ns) {
  require_cluster();
  if (options_.recipient_public_key_pem.empty())
    throw invalid("keyring export needs a recipient public key: set keyring.recipient_public_key_file in the config",
                  "no_recipient_key");
  auto pub = recipient_key(options_.recipient_public_key_pem);
  if (!pub || EVP_PKEY_base_id(pub.get()) != EVP_PKEY_RSA || EVP_PKEY_bits(pub.get()) < 2048)
    throw invalid("keyring.recipient_public_key_file is not an RSA public key of at least 2048 bits", "no_recipient_key");
  return guard([&] {
    std::string doc;
    {
      std::lock_guard<std::mutex> lk(mu_);
      json keys = json::array();
      for (auto& e : entries(ns)) {
        auto k = unseal(ns, e);
        keys.push_back({{"id", e.id}, {"key", b64(k)}});
      }
      auto active = active_of(ns);
      json d = {{"version", 1}, {"active", active ? json(*active) : json(nullptr)}, {"keys", std::move(keys)}};
      doc = d.dump();
      // nlohmann's strings are freed without wiping; the dump is wiped below.
      for (auto& k : d["keys"]) {
        auto& s = k["key"].get_ref<std::string&>();
        OPENSSL_cleanse(s.data(), s.size());
      }
    }
    auto cek = token_.random_secret(32);  // the fresh AES-256 key, from C_GenerateRandom
    auto wrapped = oaep_sha256_encrypt(pub.get(), cek);
    auto iv = token_.random(kIvBytes);
    auto body = gcm_encrypt(cek, iv, doc);
    OPENSSL_cleanse(doc.data(), doc.size());
    wrapped.insert(wrapped.end(), body.begin(), body.end());
    log::info("keyring: exported namespace " + ns);
    return encoding::base64_encode(wrapped);
  });
}

void Keyring::import_export(const std::string& ns, const std::string& data_base64) {
  require_cluster();
  guard([&] {
    auto setting = store_.get_setting(kImportKeySetting);
    if (!setting)
      throw invalid("this instance has no keyring import key: run `p11kms keyring init -config FILE` and give its "
                    "public key to the exporting side",
                    "no_import_key");
    auto key_id = encoding::hex_decode(setting->substr(0, setting->find('\n')));
    if (!key_id) throw KeyError(ErrorKind::internal, "internal", "corrupt keyring.import_key setting");
    auto blob = encoding::base64_decode(data_base64);
    if (!blob) throw invalid("data is not valid base64", "invalid_data");
    size_t k = token_.rsa_modulus_bytes(*key_id);
    if (blob->size() < k + kIvBytes + kTagBytes)
      throw invalid("data is too short for an export made for this instance's " + std::to_string(k * 8) +
                        "-bit key: RSA-OAEP (" + std::to_string(k) + " bytes) || IV (12) || ciphertext || tag (16)",
                    "invalid_data");
    hsm::Bytes rsa_part(blob->begin(), blob->begin() + k);
    // RSA in the token (raw RSA + OAEP decoding here when the module's OAEP refuses SHA-256).
    bool module_oaep = false;
    auto cek = token_.rsa_oaep_decrypt(*key_id, rsa_part, CKM_SHA256, &module_oaep);
    log::debug(std::string("keyring: import RSA step: ") +
               (module_oaep ? "CKM_RSA_PKCS_OAEP (SHA-256) in the token"
                            : "CKM_RSA_X_509 in the token, OAEP-SHA-256 decoding in the process (the module's OAEP "
                              "refuses SHA-256)"));
    if (cek.size() != 32) throw invalid("the keyring export does not open: its RSA-OAEP part is not a 256-bit key", "invalid_data");
    // The content key goes back into the token as a non-extractable session object (CKA_DECRYPT
    // only), is wiped here, and AES-GCM runs in the token.
    hsm::ObjectId cache_id = token_.random(16);
    hsm::KeyHandle handle(cache_id, [&cek] { return hsm::session_secret_template(CKK_AES, cek, {CKA_DECRYPT}); });
    hsm::Bytes iv(blob->begin() + k, blob->begin() + k + kIvBytes);
    std::optional<hsm::SecureBytes> plain;
    try {
      plain = token_.aes_gcm_decrypt(handle, iv, {}, blob->data() + k + kIvBytes, blob->size() - k - kIvBytes);
    } catch (...) {
      cek.wipe();
      token_.drop_session_objects(cache_id);
      throw;
    }
    cek.wipe();
    token_.drop_session_objects(cache_id);
    if (!plain) throw invalid("the keyring export does not open: its AES-GCM tag does not verify (tampered, or made "
                              "for another instance's key)", "invalid_data");
    json doc;
    try {
      doc = json::parse(plain->data(), plain->data() + plain->size());
    } catch (const json::exception&) {
      throw invalid("the keyring export's document is not JSON", "invalid_data");
    }
    plain->wipe();
    if (!doc.is_object() || doc.value("version", 0) != 1 || !doc.contains("keys") || !doc["keys"].is_array())
      throw invalid("the keyring export's document is not a version 1 keyring", "invalid_data");
    struct Item {
      std::string id;
      hsm::SecureBytes key;
    };
    std::vector<Item> items;
    for (auto& k : doc["keys"]) {
      if (!k.is_object() || !k.contains("id") || !k["id"].is_string() || !k.contains("key") || !k["key"].is_string())
        throw invalid("the keyring export's document holds a malformed key entry", "invalid_data");
      auto& text = k["key"].get_ref<std::string&>();
      auto raw = encoding::base64_decode(text);
      OPENSSL_cleanse(text.data(), text.size());
      std::string id = k["id"].get<std::string>();
      if (!valid_id(id) || !raw || raw->size() != kKeyBytes) {
        if (raw) OPENSSL_cleanse(raw->data(), raw->size());
        throw invalid("the keyring export's document holds an invalid key entry \"" + (valid_id(id) ? id : "?") + "\"",
                      "invalid_data");
      }
      items.push_back({id, hsm::SecureBytes(raw->data(), raw->size())});
      OPENSSL_cleanse(raw->data(), raw->size());
    }
    std::optional<std::string> export_active;
    if (doc.contains("active") && doc["active"].is_string()) export_active = doc["active"].get<std::string>();
    if (export_active && std::none_of(items.begin(), items.end(), [&](const Item& i) { return i.id == *export_active; }))
      throw invalid("the keyring export's active key is not among its keys", "invalid_data");

    std::lock_guard<std::mutex> lk(mu_);
    // Check everything first: a conflicting id imports nothing.
    std::vector<const Item*> fresh;
    for (const auto& item : items) {
      auto existing = store_.get_setting(prefix_of(ns) + item.id);
      if (!existing) {
        fresh.push_back(&item);
        continue;
      }
      Entry e{item.id, 0, existing->substr(existing->find(' ') + 1)};
      auto mine = unseal(ns, e);
      if (mine.size() != item.key.size() || CRYPTO_memcmp(mine.data(), item.key.data(), mine.size()) != 0)
        throw conflict("keyring key \"" + item.id + "\" exists here with another key; nothing was imported",
                       "keyring_id_exists");
    }
    for (const Item* item : fresh) put_key(ns, item->id, item->key);
    if (export_active) store_.put_setting(active_setting(ns), *export_active);
    log::info("keyring: imported an export into namespace " + ns + " (" + std::to_string(fresh.size()) + " new of " +
              std::to_string(items.size()) + " keys)");
  });
}

Keyring::View Keyring::sync(const std::string& ns) {
  if (options_.strategy != KeyringStrategy::vault || !options_.vault_source)
    throw invalid("only available with the vault keyring strategy", "wrong_strategy");
  if (ns != kVaultNamespace)
    throw invalid("the vault keyring strategy serves the \"" + std::string(kVaultNamespace) +
                      "\" namespace's keyring only; this request is for namespace \"" + ns + "\"",
                  "wrong_namespace");
  const std::string& where = options_.vault_description;
  // Read and check the whole secret before anything is written.
  std::vector<KvKeyVersion> versions = options_.vault_source();
  struct Item {
    std::string id;
    int version = 0;
    hsm::SecureBytes key;
  };
  std::vector<Item> items;  // oldest first; an id seen again moves to its latest version
  for (auto& v : versions) {
    std::string at = "Vault secret " + where + " version " + std::to_string(v.version);
    if (!v.id) throw bad_gateway(at + " has no string field \"id\" (Kong's layout: id and key)", "vault_bad_secret");
    if (!valid_id(*v.id))
      throw bad_gateway(at + ": id must be 8 characters of [A-Za-z0-9]", "vault_bad_secret");
    if (!v.key) throw bad_gateway(at + " (id " + *v.id + ") has no string field \"key\"", "vault_bad_secret");
    const std::string& text = v.key->reveal();
    auto raw = encoding::base64_decode(text);
    if (!raw) throw bad_gateway(at + " (id " + *v.id + "): key is not valid base64", "vault_bad_secret");
    hsm::SecureBytes key(raw->data(), raw->size());
    if (!raw->empty()) OPENSSL_cleanse(raw->data(), raw->size());
    v.key->wipe();
    if (key.size() != kKeyBytes)
      throw bad_gateway(at + " (id " + *v.id + "): key must be the base64 of a 32-byte (256-bit) key, not " +
                            std::to_string(key.size()) + " bytes",
                        "vault_bad_secret");
    auto same = std::find_if(items.begin(), items.end(), [&](const Item& i) { return i.id == *v.id; });
    if (same != items.end()) {
      if (CRYPTO_memcmp(same->key.data(), key.data(), kKeyBytes) != 0)
        throw bad_gateway("Vault secret " + where + " versions " + std::to_string(same->version) + " and " +
                              std::to_string(v.version) + " hold id " + *v.id + " with different keys",
                          "vault_bad_secret");
      items.erase(same);
    }
    items.push_back({*v.id, v.version, std::move(key)});
  }
  return guard([&] {
    // Every key is sealed afresh (one token call each) before the store is touched, so a token
    // failure changes nothing. `created` is the Vault version, so ids list in version order.
    std::vector<std::string> values;
    for (const auto& item : items)
      values.push_back(std::to_string(item.version) + " " + keys_.seal_secret(seal_aad(ns, item.id), item.key));
    std::lock_guard<std::mutex> lk(mu_);
    size_t removed = 0;
    for (auto& e : entries(ns)) {
      if (std::none_of(items.begin(), items.end(), [&](const Item& i) { return i.id == e.id; })) {
        store_.delete_setting(prefix_of(ns) + e.id);
        ++removed;
      }
    }
    for (size_t i = 0; i < items.size(); ++i) store_.put_setting(prefix_of(ns) + items[i].id, values[i]);
    if (items.empty())
      store_.delete_setting(active_setting(ns));
    else
      store_.put_setting(active_setting(ns), items.back().id);
    View v;
    for (const auto& i : items) v.ids.push_back(i.id);
    if (!items.empty()) v.active = items.back().id;
    log::info("keyring: synced namespace " + ns + " from Vault secret " + where + ": " + std::to_string(items.size()) +
              " keys, " + std::to_string(removed) + " removed, active " + (v.active ? *v.active : std::string("none")));
    return v;
  });
}

Keyring::InitResult Keyring::import_import_key(const hsm::SecretString& pem, bool force) {
  return guard([&] {
    std::lock_guard<std::mutex> lk(mu_);
    auto existing = store_.get_setting(kImportKeySetting);
    if (existing && !force)
      throw conflict("this instance already has a keyring import key; -force replaces it (exports made for the old one "
                     "no longer open)");
    auto id = token_.new_object_id();
    hsm::Bytes spki;
    try {
      spki = token_.import_rsa_decryption_key(id, "p11kms-system/keyring-import-key", pem);
    } catch (const std::invalid_argument& e) {
      throw invalid(e.what(), "invalid_key");
    }
    std::string value = encoding::hex_encode(id) + "\n" + public_key_pem(spki);
    if (existing) {
      store_.put_setting(kImportKeySetting, value);
      if (auto old = encoding::hex_decode(existing->substr(0, existing->find('\n')))) token_.destroy(*old);
    } else if (store_.put_setting_if_absent(kImportKeySetting, value) != value) {
      token_.destroy_own(id);
      throw conflict("another instance made a keyring import key at the same moment; nothing changed");
    }
    log::info("keyring: imported the keyring import key into the token");
    return InitResult{public_key_pem(spki), true};
  });
}

Keyring::InitResult Keyring::init_import_key(bool force) {
  return guard([&] {
    std::lock_guard<std::mutex> lk(mu_);
    auto existing = store_.get_setting(kImportKeySetting);
    if (existing && !force) return InitResult{existing->substr(existing->find('\n') + 1), false};
    auto id = token_.new_object_id();
    auto spki = token_.generate_wrapping_key_pair(id, "p11kms-system/keyring-import-key", kImportKeyBits);
    std::string value = encoding::hex_encode(id) + "\n" + public_key_pem(spki);
    if (existing) {
      store_.put_setting(kImportKeySetting, value);
      if (auto old = encoding::hex_decode(existing->substr(0, existing->find('\n')))) token_.destroy(*old);
    } else if (store_.put_setting_if_absent(kImportKeySetting, value) != value) {
      token_.destroy_own(id);  // another instance made one at the same moment: theirs wins
      auto theirs = *store_.get_setting(kImportKeySetting);
      return InitResult{theirs.substr(theirs.find('\n') + 1), false};
    }
    log::info("keyring: created the RSA-" + std::to_string(kImportKeyBits) + " keyring import key in the token");
    return InitResult{public_key_pem(spki), true};
  });
}

}  // namespace p11kms::keys
