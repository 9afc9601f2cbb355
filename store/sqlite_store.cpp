// SQLite implementation of MetadataStore: one connection in WAL mode, guarded by a mutex, with
// cached prepared statements and versioned schema migrations.
#include <sqlite3.h>

#include <algorithm>
#include <cstdint>
#include <ctime>
#include <iterator>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "store/metadata_store.hpp"

namespace p11kms::store {
namespace {

// Ordered schema migrations: entry i is schema version i + 1. Never edit an entry once it has
// shipped; append a new one instead. Each runs in its own transaction together with its
// schema_migrations row.
const char* const kMigrations[] = {
    // 1: initial schema.
    R"sql(
CREATE TABLE keys (
  id                     INTEGER PRIMARY KEY,
  ns                     TEXT    NOT NULL,
  name                   TEXT    NOT NULL,
  type                   TEXT    NOT NULL,
  created_at             INTEGER NOT NULL,
  min_decryption_version INTEGER NOT NULL,
  min_encryption_version INTEGER NOT NULL,
  deletion_allowed       INTEGER NOT NULL,
  exportable             INTEGER NOT NULL,
  generation             INTEGER NOT NULL,
  UNIQUE (ns, name)
);
CREATE TABLE key_versions (
  key_id     INTEGER NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
  version    INTEGER NOT NULL CHECK (version >= 1),
  object_id  TEXT    NOT NULL UNIQUE,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (key_id, version)
) WITHOUT ROWID;
CREATE TABLE intents (
  object_id  TEXT    PRIMARY KEY,
  label      TEXT    NOT NULL,
  created_at INTEGER NOT NULL
);
CREATE TABLE settings (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
-- Internal counters. 'max_deleted_generation' is the highest generation any deleted key had;
-- a newly created key starts above it, so a key deleted and created again under the same name
-- never reuses a generation a cache may still hold.
CREATE TABLE counters (
  name  TEXT    PRIMARY KEY,
  value INTEGER NOT NULL
);
INSERT INTO counters (name, value) VALUES ('max_deleted_generation', 0);
)sql",
    // 2: key and version UUIDs, Key Protect metadata, tombstones and sealed material. SQLite
    // can neither drop the inline UNIQUE (ns, name) nor relax object_id's NOT NULL, so both
    // tables are rebuilt. This runs with foreign_keys=ON (it cannot change inside a
    // transaction): the new versions table references keys_new, so dropping the old tables
    // cascades into nothing, and renaming keys_new rewrites that reference to keys.
    // Existing rows get fresh v4 UUIDs built from randomblob(): 8-4-4-4-12 lowercase hex,
    // version nibble 4, variant nibble one of 8, 9, a, b.
    R"sql(
CREATE TABLE keys_new (
  id                     INTEGER PRIMARY KEY,
  uuid                   TEXT    NOT NULL UNIQUE,
  ns                     TEXT    NOT NULL,
  name                   TEXT    NOT NULL,
  type                   TEXT    NOT NULL,
  created_at             INTEGER NOT NULL,
  min_decryption_version INTEGER NOT NULL,
  min_encryption_version INTEGER NOT NULL,
  deletion_allowed       INTEGER NOT NULL,
  exportable             INTEGER NOT NULL,
  generation             INTEGER NOT NULL,
  description            TEXT    NOT NULL DEFAULT '',
  expires_at             INTEGER NOT NULL DEFAULT 0,
  state                  INTEGER NOT NULL DEFAULT 1 CHECK (state IN (0, 1, 2, 3, 5)),
  imported               INTEGER NOT NULL DEFAULT 0,
  created_by             TEXT    NOT NULL DEFAULT '',
  updated_at             INTEGER NOT NULL DEFAULT 0,
  -- 0 on live keys; a tombstone has its deletion time and state 5 (destroyed), nothing else.
  deleted_at             INTEGER NOT NULL DEFAULT 0,
  CHECK ((deleted_at <> 0) = (state = 5))
);
CREATE TABLE key_versions_new (
  key_id     INTEGER NOT NULL REFERENCES keys_new(id) ON DELETE CASCADE,
  version    INTEGER NOT NULL CHECK (version >= 1),
  uuid       TEXT    NOT NULL UNIQUE,
  -- NULL, never '', when absent: several sealed versions and every tombstone's versions have
  -- no object, and UNIQUE ignores only NULLs.
  object_id  TEXT    UNIQUE,
  sealed     TEXT,
  created_at INTEGER NOT NULL,
  PRIMARY KEY (key_id, version),
  CHECK (object_id IS NULL OR sealed IS NULL)
) WITHOUT ROWID;
INSERT INTO keys_new (id, uuid, ns, name, type, created_at, min_decryption_version,
                      min_encryption_version, deletion_allowed, exportable, generation,
                      state, updated_at)
  SELECT id,
         lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
               substr(hex(randomblob(2)), 2) || '-' || substr('89AB', 1 + (random() & 3), 1) ||
               substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))),
         ns, name, type, created_at, min_decryption_version, min_encryption_version,
         deletion_allowed, exportable, generation, 1, created_at
    FROM keys;
INSERT INTO key_versions_new (key_id, version, uuid, object_id, sealed, created_at)
  SELECT key_id, version,
         lower(hex(randomblob(4)) || '-' || hex(randomblob(2)) || '-4' ||
               substr(hex(randomblob(2)), 2) || '-' || substr('89AB', 1 + (random() & 3), 1) ||
               substr(hex(randomblob(2)), 2) || '-' || hex(randomblob(6))),
         object_id, NULL, created_at
    FROM key_versions;
DROP TABLE key_versions;
DROP TABLE keys;
ALTER TABLE keys_new RENAME TO keys;
ALTER TABLE key_versions_new RENAME TO key_versions;
-- A name is taken only while its key is live; tombstones keep theirs for the record.
CREATE UNIQUE INDEX keys_live_name ON keys (ns, name) WHERE deleted_at = 0;
CREATE INDEX keys_ns_created ON keys (ns, created_at);
)sql",
    // 3: transit's signing, HMAC, exportable and derived keys. Key options; per version the
    // public key of an asymmetric key (PEM) and the HMAC key made on first use (a token object
    // or, for exportable keys, sealed material; never both).
    R"sql(
ALTER TABLE keys ADD COLUMN derived INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN convergent INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN key_size INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN auto_rotate_period INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN min_available_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN public_key TEXT;
ALTER TABLE key_versions ADD COLUMN hmac_object_id TEXT;
ALTER TABLE key_versions ADD COLUMN hmac_sealed TEXT;
CREATE UNIQUE INDEX key_versions_hmac_object ON key_versions (hmac_object_id)
  WHERE hmac_object_id IS NOT NULL;
)sql",
    // 4: the BYOK key registry (/byok/v1/keys). Ids are never reused: a deleted entry keeps
    // its row with deleted_at set. The key object is kept as JSON text; a P11kmsKey also
    // records the referenced p11kms key's UUID.
    R"sql(
