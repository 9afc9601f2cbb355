// Unit tests for common/log.hpp: one whole line per call, whatever stderr is and however many
// threads write at once; access lines buffered but never lost or reordered.
#include "common/log.hpp"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <limits.h>
#include <unistd.h>

#include <cstdio>
#include <chrono>
#include <cstdlib>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace log = p11kms::log;

namespace {

// Points fd 2 at `fd` for the life of the object.
class StderrTo {
 public:
  explicit StderrTo(int fd) : saved_(::dup(STDERR_FILENO)) { ::dup2(fd, STDERR_FILENO); }
  ~StderrTo() {
    ::dup2(saved_, STDERR_FILENO);
    ::close(saved_);
  }

 private:
  int saved_;
};

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  std::istringstream in(text);
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

std::string read_all(int fd) {
  std::string text;
  char buf[65536];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  return text;
}

// Each thread writes `count` lines "t<thread> n<i> <padding>"; every line must come back whole,
// in the log's format, exactly once, each thread's lines in the order written.
void expect_whole_lines(const std::string& text, int threads, int count, size_t padding) {
  static const std::regex line_re(
      R"(^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[info\] request_id=t(\d+) n(\d+) (x*)$)");
  std::map<int, int> next;
  auto lines = lines_of(text);
  ASSERT_EQ(lines.size(), static_cast<size_t>(threads * count));
  for (const auto& l : lines) {
    std::smatch m;
    ASSERT_TRUE(std::regex_match(l, m, line_re)) << "torn or malformed line of " << l.size() << " bytes";
    EXPECT_EQ(m[3].length(), static_cast<long>(padding));
    int t = std::stoi(m[1]), n = std::stoi(m[2]);
    EXPECT_EQ(n, next[t]++) << "thread " << t;
  }
  for (int t = 0; t < threads; ++t) EXPECT_EQ(next[t], count) << "thread " << t;
}

void write_from_threads(int threads, int count, size_t padding, bool access = false) {
  std::string pad(padding, 'x');
  std::vector<std::thread> ts;
  for (int t = 0; t < threads; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; i < count; ++i) {
        std::string message = "n" + std::to_string(i) + " " + pad, rid = "t" + std::to_string(t);
        if (access)
          log::access(message, rid);
        else
          log::info(message, rid);
      }
    });
  for (auto& th : ts) th.join();
}

// fd 2 goes to a fresh temporary file for the life of the object; text() is what it holds.
class CapturedStderr {
 public:
  CapturedStderr() : fd_(open_temp()), redirect_(fd_) {}
  ~CapturedStderr() { ::close(fd_); }
  bool ok() const { return fd_ >= 0; }
  std::string text() const {
    std::string text;
    char buf[65536];
    for (off_t at = 0;;) {
      ssize_t n = ::pread(fd_, buf, sizeof buf, at);
      if (n <= 0) return text;
      text.append(buf, static_cast<size_t>(n));
      at += n;
    }
  }

 private:
  static int open_temp() {
    char path[] = "/tmp/p11kms-log-test-XXXXXX";
    int fd = ::mkstemp(path);
    if (fd >= 0) ::unlink(path);
    return fd;
  }
  int fd_;
  StderrTo redirect_;  // declared after fd_, so it redirects to the file once it is open
};

}  // namespace

TEST(Log, ConcurrentLinesToAFileStayWhole) {
  CapturedStderr err;
  ASSERT_TRUE(err.ok());
  write_from_threads(4, 2000, 100);
  expect_whole_lines(err.text(), 4, 2000, 100);
}

