// PostgreSQL implementation of MetadataStore, for several instances sharing one database.
// libpq, one connection guarded by a mutex (reconnected on the next call after a failure),
// every write in one transaction, the same versioned migrations as SQLite (same numbers, the
// same schema in PostgreSQL's SQL). Semantics are pinned by the shared conformance suite in
// tests/integration/store/.
#include <libpq-fe.h>
#include <openssl/crypto.h>
#include <poll.h>

#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <iterator>
#include <memory>
#include <functional>
#include <mutex>
#include <optional>
#include <thread>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "store/metadata_store.hpp"

namespace p11kms::store {
namespace {

// Entry i is schema version i + 1, as in sqlite_store.cpp; never edit a shipped entry.
const char* const kMigrations[] = {
    // 1: initial schema.
    R"sql(
CREATE TABLE keys (
  id                     BIGSERIAL PRIMARY KEY,
  ns                     TEXT    NOT NULL,
  name                   TEXT    NOT NULL,
  type                   TEXT    NOT NULL,
  created_at             BIGINT  NOT NULL,
  min_decryption_version INTEGER NOT NULL,
  min_encryption_version INTEGER NOT NULL,
  deletion_allowed       BOOLEAN NOT NULL,
  exportable             BOOLEAN NOT NULL,
  generation             BIGINT  NOT NULL,
  CONSTRAINT keys_ns_name UNIQUE (ns, name)
);
CREATE TABLE key_versions (
  key_id     BIGINT  NOT NULL REFERENCES keys(id) ON DELETE CASCADE,
  version    INTEGER NOT NULL CHECK (version >= 1),
  object_id  TEXT    NOT NULL UNIQUE,
  created_at BIGINT  NOT NULL,
  PRIMARY KEY (key_id, version)
);
CREATE TABLE intents (
  object_id  TEXT   PRIMARY KEY,
  label      TEXT   NOT NULL,
  created_at BIGINT NOT NULL
);
CREATE TABLE settings (
  name  TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE counters (
  name  TEXT   PRIMARY KEY,
  value BIGINT NOT NULL
);
INSERT INTO counters (name, value) VALUES ('max_deleted_generation', 0);
)sql",
    // 2: key and version UUIDs, Key Protect metadata, tombstones and sealed material.
    R"sql(
ALTER TABLE keys ADD COLUMN uuid TEXT;
UPDATE keys SET uuid = gen_random_uuid()::text;
ALTER TABLE keys ALTER COLUMN uuid SET NOT NULL;
ALTER TABLE keys ADD CONSTRAINT keys_uuid UNIQUE (uuid);
ALTER TABLE keys ADD COLUMN description TEXT NOT NULL DEFAULT '';
ALTER TABLE keys ADD COLUMN expires_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN state INTEGER NOT NULL DEFAULT 1 CHECK (state IN (0, 1, 2, 3, 5));
ALTER TABLE keys ADD COLUMN imported BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE keys ADD COLUMN created_by TEXT NOT NULL DEFAULT '';
ALTER TABLE keys ADD COLUMN updated_at BIGINT NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN deleted_at BIGINT NOT NULL DEFAULT 0;
UPDATE keys SET updated_at = created_at;
ALTER TABLE keys ADD CONSTRAINT keys_tombstone CHECK ((deleted_at <> 0) = (state = 5));
ALTER TABLE keys DROP CONSTRAINT keys_ns_name;
CREATE UNIQUE INDEX keys_live_name ON keys (ns, name) WHERE deleted_at = 0;
CREATE INDEX keys_ns_created ON keys (ns, created_at);
ALTER TABLE key_versions ADD COLUMN uuid TEXT;
UPDATE key_versions SET uuid = gen_random_uuid()::text;
ALTER TABLE key_versions ALTER COLUMN uuid SET NOT NULL;
ALTER TABLE key_versions ADD CONSTRAINT key_versions_uuid UNIQUE (uuid);
ALTER TABLE key_versions ALTER COLUMN object_id DROP NOT NULL;
ALTER TABLE key_versions ADD COLUMN sealed TEXT;
ALTER TABLE key_versions ADD CONSTRAINT key_versions_one_place CHECK (object_id IS NULL OR sealed IS NULL);
)sql",
    // 3: transit's signing, HMAC, exportable and derived keys.
    R"sql(
ALTER TABLE keys ADD COLUMN derived BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE keys ADD COLUMN convergent BOOLEAN NOT NULL DEFAULT false;
ALTER TABLE keys ADD COLUMN key_size INTEGER NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN auto_rotate_period BIGINT NOT NULL DEFAULT 0;
ALTER TABLE keys ADD COLUMN min_available_version INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN public_key TEXT;
ALTER TABLE key_versions ADD COLUMN hmac_object_id TEXT;
ALTER TABLE key_versions ADD COLUMN hmac_sealed TEXT;
CREATE UNIQUE INDEX key_versions_hmac_object ON key_versions (hmac_object_id)
  WHERE hmac_object_id IS NOT NULL;
)sql",
    // 4: the BYOK key registry. Deleted entries stay (deleted_at set) so an id is never reused.
    R"sql(
CREATE TABLE byok_keys (
  id                 TEXT   PRIMARY KEY,
  ns                 TEXT   NOT NULL,
  display_name       TEXT   NOT NULL DEFAULT '',
  provider           TEXT   NOT NULL,
  kind               TEXT   NOT NULL,
  key_json           TEXT   NOT NULL,
  target_key_id      TEXT   NOT NULL DEFAULT '',
  validation_phase   TEXT   NOT NULL DEFAULT 'INITIALIZING'
                     CHECK (validation_phase IN ('INITIALIZING', 'VALID', 'INVALID')),
  validation_message TEXT   NOT NULL DEFAULT '',
  validation_since   BIGINT NOT NULL DEFAULT 0,
  validation_region  TEXT   NOT NULL DEFAULT '',
  created_at         BIGINT NOT NULL,
  updated_at         BIGINT NOT NULL,
  deleted_at         BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX byok_keys_ns_live ON byok_keys (ns, id) WHERE deleted_at = 0;
CREATE INDEX byok_keys_kind_live ON byok_keys (kind, ns, id) WHERE deleted_at = 0;
)sql",
    // 5: several writers. An intent names the instance creating its object and how long that
    // instance's lease on it lasts; a doomed intent is an order to destroy the object (a
    // deletion's, a trim's, or one a sweeper claimed). Instances record heartbeats.
    R"sql(
ALTER TABLE intents ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE intents ADD COLUMN lease_expires BIGINT NOT NULL DEFAULT 0;
ALTER TABLE intents ADD COLUMN doomed BOOLEAN NOT NULL DEFAULT false;
CREATE TABLE instances (
  id         TEXT   PRIMARY KEY,
  started_at BIGINT NOT NULL,
  last_seen  BIGINT NOT NULL
);
)sql",
};

