// Key Protect's shapes: the collection envelope around key resources, key resources themselves,
// and the vnd.ibm.kms.error+json error collection.
#include "api/kms_shape.hpp"

#include <cctype>

#include "common/json_text.hpp"
#include "common/time.hpp"

namespace p11kms::api::kms {
namespace {

using json_text::dump;

const char* reason_phrase(int status) {
  switch (status) {
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 410: return "Gone";
    case 413: return "Payload Too Large";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 501: return "Not Implemented";
    case 503: return "Service Unavailable";
    default: return "Internal Server Error";
  }
}

// The stable code in IBM's style: "key_state" -> "KEY_STATE_ERR".
std::string reason_code(const std::string& code) {
  std::string out;
  for (char c : code) out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return out + "_ERR";
}

}  // namespace

json collection(const char* type, json resources) {
  size_t n = resources.size();
  return json{{"metadata", {{"collectionType", type}, {"collectionTotal", n}}}, {"resources", std::move(resources)}};
}

json key_resource(const store::KeyRecord& k, int state) {
  bool standard = k.type == "standard";
  json r = {{"type", kKeyType},
            {"id", k.id},
            {"name", k.name},
            {"state", state},
            {"extractable", k.exportable},
            {"imported", k.imported},
            {"creationDate", timefmt::format_rfc3339(k.created_at)},
            {"createdBy", k.created_by},
            {"lastUpdateDate", timefmt::format_rfc3339(k.updated_at ? k.updated_at : k.created_at)},
            {"algorithmType", "AES"},
            {"deleted", state == store::kDestroyed}};
  if (!k.description.empty()) r["description"] = k.description;
  if (k.expires_at) r["expirationDate"] = timefmt::format_rfc3339(k.expires_at);
  if (!k.versions.empty()) {
    const auto& latest = k.versions.rbegin()->second;
    r["keyVersion"] = {{"id", latest.id}, {"creationDate", timefmt::format_rfc3339(latest.created_at)}};
  }
  if (!standard) {
    int bits = k.type == "aes128-gcm96" ? 128 : 256;
    r["algorithmBitSize"] = bits;
    r["algorithmMode"] = "GCM";
    r["algorithmMetadata"] = {{"bitLength", std::to_string(bits)}, {"mode", "GCM"}};
  }
  if (k.deleted_at) {
    r["deletionDate"] = timefmt::format_rfc3339(k.deleted_at);
  }
  return r;
}

http::Response render(const Reply& reply, const std::string& /*request_id*/) {
  http::Response r;
  r.status = reply.status;
  if (reply.status == 204 || reply.data.is_null()) return r;
  r.body = dump(reply.data);
  r.content_type = kKeyType;
  return r;
}

http::Response error(int status, const std::string& code, const std::string& message) {
  http::Response r;
  r.status = status;
  r.content_type = kErrorType;
  json reason = {{"code", reason_code(code)},
                 {"message", message},
                 {"status", status},
                 {"moreInfo", "docs/api/kms.md#errors"}};
  json resource = {{"errorMsg", std::string(reason_phrase(status)) + ": " + message},
                   {"reasons", json::array({reason})}};
  r.body = dump(collection(kErrorType, json::array({resource})));
  return r;
}

}  // namespace p11kms::api::kms
