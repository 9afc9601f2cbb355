// KeyService: every key operation of every dialect. It owns the rules (names, versions,
// lifecycle, crash-safe creation) and calls the token (hsm/) and the metadata store (store/)
// through their interfaces. It knows nothing of HTTP.
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <mutex>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "hsm/secret.hpp"
#include "hsm/token.hpp"
#include "keys/key.hpp"
#include "keys/master_seal.hpp"
#include "keys/signing.hpp"
#include "keys/usage_tracker.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

struct KeyRef {
  std::string ns = "root";
  std::string name;
  // When set, the key found by name must have this id (else 404): a caller that resolved an id
  // never acts on a different key created later under the same name.
  std::string id = {};
};

// What a new key is. `material` imports (the caller wipes it); otherwise the token generates.
struct KeySpec {
  std::string type = "aes256-gcm96";
  std::string description;
  int64_t expires_at = 0;  // unix seconds; 0 = never
  std::string created_by;
  const hsm::SecureBytes* material = nullptr;
  // Transit: material kept sealed under the master key (and exportable), not a token object.
  bool exportable = false;
  int key_size = 0;  // hmac keys: bytes, 16 to 512 (0 = 32)
  // Transit: every encryption needs a context, from which the token derives the key
  // (C_DeriveKey); convergent (requires derived): the nonce is computed in the token too, so the
  // same plaintext and context give the same ciphertext.
  bool derived = false;
  bool convergent = false;
};

// Vault's secure import: `ciphertext` = RSA-OAEP(ephemeral AES-256 key) || AES-KWP(material)
// under the transit wrapping key; hash_function is the OAEP and MGF1 hash.
struct WrappedImport {
  std::vector<uint8_t> ciphertext;
  std::string hash_function = "SHA256";  // SHA1, SHA224, SHA256, SHA384, SHA512
};

// A transit signature or HMAC: "vault:v<N>:<base64>".
struct SignResult {
  std::string value;
  int key_version = 0;
};

struct ExportResult {
  std::string name, type;
  std::map<int, std::string> keys;  // version -> exported form
};

// Envelope wrapping (Key Protect's wrap/unwrap/rewrap): limits of the caller's input.
constexpr size_t kMaxWrapPlaintextBytes = 4096;
constexpr size_t kMaxWrapAadEntries = 126;
constexpr size_t kMaxWrapAadEntryBytes = 255;
constexpr size_t kGeneratedDekBytes = 32;

struct Wrapped {
  std::string ciphertext;  // base64 wrap envelope
  int version = 0;
  std::string version_id;  // the wrapping version's UUID
};

struct WrapResult {
  Wrapped wrapped;
  std::optional<hsm::SecureBytes> generated;  // the DEK, when the token made it
};

struct UnwrapResult {
  hsm::SecureBytes plaintext;
  int version = 0;
  std::string version_id;            // the version that wrapped it
  std::optional<Wrapped> rewrapped;  // under the latest version, when an older one wrapped it
};

// Several instances on one store (config `cluster`): intents carry this instance's id and a
// lease it renews with every heartbeat while it creates the object; sweepers destroy only
// objects whose intent lease expired and whose owner has missed three heartbeats.
struct ClusterOptions {
  std::string instance_id;      // this process; "" = a fresh UUID
  int64_t intent_lease_s = 60;  // how long an intent protects its object without renewal
  int64_t heartbeat_s = 5;      // how often this instance records that it is alive
  // Other instances may write the store (PostgreSQL). Without, every intent not this
  // process's is a previous run's and is settled at once.
  bool shared_store = false;
};

struct ServiceLimits {
  size_t max_key_name_length = 128;
  // Cache key metadata in memory.
  bool cache_metadata = true;
  // Other instances write the store too (PostgreSQL): a cached key is used only after its
  // stamp (id and generation, one cheap read) matches the store's, so another instance's
  // rotation, config change or deletion is seen by the next request (read-your-writes across
  // instances); LISTEN/NOTIFY evicts changed keys early, never replacing that check.
  bool check_cached_versions = false;
  ClusterOptions cluster;
};

