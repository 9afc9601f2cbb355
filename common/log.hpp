// Structured one-line logs on stderr, shared by every layer. Never pass secrets here.
#pragma once

#include <string>

namespace p11kms::log {

enum class Level { debug, info, warn, error };

void set_level(Level level);
void write(Level level, const std::string& message, const std::string& request_id = {});

inline void info(const std::string& m, const std::string& rid = {}) { write(Level::info, m, rid); }
inline void warn(const std::string& m, const std::string& rid = {}) { write(Level::warn, m, rid); }
inline void error(const std::string& m, const std::string& rid = {}) { write(Level::error, m, rid); }
inline void debug(const std::string& m, const std::string& rid = {}) { write(Level::debug, m, rid); }

}  // namespace p11kms::log
