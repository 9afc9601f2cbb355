// Base64 and hex, strict on input: anything malformed is rejected, never half-decoded.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace p11kms::encoding {

std::string base64_encode(const uint8_t* data, size_t len);
// Appends base64_encode(data, len) to `out`.
void base64_append(std::string& out, const uint8_t* data, size_t len);
inline std::string base64_encode(const std::vector<uint8_t>& v) { return base64_encode(v.data(), v.size()); }
// Standard alphabet with padding (what Vault emits and accepts); whitespace is not allowed.
std::optional<std::vector<uint8_t>> base64_decode(const std::string& text);

std::string hex_encode(const uint8_t* data, size_t len);
inline std::string hex_encode(const std::vector<uint8_t>& v) { return hex_encode(v.data(), v.size()); }
std::optional<std::vector<uint8_t>> hex_decode(const std::string& text);

}  // namespace p11kms::encoding
