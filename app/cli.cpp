#include "app/cli.hpp"

#include <openssl/crypto.h>

#include <cstdlib>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "api/api_service.hpp"
#include "app/config.hpp"
#include "app/token_options.hpp"
#include "app/keyring_cli.hpp"
#include "app/store_open.hpp"
#include "audit/audit_log.hpp"
#include "store/metadata_store.hpp"
#include "app/server.hpp"
#include "common/encoding.hpp"
#include "common/log.hpp"
#include "app/hsm_info.hpp"
#include "hsm/token_admin.hpp"

namespace p11kms::app {
namespace {

const char* kUsage = R"(Usage: p11kms <command> [options]

Commands:
  server -config FILE        Run the server from a YAML config file.
  server -dev [options]      Run a development server on a throwaway SoftHSM token:
      -dev-data-dir DIR          token, PINs and SQLite store (default ./var/dev)
      -dev-listen-address ADDR   listen address (default 127.0.0.1:8200)
      -dev-root-token-id ID      root token to accept (default: random, printed)
  server options: -log-level debug|info|warn|error
  token hash                 Read an API token on stdin; print its config line
                             (token_sha256: <hex>).
  hsm info -config FILE      Print the config's PKCS#11 module, its token (label, serial,
                             model), every mechanism with its flags, and which key types and
                             operations p11kms can run in that token (and what each lacks).
  hsm init-token [--module M] [--force]
                             Initialize a PKCS#11 token. Label, SO PIN and user PIN come
                             from P11KMS_TOKEN_LABEL (default p11kms), P11KMS_SO_PIN or
                             P11KMS_SO_PIN_FILE, P11KMS_USER_PIN or P11KMS_USER_PIN_FILE;
                             never from the command line.
  audit verify -config FILE AUDITFILE...
                             Check audit files (any order, rotated ones included) against
                             the token's audit key and the store's chain head; names the first
                             edited, inserted, dropped or reordered line as FILE:LINE.
                             Exit 0 intact, 1 tampered, 2 usage or config error.
  store copy -from CONFIG_A -to CONFIG_B [-force]
                             Copy all metadata from A's store to B's (SQLite <-> PostgreSQL),
                             then check the counts. B must be empty unless -force, which
                             replaces B's metadata. Both configs must name the same token:
                             token objects are not touched.
  keyring init -config FILE [-force]
                             Make the token's keyring import key (an RSA key pair, once;
                             -force: a new one) and print its public key PEM for the
                             exporting instance's keyring.recipient_public_key_file.
  keyring import-key -config FILE PEM [-force]
                             The same from an RSA private key PEM file (put into the token
                             as a non-extractable object; shred the file afterwards).
  docs routes                Print the HTTP route reference (Markdown) generated from the
                             route declarations (docs/api/routes.md).
  version                    Print the version.
  help                       Print this help.
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Go-style flags (as Vault's CLI): -name value, -name=value, --name, booleans without value.
std::map<std::string, std::string> parse_flags(const std::vector<std::string>& args,
                                               const std::map<std::string, bool>& known /* name -> takes value */) {
  std::map<std::string, std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    std::string a = args[i];
    if (a.size() < 2 || a[0] != '-') throw UsageError("unexpected argument \"" + a + "\"");
    a = a.substr(a[1] == '-' ? 2 : 1);
    std::optional<std::string> value;
    if (auto eq = a.find('='); eq != std::string::npos) {
      value = a.substr(eq + 1);
      a = a.substr(0, eq);
    }
    auto it = known.find(a);
    if (it == known.end()) throw UsageError("flag provided but not defined: -" + a);
    if (it->second) {
      if (!value) {
        if (i + 1 >= args.size()) throw UsageError("flag needs an argument: -" + a);
        value = args[++i];
      }
      out[a] = *value;
    } else {
      if (value && *value != "true" && *value != "false") throw UsageError("flag -" + a + " takes no value");
      out[a] = value.value_or("true");
    }
  }
  return out;
}

