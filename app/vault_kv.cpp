// The keyring's vault strategy: Vault KV v2 over cpprestsdk's http_client. The only file that
// includes cpprestsdk's client; everything above it sees keys::KeyringSource.
//
// KV v2 (Vault's API): GET /v1/<mount>/metadata/<path> answers
//   {"data": {"versions": {"1": {"created_time", "deletion_time": "" | RFC 3339, "destroyed": bool}, ...}}}
// and GET /v1/<mount>/data/<path>?version=N answers {"data": {"data": {...fields...}, "metadata": {...}}}.
// Errors are {"errors": ["..."]} with 403 (bad token or policy), 404 (no such secret), 503 (sealed).
#include "app/vault_kv.hpp"

#include <cpprest/containerstream.h>
#include <cpprest/http_client.h>
#include <openssl/crypto.h>

#include <algorithm>
#include <ctime>
#include <nlohmann/json.hpp>

#include "common/time.hpp"
#include "keys/errors.hpp"

namespace p11kms::app {
namespace {

using json = nlohmann::json;
namespace client = web::http::client;

constexpr size_t kMaxBody = 1 << 20;  // a keyring secret's answers are a few hundred bytes
constexpr size_t kMaxVersions = 1000;

// Vault's {"errors": [...]} as one short line (Vault's messages never hold the token).
std::string vault_errors(const std::string& body) {
  std::string out;
  try {
    auto j = json::parse(body);
    if (j.is_object() && j.contains("errors") && j["errors"].is_array())
      for (const auto& e : j["errors"])
        if (e.is_string()) out += (out.empty() ? "" : "; ") + e.get<std::string>();
  } catch (const json::exception&) {
  }
  if (out.size() > 300) out = out.substr(0, 300) + "...";
  for (char& c : out)
    if (static_cast<unsigned char>(c) < 0x20) c = ' ';
  return out;
}

class VaultKvReader {
 public:
  explicit VaultKvReader(VaultKvOptions o) : o_(std::move(o)), where_(describe_vault_secret(o_.address, o_.mount, o_.path)) {}

  std::vector<keys::KvKeyVersion> read() {
    client::http_client_config cfg;
    cfg.set_timeout(o_.timeout);
    cfg.set_validate_certificates(true);
    if (!o_.ca_pem.empty()) {
      std::string pem = o_.ca_pem;
      cfg.set_ssl_context_callback([pem](boost::asio::ssl::context& ctx) {
        ctx.add_certificate_authority(boost::asio::buffer(pem.data(), pem.size()));
      });
    }
    client::http_client http(web::uri(o_.address), cfg);

    std::string metadata_path = "/v1/" + o_.mount + "/metadata/" + o_.path;
    std::string body = get(http, metadata_path);
    std::vector<int> live;
    try {
      auto j = json::parse(body);
      const json* versions = nullptr;
      if (j.is_object() && j.contains("data") && j["data"].is_object() && j["data"].contains("versions") &&
          j["data"]["versions"].is_object())
        versions = &j["data"]["versions"];
      if (!versions) throw keys::bad_gateway(bad("the metadata answer has no data.versions object (is the mount KV version 2?)"), "vault_bad_answer");
      int64_t now = static_cast<int64_t>(std::time(nullptr));
      for (auto it = versions->begin(); it != versions->end(); ++it) {
        int n = 0;
        try {
          size_t used = 0;
          n = std::stoi(it.key(), &used);
          if (used != it.key().size() || n < 1) throw std::invalid_argument(it.key());
        } catch (const std::exception&) {
          throw keys::bad_gateway(bad("the metadata answer lists a version that is not a positive integer"), "vault_bad_answer");
        }
        const json& m = it.value();
        if (!m.is_object()) throw keys::bad_gateway(bad("version " + it.key() + "'s metadata is not an object"), "vault_bad_answer");
        if (m.contains("destroyed") && m["destroyed"].is_boolean() && m["destroyed"].get<bool>()) continue;
        // deletion_time: "" when live; a past time when deleted; a future time when
        // delete_version_after will delete it then (still live now).
        if (m.contains("deletion_time") && m["deletion_time"].is_string() && !m["deletion_time"].get<std::string>().empty()) {
          auto t = timefmt::parse_rfc3339(m["deletion_time"].get<std::string>());
          if (!t || *t <= now) continue;
        }
        live.push_back(n);
      }
    } catch (const json::exception&) {
      throw keys::bad_gateway(bad("the metadata answer is not JSON"), "vault_bad_answer");
    }
    if (live.size() > kMaxVersions)
      throw keys::bad_gateway(bad("more than " + std::to_string(kMaxVersions) + " live versions"), "vault_bad_answer");
    std::sort(live.begin(), live.end());

    std::vector<keys::KvKeyVersion> out;
    for (int n : live) {
      std::string data_body = get(http, "/v1/" + o_.mount + "/data/" + o_.path + "?version=" + std::to_string(n));
      keys::KvKeyVersion v;
      v.version = n;
      try {
        auto j = json::parse(data_body);
        OPENSSL_cleanse(data_body.data(), data_body.size());
        if (!j.is_object() || !j.contains("data") || !j["data"].is_object() || !j["data"].contains("data") ||
            !j["data"]["data"].is_object())
          throw keys::bad_gateway(bad("version " + std::to_string(n) + "'s answer has no data.data object"), "vault_bad_answer");
        json& fields = j["data"]["data"];
        if (fields.contains("id") && fields["id"].is_string()) v.id = fields["id"].get<std::string>();
        if (fields.contains("key") && fields["key"].is_string()) {
          auto& text = fields["key"].get_ref<std::string&>();
          v.key = hsm::SecretString(text);
          OPENSSL_cleanse(text.data(), text.size());  // nlohmann frees its strings without wiping
        }
      } catch (const json::exception&) {
        OPENSSL_cleanse(data_body.data(), data_body.size());
        throw keys::bad_gateway(bad("version " + std::to_string(n) + "'s answer is not JSON"), "vault_bad_answer");
      }
      out.push_back(std::move(v));
    }
    return out;
  }

