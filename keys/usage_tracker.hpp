// When each key last served a client's cryptographic operation (any dialect), for the BYOK
// registry's IN_USE state. In memory, per process: after a restart every key reads as unused
// until its next operation, and with several instances each knows only its own traffic (see
// docs/api/byok.md). Validation probes do not record here.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "common/time.hpp"

namespace p11kms::keys {

class UsageTracker {
 public:
  // Records a use of the key (namespace, key id) at `now` (unix seconds).
  void record(const std::string& ns, const std::string& key_id, int64_t now = timefmt::now_unix()) {
    std::lock_guard<std::mutex> lk(mu_);
    int64_t& t = last_[ns + '\n' + key_id];
    if (now > t) t = now;
  }
  // The last recorded use, if any.
  std::optional<int64_t> last_use(const std::string& ns, const std::string& key_id) const {
    std::lock_guard<std::mutex> lk(mu_);
    auto it = last_.find(ns + '\n' + key_id);
    if (it == last_.end()) return std::nullopt;
    return it->second;
  }
  // Whether the key was used within `window` seconds before `now`.
  bool used_within(const std::string& ns, const std::string& key_id, int64_t window,
                   int64_t now = timefmt::now_unix()) const {
    auto t = last_use(ns, key_id);
    return t && now - *t < window;
  }
  void forget(const std::string& ns, const std::string& key_id) {
    std::lock_guard<std::mutex> lk(mu_);
    last_.erase(ns + '\n' + key_id);
  }

 private:
  mutable std::mutex mu_;
  std::unordered_map<std::string, int64_t> last_;
};

}  // namespace p11kms::keys
