#include "api/http/types.hpp"

#include <strings.h>

namespace p11kms::api::http {

std::optional<std::string> Request::header(const std::string& name) const {
  for (const auto& [k, v] : headers)
    if (strcasecmp(k.c_str(), name.c_str()) == 0) return v;
  return std::nullopt;
}

std::optional<std::string> Request::query_param(const std::string& name) const {
  for (const auto& [k, v] : query)
    if (k == name) return v;
  return std::nullopt;
}

}  // namespace p11kms::api::http
