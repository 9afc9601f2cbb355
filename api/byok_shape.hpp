// Confluent Cloud BYOK's shapes (byok/v1): the Key resource, the KeyList collection with its
// links, and the error envelope {"errors":[{"id","status","code","title","detail","source"}]}.
#pragma once

#include <string>

#include "api/http/types.hpp"
#include "api/route.hpp"
#include "keys/byok_registry.hpp"

namespace p11kms::api::byok {

constexpr const char* kApiVersion = "byok/v1";

// A 4xx that names the part of the request at fault: source {"pointer": "/key/key_arn"} for a
// body field, {"parameter": "page_size"} for a query parameter. Thrown by the dialect's
// callbacks and rendered by them (the shared pipeline's errors carry no source).
class Problem : public keys::KeyError {
 public:
  Problem(int status, std::string code, const std::string& detail, std::string source_kind, std::string source)
      : keys::KeyError(keys::ErrorKind::invalid_argument, std::move(code), detail),
        status_(status), source_kind_(std::move(source_kind)), source_(std::move(source)) {}
  int status() const { return status_; }
  const std::string& source_kind() const { return source_kind_; }  // "pointer" | "parameter"
  const std::string& source() const { return source_; }

 private:
  int status_;
  std::string source_kind_, source_;
};

Problem bad_field(const std::string& pointer, const std::string& detail, const std::string& code = "invalid_field");
Problem bad_parameter(const std::string& parameter, const std::string& detail,
                      const std::string& code = "invalid_parameter");

// {"errors":[{...}]} for one problem; source_kind empty = no source.
json error_body(int status, const std::string& code, const std::string& detail, const std::string& source_kind = "",
                const std::string& source = "");

// The Key resource; base_url is "scheme://host" of the request.
json key_resource(const keys::ByokRegistry::Entry& e, const std::string& base_url);

http::Response render(const Reply& reply, const std::string& request_id);
http::Response error(int status, const std::string& code, const std::string& message);

}  // namespace p11kms::api::byok