std::optional<hsm::SecretString> secret_from_env(const char* var, const char* file_var) {
  if (const char* v = std::getenv(var); v && *v) return hsm::SecretString(v);
  if (const char* f = std::getenv(file_var); f && *f) return read_secret_file(f);
  return std::nullopt;
}

int cmd_server(const std::vector<std::string>& args) {
  auto flags = parse_flags(args, {{"config", true},
                                  {"dev", false},
                                  {"dev-data-dir", true},
                                  {"dev-listen-address", true},
                                  {"dev-root-token-id", true},
                                  {"log-level", true}});
  if (flags.count("log-level")) {
    const auto& l = flags["log-level"];
    if (l == "debug") log::set_level(log::Level::debug);
    else if (l == "info") log::set_level(log::Level::info);
    else if (l == "warn") log::set_level(log::Level::warn);
    else if (l == "error") log::set_level(log::Level::error);
    else throw UsageError("-log-level must be debug, info, warn or error");
  }
  bool dev = flags.count("dev") && flags["dev"] == "true";
  if (dev && flags.count("config")) throw UsageError("-dev and -config cannot be combined");
  if (!dev) {
    for (const char* f : {"dev-data-dir", "dev-listen-address", "dev-root-token-id"})
      if (flags.count(f)) throw UsageError(std::string("-") + f + " needs -dev");
    if (!flags.count("config")) throw UsageError("server needs -config FILE or -dev");
    Config config = load_config_file(flags["config"]);
    return run_server(config, "");
  }
  DevOptions o;
  if (flags.count("dev-data-dir")) o.data_dir = flags["dev-data-dir"];
  if (flags.count("dev-listen-address")) o.listen_address = flags["dev-listen-address"];
  if (flags.count("dev-root-token-id")) o.root_token = flags["dev-root-token-id"];
  Config config = prepare_dev(o);
  std::string banner =
      "WARNING! dev mode is enabled: a throwaway SoftHSM token and SQLite store in " + o.data_dir + ".\n\n"
      "You may need to set the following environment variables:\n\n"
      "    export VAULT_ADDR='http://" + o.listen_address + "'\n"
      "    export VAULT_TOKEN='" + o.root_token + "'\n\n"
      "Root Token: " + o.root_token + "\n"
      "Token config: SOFTHSM2_CONF=" + std::string(std::getenv("SOFTHSM2_CONF")) +
      " (user PIN in " + config.hsm.pin_file + ")\n\n";
  return run_server(config, banner);
}

