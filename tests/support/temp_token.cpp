#include "support/temp_token.hpp"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "hsm/token_admin.hpp"

namespace p11kms::test_support {

std::string make_temp_dir(const std::string& prefix) {
  const char* base = std::getenv("TMPDIR");
  std::string tmpl = std::string(base && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
  if (!mkdtemp(tmpl.data())) throw std::runtime_error("mkdtemp failed");
  return tmpl;
}

void remove_tree(const std::string& dir) {
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
}

TempToken::TempToken(const std::string& label) : dir_(make_temp_dir("p11kms-token")), label_(label) {
  std::filesystem::create_directories(dir_ + "/tokens");
  std::ofstream(dir_ + "/softhsm2.conf") << "directories.tokendir = " << dir_ << "/tokens\n"
                                         << "objectstore.backend = file\nlog.level = ERROR\n"
                                         << "slots.removable = false\n";
  setenv("SOFTHSM2_CONF", (dir_ + "/softhsm2.conf").c_str(), 1);
  hsm::InitTokenRequest r;
  r.module = kModule;
  r.label = label_;
  r.so_pin = hsm::SecretString(kSoPin);
  r.user_pin = hsm::SecretString(kUserPin);
  hsm::init_token(r);
}

TempToken::~TempToken() { remove_tree(dir_); }

void TempToken::take_away() {
  namespace fs = std::filesystem;
  fs::rename(fs::directory_iterator(fs::path(dir_) / "tokens")->path(), fs::path(dir_) / "away");
}

void TempToken::bring_back() {
  namespace fs = std::filesystem;
  // SoftHSM names the directory after the token's serial; any name is found again.
  fs::rename(fs::path(dir_) / "away", fs::path(dir_) / "tokens" / "back");
}

hsm::PoolConfig TempToken::pool_config(size_t sessions) const {
  hsm::PoolConfig c;
  c.module = kModule;
  c.token_label = label_;
  c.user_pin = hsm::SecretString(kUserPin);
  c.sessions = sessions;
  return c;
}

}  // namespace p11kms::test_support
