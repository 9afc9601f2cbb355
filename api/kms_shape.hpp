// Key Protect's response and error shapes.
#pragma once

#include <string>

#include "api/http/types.hpp"
#include "api/route.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::api::kms {

constexpr const char* kKeyType = "application/vnd.ibm.kms.key+json";
constexpr const char* kErrorType = "application/vnd.ibm.kms.error+json";

// {"metadata":{"collectionType","collectionTotal"},"resources":[...]}
json collection(const char* type, json resources);
// A key's metadata as Key Protect shows it, in the given (effective) state; never material.
json key_resource(const store::KeyRecord& key, int state);

// Bodies are the callbacks' data as is (already in the envelope, or an action's flat result).
http::Response render(const Reply& reply, const std::string& request_id);
http::Response error(int status, const std::string& code, const std::string& message);

}  // namespace p11kms::api::kms
