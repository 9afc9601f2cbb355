// The Kong keyring (cluster strategy): per namespace, a set of AES-256 data keys with ids of 8
// characters of [A-Za-z0-9] and one active key, exported to / imported from another instance.
//
// Storage: keyring keys are exportable by nature (Kong hands them out), so they follow
// DESIGN.md's rule for exportable keys: made by the token (C_GenerateRandom), kept only as
// ciphertext under the token-resident master key (KeyService::seal_secret: AES-256-GCM, or
// aes-ctr-hmac where the module lacks GCM; keys/master_seal.hpp; AAD
// "p11kms-keyring/<ns>/<id>", so a blob cannot be moved to another id or namespace). They are
// not KeyService keys (they have no names, versions or lifecycle, and must not show up in the
// other dialects' key lists), so they live in store settings next to the keys:
//   keyring/<ns>/keys/<id> = "<created, unix microseconds> <sealed>"
//   keyring/<ns>/active    = <id>
// The instance's import key pair (the RSA key an export is made for) is a persistent token
// object, CKA_DECRYPT/CKA_UNWRAP only, non-extractable; its CKA_ID and public PEM are the
// setting keyring.import_key = "<hex id>\n<PEM>". Export format: docs/api/keyring.md.
//
// Vault strategy: the `root` namespace's keyring is a copy of a Vault KV v2 secret in Kong's
// layout (each live version holds `id` and `key`; the latest live version is active), read
// through a KeyringSource (app/vault_kv.cpp, the only code that speaks HTTP to Vault) at start-up
// and on sync(). The copy is stored exactly as cluster keys are (sealed settings, created = the
// Vault version number, so ids list in version order); generate/remove/import/export answer 400.
#pragma once

#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "hsm/secret.hpp"
#include "hsm/token.hpp"
#include "keys/key_service.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

// One live version of the vault strategy's KV v2 secret, its fields as Vault holds them (Kong's
// layout: `id`, and `key` = base64 of the 32-byte key); Keyring::sync validates them.
struct KvKeyVersion {
  int version = 0;
  std::optional<std::string> id;          // absent or not a string: nullopt
  std::optional<hsm::SecretString> key;   // likewise
};
// Reads every live (not deleted, not destroyed) version of the secret, oldest first. Throws
// KeyError: unavailable (503) when Vault cannot be reached or is sealed; bad_gateway (502) when
// it refuses (403), has no such secret, or answers something that is not KV v2.
using KeyringSource = std::function<std::vector<KvKeyVersion>()>;

enum class KeyringStrategy { cluster, vault };

struct KeyringOptions {
  // keyring.recipient_public_key_file's content (PEM, RSA >= 2048); empty: export answers 400.
  std::string recipient_public_key_pem;
  KeyringStrategy strategy = KeyringStrategy::cluster;
  KeyringSource vault_source;        // vault strategy: where sync() reads the keyring
  std::string vault_description;     // "secret/keyring at https://vault:8200", for messages and logs
};

class Keyring {
 public:
  static constexpr size_t kKeyBytes = 32;
  static constexpr size_t kIdLength = 8;
  static constexpr int kImportKeyBits = 3072;

  Keyring(store::MetadataStore& store, KeyService& keys, hsm::Token& token, KeyringOptions options);

  struct View {
    std::optional<std::string> active;
    std::vector<std::string> ids;  // oldest first
  };
  View view(const std::string& ns);
  struct Generated {
    std::string id;
    hsm::SecureBytes key;
  };
  // A new key made by the token; it becomes the active key.
  Generated generate(const std::string& ns);
  // 404 unknown id, 409 the active key.
  void remove(const std::string& ns, const std::string& id);
  // 400 bad id or size, 409 id present; active only when the keyring was empty.
  void import_raw(const std::string& ns, const std::string& id, const hsm::SecureBytes& key);
  // The whole keyring encrypted to the configured recipient key (base64); 400 without one.
  std::string export_keyring(const std::string& ns);
  // Merges an export made for this instance's import key (see the header comment).
  void import_export(const std::string& ns, const std::string& data_base64);

  // `p11kms keyring init`: the instance's import key pair, made once (force: a new pair, the old
  // object destroyed). Returns the public key PEM and whether a pair was made now.
  struct InitResult {
    std::string public_pem;
    bool created = false;
  };
  InitResult init_import_key(bool force);
  // `p11kms keyring import-key`: the import key from an RSA private key PEM (the token object is
  // non-extractable; the caller wipes the PEM). 409 if one exists and not force; 400 a bad PEM.
  InitResult import_import_key(const hsm::SecretString& pem, bool force);

  // Vault strategy: replaces the namespace's keyring with the secret's live versions (ids gone
  // from Vault are removed, the latest version is active). Only the root namespace (400
  // otherwise) and only under the vault strategy (400 otherwise). The secret is read and
  // checked whole before anything is written: a Vault error (503/502) or a malformed version
  // (502) leaves the keyring as it was. Returns the view after the sync.
  View sync(const std::string& ns);
  KeyringStrategy strategy() const { return options_.strategy; }
  static constexpr const char* kVaultNamespace = "root";

  static bool valid_id(const std::string& id);

 private:
  void require_cluster() const;  // 400 "only available with the cluster keyring strategy"

  struct Entry {
    std::string id;
    int64_t created_at = 0;
    std::string sealed;
  };
  std::vector<Entry> entries(const std::string& ns);
  std::optional<std::string> active_of(const std::string& ns);
  hsm::SecureBytes unseal(const std::string& ns, const Entry& e);
  void put_key(const std::string& ns, const std::string& id, const hsm::SecureBytes& key);  // 409 if present
  std::string new_id();

  store::MetadataStore& store_;
  KeyService& keys_;
  hsm::Token& token_;
  KeyringOptions options_;
  std::mutex mu_;  // one writer per process; put_setting_if_absent settles ids across instances
};

}  // namespace p11kms::keys
