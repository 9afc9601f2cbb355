// The cpprestsdk adapter. Handlers never block a listener thread on another task: the body is
// read with a continuation and the handler runs inside it (cpprestsdk issues 1144/1452: a
// .get() on a pool thread can starve the pool and hang the listener for good).
#include <algorithm>
#include <boost/asio/ssl.hpp>
#include <cpprest/http_listener.h>
#include <openssl/ssl.h>
#include <pplx/threadpool.h>

#include <atomic>
#include <mutex>

#include "api/http/types.hpp"
#include "common/log.hpp"

namespace p11kms::api::http {
namespace {

using web::http::http_request;
using web::http::http_response;
using web::http::experimental::listener::http_listener;
using web::http::experimental::listener::http_listener_config;

std::once_flag g_threadpool_once;

web::http::http_response to_cpprest(const Response& r) {
  http_response out(static_cast<web::http::status_code>(r.status));
  for (const auto& [k, v] : r.headers) out.headers().add(k, v);
  if (!r.body.empty() || (r.status != 204 && r.status != 304)) {
    out.set_body(r.body, r.content_type);
  }
  return out;
}

// TLS 1.2 and later only; with a client CA, a verified client certificate is required. The
// PEM text is read once at start; cpprestsdk calls this for every new connection.
void configure_tls(boost::asio::ssl::context& ctx, const TlsOptions& tls) {
  namespace ssl = boost::asio::ssl;
  ctx.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                  ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1 | ssl::context::single_dh_use);
  SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_2_VERSION);
  ctx.use_certificate_chain(boost::asio::buffer(tls.cert_pem));
  ctx.use_private_key(boost::asio::buffer(tls.key_pem), ssl::context::pem);
  if (!tls.client_ca_pem.empty()) {
    ctx.add_certificate_authority(boost::asio::buffer(tls.client_ca_pem));
    ctx.set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
  }
}

class CpprestServer : public Server {
 public:
  CpprestServer(const ServerOptions& options, Handler handler) : options_(options), handler_(std::move(handler)) {
    std::call_once(g_threadpool_once, [&] { crossplat::threadpool::initialize_with_threads(options.threads); });
    http_listener_config config;
    config.set_timeout(utility::seconds(options.read_timeout_s));
    if (options.tls) {
      // Fail at start, with the reason, rather than dropping every connection later.
      try {
        boost::asio::ssl::context probe(boost::asio::ssl::context::tls_server);
        configure_tls(probe, *options.tls);
        if (SSL_CTX_check_private_key(probe.native_handle()) != 1)
          throw std::runtime_error("the private key does not match the certificate");
      } catch (const std::exception& e) {
        throw std::runtime_error(std::string("TLS: ") + e.what());
      }
      auto tls = std::make_shared<TlsOptions>(*options.tls);
      config.set_ssl_context_callback([tls](boost::asio::ssl::context& ctx) { configure_tls(ctx, *tls); });
    }
    std::string scheme = options.tls ? "https://" : "http://";
    listener_ = std::make_unique<http_listener>(web::uri(scheme + options.address), config);
    listener_->support([this](http_request req) { on_request(std::move(req)); });
    try {
      listener_->open().wait();
    } catch (const std::exception& e) {
      throw std::runtime_error("cannot listen on " + options.address + ": " + e.what());
    }
  }

  ~CpprestServer() override { stop(); }

  void stop() override {
    if (stopped_.exchange(true)) return;
    try {
      listener_->close().wait();
    } catch (const std::exception& e) {
      log::warn(std::string("http: close: ") + e.what());
    }
  }

  std::string bound_address() const override { return options_.address; }

 private:
  Request base_request(const http_request& req, size_t& header_bytes) {
    Request r;
    r.method = req.method();
    const auto& uri = req.relative_uri();
    r.path = web::uri::decode(uri.path());
    // Query strings are form-encoded: '+' is a space (as Go's and Confluent's servers read them).
    auto form_decode = [](std::string s) {
      std::replace(s.begin(), s.end(), '+', ' ');
      return web::uri::decode(s);
    };
    for (const auto& [k, v] : web::uri::split_query(uri.query()))
      r.query.emplace_back(form_decode(k), form_decode(v));
    header_bytes = 0;
    for (const auto& [k, v] : req.headers()) {
      header_bytes += k.size() + v.size() + 4;
      r.headers.emplace_back(k, v);
    }
    r.remote_address = req.remote_address();
    r.tls = options_.tls.has_value();
    return r;
  }

  void reply(http_request& req, const Request& r) {
    Response resp;
    try {
      resp = handler_(r);
    } catch (const std::exception& e) {
      log::error(std::string("http: handler failed: ") + e.what());
      resp.status = 500;
      resp.body = "{\"errors\":[\"internal error\"]}";
    }
    req.reply(to_cpprest(resp)).then([](pplx::task<void> t) {
      try {
        t.get();
      } catch (const std::exception& e) {
        log::debug(std::string("http: reply not delivered: ") + e.what());
      }
    });
  }

  void on_request(http_request req) {
    size_t header_bytes = 0;
    Request r = base_request(req, header_bytes);
    if (header_bytes > options_.max_header_bytes) {
      r.headers_too_large = true;
      r.headers.clear();
      reply(req, r);
      return;
    }
    auto declared = req.headers().content_length();
    if (declared > options_.max_body_bytes) {
      r.body_too_large = true;
      reply(req, r);
      return;
    }
    auto shared = std::make_shared<Request>(std::move(r));
    req.extract_vector().then([this, req, shared](pplx::task<std::vector<unsigned char>> t) mutable {
      try {
        auto body = t.get();  // ready: .then runs after the body arrived, so this never waits
        if (body.size() > options_.max_body_bytes) {
          shared->body_too_large = true;
        } else {
          shared->body.assign(body.begin(), body.end());
        }
      } catch (const std::exception& e) {
        log::debug(std::string("http: request body not read: ") + e.what());
        return;  // the connection is gone; nobody to answer
      }
      reply(req, *shared);
    });
  }

  ServerOptions options_;
  Handler handler_;
  std::unique_ptr<http_listener> listener_;
  std::atomic<bool> stopped_{false};
};

}  // namespace

std::unique_ptr<Server> start_server(const ServerOptions& options, Handler handler) {
  return std::make_unique<CpprestServer>(options, std::move(handler));
}

}  // namespace p11kms::api::http