CREATE TABLE byok_keys (
  id                 TEXT    PRIMARY KEY,
  ns                 TEXT    NOT NULL,
  display_name       TEXT    NOT NULL DEFAULT '',
  provider           TEXT    NOT NULL,
  kind               TEXT    NOT NULL,
  key_json           TEXT    NOT NULL,
  target_key_id      TEXT    NOT NULL DEFAULT '',
  validation_phase   TEXT    NOT NULL DEFAULT 'INITIALIZING'
                     CHECK (validation_phase IN ('INITIALIZING', 'VALID', 'INVALID')),
  validation_message TEXT    NOT NULL DEFAULT '',
  validation_since   INTEGER NOT NULL,
  validation_region  TEXT    NOT NULL DEFAULT '',
  created_at         INTEGER NOT NULL,
  updated_at         INTEGER NOT NULL,
  deleted_at         INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX byok_keys_ns_live ON byok_keys (ns, id) WHERE deleted_at = 0;
CREATE INDEX byok_keys_kind_live ON byok_keys (kind, ns, id) WHERE deleted_at = 0;
)sql",
    // 5: several writers. An intent names the instance creating its object and how long that
    // instance's lease on it lasts; a doomed intent is an order to destroy the object (a
    // deletion's, a trim's, or one a sweeper claimed). Instances record heartbeats.
    R"sql(
ALTER TABLE intents ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE intents ADD COLUMN lease_expires INTEGER NOT NULL DEFAULT 0;
ALTER TABLE intents ADD COLUMN doomed INTEGER NOT NULL DEFAULT 0;
CREATE TABLE instances (
  id         TEXT    PRIMARY KEY,
  started_at INTEGER NOT NULL,
  last_seen  INTEGER NOT NULL
) WITHOUT ROWID;
)sql",
};

constexpr int kLatestSchemaVersion = static_cast<int>(std::size(kMigrations));

int64_t now_unix() { return static_cast<int64_t>(std::time(nullptr)); }

[[noreturn]] void throw_sqlite(sqlite3* db, const std::string& what) {
  std::string msg = "sqlite metadata store: " + what + " failed";
  if (db != nullptr) {
    msg += ": ";
    msg += sqlite3_errmsg(db);
    msg += " (code " + std::to_string(sqlite3_extended_errcode(db)) + ")";
  }
  throw StoreError(msg);
}

struct StmtFinalizer {
  void operator()(sqlite3_stmt* s) const { sqlite3_finalize(s); }
};
using StmtPtr = std::unique_ptr<sqlite3_stmt, StmtFinalizer>;

// A borrowed, cached prepared statement. Binds, steps and reads columns; resets itself and
// clears its bindings when it goes out of scope so the cache can hand it out again.
class Statement {
 public:
  Statement(sqlite3* db, sqlite3_stmt* stmt, const char* what) : db_(db), stmt_(stmt), what_(what) {}
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  ~Statement() {
    sqlite3_reset(stmt_);
    sqlite3_clear_bindings(stmt_);
  }

  Statement& bind(int index, int64_t value) {
    check_bind(sqlite3_bind_int64(stmt_, index, value));
    return *this;
  }
  Statement& bind(int index, int value) { return bind(index, static_cast<int64_t>(value)); }
  Statement& bind(int index, bool value) { return bind(index, static_cast<int64_t>(value ? 1 : 0)); }
  Statement& bind(int index, const std::string& value) {
    check_bind(sqlite3_bind_text(stmt_, index, value.data(), static_cast<int>(value.size()),
                                 SQLITE_TRANSIENT));
    return *this;
  }
  // Absent optional text (object_id, sealed) is NULL in the database, never ''.
  Statement& bind_text_or_null(int index, const std::string& value) {
    if (value.empty()) {
      check_bind(sqlite3_bind_null(stmt_, index));
      return *this;
    }
    return bind(index, value);
  }

  // Advances one step: true when a row is available, false when the statement is done.
  bool step() {
    int rc = sqlite3_step(stmt_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    throw_sqlite(db_, what_);
  }
  // Runs a statement that returns no rows.
  void run() {
    while (step()) {
    }
  }

  bool is_null(int col) const { return sqlite3_column_type(stmt_, col) == SQLITE_NULL; }
  int64_t int64(int col) const { return sqlite3_column_int64(stmt_, col); }
  int int32(int col) const { return static_cast<int>(sqlite3_column_int64(stmt_, col)); }
  bool boolean(int col) const { return sqlite3_column_int64(stmt_, col) != 0; }
  std::string text(int col) const {
    const unsigned char* p = sqlite3_column_text(stmt_, col);
    if (p == nullptr) return {};
    return std::string(reinterpret_cast<const char*>(p),
                       static_cast<size_t>(sqlite3_column_bytes(stmt_, col)));
  }

 private:
  void check_bind(int rc) {
    if (rc != SQLITE_OK) throw_sqlite(db_, std::string("bind parameter for ") + what_);
  }

  sqlite3* db_;
  sqlite3_stmt* stmt_;
  const char* what_;
};

// Owns the sqlite3 handle and the prepared-statement cache. Not thread-safe by itself: the
// store serializes every use behind its mutex.
class Connection {
 public:
  explicit Connection(const std::string& path) {
    if (sqlite3_threadsafe() == 0) {
      throw StoreError("sqlite metadata store: libsqlite3 was built without thread support");
    }
    int rc = sqlite3_open_v2(path.c_str(), &db_,
                             SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                             nullptr);
    if (rc != SQLITE_OK) {
      std::string msg = "sqlite metadata store: cannot open database '" + path + "': ";
      msg += db_ != nullptr ? sqlite3_errmsg(db_) : sqlite3_errstr(rc);
      sqlite3_close(db_);
      db_ = nullptr;
      throw StoreError(msg);
    }
    sqlite3_extended_result_codes(db_, 1);
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;
  ~Connection() {
    cache_.clear();  // statements must be finalized before the handle is closed
    sqlite3_close(db_);
  }

  sqlite3* handle() const { return db_; }

  // Returns the cached statement for sql, preparing it on first use. `what` names the
  // operation in error messages; both must be string literals (they are kept by pointer).
  Statement prepare(const char* sql, const char* what) {
    auto it = cache_.find(sql);
    if (it == cache_.end()) {
      sqlite3_stmt* raw = nullptr;
      if (sqlite3_prepare_v3(db_, sql, -1, SQLITE_PREPARE_PERSISTENT, &raw, nullptr) !=
          SQLITE_OK) {
        sqlite3_finalize(raw);
        throw_sqlite(db_, std::string("prepare statement for ") + what);
      }
      it = cache_.emplace(sql, StmtPtr(raw)).first;
    }
    return Statement(db_, it->second.get(), what);
  }

  // Runs one or more SQL statements that return no rows we need (uncached).
  void exec(const char* sql, const std::string& what) {
    if (sqlite3_exec(db_, sql, nullptr, nullptr, nullptr) != SQLITE_OK) throw_sqlite(db_, what);
  }

 private:
  sqlite3* db_ = nullptr;
  std::unordered_map<const char*, StmtPtr> cache_;
};

// BEGIN IMMEDIATE on construction (takes the write lock up front, honouring the busy
// timeout); ROLLBACK on destruction unless commit() succeeded.
class Transaction {
 public:
  explicit Transaction(Connection& conn) : conn_(conn) {
    conn_.exec("BEGIN IMMEDIATE", "begin transaction");
  }
  Transaction(const Transaction&) = delete;
  Transaction& operator=(const Transaction&) = delete;
  ~Transaction() {
    // Some errors (I/O, full disk, busy on commit) already end the transaction.
    if (!committed_ && sqlite3_get_autocommit(conn_.handle()) == 0) {
      sqlite3_exec(conn_.handle(), "ROLLBACK", nullptr, nullptr, nullptr);
    }
  }
  void commit() {
    conn_.exec("COMMIT", "commit transaction");
    committed_ = true;
  }

