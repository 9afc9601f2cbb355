// The metadata store: the single source of truth for key names, versions, policies and the
// token object each version lives in. It never holds key material: a version records only the
// random CKA_ID of its token object.
#pragma once

#include <cstdint>
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
  std::string object_id;   // hex of the token object's CKA_ID (32 hex chars)
  int64_t created_at = 0;  // unix seconds
};

struct KeyRecord {
  std::string ns = "root";  // namespace
  std::string name;
  std::string type;         // "aes256-gcm96", ...
  int64_t created_at = 0;   // unix seconds
  int min_decryption_version = 1;
  int min_encryption_version = 0;  // 0 = latest
  bool deletion_allowed = false;
  bool exportable = false;
  // Bumped by every write to the key (config, rotate); lets caches detect staleness.
  int64_t generation = 1;
  std::map<int, VersionRecord> versions;  // version number -> record

  int latest_version() const { return versions.empty() ? 0 : versions.rbegin()->first; }
};

// A committed promise, written before a token object is created (or after its metadata is
// removed): "an object with this CKA_ID may exist and must be destroyed unless a version
// refers to it". A sweeper settles intents at start-up, so a crash anywhere leaves either a
// usable key or an object that is safe to remove.
struct Intent {
  std::string object_id;   // hex CKA_ID
  std::string label;       // CKA_LABEL, for logs
  int64_t created_at = 0;  // unix seconds
};

class MetadataStore {
 public:
  virtual ~MetadataStore() = default;

  virtual std::optional<KeyRecord> get_key(const std::string& ns, const std::string& name) = 0;
  // Names in one namespace, sorted ascending.
  virtual std::vector<std::string> list_keys(const std::string& ns) = 0;

  virtual void add_intent(const Intent& intent) = 0;
  virtual void remove_intent(const std::string& object_id) = 0;
  virtual std::vector<Intent> list_intents() = 0;

  // Inserts the key with its versions (normally just v1) and removes the intents of those
  // versions' objects, in one transaction. ConflictError if (ns, name) exists.
  virtual void create_key(const KeyRecord& key) = 0;

  // Appends a version and removes its intent in one transaction, bumping generation.
  // ConflictError if that version number exists; std::out_of_range if the key is gone.
  virtual void add_version(const std::string& ns, const std::string& name,
                           const VersionRecord& version) = 0;

  // Writes min versions and deletion_allowed, bumping generation. out_of_range if missing.
  virtual void update_config(const KeyRecord& key) = 0;

  // Removes the key and its versions and, in the same transaction, records an intent for each
  // version's object, so the objects are destroyed even if the process dies right after.
  // Returns those intents; out_of_range if the key does not exist.
  virtual std::vector<Intent> delete_key(const std::string& ns, const std::string& name) = 0;

  // Every object_id referenced by any version of any key (for the start-up sweep).
  virtual std::vector<std::string> all_object_ids() = 0;

  // Every version of every key, for the start-up check that each has its token object.
  struct VersionRef {
    std::string ns, name;
    int version = 0;
    std::string object_id;
  };
  virtual std::vector<VersionRef> all_versions() = 0;

  // Free-form settings that must survive restarts (schema-independent), e.g. instance ids.
  virtual std::optional<std::string> get_setting(const std::string& name) = 0;
  virtual void put_setting(const std::string& name, const std::string& value) = 0;

  virtual int schema_version() = 0;
};

// Opens (creating if needed) a SQLite database at path, in WAL mode, and applies pending
// migrations. Throws StoreError with a clear message on failure.
std::unique_ptr<MetadataStore> open_sqlite_store(const std::string& path);

}  // namespace p11kms::store