// A pipe takes at most PIPE_BUF bytes in one piece; longer lines (a long request path) must not
// be cut into by other threads' lines.
TEST(Log, LinesLongerThanAPipeTakesAtOnceStayWholeInAPipe) {
  int p[2];
  ASSERT_EQ(::pipe(p), 0);
  std::string text;
  std::thread reader([&] { text = read_all(p[0]); });
  {
    StderrTo redirect(p[1]);
    ::close(p[1]);
    std::thread long_lines([] { write_from_threads(2, 200, 3 * PIPE_BUF); });
    write_from_threads(2, 2000, 10);
    long_lines.join();
  }
  reader.join();
  ::close(p[0]);
  auto lines = lines_of(text);
  ASSERT_EQ(lines.size(), 2u * 200 + 2u * 2000);
  static const std::regex line_re(R"(^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[info\] request_id=t\d+ n\d+ x+$)");
  size_t long_count = 0;
  for (const auto& l : lines) {
    ASSERT_TRUE(std::regex_match(l, line_re)) << "torn line of " << l.size() << " bytes";
    if (l.size() > PIPE_BUF) ++long_count;
  }
  EXPECT_EQ(long_count, 400u);
}

// Access lines are not written by the request's thread, but they arrive whole, each thread's in
// order, and flush() leaves none behind.
TEST(Log, ConcurrentAccessLinesStayWholeAndInOrder) {
  CapturedStderr err;
  ASSERT_TRUE(err.ok());
  write_from_threads(4, 5000, 100, /*access=*/true);
  log::flush();
  expect_whole_lines(err.text(), 4, 5000, 100);
}

// Without a flush, the background writer puts an access line out within its interval, also
// when it had nothing to do before the line came.
TEST(Log, AnAccessLineIsWrittenWithinTheFlushInterval) {
  CapturedStderr err;
  ASSERT_TRUE(err.ok());
  log::access("GET /v1/sys/health 200 0.1ms", "rid-early");
  log::flush();
  std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the writer is idle now
  log::access("GET /v1/sys/health 200 0.1ms", "rid-late");
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while (err.text().find("rid-late") == std::string::npos && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  EXPECT_NE(err.text().find("request_id=rid-late GET /v1/sys/health 200 0.1ms"), std::string::npos);
}

// Any other line goes out at once, after the access lines logged before it: a warning about a
// request never appears above that request's line.
TEST(Log, OtherLinesComeAfterTheAccessLinesBeforeThem) {
  CapturedStderr err;
  ASSERT_TRUE(err.ok());
  log::access("first", "rid-1");
  log::access("second", "rid-2");
  log::warn("third");
  auto lines = lines_of(err.text());  // no flush, no wait: the warning wrote them
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_NE(lines[0].find("[info] request_id=rid-1 first"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find("[info] request_id=rid-2 second"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("[warn] third"), std::string::npos) << lines[2];
}

TEST(Log, LinesBelowTheLevelAreNotWritten) {
  CapturedStderr err;
  ASSERT_TRUE(err.ok());
  log::set_level(log::Level::warn);
  log::info("quiet");
  log::access("hidden", "rid-h");
  log::warn("heard");
  log::set_level(log::Level::info);
  log::info("heard too");
  log::access("shown", "rid-s");
  log::flush();
  auto lines = lines_of(err.text());
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_NE(lines[0].find(" [warn] heard"), std::string::npos) << lines[0];
  EXPECT_NE(lines[1].find(" [info] heard too"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find(" [info] request_id=rid-s shown"), std::string::npos) << lines[2];
}

TEST(Log, DurationsHaveThreeDecimalsOfAMillisecond) {
  EXPECT_EQ(log::duration_ms(52), "0.052ms");
  EXPECT_EQ(log::duration_ms(0), "0.000ms");
  EXPECT_EQ(log::duration_ms(999), "0.999ms");
  EXPECT_EQ(log::duration_ms(1000), "1.000ms");
  EXPECT_EQ(log::duration_ms(12345), "12.345ms");
  EXPECT_EQ(log::duration_ms(1234500), "1234.500ms");
  EXPECT_EQ(log::duration_ms(-5), "0.000ms");  // never a minus sign, whatever the caller passes
}