constexpr int kLatestSchemaVersion = static_cast<int>(std::size(kMigrations));
// Serializes migrations across instances starting at once (pg_advisory_xact_lock key).
constexpr int64_t kMigrationLock = 0x70313162;  // "p11b"

int64_t now_unix() { return static_cast<int64_t>(std::time(nullptr)); }

std::string version_label(const std::string& ns, const std::string& name, int version) {
  return "p11kms/" + ns + "/" + name + "/v" + std::to_string(version);
}

// A query parameter: text, or SQL NULL.
using Param = std::optional<std::string>;
Param p(const std::string& s) { return s; }
Param p(int64_t v) { return std::to_string(v); }
Param p(int v) { return std::to_string(v); }
Param p(bool v) { return std::string(v ? "true" : "false"); }
Param text_or_null(const std::string& s) { return s.empty() ? Param() : Param(s); }

struct ResultFree {
  void operator()(PGresult* r) const { PQclear(r); }
};

// One query's rows. Columns are read as text (libpq's text format) and converted.
class Rows {
 public:
  explicit Rows(PGresult* r) : r_(r) {}
  int size() const { return PQntuples(r_.get()); }
  bool is_null(int row, int col) const { return PQgetisnull(r_.get(), row, col) != 0; }
  std::string text(int row, int col) const {
    return is_null(row, col) ? std::string() : std::string(PQgetvalue(r_.get(), row, col), PQgetlength(r_.get(), row, col));
  }
  int64_t int64(int row, int col) const { return is_null(row, col) ? 0 : std::strtoll(PQgetvalue(r_.get(), row, col), nullptr, 10); }
  int int32(int row, int col) const { return static_cast<int>(int64(row, col)); }
  bool boolean(int row, int col) const { return !is_null(row, col) && PQgetvalue(r_.get(), row, col)[0] == 't'; }
  int64_t affected() const { return std::strtoll(PQcmdTuples(r_.get()), nullptr, 10); }

 private:
  std::unique_ptr<PGresult, ResultFree> r_;
};

// Thrown for a unique violation, so callers can turn a lost race into ConflictError.
class UniqueViolation : public StoreError {
 public:
  using StoreError::StoreError;
};

class Connection {
 public:
  explicit Connection(std::string dsn) : dsn_(std::move(dsn)) { connect(); }
  ~Connection() {
    if (conn_) PQfinish(conn_);
    // The connection string may carry the password (store.password_file): kept for
    // reconnects, wiped at the end.
    if (!dsn_.empty()) OPENSSL_cleanse(&dsn_[0], dsn_.size());
  }
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  // Reconnects when the server went away since the last call (the instance recovers by
  // itself once PostgreSQL is back).
  void ensure() {
    if (conn_ && PQstatus(conn_) == CONNECTION_OK && !closed_by_server()) return;
    if (conn_) {
      PQreset(conn_);
      if (PQstatus(conn_) == CONNECTION_OK) return;
    }
    connect();
  }

  Rows exec(const char* what, const std::string& sql, const std::vector<Param>& params = {}) {
    std::vector<const char*> values;
    values.reserve(params.size());
    for (const auto& v : params) values.push_back(v ? v->c_str() : nullptr);
    PGresult* r = PQexecParams(conn_, sql.c_str(), static_cast<int>(params.size()), nullptr, values.data(), nullptr,
                               nullptr, 0);
    return check(what, r);
  }

  // Several statements without parameters (a migration).
  Rows exec_script(const char* what, const std::string& sql) { return check(what, PQexec(conn_, sql.c_str())); }

  PGconn* handle() const { return conn_; }

 private:
  // An idle connection the server has closed (a restart, a failover) reads as readable; libpq
  // only notices when asked. Checking costs one poll(), not a round trip, and spares the next
  // request a 503.
  bool closed_by_server() {
    pollfd p{PQsocket(conn_), POLLIN, 0};
    if (p.fd < 0 || ::poll(&p, 1, 0) <= 0) return false;
    if (PQconsumeInput(conn_) == 0 || PQstatus(conn_) != CONNECTION_OK) return true;
    bool notified = false;
    while (PGnotify* n = PQnotifies(conn_)) {
      PQfreemem(n);
      notified = true;
    }
    // Anything else arriving on an idle connection is the server saying goodbye (a FATAL
    // "terminating connection" before it closes): start afresh.
    return !notified;
  }

  Rows check(const char* what, PGresult* r) {
    ExecStatusType st = r ? PQresultStatus(r) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK) return Rows(r);
    std::string state = r && PQresultErrorField(r, PG_DIAG_SQLSTATE) ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : "";
    std::string msg = std::string("postgres metadata store: ") + what + " failed: " +
                      (r ? PQresultErrorMessage(r) : PQerrorMessage(conn_));
    while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
    if (r) PQclear(r);
    if (state == "23505") throw UniqueViolation(msg);
    throw StoreError(msg);
  }

  void connect() {
    if (conn_) PQfinish(conn_);
    conn_ = PQconnectdb(dsn_.c_str());
    if (PQstatus(conn_) != CONNECTION_OK) {
      std::string msg = PQerrorMessage(conn_);
      while (!msg.empty() && (msg.back() == '\n' || msg.back() == ' ')) msg.pop_back();
      PQfinish(conn_);
      conn_ = nullptr;
      // libpq's message names host and port, never the password.
      throw StoreError("postgres metadata store: cannot connect: " + msg);
    }
    PQsetNoticeProcessor(conn_, [](void*, const char*) {}, nullptr);  // NOTICEs are not errors
  }

  std::string dsn_;
  PGconn* conn_ = nullptr;
};

// BEGIN on construction, ROLLBACK on destruction unless committed.
class Transaction {
 public:
  explicit Transaction(Connection& c) : c_(c) { c_.exec("begin transaction", "BEGIN"); }
  ~Transaction() {
    if (!committed_ && c_.handle() && PQstatus(c_.handle()) == CONNECTION_OK) {
      PGresult* r = PQexec(c_.handle(), "ROLLBACK");
      if (r) PQclear(r);
    }
  }
  void commit() {
    c_.exec("commit transaction", "COMMIT");
    committed_ = true;
  }

