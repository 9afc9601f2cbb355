// Unit tests for api/route.hpp (Router, FieldData) and api/api_service.hpp's parse_body.
#include "api/route.hpp"

#include <gtest/gtest.h>

#include "support/expect_key_error.hpp"

#include <algorithm>
#include <string>
#include <vector>

#include "api/api_service.hpp"
#include "keys/errors.hpp"

namespace api = p11kms::api;
namespace keys = p11kms::keys;
using json = nlohmann::json;
using Outcome = api::Router::Outcome;

namespace {

api::Route route(const std::string& method, const std::string& pattern, const std::string& summary) {
  api::Route r;
  r.method = method;
  r.pattern = pattern;
  r.summary = summary;
  r.callback = [](api::Context&) { return api::Reply{}; };
  return r;
}

api::Router make_router() {
  api::Router r;
  r.add(route("GET", "sys/health", "health"));
  r.add(route("POST", "transit/keys/:name", "create"));
  r.add(route("GET", "transit/keys/:name", "read"));
  r.add(route("LIST", "transit/keys", "list"));
  r.add(route("POST", "transit/keys/:name/config", "config"));
  r.add(route("POST", "transit/encrypt/:name", "encrypt"));
  r.add(route("GET", "transit/export/:type/:name/:version", "export"));
  return r;
}

using p11kms::test_support::contains;

template <typename F>
std::string expect_invalid(F&& f) { return p11kms::test_support::expect_key_error(std::forward<F>(f)); }

}  // namespace

// ---- Router::match ----

TEST(RouterMatch, LiteralRoute) {
  auto r = make_router();
  auto m = r.match("GET", "sys/health");
  ASSERT_EQ(m.outcome, Outcome::found);
  ASSERT_NE(m.route, nullptr);
  EXPECT_EQ(m.route->summary, "health");
  EXPECT_TRUE(m.params.empty());
}

TEST(RouterMatch, ExtractsParam) {
  auto r = make_router();
  auto m = r.match("GET", "transit/keys/orders");
  ASSERT_EQ(m.outcome, Outcome::found);
  EXPECT_EQ(m.route->summary, "read");
  ASSERT_EQ(m.params.size(), 1u);
  EXPECT_EQ(m.params.at("name"), "orders");
}

TEST(RouterMatch, SameMethodDifferentPatternPicksTheRightRoute) {
  auto r = make_router();
  auto m = r.match("POST", "transit/keys/orders");
  ASSERT_EQ(m.outcome, Outcome::found);
  EXPECT_EQ(m.route->summary, "create");
  m = r.match("POST", "transit/keys/orders/config");
  ASSERT_EQ(m.outcome, Outcome::found);
  EXPECT_EQ(m.route->summary, "config");
  EXPECT_EQ(m.params.at("name"), "orders");
}

TEST(RouterMatch, ExtractsSeveralParams) {
  auto r = make_router();
  auto m = r.match("GET", "transit/export/encryption-key/orders/3");
  ASSERT_EQ(m.outcome, Outcome::found);
  EXPECT_EQ(m.route->summary, "export");
  ASSERT_EQ(m.params.size(), 3u);
  EXPECT_EQ(m.params.at("type"), "encryption-key");
  EXPECT_EQ(m.params.at("name"), "orders");
  EXPECT_EQ(m.params.at("version"), "3");
}

TEST(RouterMatch, NotFound) {
  auto r = make_router();
  auto m = r.match("GET", "nope");
  EXPECT_EQ(m.outcome, Outcome::not_found);
  EXPECT_EQ(m.route, nullptr);
  EXPECT_EQ(r.match("GET", "").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("GET", "sys/healthz").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("GET", "SYS/health").outcome, Outcome::not_found);
}

TEST(RouterMatch, MethodNotAllowedWhenOnlyMethodDiffers) {
  auto r = make_router();
  auto m = r.match("DELETE", "transit/keys/orders");
  EXPECT_EQ(m.outcome, Outcome::method_not_allowed);
  EXPECT_EQ(m.route, nullptr);
  EXPECT_EQ(r.match("POST", "sys/health").outcome, Outcome::method_not_allowed);
  EXPECT_EQ(r.match("GET", "transit/encrypt/orders").outcome, Outcome::method_not_allowed);
  EXPECT_EQ(r.match("get", "sys/health").outcome, Outcome::method_not_allowed);  // methods are exact
}

TEST(RouterMatch, NoMatchOnExtraOrMissingSegments) {
  auto r = make_router();
  EXPECT_EQ(r.match("GET", "transit/keys/orders/extra").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("POST", "transit/encrypt").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("POST", "transit/encrypt/orders/more").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("GET", "transit/export/encryption-key/orders").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("GET", "sys/health/").outcome, Outcome::not_found);  // trailing slash = extra segment
  EXPECT_EQ(r.match("GET", "/sys/health").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("GET", "sys").outcome, Outcome::not_found);
}

