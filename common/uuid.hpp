// Random (version 4) UUIDs: key ids, key version ids and request ids.
#pragma once

#include <string>

namespace p11kms::uuid {

// Lowercase 8-4-4-4-12 hex from OpenSSL's DRBG (common/public_random: an id is public, never a
// secret); throws std::runtime_error if it fails.
std::string new_v4();
// Whether text has the 8-4-4-4-12 hex shape of a UUID (any version, either case).
bool looks_like_uuid(const std::string& text);

}  // namespace p11kms::uuid
