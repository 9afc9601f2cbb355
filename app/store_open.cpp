#include "app/store_open.hpp"

#include <fstream>
#include <sstream>

#include "hsm/secret.hpp"

namespace p11kms::app {
namespace {

// A libpq keyword value in single quotes, with \ and ' escaped.
std::string quoted(const std::string& v) {
  std::string out = "'";
  for (char c : v) {
    if (c == '\\' || c == '\'') out += '\\';
    out += c;
  }
  return out + "'";
}

hsm::SecretString read_password(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("store.password_file: cannot read " + path);
  std::ostringstream buf;
  buf << in.rdbuf();
  std::string text = buf.str();
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  hsm::SecretString secret(text);
  if (!text.empty()) OPENSSL_cleanse(&text[0], text.size());
  std::string raw = buf.str();
  if (!raw.empty()) OPENSSL_cleanse(&raw[0], raw.size());
  return secret;
}

}  // namespace

std::unique_ptr<store::MetadataStore> open_store(const Config::Store& config) {
  if (config.driver != "postgres") return store::open_sqlite_store(config.path);
  if (config.password_file.empty()) return store::open_postgres_store(config.dsn);
  auto password = read_password(config.password_file);
  std::string value = quoted(password.reveal());
  hsm::SecretString dsn(config.dsn + " password=" + value);
  OPENSSL_cleanse(&value[0], value.size());
  return store::open_postgres_store(dsn.reveal());
}

std::string describe_store(const Config::Store& config) {
  return config.driver == "postgres" ? "postgres " + config.dsn : "sqlite " + config.path;
}

}  // namespace p11kms::app
