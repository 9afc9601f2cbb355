#include <openssl/rand.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "app/server.hpp"
#include "common/encoding.hpp"
#include "hsm/token_admin.hpp"

namespace p11kms::app {
namespace {

namespace fs = std::filesystem;

constexpr const char* kDevLabel = "p11kms-dev";
constexpr const char* kSoftHsm = "/usr/lib/softhsm/libsofthsm2.so";

std::string random_text(size_t n) {
  static const char* alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
  std::string out;
  unsigned char b;
  while (out.size() < n) {
    if (RAND_bytes(&b, 1) != 1) throw std::runtime_error("random generation failed");
    if (b < 248) out += alphabet[b % 62];  // 248 = 4*62: no modulo bias
  }
  return out;
}

// A secret file (mode 0600) created once and reused: the dev token keeps its PINs across runs.
hsm::SecretString secret_file(const std::string& path) {
  if (fs::exists(path)) return read_secret_file(path);
  std::string secret = random_text(24);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL, 0600);
  if (fd < 0) throw ConfigError("cannot create " + path);
  std::string line = secret + "\n";
  bool ok = ::write(fd, line.data(), line.size()) == static_cast<ssize_t>(line.size());
  ::close(fd);
  OPENSSL_cleanse(line.data(), line.size());
  if (!ok) throw ConfigError("cannot write " + path);
  hsm::SecretString out(secret);
  OPENSSL_cleanse(secret.data(), secret.size());
  return out;
}

}  // namespace

Config prepare_dev(DevOptions& o) {
  fs::path dir = fs::absolute(o.data_dir).lexically_normal();
  std::error_code ec;
  fs::create_directories(dir / "tokens", ec);
  if (ec) throw ConfigError("cannot create dev data dir " + dir.string() + ": " + ec.message());
  ::chmod(dir.c_str(), 0700);

  fs::path conf = dir / "softhsm2.conf";
  if (!fs::exists(conf)) {
    std::ofstream(conf) << "# SoftHSM config of the p11kms dev token (written by p11kms server -dev)\n"
                        << "directories.tokendir = " << (dir / "tokens").string() << "\n"
                        << "objectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n";
  }
  // SoftHSM reads its config at C_Initialize: set it before any module call.
  setenv("SOFTHSM2_CONF", conf.c_str(), 1);

  hsm::InitTokenRequest init;
  init.module = kSoftHsm;
  init.label = kDevLabel;
  init.so_pin = secret_file((dir / "so.pin").string());
  init.user_pin = secret_file((dir / "user.pin").string());
  hsm::init_token(init);

  if (o.root_token.empty()) o.root_token = "hvs." + random_text(24);

  Config c;
  c.listen_address = o.listen_address;
  c.hsm.module = kSoftHsm;
  c.hsm.token_label = kDevLabel;
  c.hsm.pin_file = (dir / "user.pin").string();
  c.store.path = (dir / "p11kms.db").string();
  policy::TokenEntry root;
  root.name = "root";
  root.sha256 = policy::sha256_of(o.root_token);
  root.policies = {"root"};
  root.namespaces = {"*"};
  c.tokens.push_back(root);
  return c;
}

}  // namespace p11kms::app
