// The listener adapter (api/http/beast_server.cpp) with real sockets on 127.0.0.1: which thread
// runs a handler (the listener thread that read the request, or the handler pool under load),
// that every response goes back to its own request, that stopping with requests queued for the
// pool neither hangs nor crashes, and that listener threads yield to CPU-bound handlers.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "api/http/types.hpp"

namespace p11kms::api::http {
namespace {

std::string thread_name() {
  char name[32] = {0};
  pthread_getname_np(pthread_self(), name, sizeof(name));
  return name;
}

// One request on a fresh connection, "Connection: close"; returns the whole response text.
std::string post(const std::string& address, const std::string& body) {
  auto colon = address.rfind(':');
  int port = std::stoi(address.substr(colon + 1));
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return "socket failed";
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(port));
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
    ::close(fd);
    return "connect failed";
  }
  std::string req = "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: " +
                    std::to_string(body.size()) + "\r\n\r\n" + body;
  for (size_t off = 0; off < req.size();) {
    ssize_t n = ::send(fd, req.data() + off, req.size() - off, MSG_NOSIGNAL);
    if (n <= 0) break;
    off += static_cast<size_t>(n);
  }
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  return out;
}

std::string body_of(const std::string& response) {
  auto p = response.find("\r\n\r\n");
  return p == std::string::npos ? std::string() : response.substr(p + 4);
}

// Echoes the body, after `delay`; records the name of every thread that ran it.
struct Recorder {
  std::mutex mu;
  std::multiset<std::string> names;
  std::chrono::milliseconds delay{0};

  Handler handler() {
    return [this](const Request& r) {
      {
        std::lock_guard<std::mutex> lk(mu);
        names.insert(thread_name());
      }
      std::this_thread::sleep_for(delay);
      Response res;
      res.body = r.body;
      return res;
    };
  }
  size_t count(const std::string& name) {
    std::lock_guard<std::mutex> lk(mu);
    return names.count(name);
  }
};

ServerOptions options(size_t handler_threads, std::optional<size_t> inline_limit = std::nullopt) {
  ServerOptions o;
  o.address = "127.0.0.1:0";
  o.threads = 2;
  o.handler_threads = handler_threads;
  o.inline_limit = inline_limit;
  return o;
}

// n clients at once, each sending its own body; returns how many got their own body back.
size_t concurrent_posts(const std::string& address, int n) {
  std::atomic<size_t> own{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < n; ++i)
    clients.emplace_back([&, i] {
      std::string body = "request-" + std::to_string(i);
      if (body_of(post(address, body)) == body) ++own;
    });
  for (auto& t : clients) t.join();
  return own;
}

// n clients at once, each handler taking 5 ms: all answered with their own body, all handlers
// run on threads named `on`, none on `not_on`.
void expect_concurrent_handlers_on(const ServerOptions& o, int n, const std::string& on, const std::string& not_on) {
  Recorder rec;
  rec.delay = std::chrono::milliseconds(5);
  auto server = start_server(o, rec.handler());
  EXPECT_EQ(concurrent_posts(server->bound_address(), n), static_cast<size_t>(n));
  EXPECT_EQ(rec.count(on), static_cast<size_t>(n));
  EXPECT_EQ(rec.count(not_on), 0u);
}

TEST(BeastServer, OneRequestAtATimeRunsOnTheListenerThread) {
  Recorder rec;
  auto server = start_server(options(2), rec.handler());
  for (int i = 0; i < 5; ++i) EXPECT_EQ(body_of(post(server->bound_address(), "one")), "one");
  EXPECT_EQ(rec.count("p11kms-http"), 5u);
  EXPECT_EQ(rec.count("p11kms-handler"), 0u);
}

// Whether requests pile up beyond the limit depends on the load; the limit 0 hands every request
// over, so the pool's path is tested deterministically (its effect under load is measured by
// scripts/bench, docs/PERFORMANCE.md section 15).
TEST(BeastServer, BeyondTheInlineLimitHandlersRunOnThePoolAndAnswerTheirOwnRequest) {
  expect_concurrent_handlers_on(options(2, 0), 16, "p11kms-handler", "p11kms-http");
}

TEST(BeastServer, HandlerExceptionOnThePoolIsA500AndThePoolKeepsServing) {
  std::atomic<int> calls{0};
  auto server = start_server(options(1, 0), [&](const Request& r) -> Response {
    if (calls++ == 0) throw std::runtime_error("secret detail");
    Response res;
    res.body = r.body;
    return res;
  });
  std::string first = post(server->bound_address(), "a");
  EXPECT_NE(first.find(" 500 "), std::string::npos) << first;
  EXPECT_EQ(first.find("secret detail"), std::string::npos) << first;
  EXPECT_EQ(body_of(post(server->bound_address(), "b")), "b");
}

