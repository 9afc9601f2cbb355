// Vault's response and error shapes.
#pragma once

#include <string>
#include <vector>

#include "api/http/types.hpp"
#include "api/route.hpp"
#include "keys/errors.hpp"

namespace p11kms::api::vault {

http::Response render(const Reply& reply, const std::string& request_id);
http::Response error(int status, const std::vector<std::string>& messages);
int status_of(keys::ErrorKind kind);

}  // namespace p11kms::api::vault
