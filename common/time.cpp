#include "common/time.hpp"

#include <chrono>
#include <ctime>
#include <regex>

namespace p11kms::timefmt {

std::optional<int64_t> parse_rfc3339(const std::string& s) {
  static const std::regex re(R"(^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|([+-])(\d{2}):(\d{2}))$)");
  std::smatch m;
  if (s.size() > 64 || !std::regex_match(s, m, re)) return std::nullopt;
  auto num = [&](int i) { return std::stoi(m[i].str()); };
  std::tm tm{};
  tm.tm_year = num(1) - 1900;
  tm.tm_mon = num(2) - 1;
  tm.tm_mday = num(3);
  tm.tm_hour = num(4);
  tm.tm_min = num(5);
  tm.tm_sec = num(6);
  std::tm check = tm;
  int64_t t = static_cast<int64_t>(timegm(&check));
  // timegm normalizes (Feb 30 -> Mar 2); a real date comes back unchanged.
  if (check.tm_mday != tm.tm_mday || check.tm_mon != tm.tm_mon || check.tm_hour != tm.tm_hour ||
      check.tm_min != tm.tm_min || check.tm_sec != tm.tm_sec)
    return std::nullopt;
  if (m[9].matched) {
    int offset = num(10) * 3600 + num(11) * 60;
    t += m[9].str() == "+" ? -offset : offset;
  }
  return t;
}

std::string format_rfc3339(int64_t t) {
  std::time_t tt = static_cast<std::time_t>(t);
  std::tm tm{};
  gmtime_r(&tt, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

int64_t now_unix() {
  return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
}

}  // namespace p11kms::timefmt
