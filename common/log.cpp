#include "common/log.hpp"

#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <thread>

namespace p11kms::log {
namespace {
std::atomic<Level> g_level{Level::info};

// Access lines wait here until one write(2) takes many of them: a write per request (with a
// mutex around it) cost ~1.5 us of server CPU per request and made the listener threads wake
// each other (docs/PERFORMANCE.md, section 13).
constexpr size_t kWakeWriterBytes = 64 * 1024;  // the writer is woken early past this
constexpr size_t kWriteInlineBytes = 1 << 20;   // past this (stderr is stuck) callers write themselves

struct Sink {
  std::mutex pending_mu;  // held only to append to or swap `pending`
  std::string pending;
  std::condition_variable wake;
  std::mutex out_mu;  // orders everything written to fd 2; guards `spare`
  std::string spare;
  std::once_flag writer_started;
};

// Never destroyed: lines may still be logged while the process exits.
Sink& sink() {
  static Sink* s = new Sink;
  return *s;
}

const char* name(Level l) {
  switch (l) {
    case Level::debug: return "debug";
    case Level::info: return "info";
    case Level::warn: return "warn";
    default: return "error";
  }
}

// "YYYY-MM-DDTHH:MM:SS" of the current second, formatted once a second per thread: gmtime_r
// takes glibc's process-wide time zone lock on every call.
struct SecondText {
  std::time_t second = -1;
  char text[32] = {};
  size_t size = 0;
};
thread_local SecondText t_second;

std::string format_line(Level level, const std::string& message, const std::string& request_id) {
  std::string line;
  line.reserve(48 + request_id.size() + message.size());
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
  std::time_t t = static_cast<std::time_t>(ms / 1000);
  if (t != t_second.second) {
    std::tm tm{};
    gmtime_r(&t, &tm);
    t_second.size = std::strftime(t_second.text, sizeof t_second.text, "%Y-%m-%dT%H:%M:%S", &tm);
    t_second.second = t;
  }
  int milli = static_cast<int>(ms % 1000);
  line.append(t_second.text, t_second.size);
  line += '.';
  line += static_cast<char>('0' + milli / 100);
  line += static_cast<char>('0' + milli / 10 % 10);
  line += static_cast<char>('0' + milli % 10);
  line += "Z [";
  line += name(level);
  line += "] ";
  if (!request_id.empty()) {
    line += "request_id=";
    line += request_id;
    line += ' ';
  }
  line += message;
  line += '\n';
  return line;
}

void write_all(const std::string& text) {
  const char* p = text.data();
  size_t n = text.size();
  while (n > 0) {
    ssize_t w = ::write(STDERR_FILENO, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return;  // nowhere left to report a failing stderr
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
}

// Caller holds out_mu.
void write_pending(Sink& s) {
  {
    std::lock_guard<std::mutex> lk(s.pending_mu);
    s.pending.swap(s.spare);
  }
  write_all(s.spare);
  s.spare.clear();  // keeps its capacity for the next swap
}

void run_writer() {
  Sink& s = sink();
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(s.pending_mu);
      s.wake.wait(lk, [&] { return !s.pending.empty(); });  // an idle server's writer sleeps
      s.wake.wait_for(lk, std::chrono::milliseconds(kAccessFlushIntervalMs),
                      [&] { return s.pending.size() >= kWakeWriterBytes; });
    }
    std::lock_guard<std::mutex> out(s.out_mu);
    write_pending(s);
  }
}

void start_writer() {
  std::thread(run_writer).detach();
  std::atexit(flush);
}
}  // namespace

void set_level(Level level) { g_level = level; }

void write(Level level, const std::string& message, const std::string& request_id) {
  if (level < g_level.load(std::memory_order_relaxed)) return;
  std::string line = format_line(level, message, request_id);
  Sink& s = sink();
  std::lock_guard<std::mutex> out(s.out_mu);
  write_pending(s);
  write_all(line);
}

// Integer arithmetic: std::to_string(double) went through printf's floating-point path on every
// request (1.2% of the handler threads' CPU under sign load) and printed six decimals.
std::string duration_ms(long long microseconds) {
  if (microseconds < 0) microseconds = 0;
  std::string out = std::to_string(microseconds / 1000);
  const int frac = static_cast<int>(microseconds % 1000);
  out += '.';
  out += static_cast<char>('0' + frac / 100);
  out += static_cast<char>('0' + frac / 10 % 10);
  out += static_cast<char>('0' + frac % 10);
  out += "ms";
  return out;
}

void access(const std::string& message, const std::string& request_id) {
  if (Level::info < g_level.load(std::memory_order_relaxed)) return;
  std::string line = format_line(Level::info, message, request_id);
  Sink& s = sink();
  std::call_once(s.writer_started, start_writer);
  size_t before, after;
  {
    std::lock_guard<std::mutex> lk(s.pending_mu);
    before = s.pending.size();
    s.pending += line;
    after = s.pending.size();
  }
  if (after >= kWriteInlineBytes) {
    std::lock_guard<std::mutex> out(s.out_mu);
    write_pending(s);
  } else if (before == 0 || (before < kWakeWriterBytes && after >= kWakeWriterBytes)) {
    s.wake.notify_one();
  }
}

void flush() {
  Sink& s = sink();
  std::lock_guard<std::mutex> out(s.out_mu);
  write_pending(s);
}

}  // namespace p11kms::log
