// The background job that rotates keys whose rotation period has passed: one thread that calls
// KeyService::rotate_due every `interval` until it is destroyed, on one instance at a time
// (keys/job_lease.hpp; the heartbeat also renews the lease, so it outlives long intervals).
#pragma once

#include <chrono>
#include <memory>

#include "common/time.hpp"
#include "keys/job_lease.hpp"
#include "keys/key_service.hpp"
#include "keys/periodic_job.hpp"

namespace p11kms::keys {

class RotationWorker {
 public:
  RotationWorker(KeyService& keys, store::MetadataStore& store, std::chrono::milliseconds interval,
                 std::string holder, int64_t lease_s)
      : keys_(keys), lease_(store, "rotation", std::move(holder), lease_s),
        job_(std::make_unique<PeriodicJob>(interval, [this] { pass(); })) {}
  ~RotationWorker() {
    job_.reset();  // no pass runs (or re-takes the lease) once it is let go
    lease_.release();
  }

  // Takes or renews the lease (with the heartbeat); throws when the store is away.
  bool renew_lease() { return lease_.renew(); }

 private:
  void pass() {
    try {
      if (lease_.renew()) keys_.rotate_due(timefmt::now_unix());  // logs its own failures
    } catch (const std::exception&) {
      // The store is away: the next pass tries again.
    }
  }

  KeyService& keys_;
  JobLease lease_;
  std::unique_ptr<PeriodicJob> job_;  // last: its thread starts once the members it uses exist
};

}  // namespace p11kms::keys
