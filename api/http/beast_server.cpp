// The HTTP listener: Boost.Beast over Boost.Asio (what cpprestsdk's own Linux listener is built
// on). It replaced cpprestsdk's http_listener, which exposes neither the peer certificate (needed
// to bind an mTLS client certificate to a token) nor per-request read deadlines (needed so a slow
// client cannot pin a worker). This is the only translation unit that includes Beast; dialects
// and the API service see only api/http/types.hpp.
//
// Model: one io_context run by options.threads threads ("p11kms-http"). Every connection lives
// on its own strand and serves one request at a time; reads are asynchronous, so a connection
// whose request is not complete holds no thread. The handler blocks (PKCS#11, database). At low
// concurrency it runs synchronously in the read completion of its connection; once more than
// 2 x threads requests are in progress, it is queued for the handler pool
// (options.handler_threads, "p11kms-handler") and its response is written back on the
// connection's strand. Measured on 2 cores (docs/PERFORMANCE.md section 15): the hand-over halves
// the rate of a single client (two more wake-ups per request), while at 64 connections keeping
// the listener threads to I/O served more requests with less CPU per request. While the pool's
// handlers are CPU-bound, the listener threads stop preempting them (listener_yields_to_handlers,
// section 16).
//
// Deadlines (limits.read_timeout_s): an idle connection (after accept, the TLS handshake or a
// response) is closed when no byte of a next request arrives in time; once a request's first
// byte has arrived, the whole request (headers and body) must arrive within read_timeout_s of it
// (an absolute deadline: trickling bytes does not extend it). Writing a response has the same
// bound. Expiry closes the connection without an answer.
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/empty_body.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <pthread.h>
#include <sched.h>
#include <strings.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <limits>
#include <type_traits>
#include <map>
#include <mutex>
#include <thread>

#include "api/http/types.hpp"
#include "common/log.hpp"

namespace p11kms::api::http {
namespace {

namespace net = boost::asio;
namespace ssl = boost::asio::ssl;
namespace beast = boost::beast;
namespace bhttp = boost::beast::http;
using tcp = net::ip::tcp;
using error_code = boost::system::error_code;

// The parser's own header limit sits this far above max_header_bytes, so a request a little over
// the configured limit is still parsed (method and path known) and the dialect renders its 431;
// only beyond it does the listener answer a plain 431 itself.
constexpr size_t kHeaderSlack = 8192;

// TLS 1.2 and later only; with a client CA, a verified client certificate is required.
void configure_tls(ssl::context& ctx, const TlsOptions& tls) {
  ctx.set_options(ssl::context::default_workarounds | ssl::context::no_sslv2 | ssl::context::no_sslv3 |
                  ssl::context::no_tlsv1 | ssl::context::no_tlsv1_1 | ssl::context::single_dh_use);
  SSL_CTX_set_min_proto_version(ctx.native_handle(), TLS1_2_VERSION);
  ctx.use_certificate_chain(net::buffer(tls.cert_pem));
  ctx.use_private_key(net::buffer(tls.key_pem), ssl::context::pem);
  if (!tls.client_ca_pem.empty()) {
    ctx.add_certificate_authority(net::buffer(tls.client_ca_pem));
    ctx.set_verify_mode(ssl::verify_peer | ssl::verify_fail_if_no_peer_cert);
  }
}

std::string hex_lower(const unsigned char* p, size_t n) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(digits[p[i] >> 4]);
    out.push_back(digits[p[i] & 0xf]);
  }
  return out;
}

// Request and response bodies carry plaintext, key material and tokens: zeroed before their
// memory is freed or reused.
void wipe(std::string& s) {
  if (!s.empty()) OPENSSL_cleanse(s.data(), s.size());
  s.clear();
}