struct CreateResult {
  store::KeyRecord key;
  bool created = false;  // false: the key already existed and was left unchanged
};

struct Sealed {
  std::string ciphertext;  // transit envelope
  int key_version = 0;
};

// One item of a batch: the value, or the reason (a 400's message) this item failed.
template <typename T>
struct ItemResult {
  std::optional<T> value;
  std::string error;
};

// Runs one item of a batch: its 400 becomes the result's error; any other failure (the token
// down) is the whole call's.
template <typename T, typename F>
void run_item(ItemResult<T>& result, F&& f) {
  try {
    f();
  } catch (const KeyError& e) {
    if (e.kind() != ErrorKind::invalid_argument) throw;
    result.error = e.what();
  }
}

struct EncryptItem {
  const uint8_t* plaintext = nullptr;
  size_t len = 0;
  int key_version = 0;  // 0: the latest
  std::vector<uint8_t> aad, context;
};

struct DataKey {
  hsm::SecureBytes plaintext;
  Sealed sealed;
};

struct MissingObject {
  std::string ns, name;
  int version = 0;
};

struct SweepReport {
  size_t intents_settled = 0;      // intents whose object was kept (metadata committed)
  size_t orphans_destroyed = 0;    // objects whose metadata never committed, or was deleted
  size_t unknown_objects = 0;      // p11kms-labelled objects no store row or intent explains
  size_t intents_waiting = 0;      // left alone: within their lease, or their owner is alive
  std::vector<MissingObject> missing;
};

struct Health {
  hsm::PoolStatus token;
  bool store_reachable = true;
  std::string store_error;  // why not, when it is not
  std::vector<MissingObject> missing_objects;
  // What the token's module cannot do (hsm::Capability::id(), e.g. "key type ed25519"), with
  // the mechanisms each one lacks.
  std::vector<std::pair<std::string, std::vector<std::string>>> unavailable_operations;
};

class KeyService {
 public:
  KeyService(store::MetadataStore& store, hsm::Token& token, ServiceLimits limits = {});
  ~KeyService();
  KeyService(const KeyService&) = delete;
  KeyService& operator=(const KeyService&) = delete;

  // How the metadata cache did: cached keys used after a matching stamp, cached keys found
  // stale (reloaded), and change notifications received from the store.
  struct CacheStats {
    uint64_t hits = 0, stale = 0, notifications = 0;
  };
  CacheStats cache_stats() const;

  // Creates the key unless one of that name is live (then created = false, nothing changes).
  CreateResult create_key(const KeyRef& ref, const KeySpec& spec);
  // Transit's create: only the types transit offers.
  CreateResult create_key(const KeyRef& ref, const std::string& type, const std::string& created_by = "",
                          bool derived = false, bool convergent = false);
  store::KeyRecord read_key(const KeyRef& ref);
  bool key_exists(const KeyRef& ref);
  std::vector<std::string> list_keys(const std::string& ns);
  // By id (a live key or its tombstone) or else by name (live keys only).
  std::optional<store::KeyRecord> find_key(const std::string& ns, const std::string& id_or_name);
  std::vector<store::KeyRecord> list_key_records(const std::string& ns, bool include_deleted);
  store::KeyRecord configure_key(const KeyRef& ref, const KeyConfigChange& change);
  // A new version made by the token, or from `material` for an imported key (which must be
  // rotated with new material; a generated key must not be given any).
  store::KeyRecord rotate_key(const KeyRef& ref, const hsm::SecureBytes* material = nullptr);
  // Key Protect's enable/disable: active <-> suspended; any other state is a 409.
  store::KeyRecord set_enabled(const KeyRef& ref, bool enabled);
  // Destroys every version's material and leaves a tombstone (returned). Transit requires the
  // key's deletion_allowed; Key Protect does not.
  store::KeyRecord delete_key(const KeyRef& ref, bool require_deletion_allowed = true);
  // The latest version's material of an exportable (standard) key, unsealed in the token.
  hsm::SecureBytes read_material(const KeyRef& ref);

