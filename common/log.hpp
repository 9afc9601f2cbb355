// Structured one-line logs on stderr, shared by every layer. Never pass secrets here.
#pragma once

#include <string>

namespace p11kms::log {

enum class Level { debug, info, warn, error };

void set_level(Level level);

// Written at once, after every access line logged before it.
void write(Level level, const std::string& message, const std::string& request_id = {});

inline void info(const std::string& m, const std::string& rid = {}) { write(Level::info, m, rid); }
inline void warn(const std::string& m, const std::string& rid = {}) { write(Level::warn, m, rid); }
inline void error(const std::string& m, const std::string& rid = {}) { write(Level::error, m, rid); }
inline void debug(const std::string& m, const std::string& rid = {}) { write(Level::debug, m, rid); }

// The line per request (level info): buffered and written by a background thread within
// kAccessFlushIntervalMs, or sooner when lines pile up, so that a request costs no write(2).
void access(const std::string& message, const std::string& request_id);
inline constexpr int kAccessFlushIntervalMs = 50;

// A duration for an access line, in milliseconds with three decimals ("0.052ms",
// "1234.500ms"); negative input counts as 0.
std::string duration_ms(long long microseconds);

// Writes out buffered access lines now (shutdown; also registered with atexit).
void flush();

}  // namespace p11kms::log
