// JSON text of a value as every response and stored document writes it: compact, object keys
// in order, invalid UTF-8 replaced by U+FFFD; the same bytes as nlohmann's
// dump(-1, ' ', false, error_handler_t::replace).
//
// Why not that call itself: its serializer decodes UTF-8 byte by byte in every string, which
// was 16% of the server's CPU for a batch of 1,000 encryptions (docs/PERFORMANCE.md section 12).
// Strings of printable ASCII without a quote or a backslash (base64, names, ids: nearly all of
// them) are copied as they are; every other value and string goes to nlohmann.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

namespace p11kms::json_text {

std::string dump(const nlohmann::json& value);
// Appends to `out` what dump(value) returns.
void append(std::string& out, const nlohmann::json& value);

}  // namespace p11kms::json_text
