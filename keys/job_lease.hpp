// A background job's lease in the store, held under the instance's id: one instance at a time
// runs the job; the holder renews it with each pass and with the heartbeat, and another instance
// takes it over once the holder has not renewed it for `ttl_s` (three heartbeats).
#pragma once

#include <string>

#include "common/time.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::keys {

class JobLease {
 public:
  JobLease(store::MetadataStore& store, std::string name, std::string holder, int64_t ttl_s)
      : store_(store), name_(std::move(name)), holder_(std::move(holder)), ttl_s_(ttl_s) {}

  // True while this instance holds it (taken, renewed, or taken over once expired); throws
  // when the store is away.
  bool renew() { return store_.take_lease(name_, holder_, timefmt::now_unix(), ttl_s_); }

  // A clean stop: held until now, so another instance takes the job at its next heartbeat
  // instead of after the lease ran out. Never throws (the lease then runs out by itself).
  void release() noexcept {
    try {
      store_.take_lease(name_, holder_, timefmt::now_unix(), 0);
    } catch (...) {
    }
  }

 private:
  store::MetadataStore& store_;
  std::string name_;
  std::string holder_;
  int64_t ttl_s_;
};

}  // namespace p11kms::keys
