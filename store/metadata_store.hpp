// The metadata store: the single source of truth for key names, versions, policies and the
// token object each version lives in. It never holds key material: a version records only the
// random CKA_ID of its token object.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace p11kms::store {

// Thrown when a write would break a uniqueness rule (a key name taken in its namespace, a
// version number already used). Callers turn it into a 409 or retry.
class ConflictError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Thrown when the database itself fails (I/O, corruption, locked past the busy timeout).
class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct VersionRecord {
  int version = 0;
  std::string id;          // v4 UUID of this version (Key Protect's keyVersion.id), never reused
  // Where the version's material is: a token object (hex of its CKA_ID, 32 hex chars), or for
  // exportable keys a ciphertext sealed in the token under the master key (`sealed`, base64).
  // Exactly one of the two is set on a live key; a tombstone keeps neither.
  std::string object_id;
  std::string sealed;
  int64_t created_at = 0;  // unix seconds
  // Asymmetric keys: the public key (PEM, SubjectPublicKeyInfo); public by definition.
  std::string public_key;
  // Transit's per-version HMAC key, made on first use: a token object (hex CKA_ID) or, for
  // exportable keys, sealed material; both empty until then. (An `hmac` key's own material
  // is its version's object_id / sealed.)
  std::string hmac_object_id;
  std::string hmac_sealed;
};

// Key Protect's lifecycle states, shared by every dialect. Deactivation by expiry is derived
// from expires_at when read; the store keeps what was set.
enum KeyStateCode : int { kPreActive = 0, kActive = 1, kSuspended = 2, kDeactivated = 3, kDestroyed = 5 };

struct KeyRecord {
  std::string id;           // v4 UUID, assigned at creation, never reused (tombstones keep it)
  std::string ns = "root";  // namespace
  std::string name;         // unique among the namespace's live keys; free again once deleted
  std::string type;         // "aes256-gcm96", ...
  int64_t created_at = 0;   // unix seconds
  int min_decryption_version = 1;
  int min_encryption_version = 0;  // 0 = latest
  bool deletion_allowed = false;
  bool exportable = false;
  std::string description;
  int64_t expires_at = 0;   // unix seconds; 0 = never expires
  int state = kActive;      // KeyStateCode; kDestroyed only on tombstones
  bool imported = false;    // material came from the caller, not the token
  std::string created_by;   // the token name that created it
  int64_t updated_at = 0;   // unix seconds of the last metadata change
  int64_t deleted_at = 0;   // unix seconds; set only on tombstones
  // Bumped by every write to the key (config, rotate); lets caches detect staleness.
  int64_t generation = 1;
  // Transit options (schema 3).
  bool derived = false;
  bool convergent = false;
  int key_size = 0;                 // hmac keys: bytes of material
  int64_t auto_rotate_period = 0;   // seconds; 0 = off
  int min_available_version = 0;    // versions below it were trimmed
  std::map<int, VersionRecord> versions;  // version number -> record

  int latest_version() const { return versions.empty() ? 0 : versions.rbegin()->first; }
};

// A committed promise, written before a token object is created (or after its metadata is
// removed): "an object with this CKA_ID may exist and must be destroyed unless a version
// refers to it". A sweeper settles intents at start-up and periodically, so a crash anywhere
// leaves either a usable key or an object that is safe to remove.
struct Intent {
  std::string object_id;   // hex CKA_ID
  std::string label;       // CKA_LABEL, for logs
  int64_t created_at = 0;  // unix seconds
  // Several writers (schema 5): the instance creating the object, and until when (unix
  // seconds) nobody else may destroy it; the owner renews that lease while it works. "" and 0
  // on intents written before schema 5.
  std::string owner;
  int64_t lease_expires = 0;
  // An order to destroy the object, never to keep it: a deletion's or a trim's intent, or one a
  // sweeper claimed. Committing metadata that names a doomed intent's object fails.
  bool doomed = false;
};

