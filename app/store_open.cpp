#include "app/store_open.hpp"

#include <fstream>
#include <algorithm>

#include "hsm/secret.hpp"

namespace p11kms::app {
namespace {

// Appends a libpq keyword value in single quotes, with \ and ' escaped (into the caller's
// buffer, so a password leaves no temporary copy).
void append_quoted(std::string& out, const std::string& v) {
  out += '\'';
  for (char c : v) {
    if (c == '\\' || c == '\'') out += '\\';
    out += c;
  }
  out += '\'';
}

hsm::SecretString read_password(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("store.password_file: cannot read " + path);
  // Read straight into a buffer sized up front (no reallocation leaves a stray copy), which
  // SecretString then owns and wipes.
  in.seekg(0, std::ios::end);
  std::string text(static_cast<size_t>(std::max<std::streamoff>(0, in.tellg())), '\0');
  in.seekg(0);
  in.read(&text[0], static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r')) text.pop_back();
  return hsm::SecretString(std::move(text));
}

}  // namespace

std::unique_ptr<store::MetadataStore> open_store(const Config::Store& config) {
  if (config.driver != "postgres") return store::open_sqlite_store(config.path);
  if (config.password_file.empty()) return store::open_postgres_store(config.dsn);
  auto password = read_password(config.password_file);
  std::string dsn_text = config.dsn;
  dsn_text.reserve(dsn_text.size() + 16 + 2 * password.reveal().size());  // no reallocation: no stray copy
  dsn_text += " password=";
  append_quoted(dsn_text, password.reveal());
  hsm::SecretString dsn(std::move(dsn_text));
  return store::open_postgres_store(dsn.reveal());
}

std::string describe_store(const Config::Store& config) {
  return config.driver == "postgres" ? "postgres " + config.dsn : "sqlite " + config.path;
}

}  // namespace p11kms::app