TEST(RouterMatch, EmptySegmentDoesNotMatchParam) {
  auto r = make_router();
  EXPECT_EQ(r.match("GET", "transit/keys/").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("POST", "transit/encrypt/").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("POST", "transit/keys//config").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("GET", "transit/export//orders/1").outcome, Outcome::not_found);
  EXPECT_EQ(r.match("GET", "transit/export/t/orders/").outcome, Outcome::not_found);
}

TEST(RouterMatch, ListIsAMethodOfItsOwn) {
  auto r = make_router();
  auto m = r.match("LIST", "transit/keys");
  ASSERT_EQ(m.outcome, Outcome::found);
  EXPECT_EQ(m.route->summary, "list");
  EXPECT_EQ(r.match("GET", "transit/keys").outcome, Outcome::method_not_allowed);
}

// ---- FieldData ----

namespace {

const std::vector<api::Field>& schema() {
  static const std::vector<api::Field> s = {
      {"name", api::FieldType::string, "key name", nullptr},
      {"plaintext", api::FieldType::string, "base64 plaintext", nullptr},
      {"key_version", api::FieldType::integer, "version", nullptr},
      {"bits", api::FieldType::integer, "size", 256},
      {"exportable", api::FieldType::boolean, "exportable", nullptr},
      {"allow_plaintext_backup", api::FieldType::boolean, "backup", nullptr},
      {"derived", api::FieldType::boolean, "derived", true},
      {"type", api::FieldType::string, "key type", "aes256-gcm96"},
      {"batch_input", api::FieldType::array, "batch", nullptr},
  };
  return s;
}

api::FieldData fields(json values) { return api::FieldData(&schema(), std::move(values)); }

}  // namespace

TEST(FieldData, IntegersFromNumbersAndStrings) {
  auto f = fields({{"key_version", "5"}, {"bits", 128}});
  EXPECT_EQ(f.get_int("key_version"), 5);
  EXPECT_EQ(f.get_int("bits"), 128);
  EXPECT_EQ(fields({{"key_version", "-3"}}).get_int("key_version"), -3);
  EXPECT_EQ(fields({{"key_version", 7.0}}).get_int("key_version"), 7);
  EXPECT_EQ(fields({{"key_version", "0"}}).get_int("key_version"), 0);
}

TEST(FieldData, IntegerWrongTypeNamesTheField) {
  for (const json& bad : {json("five"), json("5x"), json(""), json("5 "), json(7.5), json(true),
                          json::array({1}), json::object({{"a", 1}}), json("99999999999999999999999")}) {
    auto f = fields({{"key_version", bad}});
    auto msg = expect_invalid([&] { f.get_int("key_version"); });
    EXPECT_TRUE(contains(msg, "key_version")) << "value " << bad.dump() << ": " << msg;
  }
}

TEST(FieldData, BooleansFromStringsNumbersAndBools) {
  EXPECT_TRUE(fields({{"exportable", "true"}}).get_bool("exportable"));
  EXPECT_FALSE(fields({{"exportable", "false"}}).get_bool("exportable"));
  EXPECT_TRUE(fields({{"exportable", 1}}).get_bool("exportable"));
  EXPECT_FALSE(fields({{"exportable", 0}}).get_bool("exportable"));
  EXPECT_TRUE(fields({{"exportable", "1"}}).get_bool("exportable"));
  EXPECT_FALSE(fields({{"exportable", "0"}}).get_bool("exportable"));
  EXPECT_TRUE(fields({{"exportable", true}}).get_bool("exportable"));
  EXPECT_FALSE(fields({{"exportable", false}}).get_bool("exportable"));
}

TEST(FieldData, BooleanWrongTypeNamesTheField) {
  for (const json& bad : {json("yes"), json("no"), json(""), json(2), json(-1), json(0.5),
                          json::array(), json::object()}) {
    auto f = fields({{"allow_plaintext_backup", bad}});
    auto msg = expect_invalid([&] { f.get_bool("allow_plaintext_backup"); });
    EXPECT_TRUE(contains(msg, "allow_plaintext_backup")) << "value " << bad.dump() << ": " << msg;
  }
}

TEST(FieldData, StringsAndIntegersAsStrings) {
  auto f = fields({{"name", "orders"}, {"plaintext", 42}});
  EXPECT_EQ(f.get_string("name"), "orders");
  EXPECT_EQ(f.get_string("plaintext"), "42");
  for (const json& bad : {json(true), json::array({"a"}), json::object({{"a", "b"}})}) {
    auto g = fields({{"name", bad}});
    auto msg = expect_invalid([&] { g.get_string("name"); });
    EXPECT_TRUE(contains(msg, "name")) << msg;
  }
}

TEST(FieldData, DefaultsFromTheDeclaration) {
  auto f = fields(json::object());
  EXPECT_EQ(f.get_int("bits"), 256);
  EXPECT_TRUE(f.get_bool("derived"));
  EXPECT_EQ(f.get_string("type"), "aes256-gcm96");
  // Without a declared default: the type's zero value.
  EXPECT_EQ(f.get_int("key_version"), 0);
  EXPECT_FALSE(f.get_bool("exportable"));
  EXPECT_EQ(f.get_string("name"), "");
  EXPECT_TRUE(f.get_array("batch_input").is_array());
  EXPECT_TRUE(f.get_array("batch_input").empty());
  // An explicit null falls back to the default too; a value overrides it.
  EXPECT_EQ(fields({{"bits", nullptr}}).get_int("bits"), 256);
  EXPECT_FALSE(fields({{"derived", "false"}}).get_bool("derived"));
  EXPECT_EQ(fields({{"bits", "128"}}).get_int("bits"), 128);
}

