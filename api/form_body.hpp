// Request bodies as Kong's Admin API takes them: JSON, application/x-www-form-urlencoded and
// multipart/form-data, the two form encodings with Kong's dotted names for nested fields
// (`set.name=my-set`, `pem.private_key=...`) and `tags[]=a` / `tags[1]=a` / repeated names for
// arrays. All become one JSON object; form values are strings. Strict and bounded: at most
// kMaxFormFields fields, names of at most 4 dotted levels and 128 characters; a malformed body
// is a 400.
#pragma once

#include <cstddef>
#include <string>

#include <nlohmann/json.hpp>

#include "api/http/types.hpp"

namespace p11kms::api {

constexpr size_t kMaxFormFields = 256;

nlohmann::json parse_kong_body(const http::Request& request, size_t max_json_depth);
// The two form encodings alone (for tests and the fuzzer).
nlohmann::json parse_urlencoded_form(const std::string& body);
nlohmann::json parse_multipart_form(const std::string& body, const std::string& boundary);

}  // namespace p11kms::api