// SHA-256 over the DER of the verified peer certificate, lowercase hex; empty without one.
std::string peer_cert_sha256(SSL* ssl) {
  X509* cert = SSL_get1_peer_certificate(ssl);
  if (!cert) return {};
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  std::string out;
  if (X509_digest(cert, EVP_sha256(), md, &len) == 1) out = hex_lower(md, len);
  X509_free(cert);
  return out;
}

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// %XX decoding as web::uri::decode did it ('+' stays '+'); false on a malformed escape.
bool percent_decode(std::string_view in, std::string& out) {
  out.clear();
  out.reserve(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (in[i] != '%') {
      out.push_back(in[i]);
      continue;
    }
    if (i + 2 >= in.size()) return false;
    int hi = hex_value(in[i + 1]), lo = hex_value(in[i + 2]);
    if (hi < 0 || lo < 0) return false;
    out.push_back(static_cast<char>(hi * 16 + lo));
    i += 2;
  }
  return true;
}

// Query strings are form-encoded: '+' is a space (as Go's and Confluent's servers read them).
bool form_decode(std::string_view in, std::string& out) {
  std::string s(in);
  std::replace(s.begin(), s.end(), '+', ' ');
  return percent_decode(s, out);
}

// The pairs of a query string with cpprestsdk's web::uri::split_query semantics, which the
// dialects were written against: pairs split on '&' (on ';' only where no '&' follows), pairs
// without '=' ignored, one value per name (the last wins), names in sorted order.
bool parse_query(std::string_view query, std::vector<std::pair<std::string, std::string>>& out) {
  std::map<std::string, std::string> pairs;
  size_t prev = 0;
  while (prev != std::string_view::npos) {
    size_t amp = query.find('&', prev);
    if (amp == std::string_view::npos) amp = query.find(';', prev);
    std::string_view kv = query.substr(prev, amp == std::string_view::npos ? std::string_view::npos : amp - prev);
    prev = amp == std::string_view::npos ? std::string_view::npos : amp + 1;
    size_t eq = kv.find('=');
    if (eq == std::string_view::npos) continue;
    std::string k, v;
    if (!form_decode(kv.substr(0, eq), k) || !form_decode(kv.substr(eq + 1), v)) return false;
    pairs[std::move(k)] = std::move(v);
  }
  for (auto& [k, v] : pairs) out.emplace_back(k, std::move(v));
  return true;
}

// Splits a request target into the decoded path and the query pairs; false when malformed.
bool parse_target(std::string_view target, Request& r) {
  // absolute-form (RFC 9112 3.2.2): drop scheme and authority
  if (target.size() > 7 && (target.substr(0, 7) == "http://" || target.substr(0, 8) == "https://")) {
    size_t slash = target.find('/', target.find("//") + 2);
    target = slash == std::string_view::npos ? std::string_view("/") : target.substr(slash);
  }
  if (size_t hash = target.find('#'); hash != std::string_view::npos) target = target.substr(0, hash);
  size_t q = target.find('?');
  std::string_view path = target.substr(0, q);
  if (!percent_decode(path, r.path)) return false;
  if (q != std::string_view::npos && !parse_query(target.substr(q + 1), r.query)) return false;
  return true;
}

// Runs handlers handed over by the listener threads, in arrival order. The queue needs no bound:
// a connection has at most one request in it. It also tells whether its handlers are CPU-bound
// (a software token signing, large batches): then the listener threads stop preempting them.
class HandlerPool {
 public:
  explicit HandlerPool(size_t n) {
    threads_.reserve(n);
    for (size_t i = 0; i < n; ++i)
      threads_.emplace_back([this] {
        pthread_setname_np(pthread_self(), "p11kms-handler");
        run();
      });
  }
  ~HandlerPool() { stop(); }

  void post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

