#include "policy/rate_limiter.hpp"

#include <algorithm>
#include <cmath>

namespace p11kms::policy {

RateLimiter::Result RateLimiter::take(const std::string& key, std::chrono::steady_clock::time_point now) {
  std::lock_guard<std::mutex> lk(mu_);
  auto [it, fresh] = buckets_.try_emplace(key, Bucket{limit_.burst, now});
  Bucket& b = it->second;
  if (!fresh) {
    double elapsed = std::chrono::duration<double>(now - b.updated).count();
    b.tokens = std::min(limit_.burst, b.tokens + std::max(0.0, elapsed) * limit_.requests_per_second);
    b.updated = now;
  }
  Result r;
  r.limit = static_cast<long>(limit_.burst);
  if (b.tokens >= 1.0) {
    b.tokens -= 1.0;
  } else {
    r.allowed = false;
    r.retry_after_s = std::max(1L, static_cast<long>(std::ceil((1.0 - b.tokens) / limit_.requests_per_second)));
  }
  r.remaining = static_cast<long>(std::floor(b.tokens));
  r.reset_s = static_cast<long>(std::ceil((limit_.burst - b.tokens) / limit_.requests_per_second));
  return r;
}

}  // namespace p11kms::policy