 private:
  std::string bad(const std::string& what) const { return "Vault secret " + where_ + ": " + what; }

  // One GET; the body lands in a buffer this function owns (and the caller wipes).
  std::string get(client::http_client& http, const std::string& path_and_query) {
    web::http::http_request req(web::http::methods::GET);
    req.set_request_uri(web::uri(path_and_query));
    req.headers().add("X-Vault-Token", o_.token.reveal());
    req.headers().add("Accept", "application/json");
    concurrency::streams::container_buffer<std::vector<uint8_t>> buf(std::ios_base::out);
    buf.collection().reserve(64 * 1024);  // no reallocation (and unwiped old copies) for normal answers
    req.set_response_stream(buf.create_ostream());
    std::string path = path_and_query.substr(0, path_and_query.find('?'));
    int status = 0;
    try {
      // A blocking wait: this runs on a request handler thread or at start-up, never on
      // cpprestsdk's pool, and http_client_config's timeout bounds it.
      auto resp = http.request(req).get();
      status = resp.status_code();
      resp.content_ready().get();
    } catch (const std::exception& e) {
      OPENSSL_cleanse(buf.collection().data(), buf.collection().size());
      throw keys::unavailable("Vault at " + o_.address + " cannot be reached (GET " + path + "): " + e.what());
    }
    std::string body(buf.collection().begin(), buf.collection().end());
    OPENSSL_cleanse(buf.collection().data(), buf.collection().size());
    if (body.size() > kMaxBody) {
      OPENSSL_cleanse(body.data(), body.size());
      throw keys::bad_gateway(bad("the answer to GET " + path + " is over 1 MiB"), "vault_bad_answer");
    }
    if (status == 200) return body;
    std::string detail = vault_errors(body);
    OPENSSL_cleanse(body.data(), body.size());
    std::string msg = "Vault answered " + std::to_string(status) + " to GET " + path + (detail.empty() ? "" : ": " + detail);
    if (status == 503 || status == 429) throw keys::unavailable(msg + " (sealed, standby or overloaded)");
    if (status == 403) throw keys::bad_gateway(msg + " (check the token in keyring.vault.token_file and its policy)", "vault_forbidden");
    if (status == 404) throw keys::bad_gateway("Vault has no secret " + where_ + " (404 to GET " + path + ")", "vault_not_found");
    throw keys::bad_gateway(msg, "vault_error");
  }

  VaultKvOptions o_;
  std::string where_;
};

}  // namespace

std::string describe_vault_secret(const std::string& address, const std::string& mount, const std::string& path) {
  return mount + "/" + path + " at " + address;
}

keys::KeyringSource vault_keyring_source(VaultKvOptions options) {
  auto reader = std::make_shared<VaultKvReader>(std::move(options));
  return [reader] { return reader->read(); };
}

}  // namespace p11kms::app
