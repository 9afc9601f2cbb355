// The BYOK key registry (Confluent-style /byok/v1/keys): references to customer-managed keys,
// either p11kms root keys (P11kmsKey), validated by a round trip in the token, or external
// cloud keys (AWS, Azure, GCP) kept as given and never validated. The HTTP shapes live in
// api/byok_*; this is the model: ids, quota, validation phases, IN_USE, page tokens.
#pragma once

#include <algorithm>
#include <chrono>
#include <memory>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "hsm/secret.hpp"
#include "hsm/token.hpp"
#include "keys/key_service.hpp"
#include "keys/job_lease.hpp"
#include "keys/periodic_job.hpp"
#include "common/time.hpp"
#include "common/uuid.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

struct ByokOptions {
  std::string region = "local";         // validation.region of a VALID key
  int64_t validation_interval_s = 300;   // the background job's period
  int64_t in_use_window_s = 86400;       // IN_USE: a client's operation within this window
  size_t max_keys = 1000;                // live entries per namespace
};

constexpr const char* kP11kmsKeyKind = "P11kmsKey";

class ByokRegistry {
 public:
  struct Entry {
    store::ByokKeyRecord record;
    bool in_use = false;
  };

  ByokRegistry(store::MetadataStore& store, KeyService& keys, hsm::Token& token, ByokOptions options);
  const ByokOptions& options() const { return options_; }

  // Stores a new entry (id, times and the first validation are filled in here): a P11kmsKey
  // (target_key_id set) is validated at once; an external kind stays INITIALIZING. 409
  // quota_exceeded when the namespace already has max_keys entries.
  Entry create(store::ByokKeyRecord record);
  // A live entry, or nullopt (deleted entries are gone for the API).
  std::optional<Entry> get(const std::string& ns, const std::string& id);
  // Validates a live entry now (P11kmsKey) and returns it; nullopt if there is none.
  std::optional<Entry> validate(const std::string& ns, const std::string& id);
  // Every live entry of the namespace, sorted by id (bounded by max_keys).
  std::vector<Entry> list(const std::string& ns);
  std::optional<Entry> rename(const std::string& ns, const std::string& id, const std::string& display_name);
  // 404 if there is no live entry, 409 key_in_use while it is IN_USE.
  void remove(const std::string& ns, const std::string& id);
  // Validates every live P11kmsKey of every namespace; returns how many were validated.
  size_t validate_all();

  // Opaque, tamper-evident page tokens: "continue after id `after_id`", bound to the namespace
  // and the query's filters by an HMAC whose key is derived in the token once per process.
  std::string page_token(const std::string& ns, const std::string& query, const std::string& after_id);
  // The after_id of a token made by page_token for the same namespace and query; nullopt if
  // it was not (forged, edited, another namespace's, another query's).
  std::optional<std::string> open_page_token(const std::string& ns, const std::string& query, const std::string& token);

 private:
  bool in_use(const store::ByokKeyRecord& r) const;
  Entry entry(store::ByokKeyRecord r) const;
  void record_validation(const store::ByokKeyRecord& r);
  const hsm::SecureBytes& page_key();

  store::MetadataStore& store_;
  KeyService& keys_;
  hsm::Token& token_;
  ByokOptions options_;
  std::mutex page_key_mu_;
  hsm::SecureBytes page_key_;
};

// The background job that validates every P11kmsKey each validation_interval; instances
// sharing a store take turns through a lease (see RotationWorker).
class ByokValidationWorker {
 public:
  // Like RotationWorker: one instance at a time, under the job lease "byok-validation".
  ByokValidationWorker(ByokRegistry& registry, store::MetadataStore& store, std::chrono::milliseconds interval,
                       std::string holder, int64_t lease_s)
      : lease_(store, "byok-validation", std::move(holder), lease_s),
        job_(std::make_unique<PeriodicJob>(interval, [this, &registry] {
          try {
            if (lease_.renew()) registry.validate_all();  // logs its failures
          } catch (const std::exception&) {
            // The store is away: the next pass tries again.
          }
        })) {}
  ~ByokValidationWorker() {
    job_.reset();
    lease_.release();
  }

  bool renew_lease() { return lease_.renew(); }

 private:
  JobLease lease_;
  std::unique_ptr<PeriodicJob> job_;  // last: its thread starts once the lease exists
};

}  // namespace p11kms::keys