// A p11kms instance's heartbeat row (schema 5).
struct InstanceRecord {
  std::string id;
  int64_t started_at = 0;  // unix seconds of its first heartbeat
  int64_t last_seen = 0;   // unix seconds of its latest heartbeat
};

// A BYOK registry entry (Confluent-style /byok/v1/keys): a reference to a customer-managed key,
// either a p11kms root key (kind P11kmsKey, target_key_id set) or an external cloud key kept as
// given. Its id is never reused: deleting keeps the row with deleted_at set.
struct ByokKeyRecord {
  std::string id;             // "cck-" + random characters
  std::string ns = "root";
  std::string display_name;
  std::string provider;       // AWS | Azure | GCP | P11KMS
  std::string kind;           // AwsKey | AzureKey | GcpKey | P11kmsKey
  std::string key_json;       // the key object's fields, JSON text
  std::string target_key_id;  // P11kmsKey: the referenced p11kms key's UUID; else ""
  std::string validation_phase = "INITIALIZING";  // INITIALIZING | VALID | INVALID
  std::string validation_message;
  int64_t validation_since = 0;  // unix seconds; changes only with phase or message
  std::string validation_region;
  int64_t created_at = 0;
  int64_t updated_at = 0;
  int64_t deleted_at = 0;  // 0 while live
};

// Everything a store holds, for `p11kms store copy` (and its count check).
struct StoreSnapshot {
  std::vector<KeyRecord> keys;  // every namespace, tombstones included, with versions
  std::vector<Intent> intents;
  std::vector<std::pair<std::string, std::string>> settings;
  std::vector<ByokKeyRecord> byok_keys;  // deleted entries included
  int64_t max_deleted_generation = 0;
  size_t version_count() const {
    size_t n = 0;
    for (const auto& k : keys) n += k.versions.size();
    return n;
  }
};

class MetadataStore {
 public:
  virtual ~MetadataStore() = default;

  // Reads everything in one transaction.
  virtual StoreSnapshot snapshot() = 0;
  // Writes a snapshot in one transaction, keeping ids, states, tombstones and generations.
  // Refuses (ConflictError, nothing written) unless the store is empty or `replace`, which
  // first removes everything it held.
  virtual void restore(const StoreSnapshot& snapshot, bool replace) = 0;

  // A live key by name (tombstones are never returned here).
  virtual std::optional<KeyRecord> get_key(const std::string& ns, const std::string& name) = 0;
  // A key by its UUID within a namespace: live, or its tombstone (state kDestroyed, deleted_at
  // set, versions without object_id or sealed material).
  virtual std::optional<KeyRecord> get_key_by_id(const std::string& ns, const std::string& id) = 0;
  // What a cached copy of the live key (ns, name) is checked against: its id and generation
  // (bumped by every write), read without the versions. nullopt when no live key has the name.
  struct KeyStamp {
    std::string id;
    int64_t generation = 0;
  };
  virtual std::optional<KeyStamp> key_stamp(const std::string& ns, const std::string& name) = 0;
  // Calls listener(ns, name), from a thread of the store's, after a write to that key commits
  // in any instance sharing the store (PostgreSQL LISTEN/NOTIFY); ("", "") means "maybe
  // anything" (the listener reconnected and may have missed some). Best effort: a cache still
  // checks key_stamp before use. Stores no other process writes never call it.
  virtual void on_key_change(std::function<void(const std::string&, const std::string&)> listener) { (void)listener; }

  // Names of the live keys in one namespace, sorted ascending.
  virtual std::vector<std::string> list_keys(const std::string& ns) = 0;
  // Full records (with versions) of one namespace's keys in creation order (ties within one
  // second broken by insertion order, so paging is stable); with
  // include_deleted, tombstones too.
  virtual std::vector<KeyRecord> list_key_records(const std::string& ns, bool include_deleted) = 0;