 private:
  Connection& conn_;
  bool committed_ = false;
};

std::string version_label(const std::string& ns, const std::string& name, int version) {
  return "p11kms/" + ns + "/" + name + "/v" + std::to_string(version);
}

// The columns every key read selects, in the order read_keys() expects; a literal so the
// statements that use it stay string literals for the statement cache.
#define P11KMS_KEY_COLUMNS                                                                   \
  " k.id, k.uuid, k.ns, k.name, k.type, k.created_at, k.min_decryption_version,"             \
  " k.min_encryption_version, k.deletion_allowed, k.exportable, k.description, k.expires_at," \
  " k.state, k.imported, k.created_by, k.updated_at, k.deleted_at, k.generation,"            \
  " v.version, v.uuid, v.object_id, v.sealed, v.created_at,"                                 \
  " k.derived, k.convergent, k.key_size, k.auto_rotate_period, k.min_available_version,"      \
  " v.public_key, v.hmac_object_id, v.hmac_sealed"                                            \
  " FROM keys k LEFT JOIN key_versions v ON v.key_id = k.id "

// Reads the rows of a statement selecting P11KMS_KEY_COLUMNS into records. A new record starts
// whenever k.id changes, so the statement must return each key's rows together.
#define kIntentColumns "SELECT object_id, label, created_at, owner, lease_expires, doomed FROM intents "

std::vector<Intent> read_intents(Statement& q) {
  std::vector<Intent> out;
  while (q.step()) out.push_back(Intent{q.text(0), q.text(1), q.int64(2), q.text(3), q.int64(4), q.boolean(5)});
  return out;
}

std::vector<KeyRecord> read_keys(Statement& q) {
  std::vector<KeyRecord> keys;
  int64_t current = 0;
  while (q.step()) {
    const int64_t row_id = q.int64(0);
    if (keys.empty() || row_id != current) {
      current = row_id;
      KeyRecord& key = keys.emplace_back();
      key.id = q.text(1);
      key.ns = q.text(2);
      key.name = q.text(3);
      key.type = q.text(4);
      key.created_at = q.int64(5);
      key.min_decryption_version = q.int32(6);
      key.min_encryption_version = q.int32(7);
      key.deletion_allowed = q.boolean(8);
      key.exportable = q.boolean(9);
      key.description = q.text(10);
      key.expires_at = q.int64(11);
      key.state = q.int32(12);
      key.imported = q.boolean(13);
      key.created_by = q.text(14);
      key.updated_at = q.int64(15);
      key.deleted_at = q.int64(16);
      key.generation = q.int64(17);
      key.derived = q.boolean(23);
      key.convergent = q.boolean(24);
      key.key_size = q.int32(25);
      key.auto_rotate_period = q.int64(26);
      key.min_available_version = q.int32(27);
    }
    if (q.is_null(18)) continue;  // key without versions
    const int number = q.int32(18);
    VersionRecord& v = keys.back().versions[number];
    v.version = number;
    v.id = q.text(19);
    v.object_id = q.text(20);  // NULL reads as ""
    v.sealed = q.text(21);
    v.created_at = q.int64(22);
    v.public_key = q.text(28);
    v.hmac_object_id = q.text(29);
    v.hmac_sealed = q.text(30);
  }
  return keys;
}

std::optional<KeyRecord> single_key(Statement& q) {
  std::vector<KeyRecord> keys = read_keys(q);
  if (keys.empty()) return std::nullopt;
  return std::move(keys.front());
}

// kDestroyed belongs to tombstones, which only delete_key makes.
void check_live_state(int state) {
  if (state != kPreActive && state != kActive && state != kSuspended && state != kDeactivated) {
    throw std::invalid_argument("key state " + std::to_string(state) +
                                " is not a state a live key can have");
  }
}

// The sweeper and the cache rely on every live version naming exactly one place for its
// material, and on ids that can be looked up later.
void check_version(const VersionRecord& v) {
  if (v.id.empty()) {
    throw std::invalid_argument("version " + std::to_string(v.version) + " has no id");
  }
  if (v.object_id.empty() == v.sealed.empty()) {
    throw std::invalid_argument("version " + std::to_string(v.version) +
                                " must have exactly one of object_id and sealed material");
  }
}

// The columns every BYOK read selects, in the order read_byok_keys() expects.
#define P11KMS_BYOK_COLUMNS                                                                  \
  " id, ns, display_name, provider, kind, key_json, target_key_id, validation_phase,"        \
  " validation_message, validation_since, validation_region, created_at, updated_at,"         \
  " deleted_at FROM byok_keys "

std::vector<ByokKeyRecord> read_byok_keys(Statement& q) {
  std::vector<ByokKeyRecord> out;
  while (q.step()) {
    ByokKeyRecord& k = out.emplace_back();
    k.id = q.text(0);
    k.ns = q.text(1);
    k.display_name = q.text(2);
    k.provider = q.text(3);
    k.kind = q.text(4);
    k.key_json = q.text(5);
    k.target_key_id = q.text(6);
    k.validation_phase = q.text(7);
    k.validation_message = q.text(8);
    k.validation_since = q.int64(9);
    k.validation_region = q.text(10);
    k.created_at = q.int64(11);
    k.updated_at = q.int64(12);
    k.deleted_at = q.int64(13);
  }
  return out;
}

class SqliteStore final : public MetadataStore {
 public:
  explicit SqliteStore(const std::string& path) : path_(path), conn_(path) {
    configure();
    migrate();
  }

  // Each read is one statement, so a key and its versions come from the same snapshot.
  std::optional<KeyRecord> get_key(const std::string& ns, const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT" P11KMS_KEY_COLUMNS
                                "WHERE k.ns = ?1 AND k.name = ?2 AND k.deleted_at = 0"
                                " ORDER BY k.id, v.version",
                                "read key");
    q.bind(1, ns).bind(2, name);
    return single_key(q);
  }