  // Key Protect's aliases: extra names of a key, unique in the namespace together with key
  // names, usable wherever an id is; a key's aliases go when it is deleted (key_aliases.cpp).
  struct Alias {
    std::string alias, key_id, created_by;
    int64_t created_at = 0;
  };
  Alias add_alias(const KeyRef& ref, const std::string& alias, const std::string& created_by);
  void remove_alias(const KeyRef& ref, const std::string& alias);
  std::vector<Alias> aliases_of(const std::string& ns, const std::string& key_id);

  // Automatic rotation (Transit's auto_rotate_period; Key Protect's rotation policy): the
  // key's period, in the store; rotate_due(), called periodically by the server, rotates every
  // active key whose latest version is older than its period (key_rotation.cpp).
  struct RotationPolicy {
    int64_t period_s = 0;
    std::string created_by;  // the key's creator (policies keep no author of their own)
    int64_t updated_at = 0;  // the key's last metadata change
  };
  // period_s 0 removes the policy. 400 for keys the token cannot rotate alone (imported,
  // standard).
  RotationPolicy set_rotation_policy(const KeyRef& ref, int64_t period_s);
  std::optional<RotationPolicy> rotation_policy(const std::string& ns, const std::string& key_id);
  // Rotates every active key that is due at `now`; returns how many were rotated.
  size_t rotate_due(int64_t now);

  // Key Protect's envelope operations, with a root (AES) key.
  WrapResult wrap(const KeyRef& ref, const hsm::SecureBytes* plaintext, const std::vector<std::string>& aad);
  UnwrapResult unwrap(const KeyRef& ref, const std::string& ciphertext, const std::vector<std::string>& aad);
  // Unwraps and wraps again under the latest version; the plaintext stays inside.
  UnwrapResult rewrap_wrapped(const KeyRef& ref, const std::string& ciphertext, const std::vector<std::string>& aad);

  // `context`: required by derived keys (400 without it), ignored by the others, as in Vault.
  Sealed encrypt(const KeyRef& ref, const uint8_t* plaintext, size_t len, int key_version,
                 const std::vector<uint8_t>& aad = {}, const std::vector<uint8_t>& context = {});
  // encrypt of each item, the batch's token work done together (one token call for a run of a
  // non-derived key's items). An item's 400 is its result's error; any other failure is the
  // whole call's, as for encrypt.
  std::vector<ItemResult<Sealed>> encrypt_batch(const KeyRef& ref, const std::vector<EncryptItem>& items);
  hsm::SecureBytes decrypt(const KeyRef& ref, const std::string& ciphertext,
                           const std::vector<uint8_t>& aad = {}, const std::vector<uint8_t>& context = {});
  Sealed rewrap(const KeyRef& ref, const std::string& ciphertext, int key_version,
                const std::vector<uint8_t>& aad = {}, const std::vector<uint8_t>& context = {});
  DataKey generate_data_key(const KeyRef& ref, int bits, int key_version, const std::vector<uint8_t>& context = {});

  // Vault's secure import (transit/wrapping_key, keys/:name/import, import_version). The public
  // half (PEM) of the token's RSA-4096 wrapping key, made on first use.
  std::string wrapping_public_key();
  // A new key from wrapped material; 400 if the name is taken or the blob does not open (and
  // nothing is left on the token).
  CreateResult import_key(const KeyRef& ref, const KeySpec& spec, const WrappedImport& wrapped);
  // A new version of an imported key from wrapped material.
  store::KeyRecord import_key_version(const KeyRef& ref, const WrappedImport& wrapped);
  // Vault's trim: destroys the versions below min_available_version (their token objects, HMAC
  // keys and sealed material); it must not exceed min_decryption_version nor
  // min_encryption_version, which must be set.
  store::KeyRecord trim_key(const KeyRef& ref, int min_available_version);

