#include "api/byok_shape.hpp"

#include "common/json_text.hpp"
#include "common/time.hpp"
#include "common/uuid.hpp"

namespace p11kms::api::byok {
namespace {

using json_text::dump;

const char* title_of(int status) {
  switch (status) {
    case 400: return "Bad Request";
    case 401: return "Authentication Required";
    case 403: return "User Access Unauthorized";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 413: return "Payload Too Large";
    case 429: return "Rate Limit Exceeded";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Internal Server Error";
  }
}

}  // namespace

Problem bad_field(const std::string& pointer, const std::string& detail, const std::string& code) {
  return Problem(400, code, detail, "pointer", pointer);
}

Problem bad_parameter(const std::string& parameter, const std::string& detail, const std::string& code) {
  return Problem(400, code, detail, "parameter", parameter);
}

json error_body(int status, const std::string& code, const std::string& detail, const std::string& source_kind,
                const std::string& source) {
  json e = {{"id", uuid::new_v4()},
            {"status", std::to_string(status)},
            {"code", code},
            {"title", title_of(status)},
            {"detail", detail}};
  if (!source_kind.empty()) e["source"] = {{source_kind, source}};
  return json{{"errors", json::array({e})}};
}

json key_resource(const keys::ByokRegistry::Entry& e, const std::string& base_url) {
  const auto& r = e.record;
  json key = json::parse(r.key_json, nullptr, false);
  // Only the service writes this column: anything else is a corrupt store, a 500.
  if (!key.is_object()) throw std::runtime_error("corrupt BYOK entry " + r.ns + "/" + r.id + " in the store: key_json");
  if (r.kind == "AwsKey" && !key.contains("roles")) key["roles"] = json::array();  // p11kms makes no IAM roles
  json metadata = {{"self", base_url + "/byok/v1/keys/" + r.id},
                   {"resource_name", "crn://p11kms/namespace=" + r.ns + "/key=" + r.id},
                   {"created_at", timefmt::format_rfc3339(r.created_at)},
                   {"updated_at", timefmt::format_rfc3339(r.updated_at ? r.updated_at : r.created_at)}};
  if (r.deleted_at) metadata["deleted_at"] = timefmt::format_rfc3339(r.deleted_at);
  json validation = {{"phase", r.validation_phase}, {"since", timefmt::format_rfc3339(r.validation_since)}};
  if (!r.validation_message.empty()) validation["message"] = r.validation_message;
  if (!r.validation_region.empty()) validation["region"] = r.validation_region;
  return json{{"api_version", kApiVersion},
              {"kind", "Key"},
              {"id", r.id},
              {"metadata", metadata},
              {"key", key},
              {"display_name", r.display_name},
              {"provider", r.provider},
              {"state", e.in_use ? "IN_USE" : "AVAILABLE"},
              {"validation", validation}};
}

http::Response render(const Reply& reply, const std::string& /*request_id*/) {
  http::Response r;
  r.status = reply.status;
  if (reply.status == 204 || reply.data.is_null()) return r;
  r.body = dump(reply.data);
  return r;
}

http::Response error(int status, const std::string& code, const std::string& message) {
  http::Response r;
  r.status = status;
  std::string c = code, detail = message;
  // Confluent's codes for the pipeline's authentication and authorization refusals.
  if (status == 401) {
    c = "user_unauthenticated";
    detail = "Valid authentication credentials must be provided: HTTP Basic base64(<token name>:<token>) or "
             "Authorization: Bearer <token>";
    r.headers.emplace_back("WWW-Authenticate", "Basic error=\"invalid_key\", error_description=\"The API Key is invalid\"");
  } else if (status == 403 && code == "forbidden") {
    c = "user_unauthorized";
  } else if (status == 429) {
    c = "too_many_requests";
  }
  r.body = dump(error_body(status, c, detail));
  return r;
}

}  // namespace p11kms::api::byok
