#include "api/vault_shape.hpp"

#include "api/api_service.hpp"
#include "common/json_text.hpp"

namespace p11kms::api::vault {
namespace {
// Request bytes can reach a message (a JSON parse error quotes them); never let invalid UTF-8
// turn an answer into an exception.
using json_text::dump;
}  // namespace

int status_of(keys::ErrorKind kind) {
  switch (kind) {
    case keys::ErrorKind::invalid_argument: return 400;
    case keys::ErrorKind::forbidden: return 403;
    case keys::ErrorKind::not_found: return 404;
    case keys::ErrorKind::conflict: return 409;
    case keys::ErrorKind::gone: return 410;
    case keys::ErrorKind::payload_too_large: return 413;
    case keys::ErrorKind::unavailable: return 503;
    case keys::ErrorKind::bad_gateway: return 502;
    case keys::ErrorKind::not_implemented: return 501;
    default: return 500;
  }
}

http::Response render(const Reply& reply, const std::string& request_id) {
  http::Response r;
  r.status = reply.status;
  if (reply.status == 204) return r;
  if (reply.raw) {
    r.body = dump(reply.data);
    return r;
  }
  // Vault's envelope, its keys in the order dump() writes them (sorted), written around the
  // data instead of copying the data into an envelope object first.
  r.body = "{\"auth\":null,\"data\":";
  json_text::append(r.body, reply.data);
  r.body += ",\"lease_duration\":0,\"lease_id\":\"\",\"renewable\":false,\"request_id\":";
  json_text::append(r.body, json(request_id));
  r.body += ",\"warnings\":";
  json_text::append(r.body, reply.warnings.empty() ? json(nullptr) : json(reply.warnings));
  r.body += ",\"wrap_info\":null}";
  return r;
}

http::Response error(int status, const std::vector<std::string>& messages) {
  http::Response r;
  r.status = status;
  r.body = dump(json{{"errors", messages}});
  return r;
}

}  // namespace p11kms::api::vault

namespace p11kms::api {
namespace {
http::Response vault_error(int status, const std::string& /*code*/, const std::string& message) {
  return vault::error(status, {message});
}
}  // namespace

Dialect vault_dialect(const std::string& version) {
  Dialect d;
  d.name = "vault";
  d.mount = "/v1/";
  d.namespace_headers = {"X-Vault-Namespace"};
  d.vault_conventions = true;
  d.render = &vault::render;
  d.error = &vault_error;
  add_sys_routes(d.router, version);
  add_transit_routes(d.router);
  return d;
}

}  // namespace p11kms::api
