// Unit tests for common/json_text.hpp: the same text as nlohmann's compact dump with invalid
// UTF-8 replaced, for every kind of value, the fast path and the strings it hands back.
#include "common/json_text.hpp"

#include <gtest/gtest.h>

#include <limits>
#include <string>

using json = nlohmann::json;

namespace {

std::string reference(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

}  // namespace

TEST(JsonText, MatchesNlohmannForEveryKindOfValue) {
  const json values[] = {
      nullptr, true, false, 0, -1, 42, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max(),
      std::numeric_limits<uint64_t>::max(), 0.5, -1.25e-7, 1e300, 3.0, "", "plain ascii", json::array(),
      json::object(), json::array({1, "two", nullptr, json::array({json::object()})}),
      json{{"b", 1}, {"a", json{{"nested", json::array({"x", 2.5, false})}}}, {"", "empty key"}},
      json::binary({1, 2, 3}),
  };
  for (const auto& v : values) EXPECT_EQ(p11kms::json_text::dump(v), reference(v)) << reference(v);
}

TEST(JsonText, EscapesWhatNlohmannEscapes) {
  const std::string strings[] = {
      "quote \" inside", "back\\slash", "new\nline\ttab\r\b\f", std::string("nul \0 byte", 10), "\x01\x1f control",
      "del \x7f", "slash / stays", "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x94\x91",  // valid UTF-8 passes through
      "bad \xff byte", "cut \xe2\x82", "lone \x80 continuation", "overlong \xc0\xaf",
  };
  for (const auto& s : strings) {
    EXPECT_EQ(p11kms::json_text::dump(json(s)), reference(json(s))) << reference(json(s));
    json object = {{s, s}};  // keys take the same path as values
    EXPECT_EQ(p11kms::json_text::dump(object), reference(object)) << reference(object);
  }
  EXPECT_EQ(p11kms::json_text::dump(json("bad \xff")), "\"bad \xef\xbf\xbd\"");  // U+FFFD
  EXPECT_EQ(p11kms::json_text::dump(json("a\"b")), "\"a\\\"b\"");
}

TEST(JsonText, AppendsToWhatIsThere) {
  std::string out = "prefix:";
  p11kms::json_text::append(out, json{{"k", json::array({1, "v"})}});
  EXPECT_EQ(out, "prefix:{\"k\":[1,\"v\"]}");
}