  // Finishes the tasks running now; the queued ones are dropped (their connections are closed).
  void stop() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    std::deque<std::function<void()>> dropped;
    std::lock_guard<std::mutex> lk(mu_);
    dropped.swap(tasks_);
  }

  // Whether the pool's recent handlers spent more CPU than kCpuHeavyNs each (see there), and it
  // is still busy: it started one lately. Without the second condition the listener threads would
  // stay yielding after a burst while they serve a light load themselves.
  bool cpu_heavy(std::chrono::steady_clock::time_point now) const {
    return cpu_heavy_.load(std::memory_order_relaxed) &&
           now.time_since_epoch().count() - last_start_.load(std::memory_order_relaxed) < kBusyWithin.count();
  }

 private:
  // CPU per handler above which the handlers count as CPU-bound, and below which no longer:
  // between the two the state stays, so a load near one threshold does not switch the listener
  // threads back and forth. Measured per handler on 2 cores (docs/PERFORMANCE.md section 16):
  // encrypt ~10 us, hmac ~20 us, sign ecdsa-p256 ~60 us, a batch of 100 ~160 us, ed25519 ~190 us.
  static constexpr int64_t kCpuHeavyNs = 45'000;
  static constexpr int64_t kCpuLightNs = 30'000;
  // A thread's CPU clock is a system call, not vDSO: every 8th task is sample enough.
  static constexpr unsigned kSampleEvery = 8;
  static constexpr std::chrono::steady_clock::duration kBusyWithin = std::chrono::milliseconds(100);

  void run() {
    unsigned tasks_run = 0;
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [this] { return stopping_ || !tasks_.empty(); });
        if (stopping_) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      last_start_.store(std::chrono::steady_clock::now().time_since_epoch().count(), std::memory_order_relaxed);
      bool sample = ++tasks_run % kSampleEvery == 0;
      timespec t0{};
      if (sample) clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
      try {
        task();
      } catch (const std::exception& e) {
        log::error(std::string("http: handler thread: ") + e.what());
        sample = false;
      }
      if (sample) note_cpu(t0);
    }
  }

  // An average over the last few sampled tasks; two threads may race on it and lose an update,
  // which an estimate can afford.
  void note_cpu(const timespec& t0) {
    timespec t1{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    int64_t ns = (t1.tv_sec - t0.tv_sec) * 1'000'000'000LL + (t1.tv_nsec - t0.tv_nsec);
    int64_t avg = cpu_ns_avg_.load(std::memory_order_relaxed);
    avg += (ns - avg) / 4;
    cpu_ns_avg_.store(avg, std::memory_order_relaxed);
    if (avg > kCpuHeavyNs) cpu_heavy_.store(true, std::memory_order_relaxed);
    else if (avg < kCpuLightNs) cpu_heavy_.store(false, std::memory_order_relaxed);
  }

  std::atomic<int64_t> cpu_ns_avg_{0};
  std::atomic<std::chrono::steady_clock::rep> last_start_{0};
  std::atomic<bool> cpu_heavy_{false};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

// While the handler pool is busy with CPU-bound handlers, a listener thread runs as SCHED_BATCH:
// woken by a connection, it no longer preempts a handler mid-operation but waits for a core (a
// handler finishing, or the end of its time slice) and then serves every connection ready by
// then. Measured on 2 cores (docs/PERFORMANCE.md section 16): signing ed25519, the listener
// threads woke about twice per request between them and the handlers were preempted 1.3 times
// per request; batched, both spent less CPU per request. Threads the operator gave another
// policy (chrt) are left alone.
void listener_yields_to_handlers(bool yield) {
  enum : int { kUnknown, kNormal, kBatch, kLeftAlone };
  thread_local int state = kUnknown;
  if (state == kUnknown) state = sched_getscheduler(0) == SCHED_OTHER ? kNormal : kLeftAlone;
  if (state == kLeftAlone || (state == kBatch) == yield) return;
  sched_param param{};
  if (sched_setscheduler(0, yield ? SCHED_BATCH : SCHED_OTHER, &param) != 0) {
    state = kLeftAlone;
    return;
  }
  state = yield ? kBatch : kNormal;
}

struct Shared;

// A connection: plain (beast::tcp_stream) or TLS (ssl_stream over it).
template <class Stream>
class Session : public std::enable_shared_from_this<Session<Stream>> {
 public:
  template <class... Args>
  Session(std::shared_ptr<Shared> shared, std::string remote, Args&&... args)
      : shared_(std::move(shared)), remote_(std::move(remote)), stream_(std::forward<Args>(args)...) {}

  // A connection can end without its request reaching respond() (a timeout, a malformed request,
  // shutdown with the request queued for the pool): its raw bytes and the parser's copies of the
  // header values (tokens) and body are wiped here, as respond() wipes them otherwise.
  ~Session() {
    discard_parser();
    buffer_.clear();
    wipe_consumed_bytes();
    OPENSSL_cleanse(drain_buf_, sizeof(drain_buf_));  // the tail of a body left unread
  }

  void start();
  void close() { beast::get_lowest_layer(stream_).close(); }  // the socket and its deadline timer
  auto executor() { return beast::get_lowest_layer(stream_).get_executor(); }

 private:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;
  beast::tcp_stream& tcp() { return beast::get_lowest_layer(stream_); }
  std::chrono::seconds timeout() const;

  void wait_for_request();
  void read_header();
  void on_header(error_code ec);
  void on_body(error_code ec);
  void serve(Request& r, bool close_after);
  std::shared_ptr<bhttp::response<bhttp::string_body>> respond(Request& r, bool close_after);
  void write(std::shared_ptr<bhttp::response<bhttp::string_body>> res, bool close_after);
  void plain_reply(int status, const std::string& body);
  void finish(bool unread_input);
  void discard_parser();
  // A consumed request's raw bytes stay in the buffer's memory until overwritten; wiped once the
  // buffer holds nothing unread (size() == 0).
  void wipe_consumed_bytes() {
    auto raw = buffer_.prepare(buffer_.capacity());
    OPENSSL_cleanse(raw.data(), raw.size());
  }
  void drain();
  void shutdown_and_close();

  std::shared_ptr<Shared> shared_;
  std::string remote_;
  Stream stream_;
  beast::flat_buffer buffer_;
  std::optional<bhttp::request_parser<bhttp::string_body>> parser_;
  std::string client_cert_sha256_;
  char drain_buf_[4096];
};

// What every connection of one server shares; outlives the server object while connections
// still hold it.
struct Shared {
  ServerOptions options;
  Handler handler;
  HandlerPool* pool = nullptr;  // the server's, when options.handler_threads > 0
  size_t inline_limit = 0;      // requests served at once beyond which handlers go to the pool
  std::atomic<size_t> in_progress{0};  // requests read and not yet answered
  std::atomic<bool> stopping{false};
  std::mutex mu;
  // One closer per connection: close(true) closes on the connection's strand, close(false)
  // directly (only once no thread runs the io_context). Expired ones are pruned as more arrive.
  std::vector<std::pair<std::weak_ptr<void>, std::function<void(bool)>>> sessions;

  template <class S>
  void track(const std::shared_ptr<S>& s) {
    std::lock_guard<std::mutex> lk(mu);
    if (sessions.size() >= 64 && sessions.size() == sessions.capacity()) {
      sessions.erase(std::remove_if(sessions.begin(), sessions.end(), [](const auto& e) { return e.first.expired(); }),
                     sessions.end());
      sessions.reserve(std::max<size_t>(64, sessions.size() * 2));
    }
    std::weak_ptr<S> weak = s;
    sessions.emplace_back(s, [weak](bool on_strand) {
      auto live = weak.lock();
      if (!live) return;
      if (on_strand)
        net::post(live->executor(), [live] { live->close(); });
      else
        live->close();
    });
  }

  void close_all(bool on_strand) {
    std::vector<std::function<void(bool)>> all;
    {
      std::lock_guard<std::mutex> lk(mu);
      for (const auto& e : sessions)
        if (!e.first.expired()) all.push_back(e.second);
    }
    for (auto& c : all) c(on_strand);
  }

  size_t open_connections() {
    std::lock_guard<std::mutex> lk(mu);
    return static_cast<size_t>(
        std::count_if(sessions.begin(), sessions.end(), [](const auto& e) { return !e.first.expired(); }));
  }
};

template <class Stream>
std::chrono::seconds Session<Stream>::timeout() const {
  return std::chrono::seconds(std::max(1, shared_->options.read_timeout_s));
}

template <class Stream>
void Session<Stream>::start() {
  if constexpr (kTls) {
    tcp().expires_after(timeout());
    stream_.async_handshake(ssl::stream_base::server, [self = this->shared_from_this()](error_code ec) {
      if (ec) {
        log::debug("http: TLS handshake with " + self->remote_ + " failed: " + ec.message());
        self->close();
        return;
      }
      self->client_cert_sha256_ = peer_cert_sha256(self->stream_.native_handle());
      self->wait_for_request();
    });
  } else {
    wait_for_request();
  }
}

// The idle phase: wait (up to the timeout) for the first byte of the next request; its arrival
// starts the request's own deadline.
template <class Stream>
void Session<Stream>::wait_for_request() {
  if (shared_->stopping) return close();
  if (buffer_.size() > 0) return read_header();  // pipelined: already here
  tcp().expires_after(timeout());
  stream_.async_read_some(buffer_.prepare(4096), [self = this->shared_from_this()](error_code ec, size_t n) {
    if (ec) {
      if (ec == beast::error::timeout) log::debug("http: idle connection from " + self->remote_ + " closed after the read timeout");
      self->close();
      return;
    }
    self->buffer_.commit(n);
    self->read_header();
  });
}

template <class Stream>
void Session<Stream>::read_header() {
  parser_.emplace();
  parser_->header_limit(static_cast<uint32_t>(
      std::min<size_t>(shared_->options.max_header_bytes + kHeaderSlack, std::numeric_limits<uint32_t>::max())));
  // A declared Content-Length is checked in on_header, where the request is known. (Not
  // boost::none: Beast 1.74 compares `len > body_limit` on an optional, true for none.)
  parser_->body_limit(std::numeric_limits<std::uint64_t>::max());
  tcp().expires_after(timeout());    // the request's absolute deadline
  bhttp::async_read_header(stream_, buffer_, *parser_,
                           [self = this->shared_from_this()](error_code ec, size_t) { self->on_header(ec); });
}

template <class Stream>
void Session<Stream>::on_header(error_code ec) {
  if (ec == bhttp::error::header_limit) {
    return plain_reply(431, "{\"errors\":[\"request headers exceed the limit of " +
                                std::to_string(shared_->options.max_header_bytes) + " bytes\"]}");
  }
  if (ec == bhttp::error::end_of_stream || ec == net::error::eof) return close();
  if (ec == beast::error::timeout) {
    log::debug("http: request from " + remote_ + " not complete within the read timeout; connection closed");
    return close();
  }
  if (ec) {
    log::debug("http: request from " + remote_ + " not read: " + ec.message());
    if (ec.category() == bhttp::make_error_code(bhttp::error::bad_method).category() &&
        ec != bhttp::error::partial_message)
      return plain_reply(400, "{\"errors\":[\"malformed HTTP request\"]}");
    return close();
  }
  auto& req = parser_->get();
  // 100-continue: ask for the body only when it will be read.
  auto declared = parser_->content_length();
  bool too_large = declared && *declared > shared_->options.max_body_bytes;
  size_t header_bytes = 0;
  for (const auto& f : req) header_bytes += f.name_string().size() + f.value().size() + 4;
  if (too_large || header_bytes > shared_->options.max_header_bytes || parser_->is_done()) return on_body({});
  parser_->body_limit(shared_->options.max_body_bytes);  // a chunked body past it: body_limit
  auto expect = req[bhttp::field::expect];
  if (expect.size() == 12 && strncasecmp(expect.data(), "100-continue", 12) == 0 && req.version() >= 11) {
    auto cont = std::make_shared<bhttp::response<bhttp::empty_body>>(bhttp::status::continue_, 11);
    bhttp::async_write(stream_, *cont, [self = this->shared_from_this(), cont](error_code ec, size_t) {
      if (ec) return self->close();
      bhttp::async_read(self->stream_, self->buffer_, *self->parser_,
                        [self](error_code ec, size_t) { self->on_body(ec); });
    });
    return;
  }
  bhttp::async_read(stream_, buffer_, *parser_, [self = this->shared_from_this()](error_code ec, size_t) { self->on_body(ec); });
}

template <class Stream>
void Session<Stream>::on_body(error_code ec) {
  if (ec && ec != bhttp::error::body_limit) {
    if (ec == beast::error::timeout)
      log::debug("http: request from " + remote_ + " not complete within the read timeout; connection closed");
    else if (ec != net::error::eof && ec != bhttp::error::end_of_stream && ec != bhttp::error::partial_message)
      log::debug("http: request from " + remote_ + " not read: " + ec.message());
    if (ec == bhttp::error::bad_chunk || ec == bhttp::error::bad_chunk_extension)
      return plain_reply(400, "{\"errors\":[\"malformed HTTP request\"]}");
    return close();
  }
  auto& req = parser_->get();
  Request r;
  r.method = std::string(req.method_string());
  if (!parse_target(std::string_view(req.target().data(), req.target().size()), r)) return plain_reply(400, "{\"errors\":[\"malformed request target\"]}");
  size_t header_bytes = 0;
  for (const auto& f : req) {
    header_bytes += f.name_string().size() + f.value().size() + 4;
    r.headers.emplace_back(std::string(f.name_string()), std::string(f.value()));
  }
  r.remote_address = remote_;
  r.tls = kTls;
  r.client_cert_sha256 = client_cert_sha256_;
  bool close_after = !req.keep_alive();
  if (header_bytes > shared_->options.max_header_bytes) {
    r.headers_too_large = true;
    r.headers.clear();
    close_after = true;  // a body, if any, was not read
  } else if (ec == bhttp::error::body_limit ||
             (parser_->content_length() && *parser_->content_length() > shared_->options.max_body_bytes)) {
    r.body_too_large = true;
    close_after = true;  // the rest of the body was not read
  } else {
    r.body = std::move(req.body());
  }
  serve(r, close_after);
}

template <class Stream>
void Session<Stream>::serve(Request& r, bool close_after) {
  size_t in_progress = shared_->in_progress.fetch_add(1, std::memory_order_relaxed) + 1;  // until written
  if (shared_->pool) listener_yields_to_handlers(shared_->pool->cpu_heavy(std::chrono::steady_clock::now()));
  if (shared_->pool && in_progress > shared_->inline_limit) {
    // Wiped as respond() wipes it, also when the pool drops the request at shutdown.
    std::shared_ptr<Request> req(new Request(std::move(r)), [](Request* q) {
      wipe(q->body);
      for (auto& header : q->headers) wipe(header.second);
      delete q;
    });
    shared_->pool->post([self = this->shared_from_this(), req = std::move(req), close_after] {
      // Shutting down: its connection is being closed and the client will get no answer, so the
      // operation must not run after the client saw the connection end.
      if (self->shared_->stopping) return;
      auto res = self->respond(*req, close_after);
      net::post(self->executor(), [self, res = std::move(res), close_after]() mutable { self->write(std::move(res), close_after); });
    });
    return;
  }
  write(respond(r, close_after), close_after);
}

// Runs the handler and builds the response; on a handler thread the connection is idle meanwhile
// (no operation of it is pending until the response is written).
template <class Stream>
std::shared_ptr<bhttp::response<bhttp::string_body>> Session<Stream>::respond(Request& r, bool close_after) {
  Response resp;
  try {
    resp = shared_->handler(r);
  } catch (const std::exception& e) {
    log::error(std::string("http: handler failed: ") + e.what());
    resp = Response{};
    resp.status = 500;
    resp.body = "{\"errors\":[\"internal error\"]}";
  } catch (...) {
    log::error("http: handler failed with a non-standard exception");
    resp = Response{};
    resp.status = 500;
    resp.body = "{\"errors\":[\"internal error\"]}";
  }
  wipe(r.body);
  for (auto& header : r.headers) wipe(header.second);  // tokens travel in headers
  if (buffer_.size() == 0) wipe_consumed_bytes();  // unless a pipelined request follows them
  auto res = std::make_shared<bhttp::response<bhttp::string_body>>();
  unsigned version = parser_->get().version() == 10 ? 10 : 11;
  res->version(version);
  res->result(static_cast<unsigned>(resp.status));
  bool has_content_type = false;
  for (const auto& [k, v] : resp.headers) {
    if (strcasecmp(k.c_str(), "Content-Type") == 0) has_content_type = true;
    res->insert(k, v);
  }
  bool no_body = resp.status / 100 == 1 || resp.status == 204 || resp.status == 304;
  if (no_body) {
    resp.body.clear();
  } else if (!has_content_type) {
    res->set(bhttp::field::content_type, resp.content_type);
  }
  res->body() = std::move(resp.body);
  res->prepare_payload();
  res->keep_alive(!close_after && !shared_->stopping);
  return res;
}

template <class Stream>
void Session<Stream>::write(std::shared_ptr<bhttp::response<bhttp::string_body>> res, bool close_after) {
  bool unread_input = close_after && !parser_->is_done();
  tcp().expires_after(timeout());
  bhttp::async_write(stream_, *res, [self = this->shared_from_this(), res, close_after, unread_input](error_code ec, size_t) {
    wipe(res->body());
    self->shared_->in_progress.fetch_sub(1, std::memory_order_relaxed);
    if (ec) {
      log::debug("http: reply to " + self->remote_ + " not delivered: " + ec.message());
      return self->close();
    }
    if (close_after || !res->keep_alive()) return self->finish(unread_input);
    self->discard_parser();
    self->wait_for_request();
  });
}

// The parser holds its own copies of the header values and of the body (unless moved out).
template <class Stream>
void Session<Stream>::discard_parser() {
  if (!parser_) return;
  auto& req = parser_->get();
  for (auto& field : req) {
    auto value = field.value();
    OPENSSL_cleanse(const_cast<char*>(value.data()), value.size());
  }
  wipe(req.body());
  parser_.reset();
}

// An answer the handler never sees (a request too broken to route), then close.
template <class Stream>
void Session<Stream>::plain_reply(int status, const std::string& body) {
  auto res = std::make_shared<bhttp::response<bhttp::string_body>>();
  res->version(11);
  res->result(static_cast<unsigned>(status));
  res->set(bhttp::field::content_type, "application/json");
  res->body() = body;
  res->prepare_payload();
  res->keep_alive(false);
  tcp().expires_after(timeout());
  bhttp::async_write(stream_, *res, [self = this->shared_from_this(), res](error_code ec, size_t) {
    if (ec) return self->close();
    self->finish(true);
  });
}

// Closes after a response. When the client may still be sending (an unread body), read and
// discard its bytes for a while first: closing a socket with unread input resets the
// connection, and the client could lose the answer it has not read yet.
template <class Stream>
void Session<Stream>::finish(bool unread_input) {
  if (!unread_input) return shutdown_and_close();
  if constexpr (!kTls) {
    error_code ec;
    tcp().socket().shutdown(tcp::socket::shutdown_send, ec);
  }
  tcp().expires_after(std::min(timeout(), std::chrono::seconds(5)));
  drain();
}

template <class Stream>
void Session<Stream>::drain() {
  stream_.async_read_some(net::buffer(drain_buf_), [self = this->shared_from_this()](error_code ec, size_t) {
    if (ec) return self->close();
    self->drain();
  });
}

template <class Stream>
void Session<Stream>::shutdown_and_close() {
  if constexpr (kTls) {
    tcp().expires_after(std::chrono::seconds(2));
    stream_.async_shutdown([self = this->shared_from_this()](error_code) { self->close(); });
  } else {
    error_code ec;
    tcp().socket().shutdown(tcp::socket::shutdown_send, ec);
    close();
  }
}

class BeastServer : public Server {
 public:
  BeastServer(const ServerOptions& options, Handler handler)
      : shared_(std::make_shared<Shared>()), acceptor_(net::make_strand(ioc_)), retry_timer_(acceptor_.get_executor()) {
    shared_->options = options;
    shared_->handler = std::move(handler);
    if (options.tls) {
      // Fail at start, with the reason, rather than dropping every connection later.
      try {
        tls_.emplace(ssl::context::tls_server);
        configure_tls(*tls_, *options.tls);
        if (SSL_CTX_check_private_key(tls_->native_handle()) != 1)
          throw std::runtime_error("the private key does not match the certificate");
      } catch (const std::exception& e) {
        throw std::runtime_error(std::string("TLS: ") + e.what());
      }
    }
    listen(options.address);
    accept();
    size_t n = std::max<size_t>(1, options.threads);
    if (options.handler_threads > 0) {
      pool_ = std::make_unique<HandlerPool>(options.handler_threads);
      shared_->pool = pool_.get();
      shared_->inline_limit = options.inline_limit.value_or(2 * n);
    }
    threads_.reserve(n);
    for (size_t i = 0; i < n; ++i)
      threads_.emplace_back([this] {
        pthread_setname_np(pthread_self(), "p11kms-http");
        for (;;) {
          try {
            ioc_.run();
            return;
          } catch (const std::exception& e) {
            log::error(std::string("http: listener thread: ") + e.what());
          }
        }
      });
  }

  ~BeastServer() override { stop(); }

  void stop() override {
    if (shared_->stopping.exchange(true)) return;
    net::post(acceptor_.get_executor(), [this] {
      error_code ec;
      acceptor_.close(ec);
      retry_timer_.cancel();
    });
    shared_->close_all(true);
    // Let the closes run (a handler in progress finishes first), then stop the threads.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
    while (std::chrono::steady_clock::now() < deadline && shared_->open_connections() > 0)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    ioc_.stop();
    for (auto& t : threads_)
      if (t.joinable()) t.join();
    if (pool_) pool_->stop();  // no listener thread is left to hand it more
    error_code ec;
    acceptor_.close(ec);
    shared_->close_all(false);  // what is left; no thread runs the io_context any more
  }

  std::string bound_address() const override { return bound_; }

 private:
  void listen(const std::string& address) {
    size_t colon = address.rfind(':');
    std::string host = colon == std::string::npos ? address : address.substr(0, colon);
    std::string port = colon == std::string::npos ? "" : address.substr(colon + 1);
    if (host.size() >= 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
    if (host.empty()) host = "0.0.0.0";
    try {
      tcp::resolver resolver(ioc_);
      auto results = resolver.resolve(host, port, tcp::resolver::passive | tcp::resolver::numeric_service);
      if (results.empty()) throw std::runtime_error("no address for " + host);
      tcp::endpoint ep = results.begin()->endpoint();
      acceptor_.open(ep.protocol());
      acceptor_.set_option(net::socket_base::reuse_address(true));
      acceptor_.bind(ep);
      acceptor_.listen(net::socket_base::max_listen_connections);
      auto local = acceptor_.local_endpoint();
      std::string shown = local.address().is_v6() ? "[" + local.address().to_string() + "]" : local.address().to_string();
      bound_ = port == "0" ? shown + ":" + std::to_string(local.port()) : address;
    } catch (const std::exception& e) {
      throw std::runtime_error("cannot listen on " + address + ": " + e.what());
    }
  }

  void accept() {
    acceptor_.async_accept(net::make_strand(ioc_), [this](error_code ec, tcp::socket socket) {
      if (shared_->stopping || ec == net::error::operation_aborted) return;
      if (ec) {
        // e.g. EMFILE: log it and keep accepting (cpprestsdk issue 742), after a pause.
        log::warn("http: accept failed: " + ec.message());
        retry_timer_.expires_after(std::chrono::milliseconds(100));
        retry_timer_.async_wait([this](error_code ec) {
          if (!ec && !shared_->stopping) accept();
        });
        return;
      }
      on_accept(std::move(socket));
      accept();
    });
  }

  void on_accept(tcp::socket socket) {
    error_code ec;
    socket.set_option(tcp::no_delay(true), ec);  // Nagle + delayed ACK would add ~40 ms
    auto ep = socket.remote_endpoint(ec);
    std::string remote = ec ? std::string() : ep.address().to_string();
    if (tls_) {
      auto s = std::make_shared<Session<beast::ssl_stream<beast::tcp_stream>>>(shared_, std::move(remote),
                                                                                 std::move(socket), *tls_);
      shared_->track(s);
      net::dispatch(s->executor(), [s] { s->start(); });
    } else {
      auto s = std::make_shared<Session<beast::tcp_stream>>(shared_, std::move(remote), std::move(socket));
      shared_->track(s);
      net::dispatch(s->executor(), [s] { s->start(); });
    }
  }

  std::shared_ptr<Shared> shared_;
  std::optional<ssl::context> tls_;
  std::unique_ptr<HandlerPool> pool_;
  net::io_context ioc_;  // destroyed before the members above: pending handlers may hold them
  tcp::acceptor acceptor_;
  net::steady_timer retry_timer_;
  std::vector<std::thread> threads_;
  std::string bound_;
};

}  // namespace

std::unique_ptr<Server> start_server(const ServerOptions& options, Handler handler) {
  return std::make_unique<BeastServer>(options, std::move(handler));
}

}  // namespace p11kms::api::http