  // Transit signing with an asymmetric key's version (0 = latest), in the token.
  SignResult sign(const KeyRef& ref, const std::vector<uint8_t>& input, const SignOptions& options, int key_version);
  // For scripts/bench's floor-plus-sign route only (api/sys_routes.cpp, compiled in with
  // -DP11KMS_BENCH=ON): the token's signature of 32 fixed bytes with the key's latest version,
  // made as bench/token_bench.cpp makes R's (SHA-256 in the process for ECDSA and RSA-PSS,
  // Ed25519 over the bytes), with none of what sign() adds around it; the signature is dropped.
  void sign_as_token_benchmark(const KeyRef& ref);
  // Checks a "vault:v<N>:" signature: false when it does not verify; 400 when it cannot be
  // decoded or names a version that does not exist or is below min_decryption_version.
  bool verify(const KeyRef& ref, const std::vector<uint8_t>& input, const SignOptions& options,
              const std::string& signature);
  // HMAC with the version's HMAC key (made in the token on first use), any key type.
  SignResult hmac(const KeyRef& ref, const std::vector<uint8_t>& input, const std::string& algorithm, int key_version);
  bool verify_hmac(const KeyRef& ref, const std::vector<uint8_t>& input, const std::string& algorithm,
                   const std::string& hmac);
  // Vault's export (encryption-key, signing-key, hmac-key) of an exportable key; version is
  // "" (every version), "latest" or a number.
  ExportResult export_key(const KeyRef& ref, const std::string& export_type, const std::string& version);
  std::vector<uint8_t> random_bytes(size_t n);

  // Small secrets kept by registries on top of the store (the Kong keyring, keyring.cpp):
  // Sealed under the token's master key, bound to `aad` (keys/master_seal.hpp: "aes-gcm:..." or,
  // where the module lacks AES-GCM, "aes-ctr-hmac:..."; unprefixed legacy AES-GCM blobs open).
  // unseal_secret: nullopt when the blob does not open (tampered, or sealed for another aad).
  std::string seal_secret(const std::string& aad, const hsm::SecureBytes& secret);
  std::optional<hsm::SecureBytes> unseal_secret(const std::string& aad, const std::string& sealed);

  // Settles creation/deletion intents left by a crash (at start-up and every sweep_interval);
  // checks every version has its object. An object is destroyed only when its intent is doomed
  // (a deletion's) or its lease has expired and its owner is this instance or has missed three
  // heartbeats; never one another live instance is still creating.
  // An intent for a token object that a registry kept in settings makes (Kong keys), owned by
  // this instance with the configured lease, so no sweeper destroys the object while it is
  // being made. Commit it before creating the object; settle it with the record that names
  // the object (MetadataStore::put_setting_settling_intent). `doomed`: an order to destroy.
  store::Intent object_intent(const std::string& object_id, const std::string& label, bool doomed = false) const;
  SweepReport sweep();
  // Records this instance's heartbeat and renews the leases of the intents it is working on.
  void heartbeat();
  // A clean shutdown: this instance's heartbeat row goes (its intents are then anyone's to
  // settle once their leases expire).
  void retire() noexcept;
  const std::string& instance_id() const { return limits_.cluster.instance_id; }
  Health health();

  void validate_name(const std::string& name) const;
  // Held for all the items of one batch request (hsm::Token::batch_scope).
  hsm::BatchGate::Scope batch_scope() { return token_.batch_scope(); }

  // BYOK: when each key last served a client's cryptographic operation (every encrypt,
  // decrypt, rewrap, datakey, sign, hmac, wrap, unwrap and rewrap records here).
  UsageTracker& usage() { return usage_; }
  // BYOK validation (key_probe.cpp): a wrap/unwrap round trip of a fresh random DEK with the
  // root key (ns, key id) in the token; not a use. ok = false with the reason otherwise.
  struct ProbeResult {
    bool ok = false;
    std::string message;
  };
  ProbeResult probe_root_key(const std::string& ns, const std::string& key_id);

