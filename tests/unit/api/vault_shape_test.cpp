// Unit tests for api/vault_shape.hpp: Vault's response envelope, written around the data.
#include "api/vault_shape.hpp"

#include <gtest/gtest.h>

#include <string>

namespace api = p11kms::api;
using json = nlohmann::json;

namespace {

// The envelope as a JSON object, dumped as every other response is.
std::string envelope(const json& data, const std::string& request_id, const json& warnings) {
  json body = {{"request_id", request_id}, {"lease_id", ""},      {"renewable", false},
               {"lease_duration", 0},      {"data", data},         {"wrap_info", nullptr},
               {"warnings", warnings},     {"auth", nullptr}};
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace

TEST(VaultShape, RendersTheEnvelopeAroundTheData) {
  api::Reply reply;
  reply.data = json{{"batch_results", json::array({json{{"ciphertext", "vault:v1:AAAA"}, {"key_version", 1}},
                                                   json{{"error", "bad \"item\"\n"}}})}};
  auto r = api::vault::render(reply, "req-1");
  EXPECT_EQ(r.status, 200);
  EXPECT_EQ(r.body, envelope(reply.data, "req-1", nullptr));
  EXPECT_EQ(json::parse(r.body)["data"], reply.data);

  reply.warnings = {"Endpoint ignored these unrecognized parameters: [x]"};
  reply.data = nullptr;
  r = api::vault::render(reply, "req-\"2\"");
  EXPECT_EQ(r.body, envelope(nullptr, "req-\"2\"", json(reply.warnings)));
  EXPECT_EQ(json::parse(r.body)["request_id"], "req-\"2\"");
}

TEST(VaultShape, RawRepliesAndNoContentHaveNoEnvelope) {
  api::Reply raw;
  raw.raw = true;
  raw.data = json{{"keys", json::array({"a"})}};
  EXPECT_EQ(api::vault::render(raw, "r").body, "{\"keys\":[\"a\"]}");
  api::Reply none;
  none.status = 204;
  EXPECT_EQ(api::vault::render(none, "r").body, "");
}