int cmd_token(const std::vector<std::string>& args) {
  if (args.size() != 1 || args[0] != "hash") throw UsageError("usage: p11kms token hash < token-file");
  std::string token((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
  if (!token.empty() && token.back() == '\n') token.pop_back();
  if (token.empty()) {
    std::cerr << "p11kms: no token on stdin" << std::endl;
    return 2;
  }
  auto h = policy::sha256_of(token);
  OPENSSL_cleanse(token.data(), token.size());
  std::cout << "token_sha256: " << encoding::hex_encode(h.data(), h.size()) << std::endl;
  return 0;
}

std::string rule_line(const policy::PathRule& rule) {
  std::string caps;
  for (auto c : {policy::kCreate, policy::kRead, policy::kUpdate, policy::kDelete, policy::kList, policy::kSudo,
                 policy::kDeny})
    if (rule.capabilities & c) caps += (caps.empty() ? "" : ", ") + std::string(policy::capability_name(c));
  return "  - path: " + rule.path + "\n    capabilities: [" + caps + "]\n";
}

int cmd_docs(const std::vector<std::string>& args) {
  if (args.size() != 1 || (args[0] != "routes" && args[0] != "policy"))
    throw UsageError("usage: p11kms docs routes|policy");
  auto vault = api::vault_dialect(P11KMS_VERSION);
  auto kms = api::kms_dialect();
  auto byok = api::byok_dialect();
  auto keyring = api::keyring_dialect();
  auto kong_keys = api::kong_keys_dialect();
  auto kong_sets = api::kong_key_sets_dialect(true);
  if (args[0] == "policy") {
    std::cout << "# Policy paths and capabilities\n\n"
              << "Generated by `p11kms docs policy` from the route declarations in api/ and the built-in\n"
              << "policies in policy/; a test checks that this file matches them.\n\n"
              << "A request is allowed when the token's policies grant the route's capability on the\n"
              << "request's own path (the URL path after `/v1/`, with the key's name in place of `<name>`).\n"
              << "Semantics are Vault's: a rule path ending in `*` matches by prefix, `+` matches exactly\n"
              << "one segment; rules for the same path in a token's policies are merged; the most specific\n"
              << "matching path decides (an exact path beats a wildcard, a later first wildcard beats an\n"
              << "earlier one, no trailing `*` beats one, fewer `+` beat more, longer beats shorter); `deny`\n"
              << "on it refuses everything. `LIST transit/keys` and `GET transit/keys?list=true` are both\n"
              << "`list` on `transit/keys`. An encrypt that would create its key (Vault's upsert) also needs\n"
              << "`create` on `transit/encrypt/<name>`. Refusals are 403 `permission denied`, before any key\n"
              << "is looked up, so they never tell whether a key exists.\n\n"
              << "## Routes\n\n"
              << "### Vault dialect (`/v1/`)\n\n"
              << api::render_policy_table(vault)
              << "\n### KMS dialect (`/kms/api/v2/`)\n\n"
              << "The policy path is `kms/` followed by the path after `/kms/api/v2/`, with the key's id or\n"
              << "name as given in the URL, and `/<action>` for `?action=` routes.\n\n"
              << api::render_policy_table(kms)
              << "\n### BYOK dialect (`/byok/v1/`)\n\n"
              << "The policy path is `byok/keys` for the collection (create, list) and `byok/keys/<id>` for one\n"
              << "registered key (read, update, delete).\n\n"
              << api::render_policy_table(byok)
              << "\n### Keyring dialect (`/keyring`)\n\n"
              << "The policy path is `keyring` for the keyring itself and `keyring/<operation>` for the others;\n"
              << "export needs `sudo`.\n\n"
              << api::render_policy_table(keyring)
              << "\n### Keys and key sets (`/keys`, `/key-sets`)\n\n"
              << "The policy path is the URL path without its leading `/`, with the key's or set's id or name\n"
              << "as given in the URL: `keys/<id>`, `keys/<id>/sign`, `key-sets/<id>/jwks`. The JWK Set needs\n"
              << "no token while `jwks.public` is true (the default).\n\n"
              << api::render_policy_table(kong_keys) << api::render_policy_table(kong_sets)
              << "\n## Built-in policies\n\n";
    for (const auto& [name, p] : policy::builtin_policies()) {
      std::cout << "`" << name << "`:\n\n```yaml\n";
      for (const auto& rule : p.rules) std::cout << rule_line(rule);
      std::cout << "```\n\n";
    }
    return 0;
  }
  std::cout << "# HTTP routes\n\n"
            << "Generated by `p11kms docs routes` from the route declarations in api/; a test checks\n"
            << "that this file matches them. Behaviour and errors: transit.md.\n\n"
            << "## Transit\n\n"
            << api::render_route_docs(vault, "transit/")
            << "## System\n\n"
            << api::render_route_docs(vault, "sys/")
            << api::render_route_docs(vault, "auth/")
            << "## KMS (Key Protect style)\n\n"
            << "Behaviour, errors and curl examples: kms.md.\n\n"
            << api::render_route_docs(kms, "keys")
            << "## BYOK (Confluent style)\n\n"
            << "Behaviour, errors and curl examples: byok.md.\n\n"
            << api::render_route_docs(byok, "keys")
            << "## Keyring (Kong style)\n\n"
            << "Behaviour, errors, export format and curl examples: keyring.md.\n\n"
            << api::render_route_docs(keyring, "")
            << "## Keys and key sets (Kong style)\n\n"
            << "Behaviour, errors, JWKS, JWS, JWE and curl examples: kong.md.\n\n"
            << api::render_route_docs(kong_keys, "") << api::render_route_docs(kong_sets, "");
  return 0;
}

int cmd_store(const std::vector<std::string>& args) {
  if (args.empty() || args[0] != "copy") throw UsageError("usage: p11kms store copy -from CONFIG_A -to CONFIG_B [-force]");
  std::string from, to;
  bool force = false;
  for (size_t i = 1; i < args.size(); ++i) {
    std::string a = args[i];
    if (a == "-force" || a == "--force") {
      force = true;
    } else if ((a == "-from" || a == "--from" || a == "-to" || a == "--to") && i + 1 < args.size()) {
      (a.find("from") != std::string::npos ? from : to) = args[++i];
    } else {
      throw UsageError("store copy: unexpected argument " + a);
    }
  }
  if (from.empty() || to.empty()) throw UsageError("usage: p11kms store copy -from CONFIG_A -to CONFIG_B [-force]");
  Config a = load_config_file(from), b = load_config_file(to);
  if (a.hsm.token_label != b.hsm.token_label)
    throw ConfigError("store copy: the configs name different tokens ('" + a.hsm.token_label + "' and '" +
                      b.hsm.token_label + "'); the metadata refers to objects on one token, which copy does not move");
  auto source = open_store(a.store);
  auto target = open_store(b.store);
  auto snap = source->snapshot();
  try {
    target->restore(snap, force);
  } catch (const store::ConflictError&) {
    std::cerr << "p11kms: store copy: the target store (" << describe_store(b.store)
              << ") is not empty; use -force to replace its metadata" << std::endl;
    return 1;
  }
  auto check = target->snapshot();
  struct Count {
    const char* what;
    size_t from, to;
  } counts[] = {{"keys", snap.keys.size(), check.keys.size()},
                {"key versions", snap.version_count(), check.version_count()},
                {"intents", snap.intents.size(), check.intents.size()},
                {"settings", snap.settings.size(), check.settings.size()},
                {"byok keys", snap.byok_keys.size(), check.byok_keys.size()}};
  bool same = true;
  for (const auto& c : counts) {
    std::cout << c.what << ": " << c.from << " copied, " << c.to << " in the target\n";
    same = same && c.from == c.to;
  }
  if (!same) {
    std::cerr << "p11kms: store copy: counts differ after the copy" << std::endl;
    return 1;
  }
  std::cout << "copied " << describe_store(a.store) << " -> " << describe_store(b.store) << std::endl;
  return 0;
}

int cmd_audit(const std::vector<std::string>& args) {
  if (args.empty() || args[0] != "verify") throw UsageError("usage: p11kms audit verify -config FILE AUDITFILE...");
  std::string config_path;
  std::vector<std::string> files;
  for (size_t i = 1; i < args.size(); ++i) {
    std::string a = args[i];
    if (a == "-config" || a == "--config") {
      if (i + 1 >= args.size()) throw UsageError("flag needs an argument: -config");
      config_path = args[++i];
    } else if (a.rfind("-config=", 0) == 0 || a.rfind("--config=", 0) == 0) {
      config_path = a.substr(a.find('=') + 1);
    } else if (!a.empty() && a[0] == '-') {
      throw UsageError("flag provided but not defined: " + a);
    } else {
      files.push_back(a);
    }
  }
  if (config_path.empty()) throw UsageError("audit verify needs -config FILE");
  if (files.empty()) throw UsageError("audit verify needs at least one audit file");
  Config config = load_config_file(config_path);
  try {
    auto store = open_store(config.store);
    hsm::PoolConfig pc;
    pc.module = config.hsm.module;
    pc.token_label = config.hsm.token_label;
    pc.user_pin = read_pin(config.hsm);
    pc.sessions = 1;
    hsm::SessionPool pool(std::move(pc));
    hsm::Token token(pool, token_options(config.hsm, pool));
    auto result = audit::verify_audit_files(files, token, *store, config.audit.chain);
    if (result.intact) {
      std::cout << "intact: " << result.lines << " lines" << std::endl;
      return 0;
    }
    std::cout << "tampered: " << result.problem << std::endl;
    return 1;
  } catch (const ConfigError&) {
    throw;
  } catch (const std::exception& e) {
    std::cerr << "p11kms: audit verify: " << e.what() << std::endl;
    return 2;
  }
}

int cmd_hsm(const std::vector<std::string>& args) {
  if (!args.empty() && args[0] == "info") {
    auto flags = parse_flags({args.begin() + 1, args.end()}, {{"config", true}});
    if (!flags.count("config")) throw UsageError("usage: p11kms hsm info -config FILE");
    return run_hsm_info(load_config_file(flags["config"]));
  }
  if (args.empty() || args[0] != "init-token")
    throw UsageError("usage: p11kms hsm info -config FILE | hsm init-token [--module M] [--force]");
  auto flags = parse_flags({args.begin() + 1, args.end()}, {{"module", true}, {"force", false}});
  hsm::InitTokenRequest r;
  r.module = flags.count("module") ? flags["module"] : "/usr/lib/softhsm/libsofthsm2.so";
  r.force = flags.count("force") && flags["force"] == "true";
  const char* label = std::getenv("P11KMS_TOKEN_LABEL");
  r.label = label && *label ? label : "p11kms";
  auto so = secret_from_env("P11KMS_SO_PIN", "P11KMS_SO_PIN_FILE");
  auto user = secret_from_env("P11KMS_USER_PIN", "P11KMS_USER_PIN_FILE");
  if (!so) throw UsageError("no SO PIN: set P11KMS_SO_PIN or P11KMS_SO_PIN_FILE");
  if (!user) throw UsageError("no user PIN: set P11KMS_USER_PIN or P11KMS_USER_PIN_FILE");
  r.so_pin = *so;
  r.user_pin = *user;
  try {
    switch (hsm::init_token(r)) {
      case hsm::InitResult::initialized:
        std::cout << "initialized token '" << r.label << "'" << std::endl;
        break;
      case hsm::InitResult::reinitialized:
        std::cout << "re-initialized token '" << r.label << "' (all its objects are gone)" << std::endl;
        break;
      case hsm::InitResult::already_initialized:
        std::cout << "token '" << r.label
                  << "' is already initialized; nothing changed (use --force to re-initialize)" << std::endl;
        break;
    }
  } catch (const std::exception& e) {
    std::cerr << "p11kms: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}

}  // namespace

int run_cli(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  try {
    if (args.empty()) {
      std::cerr << kUsage;
      return 2;
    }
    std::string cmd = args[0];
    std::vector<std::string> rest(args.begin() + 1, args.end());
    if (cmd == "version" || cmd == "-version" || cmd == "--version") {
      std::cout << "p11kms " << P11KMS_VERSION << std::endl;
      return 0;
    }
    if (cmd == "help" || cmd == "-h" || cmd == "-help" || cmd == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (cmd == "server") return cmd_server(rest);
    if (cmd == "token") return cmd_token(rest);
    if (cmd == "hsm") return cmd_hsm(rest);
    if (cmd == "docs") return cmd_docs(rest);
    if (cmd == "audit") return cmd_audit(rest);
    if (cmd == "store") return cmd_store(rest);
    if (cmd == "keyring") return cmd_keyring(rest);
    throw UsageError("unknown command \"" + cmd + "\"");
  } catch (const UsageError& e) {
    std::cerr << "p11kms: " << e.what() << "\n\n" << kUsage;
    return 2;
  } catch (const ConfigError& e) {
    std::cerr << "p11kms: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "p11kms: " << e.what() << std::endl;
    return 1;
  }
}

}  // namespace p11kms::app