 private:
  Connection& c_;
  bool committed_ = false;
};

const char* const kIntentColumns = "SELECT object_id, label, created_at, owner, lease_expires, doomed FROM intents ";

std::vector<Intent> read_intents(const Rows& q) {
  std::vector<Intent> out;
  for (int i = 0; i < q.size(); ++i)
    out.push_back(Intent{q.text(i, 0), q.text(i, 1), q.int64(i, 2), q.text(i, 3), q.int64(i, 4), q.boolean(i, 5)});
  return out;
}

const char* const kKeyColumns =
    "SELECT k.id, k.uuid, k.ns, k.name, k.type, k.created_at, k.min_decryption_version,"
    " k.min_encryption_version, k.deletion_allowed, k.exportable, k.description, k.expires_at,"
    " k.state, k.imported, k.created_by, k.updated_at, k.deleted_at, k.generation,"
    " v.version, v.uuid, v.object_id, v.sealed, v.created_at,"
    " k.derived, k.convergent, k.key_size, k.auto_rotate_period, k.min_available_version,"
    " v.public_key, v.hmac_object_id, v.hmac_sealed"
    " FROM keys k LEFT JOIN key_versions v ON v.key_id = k.id ";

std::vector<KeyRecord> read_keys(const Rows& q) {
  std::vector<KeyRecord> keys;
  int64_t current = 0;
  for (int i = 0; i < q.size(); ++i) {
    const int64_t row_id = q.int64(i, 0);
    if (keys.empty() || row_id != current) {
      current = row_id;
      KeyRecord& key = keys.emplace_back();
      key.id = q.text(i, 1);
      key.ns = q.text(i, 2);
      key.name = q.text(i, 3);
      key.type = q.text(i, 4);
      key.created_at = q.int64(i, 5);
      key.min_decryption_version = q.int32(i, 6);
      key.min_encryption_version = q.int32(i, 7);
      key.deletion_allowed = q.boolean(i, 8);
      key.exportable = q.boolean(i, 9);
      key.description = q.text(i, 10);
      key.expires_at = q.int64(i, 11);
      key.state = q.int32(i, 12);
      key.imported = q.boolean(i, 13);
      key.created_by = q.text(i, 14);
      key.updated_at = q.int64(i, 15);
      key.deleted_at = q.int64(i, 16);
      key.generation = q.int64(i, 17);
      key.derived = q.boolean(i, 23);
      key.convergent = q.boolean(i, 24);
      key.key_size = q.int32(i, 25);
      key.auto_rotate_period = q.int64(i, 26);
      key.min_available_version = q.int32(i, 27);
    }
    if (q.is_null(i, 18)) continue;
    const int number = q.int32(i, 18);
    VersionRecord& v = keys.back().versions[number];
    v.version = number;
    v.id = q.text(i, 19);
    v.object_id = q.text(i, 20);
    v.sealed = q.text(i, 21);
    v.created_at = q.int64(i, 22);
    v.public_key = q.text(i, 28);
    v.hmac_object_id = q.text(i, 29);
    v.hmac_sealed = q.text(i, 30);
  }
  return keys;
}

void check_live_state(int state) {
  if (state != kPreActive && state != kActive && state != kSuspended && state != kDeactivated)
    throw std::invalid_argument("key state " + std::to_string(state) + " is not a state a live key can have");
}

void check_version(const VersionRecord& v) {
  if (v.id.empty()) throw std::invalid_argument("version " + std::to_string(v.version) + " has no id");
  if (v.object_id.empty() == v.sealed.empty())
    throw std::invalid_argument("version " + std::to_string(v.version) +
                                " must have exactly one of object_id and sealed material");
}

class PostgresStore final : public MetadataStore {
 public:
  explicit PostgresStore(const std::string& dsn) : dsn_(dsn), conn_(dsn) { migrate(); }

  std::optional<KeyRecord> get_key(const std::string& ns, const std::string& name) override {
    auto keys = read(std::string(kKeyColumns) + "WHERE k.ns = $1 AND k.name = $2 AND k.deleted_at = 0 ORDER BY k.id, v.version",
                     {p(ns), p(name)});
    if (keys.empty()) return std::nullopt;
    return std::move(keys.front());
  }

  std::optional<KeyRecord> get_key_by_id(const std::string& ns, const std::string& id) override {
    auto keys = read(std::string(kKeyColumns) + "WHERE k.ns = $1 AND k.uuid = $2 ORDER BY k.id, v.version", {p(ns), p(id)});
    if (keys.empty()) return std::nullopt;
    return std::move(keys.front());
  }