TEST(BeastServer, WithoutAPoolEveryHandlerRunsOnAListenerThread) {
  expect_concurrent_handlers_on(options(0), 12, "p11kms-http", "p11kms-handler");
}

TEST(BeastServer, StopsWithRequestsQueuedForThePool) {
  Recorder rec;
  rec.delay = std::chrono::milliseconds(200);
  auto server = start_server(options(1, 0), rec.handler());
  std::string address = server->bound_address();
  std::atomic<int> answered{0};
  std::vector<std::thread> clients;
  for (int i = 0; i < 12; ++i)
    clients.emplace_back([&] {
      if (body_of(post(address, "x")) == "x") ++answered;
    });
  // Wait until the pool has started on some and more are queued behind its single thread.
  for (int i = 0; i < 200 && rec.count("p11kms-handler") == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_GT(rec.count("p11kms-handler"), 0u);
  size_t started_before_stop = rec.count("p11kms-handler");
  server->stop();
  for (auto& t : clients) t.join();
  // Shutdown closed every connection; the handler running then finished, and the queued ones
  // never started (at most one more may have begun between the count above and stop()).
  EXPECT_EQ(answered.load(), 0);
  EXPECT_LE(rec.count("p11kms-handler"), started_before_stop + 1);
}

// The ids of this process's threads named `name` (from /proc/self/task).
std::vector<pid_t> threads_named(const std::string& name) {
  std::vector<pid_t> out;
  for (const auto& task : std::filesystem::directory_iterator("/proc/self/task")) {
    std::ifstream comm(task.path() / "comm");
    std::string n;
    std::getline(comm, n);
    if (n == name) out.push_back(static_cast<pid_t>(std::stol(task.path().filename().string())));
  }
  return out;
}

// Burns `us` microseconds of this thread's CPU (not wall time: a preempted thread burns on).
void burn_cpu(long us) {
  timespec t0{}, t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
  do {
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  } while ((t.tv_sec - t0.tv_sec) * 1000000L + (t.tv_nsec - t0.tv_nsec) / 1000 < us);
}

// A handler that burns 300 us of CPU for the body "heavy" and answers at once otherwise.
Response cpu_handler(const Request& r) {
  if (r.body == "heavy") burn_cpu(300);
  Response res;
  res.body = r.body;
  return res;
}

// One listener thread, so that every request passes through the thread whose policy is checked.
ServerOptions one_listener_all_to_the_pool() {
  ServerOptions o = options(1, 0);
  o.threads = 1;
  return o;
}

// Sequential requests: the pool's average CPU per handler follows them, and the listener thread
// reads it as each next request arrives (the last one below only carries that reading).
void post_n(const std::string& address, const std::string& body, int n) {
  for (int i = 0; i < n; ++i) ASSERT_EQ(body_of(post(address, body)), body);
}

TEST(BeastServer, ListenerThreadYieldsToCpuBoundHandlersAndStopsWhenTheyAreLight) {
  // Threads inherit their creator's policy; under `chrt` the listener is rightly left alone.
  if (sched_getscheduler(0) != SCHED_OTHER) GTEST_SKIP() << "the test runs under a scheduling policy other than SCHED_OTHER";
  auto server = start_server(one_listener_all_to_the_pool(), cpu_handler);
  std::string address = server->bound_address();
  post_n(address, "light", 16);
  auto listeners = threads_named("p11kms-http");
  ASSERT_EQ(listeners.size(), 1u);
  EXPECT_EQ(sched_getscheduler(listeners[0]), SCHED_OTHER);

  post_n(address, "heavy", 64);
  post_n(address, "light", 1);
  EXPECT_EQ(sched_getscheduler(listeners[0]), SCHED_BATCH);
  for (pid_t handler : threads_named("p11kms-handler")) EXPECT_EQ(sched_getscheduler(handler), SCHED_OTHER);

  post_n(address, "light", 200);
  EXPECT_EQ(sched_getscheduler(listeners[0]), SCHED_OTHER);
}

TEST(BeastServer, ListenerThreadWithAPolicyOfTheOperatorsIsLeftAlone) {
  auto server = start_server(one_listener_all_to_the_pool(), cpu_handler);
  std::vector<pid_t> listeners;
  for (int i = 0; i < 200 && listeners.empty(); ++i) {  // the thread names itself once running
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    listeners = threads_named("p11kms-http");
  }
  ASSERT_EQ(listeners.size(), 1u);
  // As `chrt -b -p 0` would (the whole process started under `chrt -b` likewise): the operator's
  // SCHED_BATCH stays through a heavy load and the light one after it.
  sched_param param{};
  ASSERT_EQ(sched_setscheduler(listeners[0], SCHED_BATCH, &param), 0);
  post_n(server->bound_address(), "heavy", 64);
  post_n(server->bound_address(), "light", 200);
  EXPECT_EQ(sched_getscheduler(listeners[0]), SCHED_BATCH);
}

}  // namespace
}  // namespace p11kms::api::http