  std::optional<KeyRecord> get_key_by_id(const std::string& ns, const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT" P11KMS_KEY_COLUMNS
                                "WHERE k.ns = ?1 AND k.uuid = ?2"
                                " ORDER BY k.id, v.version",
                                "read key by id");
    q.bind(1, ns).bind(2, id);
    return single_key(q);
  }

  std::vector<std::string> list_keys(const std::string& ns) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "SELECT name FROM keys WHERE ns = ?1 AND deleted_at = 0 ORDER BY name", "list keys");
    q.bind(1, ns);
    std::vector<std::string> names;
    while (q.step()) names.push_back(q.text(0));
    return names;
  }

  std::vector<KeyRecord> list_key_records(const std::string& ns, bool include_deleted) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT" P11KMS_KEY_COLUMNS
                                "WHERE k.ns = ?1 AND (?2 OR k.deleted_at = 0)"
                                " ORDER BY k.created_at, k.id, v.version",
                                "list key records");
    q.bind(1, ns).bind(2, include_deleted);
    return read_keys(q);
  }

  std::optional<KeyStamp> key_stamp(const std::string& ns, const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT uuid, generation FROM keys WHERE ns = ?1 AND name = ?2 AND deleted_at = 0",
                                "read key stamp");
    q.bind(1, ns).bind(2, name);
    if (!q.step()) return std::nullopt;
    return KeyStamp{q.text(0), q.int64(1)};
  }

  void add_intent(const Intent& intent) override {
    std::lock_guard<std::mutex> lock(mu_);
    insert_intent(intent);
  }

  void remove_intent(const std::string& object_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    delete_intent(object_id);
  }

  std::vector<Intent> list_intents() override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(kIntentColumns "ORDER BY created_at, object_id", "list intents");
    return read_intents(q);
  }

  void renew_intents(const std::string& owner, const std::vector<std::string>& object_ids,
                     int64_t lease_expires) override {
    if (object_ids.empty()) return;
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    for (const auto& id : object_ids) {
      Statement q = conn_.prepare(
          "UPDATE intents SET lease_expires = max(lease_expires, ?2) WHERE owner = ?1 AND NOT doomed AND object_id = ?3",
          "renew intent");
      q.bind(1, owner).bind(2, lease_expires).bind(3, id);
      q.run();
    }
    tx.commit();
  }

  bool claim_intent(const std::string& object_id, const std::string& claimant, int64_t now,
                    int64_t alive_since) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "UPDATE intents SET doomed = 1 WHERE object_id = ?1 AND (doomed OR (lease_expires <= ?3"
        " AND (owner = ?2 OR NOT EXISTS (SELECT 1 FROM instances n WHERE n.id = intents.owner"
        " AND n.last_seen >= ?4))))",
        "claim intent");
    q.bind(1, object_id).bind(2, claimant).bind(3, now).bind(4, alive_since);
    q.run();
    return sqlite3_changes(conn_.handle()) > 0;
  }

  void heartbeat(const std::string& instance_id, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "INSERT INTO instances (id, started_at, last_seen) VALUES (?1, ?2, ?2)"
        " ON CONFLICT (id) DO UPDATE SET last_seen = max(last_seen, excluded.last_seen)",
        "heartbeat");
    q.bind(1, instance_id).bind(2, now);
    q.run();
  }

  void remove_instance(const std::string& instance_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("DELETE FROM instances WHERE id = ?1", "remove instance");
    q.bind(1, instance_id);
    q.run();
  }

  std::vector<InstanceRecord> list_instances() override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT id, started_at, last_seen FROM instances ORDER BY id", "list instances");
    std::vector<InstanceRecord> out;
    while (q.step()) out.push_back(InstanceRecord{q.text(0), q.int64(1), q.int64(2)});
    return out;
  }

  void create_key(const KeyRecord& key) override {
    if (key.id.empty()) throw std::invalid_argument("create_key: the key has no id");
    check_live_state(key.state);
    for (const auto& [number, v] : key.versions) {
      if (number != v.version) {
        throw std::invalid_argument("create_key: versions map key " + std::to_string(number) +
                                    " does not match VersionRecord::version " +
                                    std::to_string(v.version));
      }
      check_version(v);
    }
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    if (find_key(key.ns, key.name)) {
      throw ConflictError("key '" + key.name + "' already exists in namespace '" + key.ns + "'");
    }
    {
      // Tombstones included: an id names one key forever.
      Statement q = conn_.prepare("SELECT 1 FROM keys WHERE uuid = ?1", "check key id");
      q.bind(1, key.id);
      if (q.step()) throw ConflictError("key id " + key.id + " is already in use");
    }
    int64_t generation = std::max<int64_t>(key.generation, max_deleted_generation() + 1);
    {
      Statement q = conn_.prepare(
          "INSERT INTO keys (uuid, ns, name, type, created_at, min_decryption_version,"
          "                  min_encryption_version, deletion_allowed, exportable, generation,"
          "                  description, expires_at, state, imported, created_by, updated_at,"
          "                  derived, convergent, key_size, auto_rotate_period, min_available_version)"
          " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,"
          "         ?17, ?18, ?19, ?20, ?21)",
          "insert key");
      q.bind(1, key.id).bind(2, key.ns).bind(3, key.name).bind(4, key.type);
      q.bind(5, key.created_at).bind(6, key.min_decryption_version);
      q.bind(7, key.min_encryption_version).bind(8, key.deletion_allowed);
      q.bind(9, key.exportable).bind(10, generation).bind(11, key.description);
      q.bind(12, key.expires_at).bind(13, key.state).bind(14, key.imported);
      q.bind(15, key.created_by);
      // A new key's metadata was last changed when it was made.
      q.bind(16, key.updated_at != 0 ? key.updated_at : key.created_at);
      q.bind(17, key.derived).bind(18, key.convergent).bind(19, key.key_size);
      q.bind(20, key.auto_rotate_period).bind(21, key.min_available_version);
      q.run();
    }
    int64_t key_id = sqlite3_last_insert_rowid(conn_.handle());
    for (const auto& entry : key.versions) {
      // Checked one by one after the previous inserts, so ids repeated within the record
      // conflict too.
      check_version_id_unused(entry.second.id);
      insert_version(key_id, entry.second);
      if (!entry.second.object_id.empty()) settle_intent(entry.second.object_id);
      if (!entry.second.hmac_object_id.empty()) settle_intent(entry.second.hmac_object_id);
    }
    tx.commit();
  }

  void add_version(const std::string& ns, const std::string& name,
                   const VersionRecord& version) override {
    check_version(version);
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    // Only a live key is found by name, so a tombstone never gains a version.
    std::optional<int64_t> key_id = find_key(ns, name);
    if (!key_id) {
      throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
    }
    {
      Statement q = conn_.prepare(
          "SELECT 1 FROM key_versions WHERE key_id = ?1 AND version = ?2", "check version");
      q.bind(1, *key_id).bind(2, version.version);
      if (q.step()) {
        throw ConflictError("version " + std::to_string(version.version) + " of key '" + name +
                            "' in namespace '" + ns + "' already exists");
      }
    }
    check_version_id_unused(version.id);
    insert_version(*key_id, version);
    if (!version.object_id.empty()) settle_intent(version.object_id);
    if (!version.hmac_object_id.empty()) settle_intent(version.hmac_object_id);
    bump_generation(*key_id);
    tx.commit();
  }

  void update_config(const KeyRecord& key) override {
    check_live_state(key.state);
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    Statement q = conn_.prepare(
        "UPDATE keys SET min_decryption_version = ?3, min_encryption_version = ?4,"
        "                deletion_allowed = ?5, exportable = ?6, description = ?7,"
        "                expires_at = ?8, state = ?9, updated_at = ?10,"
        "                auto_rotate_period = ?11, generation = generation + 1"
        " WHERE ns = ?1 AND name = ?2 AND deleted_at = 0",
        "update key config");
    q.bind(1, key.ns).bind(2, key.name).bind(3, key.min_decryption_version);
    q.bind(4, key.min_encryption_version).bind(5, key.deletion_allowed).bind(6, key.exportable);
    q.bind(7, key.description).bind(8, key.expires_at).bind(9, key.state);
    q.bind(10, key.updated_at).bind(11, key.auto_rotate_period);
    q.run();
    if (sqlite3_changes(conn_.handle()) == 0) {
      throw std::out_of_range("key '" + key.name + "' not found in namespace '" + key.ns + "'");
    }
    tx.commit();
  }

  std::vector<Intent> delete_key(const std::string& ns, const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    std::optional<int64_t> key_id = find_key(ns, name);
    if (!key_id) {
      throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
    }
    const int64_t now = now_unix();
    std::vector<Intent> intents;
    {
      Statement q = conn_.prepare(
          "SELECT version, object_id, hmac_object_id FROM key_versions"
          " WHERE key_id = ?1 AND (object_id IS NOT NULL OR hmac_object_id IS NOT NULL)"
          " ORDER BY version",
          "read versions for delete");
      q.bind(1, *key_id);
      intents = doom_objects(q, ns, name, now);
    }
    {
      // The tombstone keeps ids, numbers and dates; the material (objects, sealed blobs) goes.
      Statement q = conn_.prepare(
          "UPDATE key_versions SET object_id = NULL, sealed = NULL, hmac_object_id = NULL,"
          "                        hmac_sealed = NULL WHERE key_id = ?1",
          "clear versions for delete");
      q.bind(1, *key_id);
      q.run();
    }
    {
      Statement q = conn_.prepare(
          "UPDATE keys SET state = 5, deleted_at = ?2, updated_at = ?2,"
          "                generation = generation + 1"
          " WHERE id = ?1",
          "make key a tombstone");
      q.bind(1, *key_id).bind(2, now);
      q.run();
    }
    int64_t generation = 0;
    {
      Statement q = conn_.prepare("SELECT generation FROM keys WHERE id = ?1",
                                  "read tombstone generation");
      q.bind(1, *key_id);
      if (q.step()) generation = q.int64(0);
    }
    {
      // The name is free again; a key created under it must start above every generation a
      // cache may hold for this one.
      Statement q = conn_.prepare(
          "UPDATE counters SET value = max(value, ?1) WHERE name = 'max_deleted_generation'",
          "record deleted generation");
      q.bind(1, generation);
      q.run();
    }
    tx.commit();
    return intents;
  }

  std::vector<Intent> trim_versions(const std::string& ns, const std::string& name,
                                    int min_available_version) override {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    std::optional<int64_t> key_id = find_key(ns, name);
    if (!key_id) throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
    const int64_t now = now_unix();
    std::vector<Intent> intents;
    {
      Statement q = conn_.prepare(
          "SELECT version, object_id, hmac_object_id FROM key_versions"
          " WHERE key_id = ?1 AND version < ?2 AND (object_id IS NOT NULL OR hmac_object_id IS NOT NULL)"
          " ORDER BY version",
          "read versions for trim");
      q.bind(1, *key_id).bind(2, min_available_version);
      intents = doom_objects(q, ns, name, now);
    }
    {
      Statement q = conn_.prepare("DELETE FROM key_versions WHERE key_id = ?1 AND version < ?2", "trim versions");
      q.bind(1, *key_id).bind(2, min_available_version);
      q.run();
    }
    {
      Statement q = conn_.prepare(
          "UPDATE keys SET min_available_version = max(min_available_version, ?2), updated_at = ?3,"
          "                generation = generation + 1 WHERE id = ?1",
          "record min available version");
      q.bind(1, *key_id).bind(2, min_available_version).bind(3, now);
      q.run();
    }
    tx.commit();
    return intents;
  }

  std::vector<KeyRecord> keys_due_for_rotation(int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "SELECT k.ns, k.name, k.uuid, k.auto_rotate_period"
        "  FROM keys k JOIN (SELECT key_id, max(created_at) AS newest FROM key_versions GROUP BY key_id) v"
        "    ON v.key_id = k.id"
        " WHERE k.deleted_at = 0 AND k.auto_rotate_period > 0 AND v.newest + k.auto_rotate_period <= ?1"
        " ORDER BY k.id",
        "list keys due for rotation");
    q.bind(1, now);
    std::vector<KeyRecord> out;
    while (q.step()) {
      KeyRecord k;
      k.ns = q.text(0);
      k.name = q.text(1);
      k.id = q.text(2);
      k.auto_rotate_period = q.int64(3);
      out.push_back(std::move(k));
    }
    return out;
  }

  std::vector<std::string> all_object_ids() override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "SELECT o FROM (SELECT v.object_id AS o FROM key_versions v JOIN keys k ON k.id = v.key_id"
        "                WHERE k.deleted_at = 0"
        "               UNION ALL"
        "               SELECT v.hmac_object_id FROM key_versions v JOIN keys k ON k.id = v.key_id"
        "                WHERE k.deleted_at = 0)"
        " WHERE o IS NOT NULL ORDER BY o",
        "list object ids");
    std::vector<std::string> ids;
    while (q.step()) ids.push_back(q.text(0));
    return ids;
  }

  std::vector<VersionRef> all_versions() override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "SELECT ns, name, version, o FROM ("
        "  SELECT k.ns, k.name, v.version, v.object_id AS o"
        "    FROM key_versions v JOIN keys k ON k.id = v.key_id WHERE k.deleted_at = 0"
        "  UNION ALL"
        "  SELECT k.ns, k.name, v.version, v.hmac_object_id"
        "    FROM key_versions v JOIN keys k ON k.id = v.key_id WHERE k.deleted_at = 0)"
        " WHERE o IS NOT NULL ORDER BY ns, name, version, o",
        "list versions");
    std::vector<VersionRef> out;
    while (q.step()) {
      VersionRef ref;
      ref.ns = q.text(0);
      ref.name = q.text(1);
      ref.version = q.int32(2);
      ref.object_id = q.text(3);
      out.push_back(std::move(ref));
    }
    return out;
  }

  bool set_version_hmac(const std::string& ns, const std::string& name, int version,
                        const std::string& hmac_object_id, const std::string& hmac_sealed) override {
    if (hmac_object_id.empty() == hmac_sealed.empty())
      throw std::invalid_argument("set_version_hmac: exactly one of hmac_object_id and hmac_sealed");
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    std::optional<int64_t> key_id = find_key(ns, name);
    if (!key_id) throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
    {
      Statement q = conn_.prepare(
          "SELECT hmac_object_id IS NULL AND hmac_sealed IS NULL FROM key_versions"
          " WHERE key_id = ?1 AND version = ?2",
          "read version hmac key");
      q.bind(1, *key_id).bind(2, version);
      if (!q.step()) throw std::out_of_range("version " + std::to_string(version) + " of key '" + name + "' not found");
      if (!q.boolean(0)) return false;
    }
    {
      Statement q = conn_.prepare(
          "UPDATE key_versions SET hmac_object_id = ?3, hmac_sealed = ?4 WHERE key_id = ?1 AND version = ?2",
          "write version hmac key");
      q.bind(1, *key_id).bind(2, version);
      q.bind_text_or_null(3, hmac_object_id).bind_text_or_null(4, hmac_sealed);
      q.run();
    }
    if (!hmac_object_id.empty()) settle_intent(hmac_object_id);
    bump_generation(*key_id);
    tx.commit();
    return true;
  }

  std::optional<std::string> get_setting(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT value FROM settings WHERE name = ?1", "read setting");
    q.bind(1, name);
    if (!q.step()) return std::nullopt;
    return q.text(0);
  }

  void put_setting(const std::string& name, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        "write setting");
    q.bind(1, name).bind(2, value);
    q.run();
  }

  void put_setting_settling_intent(const std::string& name, const std::string& value,
                                   const std::string& object_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    settle_intent(object_id);
    Statement q = conn_.prepare(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        "write setting");
    q.bind(1, name).bind(2, value);
    q.run();
    tx.commit();
  }

  std::string put_setting_if_absent(const std::string& name, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    {
      Statement q = conn_.prepare(
          "INSERT INTO settings (name, value) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING",
          "write setting if absent");
      q.bind(1, name).bind(2, value);
      q.run();
    }
    std::string stored;
    {
      Statement q = conn_.prepare("SELECT value FROM settings WHERE name = ?1", "read setting");
      q.bind(1, name);
      if (q.step()) stored = q.text(0);
    }
    tx.commit();
    return stored;
  }

  // Leases are settings "lease/<name>" = "<holder> <expiry>".
  bool take_lease(const std::string& name, const std::string& holder, int64_t now, int64_t ttl_s) override {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    const std::string key = "lease/" + name;
    std::string current;
    {
      Statement q = conn_.prepare("SELECT value FROM settings WHERE name = ?1", "read lease");
      q.bind(1, key);
      if (q.step()) current = q.text(0);
    }
    if (!current.empty()) {
      auto space = current.rfind(' ');
      std::string owner = current.substr(0, space);
      int64_t expiry = space == std::string::npos ? 0 : std::stoll(current.substr(space + 1));
      if (owner != holder && expiry > now) return false;
    }
    Statement q = conn_.prepare(
        "INSERT INTO settings (name, value) VALUES (?1, ?2)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        "write lease");
    q.bind(1, key).bind(2, holder + " " + std::to_string(now + ttl_s));
    q.run();
    tx.commit();
    return true;
  }

  std::vector<std::pair<std::string, std::string>> list_settings(const std::string& prefix) override {
    std::lock_guard<std::mutex> lock(mu_);
    // substr rather than LIKE: a prefix may contain % or _.
    Statement q = conn_.prepare(
        "SELECT name, value FROM settings WHERE substr(name, 1, length(?1)) = ?1 ORDER BY name",
        "list settings");
    q.bind(1, prefix);
    std::vector<std::pair<std::string, std::string>> out;
    while (q.step()) out.emplace_back(q.text(0), q.text(1));
    return out;
  }

  bool delete_setting(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("DELETE FROM settings WHERE name = ?1", "delete setting");
    q.bind(1, name);
    q.run();
    return sqlite3_changes(conn_.handle()) > 0;
  }


  // -- BYOK registry (schema 4) --------------------------------------------------------------

  bool create_byok_key(const ByokKeyRecord& key, size_t max_live_in_ns) override {
    if (key.id.empty()) throw std::invalid_argument("create_byok_key: the entry has no id");
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    {
      Statement q = conn_.prepare("SELECT 1 FROM byok_keys WHERE id = ?1", "check byok key id");
      q.bind(1, key.id);
      if (q.step()) throw ConflictError("byok key id " + key.id + " is already in use");
    }
    {
      Statement q = conn_.prepare("SELECT count(*) FROM byok_keys WHERE ns = ?1 AND deleted_at = 0",
                                  "count byok keys for quota");
      q.bind(1, key.ns);
      if (q.step() && static_cast<size_t>(q.int64(0)) >= max_live_in_ns) return false;
    }
    {
      Statement q = conn_.prepare(
          "INSERT INTO byok_keys (id, ns, display_name, provider, kind, key_json, target_key_id,"
          "                       validation_phase, validation_message, validation_since,"
          "                       validation_region, created_at, updated_at, deleted_at)"
          " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, 0)",
          "insert byok key");
      q.bind(1, key.id).bind(2, key.ns).bind(3, key.display_name).bind(4, key.provider);
      q.bind(5, key.kind).bind(6, key.key_json).bind(7, key.target_key_id);
      q.bind(8, key.validation_phase).bind(9, key.validation_message);
      q.bind(10, key.validation_since ? key.validation_since : key.created_at);
      q.bind(11, key.validation_region).bind(12, key.created_at);
      q.bind(13, key.updated_at ? key.updated_at : key.created_at);
      q.run();
    }
    tx.commit();
    return true;
  }

  std::optional<ByokKeyRecord> get_byok_key(const std::string& ns, const std::string& id) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT" P11KMS_BYOK_COLUMNS "WHERE ns = ?1 AND id = ?2", "read byok key");
    q.bind(1, ns).bind(2, id);
    auto rows = read_byok_keys(q);
    if (rows.empty()) return std::nullopt;
    return std::move(rows.front());
  }

  std::vector<ByokKeyRecord> list_byok_keys(const std::string& ns, const std::string& after_id,
                                            size_t limit) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT" P11KMS_BYOK_COLUMNS
                                "WHERE ns = ?1 AND deleted_at = 0 AND id > ?2 ORDER BY id LIMIT ?3",
                                "list byok keys");
    q.bind(1, ns).bind(2, after_id).bind(3, limit ? static_cast<int64_t>(limit) : int64_t{-1});
    return read_byok_keys(q);
  }

  size_t count_byok_keys(const std::string& ns) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT count(*) FROM byok_keys WHERE ns = ?1 AND deleted_at = 0",
                                "count byok keys");
    q.bind(1, ns);
    return q.step() ? static_cast<size_t>(q.int64(0)) : 0;
  }

  std::vector<ByokKeyRecord> live_byok_keys_of_kind(const std::string& kind) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare("SELECT" P11KMS_BYOK_COLUMNS
                                "WHERE kind = ?1 AND deleted_at = 0 ORDER BY ns, id",
                                "list byok keys of a kind");
    q.bind(1, kind);
    return read_byok_keys(q);
  }

  bool update_byok_display_name(const std::string& ns, const std::string& id, const std::string& display_name,
                                int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "UPDATE byok_keys SET display_name = ?3, updated_at = ?4 WHERE ns = ?1 AND id = ?2 AND deleted_at = 0",
        "update byok display name");
    q.bind(1, ns).bind(2, id).bind(3, display_name).bind(4, now);
    q.run();
    return sqlite3_changes(conn_.handle()) > 0;
  }

  bool set_byok_validation(const std::string& ns, const std::string& id, const std::string& phase,
                           const std::string& message, const std::string& region, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "UPDATE byok_keys SET"
        "  validation_since = CASE WHEN validation_phase <> ?3 OR validation_message <> ?4"
        "                          THEN ?6 ELSE validation_since END,"
        "  validation_phase = ?3, validation_message = ?4,"
        "  validation_region = CASE WHEN ?5 <> '' THEN ?5 ELSE validation_region END"
        " WHERE ns = ?1 AND id = ?2 AND deleted_at = 0",
        "record byok validation");
    q.bind(1, ns).bind(2, id).bind(3, phase).bind(4, message).bind(5, region).bind(6, now);
    q.run();
    return sqlite3_changes(conn_.handle()) > 0;
  }

  bool delete_byok_key(const std::string& ns, const std::string& id, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    Statement q = conn_.prepare(
        "UPDATE byok_keys SET deleted_at = ?3, updated_at = ?3 WHERE ns = ?1 AND id = ?2 AND deleted_at = 0",
        "delete byok key");
    q.bind(1, ns).bind(2, id).bind(3, now);
    q.run();
    return sqlite3_changes(conn_.handle()) > 0;
  }

  StoreSnapshot snapshot() override {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);  // one consistent read
    StoreSnapshot out;
    {
      Statement q = conn_.prepare("SELECT" P11KMS_KEY_COLUMNS "ORDER BY k.id, v.version", "snapshot keys");
      out.keys = read_keys(q);
    }
    {
      Statement q = conn_.prepare(kIntentColumns "ORDER BY object_id", "snapshot intents");
      out.intents = read_intents(q);
    }
    {
      Statement q = conn_.prepare("SELECT name, value FROM settings ORDER BY name", "snapshot settings");
      while (q.step()) out.settings.emplace_back(q.text(0), q.text(1));
    }
    {
      Statement q = conn_.prepare("SELECT" P11KMS_BYOK_COLUMNS "ORDER BY ns, id", "snapshot byok keys");
      out.byok_keys = read_byok_keys(q);
    }
    out.max_deleted_generation = max_deleted_generation();
    tx.commit();
    return out;
  }

  void restore(const StoreSnapshot& snap, bool replace) override {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    if (replace) {
      conn_.exec("DELETE FROM key_versions; DELETE FROM keys; DELETE FROM intents; DELETE FROM settings;"
                 " DELETE FROM byok_keys;",
                 "clear the store");
    } else {
      Statement q = conn_.prepare(
          "SELECT (SELECT count(*) FROM keys) + (SELECT count(*) FROM intents) +"
          " (SELECT count(*) FROM settings) + (SELECT count(*) FROM byok_keys)",
          "check the store is empty");
      if (q.step() && q.int64(0) > 0) throw ConflictError("the target store is not empty");
    }
    for (const KeyRecord& k : snap.keys) {
      {
        Statement q = conn_.prepare(
            "INSERT INTO keys (uuid, ns, name, type, created_at, min_decryption_version,"
            " min_encryption_version, deletion_allowed, exportable, generation, description, expires_at,"
            " state, imported, created_by, updated_at, deleted_at, derived, convergent, key_size,"
            " auto_rotate_period, min_available_version)"
            " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,"
            "         ?20, ?21, ?22)",
            "restore key");
        q.bind(1, k.id).bind(2, k.ns).bind(3, k.name).bind(4, k.type).bind(5, k.created_at);
        q.bind(6, k.min_decryption_version).bind(7, k.min_encryption_version).bind(8, k.deletion_allowed);
        q.bind(9, k.exportable).bind(10, k.generation).bind(11, k.description).bind(12, k.expires_at);
        q.bind(13, k.state).bind(14, k.imported).bind(15, k.created_by).bind(16, k.updated_at);
        q.bind(17, k.deleted_at).bind(18, k.derived).bind(19, k.convergent).bind(20, k.key_size);
        q.bind(21, k.auto_rotate_period).bind(22, k.min_available_version);
        q.run();
      }
      int64_t key_id = sqlite3_last_insert_rowid(conn_.handle());
      for (const auto& entry : k.versions) insert_version(key_id, entry.second);
    }
    for (const Intent& i : snap.intents) insert_intent(i);
    for (const auto& [name, value] : snap.settings) {
      Statement q = conn_.prepare("INSERT INTO settings (name, value) VALUES (?1, ?2)", "restore setting");
      q.bind(1, name).bind(2, value);
      q.run();
    }
    for (const ByokKeyRecord& b : snap.byok_keys) {
      Statement q = conn_.prepare(
          "INSERT INTO byok_keys (id, ns, display_name, provider, kind, key_json, target_key_id, validation_phase,"
          " validation_message, validation_since, validation_region, created_at, updated_at, deleted_at)"
          " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
          "restore byok key");
      q.bind(1, b.id).bind(2, b.ns).bind(3, b.display_name).bind(4, b.provider).bind(5, b.kind);
      q.bind(6, b.key_json).bind(7, b.target_key_id).bind(8, b.validation_phase).bind(9, b.validation_message);
      q.bind(10, b.validation_since).bind(11, b.validation_region).bind(12, b.created_at);
      q.bind(13, b.updated_at).bind(14, b.deleted_at);
      q.run();
    }
    {
      Statement q = conn_.prepare("UPDATE counters SET value = ?1 WHERE name = 'max_deleted_generation'",
                                  "restore deleted generation");
      q.bind(1, snap.max_deleted_generation);
      q.run();
    }
    tx.commit();
  }

  int schema_version() override {
    std::lock_guard<std::mutex> lock(mu_);
    return applied_schema_version();
  }

 private:
  void configure() {
    if (sqlite3_busy_timeout(conn_.handle(), 5000) != SQLITE_OK) {
      throw_sqlite(conn_.handle(), "set busy timeout");
    }
    {
      Statement q = conn_.prepare("PRAGMA journal_mode=WAL", "enable WAL journal mode");
      std::string mode = q.step() ? q.text(0) : std::string();
      // An in-memory database cannot use WAL; it reports "memory" and is fine for tests.
      bool in_memory = path_.empty() || path_ == ":memory:";
      if (mode != "wal" && !(in_memory && mode == "memory")) {
        throw StoreError("sqlite metadata store: cannot enable WAL journal mode on '" + path_ +
                         "' (journal mode is '" + mode + "')");
      }
    }
    conn_.exec("PRAGMA synchronous=NORMAL", "set synchronous mode");
    conn_.exec("PRAGMA foreign_keys=ON", "enable foreign keys");
    {
      Statement q = conn_.prepare("PRAGMA foreign_keys", "check foreign keys");
      if (!q.step() || q.int64(0) != 1) {
        throw StoreError("sqlite metadata store: libsqlite3 does not enforce foreign keys");
      }
    }
  }

  int applied_schema_version() {
    Statement q = conn_.prepare("SELECT coalesce(max(version), 0) FROM schema_migrations",
                                "read schema version");
    return q.step() ? q.int32(0) : 0;
  }

  void check_not_newer(int version) const {
    if (version > kLatestSchemaVersion) {
      throw StoreError("sqlite metadata store: database '" + path_ + "' has schema version " +
                       std::to_string(version) + ", newer than this build supports (" +
                       std::to_string(kLatestSchemaVersion) +
                       "); refusing to open it with an older p11kms");
    }
  }

  void migrate() {
    conn_.exec(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        "create schema_migrations table");
    const int start = applied_schema_version();
    check_not_newer(start);
    for (int target = start + 1; target <= kLatestSchemaVersion; ++target) {
      Transaction tx(conn_);
      // Re-read under the write lock: another process may have migrated meanwhile.
      int current = applied_schema_version();
      check_not_newer(current);
      if (current >= target) continue;
      conn_.exec(kMigrations[target - 1],
                 "apply schema migration " + std::to_string(target) + " to '" + path_ + "'");
      {
        Statement q = conn_.prepare(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
            "record schema migration");
        q.bind(1, target).bind(2, now_unix());
        q.run();
      }
      tx.commit();
    }
  }

  // The live key with that name (tombstones keep their names but never match).
  std::optional<int64_t> find_key(const std::string& ns, const std::string& name) {
    Statement q = conn_.prepare(
        "SELECT id FROM keys WHERE ns = ?1 AND name = ?2 AND deleted_at = 0", "find key");
    q.bind(1, ns).bind(2, name);
    if (!q.step()) return std::nullopt;
    return q.int64(0);
  }

  int64_t max_deleted_generation() {
    Statement q = conn_.prepare(
        "SELECT value FROM counters WHERE name = 'max_deleted_generation'",
        "read deleted generation");
    return q.step() ? q.int64(0) : 0;
  }

  void insert_version(int64_t key_id, const VersionRecord& v) {
    Statement q = conn_.prepare(
        "INSERT INTO key_versions (key_id, version, uuid, object_id, sealed, created_at,"
        "                          public_key, hmac_object_id, hmac_sealed)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        "insert key version");
    q.bind(1, key_id).bind(2, v.version).bind(3, v.id);
    q.bind_text_or_null(4, v.object_id).bind_text_or_null(5, v.sealed).bind(6, v.created_at);
    q.bind_text_or_null(7, v.public_key).bind_text_or_null(8, v.hmac_object_id).bind_text_or_null(9, v.hmac_sealed);
    q.run();
  }

  // Tombstones included: a version id names one version forever.
  void check_version_id_unused(const std::string& id) {
    Statement q = conn_.prepare("SELECT 1 FROM key_versions WHERE uuid = ?1", "check version id");
    q.bind(1, id);
    if (q.step()) throw ConflictError("key version id " + id + " is already in use");
  }

  // Rows (version, object_id, hmac_object_id) of versions whose token objects go: a doomed
  // intent for each, in the caller's transaction, so the objects are destroyed even if the
  // process dies right after the metadata changes.
  std::vector<Intent> doom_objects(Statement& q, const std::string& ns, const std::string& name, int64_t now) {
    std::vector<Intent> intents;
    while (q.step()) {
      std::string label = version_label(ns, name, q.int32(0));
      if (!q.is_null(1)) intents.push_back(Intent{q.text(1), label, now});
      if (!q.is_null(2)) intents.push_back(Intent{q.text(2), label + "/hmac", now});
    }
    for (Intent& intent : intents) {
      intent.doomed = true;
      insert_intent(intent);
    }
    return intents;
  }

  // Idempotent: an intent that already exists keeps its original label and time (the older
  // time is the safer one for a sweeper that settles intents by age).
  void insert_intent(const Intent& intent) {
    Statement q = conn_.prepare(
        "INSERT INTO intents (object_id, label, created_at, owner, lease_expires, doomed)"
        " VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (object_id) DO NOTHING",
        "insert intent");
    q.bind(1, intent.object_id).bind(2, intent.label).bind(3, intent.created_at);
    q.bind(4, intent.owner).bind(5, intent.lease_expires).bind(6, intent.doomed);
    q.run();
  }

  // The metadata naming an object is being committed: its intent goes, unless a sweeper has
  // claimed it (the object is being destroyed), which aborts the whole write.
  void settle_intent(const std::string& object_id) {
    {
      Statement q = conn_.prepare("SELECT doomed FROM intents WHERE object_id = ?1", "read intent");
      q.bind(1, object_id);
      if (q.step() && q.boolean(0))
        throw StoreError("sqlite metadata store: the intent of object " + object_id +
                         " was claimed by a sweeper (its lease expired); nothing was written");
    }
    delete_intent(object_id);
  }

  void delete_intent(const std::string& object_id) {
    Statement q = conn_.prepare("DELETE FROM intents WHERE object_id = ?1", "delete intent");
    q.bind(1, object_id);
    q.run();
  }

  void bump_generation(int64_t key_id) {
    Statement q = conn_.prepare("UPDATE keys SET generation = generation + 1 WHERE id = ?1",
                                "bump key generation");
    q.bind(1, key_id);
    q.run();
  }

  const std::string path_;
  std::mutex mu_;
  Connection conn_;
};

#undef P11KMS_KEY_COLUMNS
#undef P11KMS_BYOK_COLUMNS

}  // namespace

std::unique_ptr<MetadataStore> open_sqlite_store(const std::string& path) {
  return std::make_unique<SqliteStore>(path);
}

}  // namespace p11kms::store
