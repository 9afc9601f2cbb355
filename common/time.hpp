// RFC 3339 timestamps, as the APIs and the config file write them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace p11kms::timefmt {

// Strictly YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM) and a real date; unix seconds (the
// fraction is dropped), or nullopt.
std::optional<int64_t> parse_rfc3339(const std::string& text);
// Unix seconds as YYYY-MM-DDTHH:MM:SSZ.
std::string format_rfc3339(int64_t unix_seconds);
int64_t now_unix();

}  // namespace p11kms::timefmt