  // Idempotent: an intent that exists keeps what it has.
  virtual void add_intent(const Intent& intent) = 0;
  virtual void remove_intent(const std::string& object_id) = 0;
  virtual std::vector<Intent> list_intents() = 0;
  // Extends to lease_expires (never shortens) the leases of owner's intents among object_ids
  // that are not doomed.
  virtual void renew_intents(const std::string& owner, const std::vector<std::string>& object_ids,
                             int64_t lease_expires) = 0;
  // A sweeper's claim on an intent whose object it wants to destroy: marks it doomed, in one
  // step, if it already is, or if its lease has expired at `now` and its owner is the claimant
  // or has no heartbeat at or after alive_since. True when the claimant may destroy the object
  // (then removes the intent); false when the intent is gone (its metadata committed, or
  // another sweeper finished) or still protected.
  virtual bool claim_intent(const std::string& object_id, const std::string& claimant, int64_t now,
                            int64_t alive_since) = 0;
  // Instance heartbeats: records that the instance is alive at `now` (creating its row).
  virtual void heartbeat(const std::string& instance_id, int64_t now) = 0;
  virtual void remove_instance(const std::string& instance_id) = 0;  // a clean shutdown
  virtual std::vector<InstanceRecord> list_instances() = 0;           // sorted by id

  // Inserts the key with its versions (normally just v1) and removes the intents of those
  // versions' objects, in one transaction. ConflictError if a live key has (ns, name), or if
  // the key's id or a version's id was ever used; StoreError, nothing written, if one of those
  // intents is doomed (a sweeper claimed it).
  virtual void create_key(const KeyRecord& key) = 0;

  // Appends a version and removes its intent in one transaction, bumping generation.
  // ConflictError if that version number exists; std::out_of_range if the key is gone;
  // StoreError if its intent is doomed.
  virtual void add_version(const std::string& ns, const std::string& name,
                           const VersionRecord& version) = 0;

  // Writes the mutable metadata (min versions, deletion_allowed, exportable, description,
  // expires_at, state, updated_at, auto_rotate_period) of the live key (ns, name), bumping
  // generation.
  // out_of_range if there is no such live key.
  virtual void update_config(const KeyRecord& key) = 0;

  // Turns the live key into a tombstone (state kDestroyed, deleted_at now, every version's
  // object_id and sealed material cleared, its name free again) and, in the same transaction,
  // records a doomed intent for each version's object, so the objects are destroyed even if the
  // process dies right after. Returns those intents; out_of_range if no live key has the name.
  virtual std::vector<Intent> delete_key(const std::string& ns, const std::string& name) = 0;

  // Vault's trim: removes the versions below min_available_version from the live key (ns, name)
  // and records min_available_version, bumping generation; in the same transaction it records
  // a doomed intent for each removed version's token objects (material and HMAC key) and returns
  // them, so the objects are destroyed even if the process dies right after. out_of_range if
  // there is no such live key.
  virtual std::vector<Intent> trim_versions(const std::string& ns, const std::string& name,
                                            int min_available_version) = 0;

  // Records a version's HMAC key (exactly one of hmac_object_id and hmac_sealed) and removes
  // the object's intent, bumping generation. Returns false, changing nothing, if that version
  // already has one (another writer won); out_of_range if the live key or version is absent;
  // StoreError if the object's intent is doomed.
  virtual bool set_version_hmac(const std::string& ns, const std::string& name, int version,
                                const std::string& hmac_object_id, const std::string& hmac_sealed) = 0;

  // Every object_id referenced by any version of any live key (for the start-up sweep),
  // HMAC key objects included.
  virtual std::vector<std::string> all_object_ids() = 0;

  // Live keys with an auto_rotate_period whose latest version is at least that old at `now`
  // (ns, name, id and the period filled in; no versions), for the rotation job.
  virtual std::vector<KeyRecord> keys_due_for_rotation(int64_t now) = 0;

