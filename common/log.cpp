#include "common/log.hpp"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <mutex>

namespace p11kms::log {
namespace {
std::atomic<Level> g_level{Level::info};
std::mutex g_mu;
const char* name(Level l) {
  switch (l) {
    case Level::debug: return "debug";
    case Level::info: return "info";
    case Level::warn: return "warn";
    default: return "error";
  }
}
}  // namespace

void set_level(Level level) { g_level = level; }

void write(Level level, const std::string& message, const std::string& request_id) {
  if (level < g_level.load()) return;
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char ts[32];
  std::strftime(ts, sizeof ts, "%Y-%m-%dT%H:%M:%S", &tm);
  std::lock_guard<std::mutex> lk(g_mu);
  if (request_id.empty())
    std::fprintf(stderr, "%s.%03dZ [%s] %s\n", ts, static_cast<int>(ms), name(level), message.c_str());
  else
    std::fprintf(stderr, "%s.%03dZ [%s] request_id=%s %s\n", ts, static_cast<int>(ms), name(level),
                 request_id.c_str(), message.c_str());
  std::fflush(stderr);
}

}  // namespace p11kms::log
