#include "api/api_service.hpp"

#include <openssl/rand.h>

#include <algorithm>
#include <cstdio>
#include <chrono>

#include "api/vault_shape.hpp"
#include "common/encoding.hpp"
#include "common/log.hpp"

namespace p11kms::api {
namespace {

std::string new_request_id() {
  unsigned char b[16];
  RAND_bytes(b, sizeof b);
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  std::string h = encoding::hex_encode(b, sizeof b);
  return h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) + "-" + h.substr(20);
}

// Client-controlled text in a log line: control characters (a decoded %0A could forge a line)
// are shown escaped.
std::string printable(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      out += buf;
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// A client's id is echoed only if it is a sane token (no header injection, bounded length).
std::string request_id_of(const http::Request& r) {
  if (auto id = r.header("X-Request-Id")) {
    bool ok = !id->empty() && id->size() <= 128;
    for (char c : *id) ok = ok && c > 0x20 && c < 0x7f;
    if (ok) return *id;
  }
  return new_request_id();
}

std::string presented_token(const http::Request& r) {
  if (auto t = r.header("X-Vault-Token")) return *t;
  if (auto a = r.header("Authorization")) {
    const std::string prefix = "Bearer ";
    if (a->size() > prefix.size() && strncasecmp(a->c_str(), prefix.c_str(), prefix.size()) == 0)
      return a->substr(prefix.size());
  }
  return {};
}

bool valid_namespace(const std::string& ns) {
  if (ns.empty() || ns.size() > 64) return false;
  for (char c : ns)
    if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
      return false;
  return true;
}

bool may_use_namespace(const policy::TokenEntry& t, const std::string& ns) {
  for (const auto& n : t.namespaces)
    if (n == "*" || n == ns) return true;
  return false;
}

// Fields that carry data which must never reach the audit log in clear.
bool is_secret_field(const std::string& name) {
  static const char* names[] = {"plaintext", "ciphertext", "context", "nonce", "associated_data", "input",
                                "batch_input", "batch_results", "signature", "hmac", "payload", "aad",
                                "random_bytes", "sum"};
  for (const char* n : names)
    if (name == n) return true;
  return false;
}

void collect_secrets(const json& object, std::vector<std::pair<std::string, std::string>>& out) {
  if (!object.is_object()) return;
  for (auto it = object.begin(); it != object.end(); ++it)
    if (is_secret_field(it.key()) && !it->is_null())
      out.emplace_back(it.key(), it->is_string() ? it->get<std::string>()
                                                 : it->dump(-1, ' ', false, json::error_handler_t::replace));
}

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace

namespace {
// Nesting depth of a JSON text, counted before parsing: exact for empty containers too, and it
// keeps absurdly deep input (half a million levels fit in 1 MiB) away from the parser.
size_t json_depth(const std::string& text) {
  size_t depth = 0, deepest = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
  return deepest;
}
}  // namespace

json parse_body(const std::string& body, size_t max_depth) {
  if (json_depth(body) > max_depth)
    throw keys::invalid("request body nests JSON deeper than the limit of " + std::to_string(max_depth));
  try {
    return json::parse(body);
  } catch (const json::parse_error& e) {
    // nlohmann's message quotes the bytes read; keep only its position, not the client's bytes.
    throw keys::invalid("failed to parse JSON request body: malformed JSON at byte " + std::to_string(e.byte));
  } catch (const json::exception&) {
    // e.g. out_of_range for a number such as 1e400 (found by the fuzzer).
    throw keys::invalid("failed to parse JSON request body: a number is out of range");
  }
}

ApiService::ApiService(keys::KeyService& keys, const policy::AccessControl& access, ApiLimits limits,
                       std::string version)
    : keys_(keys), access_(access), limits_(limits) {
  add_sys_routes(vault_, version);
  add_transit_routes(vault_);
  if (limits_.rate_limit) rate_limiter_ = std::make_unique<policy::RateLimiter>(*limits_.rate_limit);
}

bool ApiService::drain(std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lk(inflight_mu_);
  return inflight_cv_.wait_for(lk, timeout, [&] { return inflight_ == 0; });
}

http::Response ApiService::handle(const http::Request& request) {
  {
    std::lock_guard<std::mutex> lk(inflight_mu_);
    ++inflight_;
  }
  struct InflightGuard {
    ApiService* self;
    ~InflightGuard() {
      std::lock_guard<std::mutex> lk(self->inflight_mu_);
      if (--self->inflight_ == 0) self->inflight_cv_.notify_all();
    }
  } guard{this};
  auto started = std::chrono::steady_clock::now();
  std::string request_id = request_id_of(request);
  http::Response resp;
  audit::AuditRecord record;
  record.request_id = request_id;
  record.ns = "root";
  record.method = request.method;
  record.path = request.path;
  try {
    if (request.headers_too_large) {
      resp = vault::error(431, {"request headers exceed the limit of " + std::to_string(limits_.max_header_bytes) + " bytes"});
    } else if (request.body_too_large) {
      resp = vault::error(413, {"request body exceeds the limit of " + std::to_string(limits_.max_body_bytes) + " bytes"});
    } else if (request.path.rfind("/v1/", 0) == 0) {
      http::Headers extra;
      resp = handle_vault(request, request.path.substr(4), request_id, extra, record);
      resp.headers.insert(resp.headers.end(), extra.begin(), extra.end());
    } else {
      resp = vault::error(404, {"no handler for route \"" + request.path + "\""});
    }
  } catch (const std::exception& e) {
    log::error(std::string("unexpected error: ") + e.what(), request_id);
    resp = vault::error(500, {"internal error; see the server log for request id " + request_id});
  }
  if (audit_) {
    record.status = resp.status;
    record.latency_ms =
        std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count() / 1000.0;
    try {
      audit_->write(record);
    } catch (const std::exception& e) {
      log::error(std::string("audit: ") + e.what(), request_id);
      // Fail closed: the client is not told success that the log cannot vouch for.
      if (audit_->fail_closed() && record.capability)
        resp = vault::error(503, {"the audit log cannot be written; request refused"});
    }
  }
  resp.headers.emplace_back("X-Request-Id", request_id);
  resp.headers.emplace_back("Cache-Control", "no-store");
  auto ms = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started).count() / 1000.0;
  log::info(printable(request.method) + " " + printable(request.path) + " " + std::to_string(resp.status) + " " +
                std::to_string(ms) + "ms",
            request_id);
  return resp;
}

http::Response ApiService::handle_vault(const http::Request& request, const std::string& path,
                                        const std::string& request_id, http::Headers& extra_headers,
                                        audit::AuditRecord& record) {
  try {
    // Vault treats GET ...?list=true as LIST, for clients that cannot send the LIST verb.
    std::string method = request.method;
    if (method == "PUT") method = "POST";  // Vault makes no difference between the two
    if (method == "GET" && request.query_param("list").value_or("") == "true") method = "LIST";
    auto m = vault_.match(method, path);
    auto rules = access_.current();  // one snapshot for the whole request (SIGHUP may swap it)
    const policy::TokenEntry* token = nullptr;
    bool needs_auth = m.outcome != Router::Outcome::found || m.route->authenticated;
    if (needs_auth) {
      // Authentication comes before routing, as in Vault: without a valid token nothing about
      // the route table is revealed.
      token = rules->authenticator.authenticate(presented_token(request), now_seconds());
      if (!token) return vault::error(403, {"permission denied"});
      record.token = token->name;
      if (rate_limiter_) {
        auto rl = rate_limiter_->take(token->name, std::chrono::steady_clock::now());
        extra_headers.emplace_back("X-RateLimit-Limit", std::to_string(rl.limit));
        extra_headers.emplace_back("X-RateLimit-Remaining", std::to_string(rl.remaining));
        extra_headers.emplace_back("X-RateLimit-Reset", std::to_string(rl.reset_s));
        if (!rl.allowed) {
          extra_headers.emplace_back("Retry-After", std::to_string(rl.retry_after_s));
          return vault::error(429, {"rate limit exceeded for this token; retry after " +
                                    std::to_string(rl.retry_after_s) + " s"});
        }
      }
    }
    if (m.outcome == Router::Outcome::not_found)
      return vault::error(404, {"no handler for route \"" + path + "\": route entry not found"});
    if (m.outcome == Router::Outcome::method_not_allowed)
      return vault::error(405, {"unsupported operation: " + request.method + " is not allowed on \"" + path + "\""});

    Context ctx{request, &keys_, &limits_, request_id};
    ctx.token = token;
    ctx.params = m.params;
    ctx.policies = &rules->policies;
    ctx.path = path;
    while (!ctx.path.empty() && ctx.path.back() == '/') ctx.path.pop_back();
    if (m.route->authenticated)
      record.capability = m.route->capability ? policy::capability_name(static_cast<policy::Capability>(m.route->capability))
                                              : "any";
    if (m.params.count("name")) record.key = m.params.at("name");
    if (auto ns = request.header("X-Vault-Namespace")) {
      std::string n = *ns;
      while (!n.empty() && n.back() == '/') n.pop_back();
      if (!n.empty()) ctx.ns = n;
    }
    record.ns = ctx.ns;
    if (!valid_namespace(ctx.ns))
      return vault::error(400, {"invalid namespace in X-Vault-Namespace: 1 to 64 characters of [A-Za-z0-9._-]"});
    if (token && !may_use_namespace(*token, ctx.ns))
      return vault::error(403, {"permission denied: this token may not use namespace \"" + ctx.ns + "\""});
    // The policy is checked on the request's own path before anything looks at a key, so a
    // refusal never tells whether the key exists.
    if (token && m.route->capability != 0) {
      std::string policy_path = path;
      while (!policy_path.empty() && policy_path.back() == '/') policy_path.pop_back();
      if (!rules->policies.allows(token->policies, policy_path, static_cast<policy::Capability>(m.route->capability)))
        return vault::error(403, {"permission denied"});
    }

    json values = json::object();
    bool has_body = request.body.find_first_not_of(" \t\r\n") != std::string::npos;
    if (has_body) {
      values = parse_body(request.body, limits_.max_json_depth);
      if (!values.is_object()) throw keys::invalid("the request body must be a JSON object");
    }
    for (const auto& [k, v] : request.query)
      if (!values.contains(k) && k != "list") values[k] = v;
    for (const auto& [k, v] : m.params) values[k] = v;
    ctx.fields = FieldData(&m.route->fields, std::move(values));
    collect_secrets(ctx.fields.raw(), record.request_secrets);
    if (record.key && ctx.fields.raw().contains("key_version") && ctx.fields.raw()["key_version"].is_number_integer())
      record.key_version = ctx.fields.raw()["key_version"].get<int>();
    // Fail closed before anything runs; health (no token, changes nothing) always answers.
    if (audit_ && m.route->authenticated && !audit_->ready())
      return vault::error(503, {"the audit log cannot be written; request refused"});

    Reply reply = m.route->callback(ctx);
    collect_secrets(reply.data, record.response_secrets);
    if (record.key && reply.data.is_object() && reply.data.contains("key_version") &&
        reply.data["key_version"].is_number_integer())
      record.key_version = reply.data["key_version"].get<int>();
    if (record.key && !record.key_version && reply.data.is_object() && reply.data.contains("latest_version"))
      record.key_version = reply.data["latest_version"].get<int>();
    auto unknown = ctx.fields.unknown_fields();
    if (!unknown.empty() && !reply.raw && reply.status != 204) {
      std::string w = "Endpoint ignored these unrecognized parameters: [";
      for (size_t i = 0; i < unknown.size(); ++i) w += (i ? " " : "") + unknown[i];
      reply.warnings.push_back(w + "]");
    }
    return vault::render(reply, request_id);
  } catch (const keys::KeyError& e) {
    if (e.kind() == keys::ErrorKind::internal) log::error(std::string("internal error: ") + e.what(), request_id);
    return vault::error(vault::status_of(e.kind()), {e.what()});
  } catch (const std::exception& e) {
    log::error(std::string("unexpected error: ") + e.what(), request_id);
    return vault::error(500, {"internal error; see the server log for request id " + request_id});
  }
}

}  // namespace p11kms::api