TEST(FieldData, Has) {
  auto f = fields({{"name", "orders"}, {"plaintext", nullptr}});
  EXPECT_TRUE(f.has("name"));
  EXPECT_FALSE(f.has("plaintext"));  // null counts as absent
  EXPECT_FALSE(f.has("bits"));       // a default is not a value sent
}

TEST(FieldData, Arrays) {
  auto f = fields({{"batch_input", json::parse(R"([{"plaintext":"AA=="}])")}});
  EXPECT_EQ(f.get_array("batch_input").size(), 1u);
  auto g = fields({{"batch_input", "not an array"}});
  auto msg = expect_invalid([&] { g.get_array("batch_input"); });
  EXPECT_TRUE(contains(msg, "batch_input")) << msg;
}

TEST(FieldData, UnknownFieldsListsUndeclaredKeys) {
  auto f = fields({{"name", "orders"}, {"plaintxt", "AA=="}, {"colour", "red"}, {"bits", 128}});
  auto unknown = f.unknown_fields();
  std::sort(unknown.begin(), unknown.end());
  EXPECT_EQ(unknown, (std::vector<std::string>{"colour", "plaintxt"}));
  EXPECT_TRUE(fields({{"name", "orders"}}).unknown_fields().empty());
  EXPECT_TRUE(fields(json::object()).unknown_fields().empty());
}

TEST(FieldData, UndeclaredFieldAccessIsAnInternalError) {
  auto f = fields(json::object());
  try {
    f.get_string("not_declared");
    FAIL() << "undeclared field accepted";
  } catch (const keys::KeyError& e) {
    EXPECT_EQ(e.kind(), keys::ErrorKind::internal);
  }
}

// ---- parse_body ----

namespace {

std::string nested_arrays(size_t depth, const std::string& inner) {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

std::string nested_objects(size_t depth, const std::string& inner) {
  std::string s;
  for (size_t i = 0; i < depth; ++i) s += "{\"a\":";
  s += inner;
  s += std::string(depth, '}');
  return s;
}

}  // namespace

TEST(ParseBody, ValidObject) {
  auto j = api::parse_body(R"({"plaintext":"AA==","key_version":2,"batch_input":[{"a":1}],"ok":true})", 64);
  ASSERT_TRUE(j.is_object());
  EXPECT_EQ(j["plaintext"], "AA==");
  EXPECT_EQ(j["key_version"], 2);
  EXPECT_EQ(j["batch_input"][0]["a"], 1);
  EXPECT_EQ(j["ok"], true);
  EXPECT_TRUE(api::parse_body("{}", 64).is_object());
}

TEST(ParseBody, MalformedJsonIsInvalidArgument) {
  for (std::string bad : {"{", "{\"a\":}", "{\"a\":1,}", "not json", "{'a':1}", "{\"a\":1} trailing", ""}) {
    expect_invalid([&] { api::parse_body(bad, 64); });
  }
}

TEST(ParseBody, NestingWithinTheLimitAccepted) {
  EXPECT_NO_THROW(api::parse_body(nested_arrays(10, "1"), 64));
  EXPECT_NO_THROW(api::parse_body(nested_arrays(64, "1"), 64));
  EXPECT_NO_THROW(api::parse_body(nested_objects(64, "1"), 64));
  EXPECT_NO_THROW(api::parse_body(nested_objects(3, "\"x\""), 3));
}

TEST(ParseBody, NestingDeeperThanTheLimitRefusedNamingIt) {
  for (const std::string& body : {nested_arrays(65, "1"), nested_objects(65, "1"), nested_arrays(100000, "1"),
                                  nested_objects(20000, "{}")}) {
    auto msg = expect_invalid([&] { api::parse_body(body, 64); });
    EXPECT_TRUE(contains(msg, "64")) << msg.substr(0, 200);
    EXPECT_TRUE(contains(msg, "limit")) << msg.substr(0, 200);
  }
  auto msg = expect_invalid([&] { api::parse_body(nested_objects(4, "1"), 3); });
  EXPECT_TRUE(contains(msg, "3")) << msg;
}

TEST(ParseBody, NestedEmptyContainersCountTowardsTheLimit) {
  // 65 levels of nesting with an empty innermost container is as deep as 65 levels with a value.
  auto msg = expect_invalid([&] { api::parse_body(nested_arrays(65, ""), 64); });
  EXPECT_TRUE(contains(msg, "64")) << msg;
  msg = expect_invalid([&] { api::parse_body(nested_objects(64, "{}"), 64); });
  EXPECT_TRUE(contains(msg, "64")) << msg;
}
