// Token-bucket rate limits, driven by an injected clock.
#include <gtest/gtest.h>

#include "policy/rate_limiter.hpp"

using namespace p11kms::policy;
using Clock = std::chrono::steady_clock;

namespace {

TEST(RateLimiter, BurstThenRefusalWithRetryAfter) {
  RateLimiter rl({2, 3});
  auto t0 = Clock::now();
  for (long left : {2, 1, 0}) {
    auto r = rl.take("app", t0);
    EXPECT_TRUE(r.allowed);
    EXPECT_EQ(r.limit, 3);
    EXPECT_EQ(r.remaining, left);
  }
  auto refused = rl.take("app", t0);
  EXPECT_FALSE(refused.allowed);
  EXPECT_EQ(refused.remaining, 0);
  EXPECT_EQ(refused.retry_after_s, 1);  // 1 request at 2/s is half a second away: rounded up
  EXPECT_EQ(refused.reset_s, 2);        // 3 requests at 2/s
}

TEST(RateLimiter, RefillsAtTheConfiguredRateUpToTheBurst) {
  RateLimiter rl({1, 2});
  auto t0 = Clock::now();
  EXPECT_TRUE(rl.take("a", t0).allowed);
  EXPECT_TRUE(rl.take("a", t0).allowed);
  EXPECT_FALSE(rl.take("a", t0).allowed);
  EXPECT_TRUE(rl.take("a", t0 + std::chrono::seconds(1)).allowed);
  EXPECT_FALSE(rl.take("a", t0 + std::chrono::seconds(1)).allowed);
  // A long idle period refills to the burst, not beyond it.
  auto later = t0 + std::chrono::hours(1);
  EXPECT_EQ(rl.take("a", later).remaining, 1);
  EXPECT_TRUE(rl.take("a", later).allowed);
  EXPECT_FALSE(rl.take("a", later).allowed);
}

TEST(RateLimiter, TokensHaveSeparateBuckets) {
  RateLimiter rl({1, 1});
  auto t0 = Clock::now();
  EXPECT_TRUE(rl.take("a", t0).allowed);
  EXPECT_FALSE(rl.take("a", t0).allowed);
  EXPECT_TRUE(rl.take("b", t0).allowed);
}

}  // namespace
