// The project's own HTTP request/response types. Dialects and the API service see only these;
// the listener adapter (beast_server.cpp, Boost.Beast) is the one place that knows the HTTP
// library, so it can be replaced without touching a dialect.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace p11kms::api::http {

using Headers = std::vector<std::pair<std::string, std::string>>;

struct Request {
  std::string method;  // as sent: GET, POST, LIST, ...
  std::string path;    // percent-decoded, without the query
  std::vector<std::pair<std::string, std::string>> query;  // decoded
  Headers headers;
  std::string body;
  std::string remote_address;
  bool tls = false;  // arrived over TLS (absolute links use https)
  // mTLS: lowercase hex SHA-256 over the DER of the verified client certificate; empty when the
  // connection has none (plain HTTP, or TLS without a client CA).
  std::string client_cert_sha256;
  // Set by the adapter instead of buffering what exceeds the configured limits; the service
  // answers 413 / 431 in the dialect's own error shape.
  bool body_too_large = false;
  bool headers_too_large = false;

  std::optional<std::string> header(const std::string& name) const;  // case-insensitive
  std::optional<std::string> query_param(const std::string& name) const;
};

struct Response {
  int status = 200;
  Headers headers;
  std::string body;
  std::string content_type = "application/json";
};

using Handler = std::function<Response(const Request&)>;

struct TlsOptions {
  std::string cert_pem;       // server certificate chain (PEM)
  std::string key_pem;        // its private key (PEM)
  std::string client_ca_pem;  // when set: client certificates are required and verified
};

struct ServerOptions {
  std::string address = "127.0.0.1:8200";  // host:port
  std::optional<TlsOptions> tls;           // absent: plain HTTP
  size_t max_body_bytes = 1 << 20;
  size_t max_header_bytes = 16384;
  int read_timeout_s = 30;
  size_t threads = 2;  // threads running the listener (and handlers run inline), fixed at start
  // Threads that run handlers handed over by the listener threads. While at most inline_limit
  // requests are in progress (read, not yet answered), a request's handler runs on the listener
  // thread that read it (no hand-over: the fastest at low concurrency); beyond that, it is queued
  // for this pool, so the listener threads keep reading and writing for every other connection.
  // 0: every handler runs inline, as on a listener with no pool.
  size_t handler_threads = 0;
  std::optional<size_t> inline_limit;  // absent: 2 x threads
};

class Server {
 public:
  virtual ~Server() = default;
  virtual void stop() = 0;
  virtual std::string bound_address() const = 0;
};

// Starts listening; throws std::runtime_error with a clear message (e.g. address in use).
std::unique_ptr<Server> start_server(const ServerOptions& options, Handler handler);

}  // namespace p11kms::api::http