 private:
  std::shared_ptr<const Key> load(const KeyRef& ref);  // nullptr when absent
  std::shared_ptr<const Key> load_for_use(const KeyRef& ref);  // 400 when absent (Vault)
  std::shared_ptr<const Key> load_existing(const KeyRef& ref);  // 404 when absent
  store::VersionRecord create_version_object(const Key& key, int version, const hsm::SecureBytes* material);
  void make_version_object(const Key& key, const hsm::ObjectId& id, const std::string& label,
                           const hsm::SecureBytes* material, store::VersionRecord& v);
  template <typename F>
  void with_generation_retries(F&& make);
  static constexpr int kMaxRotateAttempts = 50;
  // How the token reaches a version's material: its token object, or a session object loaded
  // from the sealed material.
  hsm::KeyHandle material_handle(const Key& key, const store::VersionRecord& v);
  // A derived key's encryption key (or, `nonce`, its convergent nonce key) for one context,
  // derived in the token from the version's base key; 400 without a context.
  hsm::KeyHandle derived_handle(const Key& key, const store::VersionRecord& v, const std::vector<uint8_t>& context,
                                bool nonce);
  const hsm::ObjectId& wrapping_key();
  store::VersionRecord import_version_object(const Key& key, int version, const WrappedImport& wrapped);
  // The version's HMAC key, made first if it has none yet (key is reloaded then).
  hsm::KeyHandle hmac_handle(const KeyRef& ref, std::shared_ptr<const Key>& key, int version);
  void ensure_hmac_key(const KeyRef& ref, int version);
  std::shared_ptr<const Key> load_for_signing(const KeyRef& ref);
  size_t material_bytes(const store::KeyRecord& key) const;
  // A version's material: a token object for AES keys, sealed under the master key otherwise.
  store::VersionRecord new_version(const Key& key, int version, const hsm::SecureBytes* material);
  void discard_version(const store::VersionRecord& v) noexcept;
  void check_material(KeyType type, const hsm::SecureBytes& material) const;
  std::string seal_material(const store::KeyRecord& key, int version, const hsm::SecureBytes& material);
  hsm::SecureBytes unseal_material(const store::KeyRecord& key, const store::VersionRecord& v);
  std::shared_ptr<const Key> load_wrapping_key(const KeyRef& ref, KeyUse use);
  std::optional<std::string> alias_target(const std::string& ns, const std::string& alias);  // key id
  void require_name_not_elsewhere(const KeyRef& ref);  // 409 name_in_use: an alias or a Kong key
  void drop_aliases_of(const std::string& ns, const std::string& key_id) noexcept;
  Wrapped wrap_with(const Key& key, const uint8_t* plaintext, size_t len, const std::vector<std::string>& aad);
  void invalidate(const KeyRef& ref);
  // 400 mechanism_unavailable naming `what` and the missing mechanisms when the module's
  // capability table (hsm/capabilities.hpp) lacks the capability; never a fallback outside it.
  void require_capability(hsm::CapabilityKind kind, const char* name, const std::string& what) const;
  void require_aes_gcm(const std::string& what = "encrypting or decrypting with an AES-GCM key") const;
  void destroy_for_intents(const std::vector<store::Intent>& intents);
  // Commits an intent owned by this instance (lease from now) and remembers it as in flight
  // until the write holding write_mu_ ends (IntentScope), so heartbeats renew its lease.
  void begin_intent(const std::string& object_id, const std::string& label, int64_t created_at);
  class IntentScope;
  template <typename F>
  auto guarded(F&& f) -> decltype(f());

  store::MetadataStore& store_;
  hsm::Token& token_;
  ServiceLimits limits_;
  UsageTracker usage_;

  std::mutex write_mu_;  // serializes metadata writes (create, rotate, config, delete)
  mutable std::mutex cache_mu_;
  CacheStats cache_stats_;  // under cache_mu_
  std::unordered_map<std::string, std::shared_ptr<const Key>> cache_;
  // ns + '\0' + key id -> the key's name (fixed for the key's life), under cache_mu_: a request
  // by id (Key Protect's URLs) then reads the metadata cache instead of the store.
  std::unordered_map<std::string, std::string> names_by_id_;
  std::mutex master_mu_;
  MasterSeal master_seal_{store_, token_};  // everything sealed under the master key goes through it
  hsm::ObjectId wrapping_key_id_;  // transit's import key; empty until first needed
  std::mutex missing_mu_;
  std::vector<MissingObject> missing_;
  std::mutex inflight_mu_;
  std::set<std::string> inflight_;  // object ids of intents the current writer is working on
  std::mutex sweep_mu_;             // one sweep at a time in this process
};

}  // namespace p11kms::keys
