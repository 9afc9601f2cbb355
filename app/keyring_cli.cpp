// `p11kms keyring init -config FILE [-force]`: the instance's keyring import key, an RSA key
// pair made in the token (non-extractable, CKA_DECRYPT/CKA_UNWRAP only); prints its public key
// PEM, which the exporting instance configures as keyring.recipient_public_key_file.
#include <openssl/crypto.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "app/config.hpp"
#include "app/token_options.hpp"
#include "app/keyring_cli.hpp"
#include "app/store_open.hpp"
#include "hsm/session_pool.hpp"
#include "hsm/token.hpp"
#include "keys/key_service.hpp"
#include "keys/keyring.hpp"

namespace p11kms::app {

int cmd_keyring(const std::vector<std::string>& args) {
  const char* usage = "usage: p11kms keyring init -config FILE [-force] | keyring import-key -config FILE PEM [-force]";
  if (args.empty() || (args[0] != "init" && args[0] != "import-key")) {
    std::cerr << "p11kms: " << usage << std::endl;
    return 2;
  }
  std::string config_path;
  bool force = false;
  std::string pem_path;
  for (size_t i = 1; i < args.size(); ++i) {
    const std::string& a = args[i];
    if ((a == "-config" || a == "--config") && i + 1 < args.size()) {
      config_path = args[++i];
    } else if (a.rfind("-config=", 0) == 0 || a.rfind("--config=", 0) == 0) {
      config_path = a.substr(a.find('=') + 1);
    } else if (a == "-force" || a == "--force") {
      force = true;
    } else if (args[0] == "import-key" && pem_path.empty() && !a.empty() && a[0] != '-') {
      pem_path = a;
    } else {
      std::cerr << "p11kms: keyring " << args[0] << ": unexpected argument \"" << a << "\"\n" << usage << std::endl;
      return 2;
    }
  }
  if (config_path.empty() || (args[0] == "import-key" && pem_path.empty())) {
    std::cerr << "p11kms: " << usage << std::endl;
    return 2;
  }
  Config config = load_config_file(config_path);  // ConfigError: exit 2 from run_cli
  try {
    auto store = open_store(config.store);
    hsm::PoolConfig pc;
    pc.module = config.hsm.module;
    pc.token_label = config.hsm.token_label;
    pc.user_pin = read_pin(config.hsm);
    pc.sessions = 1;
    hsm::SessionPool pool(std::move(pc));
    hsm::Token token(pool, token_options(config.hsm, pool));
    keys::KeyService keys(*store, token);
    keys::Keyring keyring(*store, keys, token, {});
    if (args[0] == "import-key") {
      std::ifstream in(pem_path, std::ios::binary);
      if (!in) {
        std::cerr << "p11kms: keyring import-key: cannot read " << pem_path << std::endl;
        return 1;
      }
      std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
      hsm::SecretString pem(std::move(text));
      OPENSSL_cleanse(text.data(), text.size());
      try {
        auto r = keyring.import_import_key(pem, force);
        std::cerr << "imported the keyring import key into the token as a non-extractable object; shred " << pem_path
                  << " now (e.g. shred -u " << pem_path << "): the token holds the only copy p11kms needs\n";
        std::cout << r.public_pem;
        return 0;
      } catch (const keys::KeyError& e) {
        std::cerr << "p11kms: keyring import-key: " << e.what() << std::endl;
        return 1;
      }
    }
    auto r = keyring.init_import_key(force);
    std::cerr << (r.created ? (force ? "created a new keyring import key in the token (the previous one is destroyed; "
                                       "exports made for it no longer open)\n"
                                     : "created the keyring import key in the token\n")
                            : "the keyring import key already exists; nothing changed (-force makes a new one)\n");
    std::cout << r.public_pem;
    return 0;
  } catch (const ConfigError&) {
    throw;
  } catch (const std::exception& e) {
    std::cerr << "p11kms: keyring init: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace p11kms::app