  std::vector<std::string> list_keys(const std::string& ns) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    // COLLATE "C": byte order, as SQLite sorts.
    auto q = conn_.exec("list keys", "SELECT name FROM keys WHERE ns = $1 AND deleted_at = 0 ORDER BY name COLLATE \"C\"",
                        {p(ns)});
    std::vector<std::string> names;
    for (int i = 0; i < q.size(); ++i) names.push_back(q.text(i, 0));
    return names;
  }

  std::vector<KeyRecord> list_key_records(const std::string& ns, bool include_deleted) override {
    return read(std::string(kKeyColumns) + "WHERE k.ns = $1 AND ($2 OR k.deleted_at = 0) ORDER BY k.created_at, k.id, v.version",
                {p(ns), p(include_deleted)});
  }

  void add_intent(const Intent& intent) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    insert_intent(intent);
  }

  void remove_intent(const std::string& object_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    delete_intent(object_id);
  }

  std::vector<Intent> list_intents() override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("list intents", std::string(kIntentColumns) + "ORDER BY created_at, object_id COLLATE \"C\"");
    return read_intents(q);
  }

  void renew_intents(const std::string& owner, const std::vector<std::string>& object_ids,
                     int64_t lease_expires) override {
    if (object_ids.empty()) return;
    std::string ids = "{";
    for (size_t i = 0; i < object_ids.size(); ++i) ids += (i ? "," : "") + ("\"" + object_ids[i] + "\"");
    ids += "}";
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    conn_.exec("renew intents",
               "UPDATE intents SET lease_expires = greatest(lease_expires, $2)"
               " WHERE owner = $1 AND NOT doomed AND object_id = ANY($3::text[])",
               {p(owner), p(lease_expires), p(ids)});
  }

  bool claim_intent(const std::string& object_id, const std::string& claimant, int64_t now,
                    int64_t alive_since) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    // One statement: the row lock orders it against the owner's settling transaction, and the
    // conditions are checked again on the row as it is once that transaction is over.
    auto q = conn_.exec("claim intent",
                        "UPDATE intents i SET doomed = true WHERE object_id = $1 AND (doomed OR (lease_expires <= $3"
                        " AND (owner = $2 OR NOT EXISTS (SELECT 1 FROM instances n WHERE n.id = i.owner"
                        " AND n.last_seen >= $4)))) RETURNING object_id",
                        {p(object_id), p(claimant), p(now), p(alive_since)});
    return q.size() > 0;
  }

  void heartbeat(const std::string& instance_id, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    conn_.exec("heartbeat",
               "INSERT INTO instances (id, started_at, last_seen) VALUES ($1, $2, $2)"
               " ON CONFLICT (id) DO UPDATE SET last_seen = greatest(instances.last_seen, excluded.last_seen)",
               {p(instance_id), p(now)});
  }

  void remove_instance(const std::string& instance_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    conn_.exec("remove instance", "DELETE FROM instances WHERE id = $1", {p(instance_id)});
  }

  std::vector<InstanceRecord> list_instances() override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("list instances", "SELECT id, started_at, last_seen FROM instances ORDER BY id COLLATE \"C\"");
    std::vector<InstanceRecord> out;
    for (int i = 0; i < q.size(); ++i) out.push_back(InstanceRecord{q.text(i, 0), q.int64(i, 1), q.int64(i, 2)});
    return out;
  }

  void create_key(const KeyRecord& key) override {
    if (key.id.empty()) throw std::invalid_argument("create_key: the key has no id");
    check_live_state(key.state);
    for (const auto& [number, v] : key.versions) {
      if (number != v.version)
        throw std::invalid_argument("create_key: versions map key " + std::to_string(number) +
                                    " does not match VersionRecord::version " + std::to_string(v.version));
      check_version(v);
    }
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    try {
      Transaction tx(conn_);
      if (find_key(key.ns, key.name))
        throw ConflictError("key '" + key.name + "' already exists in namespace '" + key.ns + "'");
      if (conn_.exec("check key id", "SELECT 1 FROM keys WHERE uuid = $1", {p(key.id)}).size() > 0)
        throw ConflictError("key id " + key.id + " is already in use");
      int64_t generation = std::max<int64_t>(key.generation, max_deleted_generation() + 1);
      auto ins = conn_.exec(
          "insert key",
          "INSERT INTO keys (uuid, ns, name, type, created_at, min_decryption_version, min_encryption_version,"
          " deletion_allowed, exportable, generation, description, expires_at, state, imported, created_by,"
          " updated_at, derived, convergent, key_size, auto_rotate_period, min_available_version)"
          " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21) RETURNING id",
          {p(key.id), p(key.ns), p(key.name), p(key.type), p(key.created_at), p(key.min_decryption_version),
           p(key.min_encryption_version), p(key.deletion_allowed), p(key.exportable), p(generation),
           p(key.description), p(key.expires_at), p(key.state), p(key.imported), p(key.created_by),
           p(key.updated_at != 0 ? key.updated_at : key.created_at), p(key.derived), p(key.convergent),
           p(key.key_size), p(key.auto_rotate_period), p(key.min_available_version)});
      int64_t key_id = ins.int64(0, 0);
      for (const auto& entry : key.versions) {
        check_version_id_unused(entry.second.id);
        insert_version(key_id, entry.second);
        if (!entry.second.object_id.empty()) settle_intent(entry.second.object_id);
        if (!entry.second.hmac_object_id.empty()) settle_intent(entry.second.hmac_object_id);
      }
      notify_key_change(key.ns, key.name);
      tx.commit();
    } catch (const UniqueViolation& e) {
      // Another instance won a race for the same name or id.
      throw ConflictError(e.what());
    }
  }

  void add_version(const std::string& ns, const std::string& name, const VersionRecord& version) override {
    check_version(version);
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    try {
      Transaction tx(conn_);
      // FOR UPDATE: two instances adding versions to one key take turns.
      auto k = conn_.exec("lock key", "SELECT id FROM keys WHERE ns = $1 AND name = $2 AND deleted_at = 0 FOR UPDATE",
                          {p(ns), p(name)});
      if (k.size() == 0) throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
      int64_t key_id = k.int64(0, 0);
      if (conn_.exec("check version", "SELECT 1 FROM key_versions WHERE key_id = $1 AND version = $2",
                     {p(key_id), p(version.version)}).size() > 0)
        throw ConflictError("version " + std::to_string(version.version) + " of key '" + name + "' in namespace '" + ns +
                            "' already exists");
      check_version_id_unused(version.id);
      insert_version(key_id, version);
      if (!version.object_id.empty()) settle_intent(version.object_id);
      if (!version.hmac_object_id.empty()) settle_intent(version.hmac_object_id);
      bump_generation(key_id);
      notify_key_change(ns, name);
      tx.commit();
    } catch (const UniqueViolation& e) {
      throw ConflictError(e.what());
    }
  }

  void update_config(const KeyRecord& key) override {
    check_live_state(key.state);
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec(
        "update key config",
        "UPDATE keys SET min_decryption_version = $3, min_encryption_version = $4, deletion_allowed = $5,"
        " exportable = $6, description = $7, expires_at = $8, state = $9, updated_at = $10,"
        " auto_rotate_period = $11, generation = generation + 1"
        " WHERE ns = $1 AND name = $2 AND deleted_at = 0",
        {p(key.ns), p(key.name), p(key.min_decryption_version), p(key.min_encryption_version), p(key.deletion_allowed),
         p(key.exportable), p(key.description), p(key.expires_at), p(key.state), p(key.updated_at),
         p(key.auto_rotate_period)});
    if (q.affected() == 0) throw std::out_of_range("key '" + key.name + "' not found in namespace '" + key.ns + "'");
    notify_key_change(key.ns, key.name);
  }

  std::optional<KeyStamp> key_stamp(const std::string& ns, const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("read key stamp", "SELECT uuid, generation FROM keys WHERE ns = $1 AND name = $2 AND deleted_at = 0",
                        {p(ns), p(name)});
    if (q.size() == 0) return std::nullopt;
    return KeyStamp{q.text(0, 0), q.int64(0, 1)};
  }

  // LISTEN on a connection of its own, in a thread of its own; (re)connecting calls the
  // listener with ("", "") since notifications may have been missed meanwhile.
  void on_key_change(std::function<void(const std::string&, const std::string&)> listener) override {
    std::lock_guard<std::mutex> lk(listen_mu_);
    listener_ = std::move(listener);  // an empty one detaches the previous listener
    if (listener_ && !listen_thread_.joinable()) listen_thread_ = std::thread([this] { listen_loop(); });
  }

  ~PostgresStore() override {
    {
      std::lock_guard<std::mutex> lk(listen_mu_);
      listen_stop_ = true;
    }
    if (listen_thread_.joinable()) listen_thread_.join();
    if (!dsn_.empty()) OPENSSL_cleanse(&dsn_[0], dsn_.size());
  }

  std::vector<Intent> delete_key(const std::string& ns, const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    Transaction tx(conn_);
    auto k = conn_.exec("lock key for delete",
                        "SELECT id FROM keys WHERE ns = $1 AND name = $2 AND deleted_at = 0 FOR UPDATE", {p(ns), p(name)});
    if (k.size() == 0) throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
    int64_t key_id = k.int64(0, 0);
    const int64_t now = now_unix();
    auto v = conn_.exec("read versions for delete",
                        "SELECT version, object_id, hmac_object_id FROM key_versions WHERE key_id = $1"
                        " AND (object_id IS NOT NULL OR hmac_object_id IS NOT NULL) ORDER BY version",
                        {p(key_id)});
    std::vector<Intent> intents = doom_objects(v, ns, name, now);
    conn_.exec("clear versions for delete",
               "UPDATE key_versions SET object_id = NULL, sealed = NULL, hmac_object_id = NULL, hmac_sealed = NULL"
               " WHERE key_id = $1",
               {p(key_id)});
    auto g = conn_.exec("make key a tombstone",
                        "UPDATE keys SET state = 5, deleted_at = $2, updated_at = $2, generation = generation + 1"
                        " WHERE id = $1 RETURNING generation",
                        {p(key_id), p(now)});
    conn_.exec("record deleted generation",
               "UPDATE counters SET value = greatest(value, $1) WHERE name = 'max_deleted_generation'",
               {p(g.int64(0, 0))});
    notify_key_change(ns, name);
    tx.commit();
    return intents;
  }

  std::vector<Intent> trim_versions(const std::string& ns, const std::string& name, int min_available_version) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    Transaction tx(conn_);
    auto k = conn_.exec("lock key for trim",
                        "SELECT id FROM keys WHERE ns = $1 AND name = $2 AND deleted_at = 0 FOR UPDATE", {p(ns), p(name)});
    if (k.size() == 0) throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
    int64_t key_id = k.int64(0, 0);
    const int64_t now = now_unix();
    auto v = conn_.exec("read versions for trim",
                        "SELECT version, object_id, hmac_object_id FROM key_versions WHERE key_id = $1 AND version < $2"
                        " AND (object_id IS NOT NULL OR hmac_object_id IS NOT NULL) ORDER BY version",
                        {p(key_id), p(min_available_version)});
    std::vector<Intent> intents = doom_objects(v, ns, name, now);
    conn_.exec("trim versions", "DELETE FROM key_versions WHERE key_id = $1 AND version < $2",
               {p(key_id), p(min_available_version)});
    conn_.exec("record min available version",
               "UPDATE keys SET min_available_version = greatest(min_available_version, $2), updated_at = $3,"
               " generation = generation + 1 WHERE id = $1",
               {p(key_id), p(min_available_version), p(now)});
    notify_key_change(ns, name);
    tx.commit();
    return intents;
  }

  bool set_version_hmac(const std::string& ns, const std::string& name, int version, const std::string& hmac_object_id,
                        const std::string& hmac_sealed) override {
    if (hmac_object_id.empty() == hmac_sealed.empty())
      throw std::invalid_argument("set_version_hmac: exactly one of hmac_object_id and hmac_sealed");
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    Transaction tx(conn_);
    auto k = conn_.exec("lock key", "SELECT id FROM keys WHERE ns = $1 AND name = $2 AND deleted_at = 0 FOR UPDATE",
                        {p(ns), p(name)});
    if (k.size() == 0) throw std::out_of_range("key '" + name + "' not found in namespace '" + ns + "'");
    int64_t key_id = k.int64(0, 0);
    auto cur = conn_.exec("read version hmac key",
                          "SELECT hmac_object_id IS NULL AND hmac_sealed IS NULL FROM key_versions"
                          " WHERE key_id = $1 AND version = $2",
                          {p(key_id), p(version)});
    if (cur.size() == 0) throw std::out_of_range("version " + std::to_string(version) + " of key '" + name + "' not found");
    if (!cur.boolean(0, 0)) return false;
    conn_.exec("write version hmac key",
               "UPDATE key_versions SET hmac_object_id = $3, hmac_sealed = $4 WHERE key_id = $1 AND version = $2",
               {p(key_id), p(version), text_or_null(hmac_object_id), text_or_null(hmac_sealed)});
    if (!hmac_object_id.empty()) settle_intent(hmac_object_id);
    bump_generation(key_id);
    notify_key_change(ns, name);
    tx.commit();
    return true;
  }

  std::vector<KeyRecord> keys_due_for_rotation(int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec(
        "list keys due for rotation",
        "SELECT k.ns, k.name, k.uuid, k.auto_rotate_period"
        "  FROM keys k JOIN (SELECT key_id, max(created_at) AS newest FROM key_versions GROUP BY key_id) v"
        "    ON v.key_id = k.id"
        " WHERE k.deleted_at = 0 AND k.auto_rotate_period > 0 AND v.newest + k.auto_rotate_period <= $1"
        " ORDER BY k.id",
        {p(now)});
    std::vector<KeyRecord> out;
    for (int i = 0; i < q.size(); ++i) {
      KeyRecord k;
      k.ns = q.text(i, 0);
      k.name = q.text(i, 1);
      k.id = q.text(i, 2);
      k.auto_rotate_period = q.int64(i, 3);
      out.push_back(std::move(k));
    }
    return out;
  }

  std::vector<std::string> all_object_ids() override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("list object ids",
                        "SELECT o FROM (SELECT v.object_id AS o FROM key_versions v JOIN keys k ON k.id = v.key_id"
                        " WHERE k.deleted_at = 0 UNION ALL SELECT v.hmac_object_id FROM key_versions v"
                        " JOIN keys k ON k.id = v.key_id WHERE k.deleted_at = 0) x"
                        " WHERE o IS NOT NULL ORDER BY o COLLATE \"C\"");
    std::vector<std::string> ids;
    for (int i = 0; i < q.size(); ++i) ids.push_back(q.text(i, 0));
    return ids;
  }

  std::vector<VersionRef> all_versions() override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("list versions",
                        "SELECT ns, name, version, o FROM ("
                        "  SELECT k.ns, k.name, v.version, v.object_id AS o"
                        "    FROM key_versions v JOIN keys k ON k.id = v.key_id WHERE k.deleted_at = 0"
                        "  UNION ALL"
                        "  SELECT k.ns, k.name, v.version, v.hmac_object_id"
                        "    FROM key_versions v JOIN keys k ON k.id = v.key_id WHERE k.deleted_at = 0) x"
                        " WHERE o IS NOT NULL ORDER BY ns COLLATE \"C\", name COLLATE \"C\", version, o COLLATE \"C\"");
    std::vector<VersionRef> out;
    for (int i = 0; i < q.size(); ++i) {
      VersionRef ref;
      ref.ns = q.text(i, 0);
      ref.name = q.text(i, 1);
      ref.version = q.int32(i, 2);
      ref.object_id = q.text(i, 3);
      out.push_back(std::move(ref));
    }
    return out;
  }

  std::optional<std::string> get_setting(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("read setting", "SELECT value FROM settings WHERE name = $1", {p(name)});
    if (q.size() == 0) return std::nullopt;
    return q.text(0, 0);
  }

  void put_setting(const std::string& name, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    conn_.exec("write setting",
               "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
               {p(name), p(value)});
  }

  void put_setting_settling_intent(const std::string& name, const std::string& value,
                                   const std::string& object_id) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    Transaction tx(conn_);
    settle_intent(object_id);
    conn_.exec("write setting",
               "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET value = excluded.value",
               {p(name), p(value)});
    tx.commit();
  }

  std::string put_setting_if_absent(const std::string& name, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    conn_.exec("write setting if absent",
               "INSERT INTO settings (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING", {p(name), p(value)});
    return conn_.exec("read setting", "SELECT value FROM settings WHERE name = $1", {p(name)}).text(0, 0);
  }

  // Leases are settings "lease/<name>" = "<holder> <expiry>"; the row lock makes the check and
  // the write one step across instances.
  bool take_lease(const std::string& name, const std::string& holder, int64_t now, int64_t ttl_s) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    Transaction tx(conn_);
    const std::string key = "lease/" + name;
    conn_.exec("create lease", "INSERT INTO settings (name, value) VALUES ($1, ' 0') ON CONFLICT (name) DO NOTHING",
               {p(key)});
    auto cur = conn_.exec("lock lease", "SELECT value FROM settings WHERE name = $1 FOR UPDATE", {p(key)});
    std::string current = cur.text(0, 0);
    auto space = current.rfind(' ');
    std::string owner = current.substr(0, space);
    int64_t expiry = space == std::string::npos ? 0 : std::stoll(current.substr(space + 1));
    if (owner != holder && !owner.empty() && expiry > now) return false;
    conn_.exec("write lease", "UPDATE settings SET value = $2 WHERE name = $1",
               {p(key), p(holder + " " + std::to_string(now + ttl_s))});
    tx.commit();
    return true;
  }

  std::vector<std::pair<std::string, std::string>> list_settings(const std::string& prefix) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("list settings",
                        "SELECT name, value FROM settings WHERE left(name, length($1)) = $1 ORDER BY name COLLATE \"C\"",
                        {p(prefix)});
    std::vector<std::pair<std::string, std::string>> out;
    for (int i = 0; i < q.size(); ++i) out.emplace_back(q.text(i, 0), q.text(i, 1));
    return out;
  }

  bool delete_setting(const std::string& name) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    return conn_.exec("delete setting", "DELETE FROM settings WHERE name = $1", {p(name)}).affected() > 0;
  }

  bool create_byok_key(const ByokKeyRecord& k, size_t max_live_in_ns) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    try {
      Transaction tx(conn_);
      // Serializes creates per namespace across instances, so the quota holds.
      conn_.exec("lock byok namespace", "SELECT pg_advisory_xact_lock(hashtext($1))", {p("byok/" + k.ns)});
      auto n = conn_.exec("count byok keys", "SELECT count(*) FROM byok_keys WHERE ns = $1 AND deleted_at = 0", {p(k.ns)});
      if (static_cast<size_t>(n.int64(0, 0)) >= max_live_in_ns) return false;
      conn_.exec("insert byok key",
                 "INSERT INTO byok_keys (id, ns, display_name, provider, kind, key_json, target_key_id,"
                 " validation_phase, validation_message, validation_since, validation_region, created_at, updated_at)"
                 " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13)",
                 {p(k.id), p(k.ns), p(k.display_name), p(k.provider), p(k.kind), p(k.key_json), p(k.target_key_id),
                  p(k.validation_phase), p(k.validation_message), p(k.validation_since), p(k.validation_region),
                  p(k.created_at), p(k.updated_at != 0 ? k.updated_at : k.created_at)});
      tx.commit();
      return true;
    } catch (const UniqueViolation&) {
      throw ConflictError("byok key id " + k.id + " is already in use");
    }
  }

  std::optional<ByokKeyRecord> get_byok_key(const std::string& ns, const std::string& id) override {
    auto rows = read_byok("WHERE ns = $1 AND id = $2", {p(ns), p(id)});
    if (rows.empty()) return std::nullopt;
    return rows.front();
  }

  std::vector<ByokKeyRecord> list_byok_keys(const std::string& ns, const std::string& after_id, size_t limit) override {
    std::string sql = "WHERE ns = $1 AND deleted_at = 0 AND id > $2 ORDER BY id COLLATE \"C\"";
    if (limit > 0) sql += " LIMIT " + std::to_string(limit);
    return read_byok(sql, {p(ns), p(after_id)});
  }

  size_t count_byok_keys(const std::string& ns) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("count byok keys", "SELECT count(*) FROM byok_keys WHERE ns = $1 AND deleted_at = 0", {p(ns)});
    return static_cast<size_t>(q.int64(0, 0));
  }

  std::vector<ByokKeyRecord> live_byok_keys_of_kind(const std::string& kind) override {
    return read_byok("WHERE kind = $1 AND deleted_at = 0 ORDER BY ns COLLATE \"C\", id COLLATE \"C\"", {p(kind)});
  }

  bool update_byok_display_name(const std::string& ns, const std::string& id, const std::string& display_name,
                                int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    return conn_.exec("update byok display name",
                      "UPDATE byok_keys SET display_name = $3, updated_at = $4 WHERE ns = $1 AND id = $2 AND deleted_at = 0",
                      {p(ns), p(id), p(display_name), p(now)}).affected() > 0;
  }

  bool set_byok_validation(const std::string& ns, const std::string& id, const std::string& phase,
                           const std::string& message, const std::string& region, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    return conn_.exec("record byok validation",
                      "UPDATE byok_keys SET"
                      " validation_since = CASE WHEN validation_phase <> $3 OR validation_message <> $4"
                      "                         THEN $6 ELSE validation_since END,"
                      " validation_phase = $3, validation_message = $4,"
                      " validation_region = CASE WHEN $5 <> '' THEN $5 ELSE validation_region END"
                      " WHERE ns = $1 AND id = $2 AND deleted_at = 0",
                      {p(ns), p(id), p(phase), p(message), p(region), p(now)}).affected() > 0;
  }

  bool delete_byok_key(const std::string& ns, const std::string& id, int64_t now) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    return conn_.exec("delete byok key",
                      "UPDATE byok_keys SET deleted_at = $3, updated_at = $3 WHERE ns = $1 AND id = $2 AND deleted_at = 0",
                      {p(ns), p(id), p(now)}).affected() > 0;
  }

  StoreSnapshot snapshot() override {
    StoreSnapshot out;
    {
      std::lock_guard<std::mutex> lock(mu_);
      conn_.ensure();
      Transaction tx(conn_);
      conn_.exec("snapshot isolation", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ");
      out.keys = read_keys(conn_.exec("snapshot keys", std::string(kKeyColumns) + "ORDER BY k.id, v.version"));
      out.intents = read_intents(conn_.exec("snapshot intents", std::string(kIntentColumns) + "ORDER BY object_id"));
      auto st = conn_.exec("snapshot settings", "SELECT name, value FROM settings ORDER BY name COLLATE \"C\"");
      for (int r = 0; r < st.size(); ++r) out.settings.emplace_back(st.text(r, 0), st.text(r, 1));
      out.max_deleted_generation = max_deleted_generation();
      tx.commit();
    }
    out.byok_keys = read_byok("ORDER BY ns COLLATE \"C\", id COLLATE \"C\"", {});
    return out;
  }

  void restore(const StoreSnapshot& snap, bool replace) override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    Transaction tx(conn_);
    if (replace) {
      conn_.exec_script("clear the store",
                        "DELETE FROM key_versions; DELETE FROM keys; DELETE FROM intents; DELETE FROM settings;"
                        " DELETE FROM byok_keys;");
    } else {
      auto n = conn_.exec("check the store is empty",
                          "SELECT (SELECT count(*) FROM keys) + (SELECT count(*) FROM intents) +"
                          " (SELECT count(*) FROM settings) + (SELECT count(*) FROM byok_keys)");
      if (n.int64(0, 0) > 0) throw ConflictError("the target store is not empty");
    }
    for (const KeyRecord& k : snap.keys) {
      auto ins = conn_.exec(
          "restore key",
          "INSERT INTO keys (uuid, ns, name, type, created_at, min_decryption_version, min_encryption_version,"
          " deletion_allowed, exportable, generation, description, expires_at, state, imported, created_by,"
          " updated_at, deleted_at, derived, convergent, key_size, auto_rotate_period, min_available_version)"
          " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$19,$20,$21,$22) RETURNING id",
          {p(k.id), p(k.ns), p(k.name), p(k.type), p(k.created_at), p(k.min_decryption_version),
           p(k.min_encryption_version), p(k.deletion_allowed), p(k.exportable), p(k.generation), p(k.description),
           p(k.expires_at), p(k.state), p(k.imported), p(k.created_by), p(k.updated_at), p(k.deleted_at),
           p(k.derived), p(k.convergent), p(k.key_size), p(k.auto_rotate_period), p(k.min_available_version)});
      int64_t key_id = ins.int64(0, 0);
      for (const auto& entry : k.versions) insert_version(key_id, entry.second);
    }
    for (const Intent& i : snap.intents) insert_intent(i);
    for (const auto& [name, value] : snap.settings)
      conn_.exec("restore setting", "INSERT INTO settings (name, value) VALUES ($1, $2)", {p(name), p(value)});
    for (const ByokKeyRecord& b : snap.byok_keys)
      conn_.exec("restore byok key",
                 "INSERT INTO byok_keys (id, ns, display_name, provider, kind, key_json, target_key_id,"
                 " validation_phase, validation_message, validation_since, validation_region, created_at, updated_at,"
                 " deleted_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)",
                 {p(b.id), p(b.ns), p(b.display_name), p(b.provider), p(b.kind), p(b.key_json), p(b.target_key_id),
                  p(b.validation_phase), p(b.validation_message), p(b.validation_since), p(b.validation_region),
                  p(b.created_at), p(b.updated_at), p(b.deleted_at)});
    conn_.exec("restore deleted generation", "UPDATE counters SET value = $1 WHERE name = 'max_deleted_generation'",
               {p(snap.max_deleted_generation)});
    tx.commit();
  }

  int schema_version() override {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    return applied_schema_version();
  }

 private:
  std::vector<KeyRecord> read(const std::string& sql, const std::vector<Param>& params) {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    return read_keys(conn_.exec("read keys", sql, params));
  }

  std::vector<ByokKeyRecord> read_byok(const std::string& where, const std::vector<Param>& params) {
    std::lock_guard<std::mutex> lock(mu_);
    conn_.ensure();
    auto q = conn_.exec("read byok keys",
                        "SELECT id, ns, display_name, provider, kind, key_json, target_key_id, validation_phase,"
                        " validation_message, validation_since, validation_region, created_at, updated_at, deleted_at"
                        " FROM byok_keys " + where,
                        params);
    std::vector<ByokKeyRecord> out;
    for (int i = 0; i < q.size(); ++i) {
      ByokKeyRecord k;
      k.id = q.text(i, 0);
      k.ns = q.text(i, 1);
      k.display_name = q.text(i, 2);
      k.provider = q.text(i, 3);
      k.kind = q.text(i, 4);
      k.key_json = q.text(i, 5);
      k.target_key_id = q.text(i, 6);
      k.validation_phase = q.text(i, 7);
      k.validation_message = q.text(i, 8);
      k.validation_since = q.int64(i, 9);
      k.validation_region = q.text(i, 10);
      k.created_at = q.int64(i, 11);
      k.updated_at = q.int64(i, 12);
      k.deleted_at = q.int64(i, 13);
      out.push_back(std::move(k));
    }
    return out;
  }

  int applied_schema_version() {
    auto q = conn_.exec("read schema version", "SELECT coalesce(max(version), 0) FROM schema_migrations");
    return q.int32(0, 0);
  }

  void check_not_newer(int version) const {
    if (version > kLatestSchemaVersion)
      throw StoreError("postgres metadata store: the database has schema version " + std::to_string(version) +
                       ", newer than this build supports (" + std::to_string(kLatestSchemaVersion) +
                       "); refusing to open it with an older p11kms");
  }

  void migrate() {
    std::lock_guard<std::mutex> lock(mu_);
    Transaction tx(conn_);
    // One instance migrates at a time; the others wait here, then find nothing left to do.
    conn_.exec("take migration lock", "SELECT pg_advisory_xact_lock($1)", {p(kMigrationLock)});
    conn_.exec("create schema_migrations table",
               "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)");
    int current = applied_schema_version();
    check_not_newer(current);
    for (int target = current + 1; target <= kLatestSchemaVersion; ++target) {
      conn_.exec_script("apply schema migration", kMigrations[target - 1]);
      conn_.exec("record schema migration", "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                 {p(target), p(now_unix())});
    }
    tx.commit();
  }

  std::optional<int64_t> find_key(const std::string& ns, const std::string& name) {
    auto q = conn_.exec("find key", "SELECT id FROM keys WHERE ns = $1 AND name = $2 AND deleted_at = 0", {p(ns), p(name)});
    if (q.size() == 0) return std::nullopt;
    return q.int64(0, 0);
  }

  int64_t max_deleted_generation() {
    auto q = conn_.exec("read deleted generation", "SELECT value FROM counters WHERE name = 'max_deleted_generation'");
    return q.size() ? q.int64(0, 0) : 0;
  }

  void insert_version(int64_t key_id, const VersionRecord& v) {
    conn_.exec("insert key version",
               "INSERT INTO key_versions (key_id, version, uuid, object_id, sealed, created_at, public_key,"
               " hmac_object_id, hmac_sealed) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
               {p(key_id), p(v.version), p(v.id), text_or_null(v.object_id), text_or_null(v.sealed), p(v.created_at),
                text_or_null(v.public_key), text_or_null(v.hmac_object_id), text_or_null(v.hmac_sealed)});
  }

  void check_version_id_unused(const std::string& id) {
    if (conn_.exec("check version id", "SELECT 1 FROM key_versions WHERE uuid = $1", {p(id)}).size() > 0)
      throw ConflictError("key version id " + id + " is already in use");
  }

  // Rows (version, object_id, hmac_object_id) of versions whose token objects go: a doomed
  // intent for each, in the caller's transaction, so the objects are destroyed even if the
  // process dies right after the metadata changes.
  std::vector<Intent> doom_objects(const Rows& v, const std::string& ns, const std::string& name, int64_t now) {
    std::vector<Intent> intents;
    for (int i = 0; i < v.size(); ++i) {
      std::string label = version_label(ns, name, v.int32(i, 0));
      if (!v.is_null(i, 1)) intents.push_back(Intent{v.text(i, 1), label, now});
      if (!v.is_null(i, 2)) intents.push_back(Intent{v.text(i, 2), label + "/hmac", now});
    }
    for (Intent& intent : intents) {
      intent.doomed = true;
      insert_intent(intent);
    }
    return intents;
  }

  void insert_intent(const Intent& intent) {
    conn_.exec("insert intent",
               "INSERT INTO intents (object_id, label, created_at, owner, lease_expires, doomed)"
               " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (object_id) DO NOTHING",
               {p(intent.object_id), p(intent.label), p(intent.created_at), p(intent.owner), p(intent.lease_expires),
                p(intent.doomed)});
  }

  // The metadata naming an object is committed: its intent goes, unless a sweeper has claimed
  // it (the object is being destroyed), which aborts the whole write.
  void settle_intent(const std::string& object_id) {
    auto q = conn_.exec("settle intent", "DELETE FROM intents WHERE object_id = $1 RETURNING doomed", {p(object_id)});
    if (q.size() > 0 && q.boolean(0, 0))
      throw StoreError("postgres metadata store: the intent of object " + object_id +
                       " was claimed by a sweeper (its lease expired); nothing was written");
  }

  void delete_intent(const std::string& object_id) {
    conn_.exec("delete intent", "DELETE FROM intents WHERE object_id = $1", {p(object_id)});
  }

  // Delivered to every listening instance when the transaction commits.
  void notify_key_change(const std::string& ns, const std::string& name) {
    conn_.exec("notify key change", "SELECT pg_notify('p11kms_keys', $1)", {p(ns + "\n" + name)});
  }

  void tell(const std::string& ns, const std::string& name) {
    std::lock_guard<std::mutex> lk(listen_mu_);
    if (listener_) listener_(ns, name);
  }

  bool listen_stopping() {
    std::lock_guard<std::mutex> lk(listen_mu_);
    return listen_stop_;
  }

  void listen_loop() {
    std::unique_ptr<Connection> c;
    while (!listen_stopping()) {
      try {
        if (!c) {
          c = std::make_unique<Connection>(dsn_);
          c->exec("listen for key changes", "LISTEN p11kms_keys");
          tell("", "");
        }
        pollfd pfd{PQsocket(c->handle()), POLLIN, 0};
        if (pfd.fd < 0) throw StoreError("listener connection lost");
        if (::poll(&pfd, 1, 250) > 0) {
          if (PQconsumeInput(c->handle()) == 0 || PQstatus(c->handle()) != CONNECTION_OK)
            throw StoreError("listener connection lost");
          while (PGnotify* n = PQnotifies(c->handle())) {
            std::string payload = n->extra ? n->extra : "";
            PQfreemem(n);
            auto nl = payload.find('\n');
            if (nl != std::string::npos) tell(payload.substr(0, nl), payload.substr(nl + 1));
          }
        }
      } catch (const std::exception&) {
        c.reset();
        for (int i = 0; i < 4 && !listen_stopping(); ++i) ::poll(nullptr, 0, 250);
      }
    }
  }

  void bump_generation(int64_t key_id) {
    conn_.exec("bump key generation", "UPDATE keys SET generation = generation + 1 WHERE id = $1", {p(key_id)});
  }

  std::mutex mu_;
  std::string dsn_;  // for the listener's own connection
  Connection conn_;
  std::mutex listen_mu_;
  bool listen_stop_ = false;
  std::function<void(const std::string&, const std::string&)> listener_;
  std::thread listen_thread_;
};

}  // namespace

std::unique_ptr<MetadataStore> open_postgres_store(const std::string& dsn) {
  return std::make_unique<PostgresStore>(dsn);
}

}  // namespace p11kms::store
