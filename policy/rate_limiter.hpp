// Per-token request rate limits: a token bucket per token name (refilled at
// requests_per_second, holding at most burst).
#pragma once

#include <chrono>
#include <mutex>
#include <string>
#include <unordered_map>

namespace p11kms::policy {

struct RateLimit {
  double requests_per_second = 0;
  double burst = 0;
};

class RateLimiter {
 public:
  explicit RateLimiter(RateLimit limit) : limit_(limit) {}

  struct Result {
    bool allowed = true;
    long limit = 0;        // X-RateLimit-Limit: the bucket's size (burst)
    long remaining = 0;    // X-RateLimit-Remaining: whole requests left right now
    long reset_s = 0;      // X-RateLimit-Reset: seconds until the bucket is full again
    long retry_after_s = 0;  // Retry-After when refused: seconds until one request fits
  };
  Result take(const std::string& key, std::chrono::steady_clock::time_point now);

 private:
  struct Bucket {
    double tokens;
    std::chrono::steady_clock::time_point updated;
  };
  RateLimit limit_;
  std::mutex mu_;
  std::unordered_map<std::string, Bucket> buckets_;
};

}  // namespace p11kms::policy