  // Every version of every live key that lives in a token object (object_id set), and every
  // version's HMAC key object (a second entry for that version), for the start-up check that
  // each has its object.
  struct VersionRef {
    std::string ns, name;
    int version = 0;
    std::string object_id;
  };
  virtual std::vector<VersionRef> all_versions() = 0;

  // Free-form settings that must survive restarts (schema-independent), e.g. instance ids.
  virtual std::optional<std::string> get_setting(const std::string& name) = 0;
  virtual void put_setting(const std::string& name, const std::string& value) = 0;
  // Writes the setting only if it has none; returns the value it has afterwards (ours, or the
  // one another instance wrote first).
  virtual std::string put_setting_if_absent(const std::string& name, const std::string& value) = 0;
  // Writes the setting and removes the intent of the token object it names, in one
  // transaction (registries kept in settings, e.g. Kong keys, commit their objects this way).
  // StoreError, writing nothing, if a sweeper has claimed the intent.
  virtual void put_setting_settling_intent(const std::string& name, const std::string& value,
                                           const std::string& object_id) = 0;
  // A lease for a background job that one instance at a time must run: true when `holder`
  // holds lease `name` until now + ttl_s (taken, renewed, or taken over once expired).
  virtual bool take_lease(const std::string& name, const std::string& holder, int64_t now, int64_t ttl_s) = 0;
  // Settings whose name starts with prefix, sorted by name.
  virtual std::vector<std::pair<std::string, std::string>> list_settings(const std::string& prefix) = 0;
  // Removes a setting; false if there was none.
  virtual bool delete_setting(const std::string& name) = 0;

  // BYOK registry (schema 4). Inserts the entry unless its namespace already has
  // max_live_in_ns live entries (then false, nothing written); ConflictError if the id was
  // ever used (deleted entries included).
  virtual bool create_byok_key(const ByokKeyRecord& key, size_t max_live_in_ns) = 0;
  // An entry by id within a namespace, live or deleted (deleted_at set).
  virtual std::optional<ByokKeyRecord> get_byok_key(const std::string& ns, const std::string& id) = 0;
  // Live entries of a namespace with id > after_id ("" = from the start), sorted by id, at
  // most limit of them (0 = all): keyset paging.
  virtual std::vector<ByokKeyRecord> list_byok_keys(const std::string& ns, const std::string& after_id,
                                                    size_t limit) = 0;
  virtual size_t count_byok_keys(const std::string& ns) = 0;  // live entries
  // Live entries of one kind in every namespace, sorted by (ns, id): for the validation job.
  virtual std::vector<ByokKeyRecord> live_byok_keys_of_kind(const std::string& kind) = 0;
  // Sets display_name and updated_at of a live entry; false if there is none.
  virtual bool update_byok_display_name(const std::string& ns, const std::string& id, const std::string& display_name,
                                        int64_t now) = 0;
  // Records a validation outcome of a live entry: since becomes `now` only when the phase or
  // the message changes; a non-empty region replaces the stored one. False if no live entry.
  virtual bool set_byok_validation(const std::string& ns, const std::string& id, const std::string& phase,
                                   const std::string& message, const std::string& region, int64_t now) = 0;
  // Marks a live entry deleted (deleted_at = updated_at = now); false if there is none.
  virtual bool delete_byok_key(const std::string& ns, const std::string& id, int64_t now) = 0;

  virtual int schema_version() = 0;
};

// Opens (creating if needed) a SQLite database at path, in WAL mode, and applies pending
// migrations. Throws StoreError with a clear message on failure.
std::unique_ptr<MetadataStore> open_sqlite_store(const std::string& path);

// Connects to PostgreSQL with a libpq connection string (the password from PGPASSFILE or the
// DSN's passfile=, never argv) and applies pending migrations, one instance at a time.
// Throws StoreError with libpq's message (which never carries the password).
std::unique_ptr<MetadataStore> open_postgres_store(const std::string& dsn);

}  // namespace p11kms::store
