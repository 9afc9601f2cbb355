#include "app/server.hpp"
#include "app/store_open.hpp"
#include "app/token_options.hpp"
#include "app/vault_kv.hpp"

#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <thread>

#include "api/api_service.hpp"
#include "audit/audit_log.hpp"
#include "common/log.hpp"
#include "hsm/token.hpp"
#include "keys/byok_registry.hpp"
#include "keys/keyring.hpp"
#include "keys/kong_keys.hpp"
#include "keys/key_service.hpp"
#include "keys/periodic_job.hpp"
#include "keys/rotation_worker.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::app {

namespace {

std::string read_text_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// SIGHUP: tokens and policies are re-read from the config file and swapped in as one snapshot;
// a file that no longer parses leaves the running rules untouched. Settings that need a restart
// (listener, token, store, limits) are reported, not half-applied.
void reload_access(const Config& running, policy::AccessControl& access) {
  if (running.source_file.empty()) {
    log::info("SIGHUP: dev mode has no config file to reload");
    return;
  }
  try {
    Config next = load_config_file(running.source_file);
    access.replace(std::make_shared<policy::AccessRules>(next.tokens, next.policies));
    log::info("SIGHUP: reloaded " + std::to_string(next.tokens.size()) + " tokens and " +
              std::to_string(next.policies.size()) + " policies from " + running.source_file);
    if (next.listen_address != running.listen_address || next.http_threads != running.http_threads ||
        next.http_handler_threads != running.http_handler_threads || next.hsm.module != running.hsm.module ||
        next.hsm.token_label != running.hsm.token_label || next.store.path != running.store.path ||
        next.store.dsn != running.store.dsn)
      log::warn("SIGHUP: listen, hsm and store settings changed in the file; they take effect at restart");
  } catch (const std::exception& e) {
    log::error(std::string("SIGHUP: config not reloaded, the running rules stay: ") + e.what());
  }
}

}  // namespace

int run_server(const Config& config, const std::string& banner) {
  // Block the signals before any thread starts, so only sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGHUP);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  ::signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<store::MetadataStore> store;
  std::unique_ptr<hsm::SessionPool> pool;
  try {
    store = open_store(config.store);
    hsm::PoolConfig pc;
    pc.module = config.hsm.module;
    pc.token_label = config.hsm.token_label;
    pc.user_pin = read_pin(config.hsm);
    pc.sessions = config.hsm.sessions;
    pool = std::make_unique<hsm::SessionPool>(std::move(pc));
  } catch (const ConfigError&) {
    throw;
  } catch (const std::exception& e) {
    std::cerr << "p11kms: cannot start: " << e.what() << std::endl;
    return 1;
  }
  hsm::Token token(*pool, token_options(config.hsm, *pool));
  keys::ServiceLimits kl;
  kl.max_key_name_length = config.max_key_name_length;
  const bool shared_store = config.store.driver == "postgres";
  // A shared store: cached metadata is checked against the store's per-key stamp before use,
  // and evicted by PostgreSQL notifications.
  kl.cache_metadata = true;
  kl.check_cached_versions = shared_store;
  kl.cluster.shared_store = shared_store;
  kl.cluster.intent_lease_s = config.cluster.intent_lease_s;
  kl.cluster.heartbeat_s = config.cluster.heartbeat_s;
  keys::KeyService keys(*store, token, kl);
  try {
    // Alive first, so other instances' sweepers leave this one's intents alone; then the
    // start-up sweep (another live instance's intents are left to their leases).
    keys.heartbeat();
    auto report = keys.sweep();
    log::info("start-up sweep: " + std::to_string(report.intents_settled) + " intents settled, " +
              std::to_string(report.orphans_destroyed) + " orphan objects destroyed, " +
              std::to_string(report.missing.size()) + " versions missing their object, " +
              std::to_string(report.unknown_objects) + " unknown objects, " +
              std::to_string(report.intents_waiting) + " intents left to their owners (instance " +
              keys.instance_id() + ")");
  } catch (const std::exception& e) {
    std::cerr << "p11kms: start-up sweep failed: " << e.what() << std::endl;
    return 1;
  }

  policy::AccessControl access(std::make_shared<policy::AccessRules>(config.tokens, config.policies));
  api::ApiLimits limits = config.limits;
  if (config.source_file.empty()) limits.min_auto_rotate_period_s = 10;  // dev mode: rotation can be watched
  api::ApiService service(keys, access, limits, P11KMS_VERSION);
  keys::MountRegistry mounts(*store, keys);
  service.set_mounts(&mounts);
  keys::ByokRegistry byok(*store, keys, token, config.byok);
  service.set_byok(&byok);
  keys::KeyringOptions keyring_options;
  if (!config.keyring.recipient_public_key_file.empty()) {
    try {
      keyring_options.recipient_public_key_pem = read_text_file(config.keyring.recipient_public_key_file);
    } catch (const std::exception& e) {
      std::cerr << "p11kms: cannot start: keyring.recipient_public_key_file: " << e.what() << std::endl;
      return 1;
    }
  }
  if (config.keyring.strategy == "vault") {
    // The Vault token comes from its file into a wiping buffer; it is never logged.
    const auto& kv = config.keyring.vault;
    VaultKvOptions vo;
    vo.address = kv.address;
    vo.mount = kv.mount;
    vo.path = kv.path;
    try {
      vo.token = read_secret_file(kv.token_file);
    } catch (const ConfigError& e) {
      throw ConfigError(std::string("config: keyring.vault.token_file: ") + e.what());
    }
    if (vo.token.empty()) throw ConfigError("config: keyring.vault.token_file: " + kv.token_file + " is empty");
    if (!kv.ca_file.empty()) {
      try {
        vo.ca_pem = read_text_file(kv.ca_file);
      } catch (const std::exception& e) {
        std::cerr << "p11kms: cannot start: keyring.vault.ca_file: " << e.what() << std::endl;
        return 1;
      }
    }
    keyring_options.strategy = keys::KeyringStrategy::vault;
    keyring_options.vault_description = describe_vault_secret(kv.address, kv.mount, kv.path);
    keyring_options.vault_source = vault_keyring_source(std::move(vo));
  }
  keys::Keyring keyring(*store, keys, token, keyring_options);
  service.set_keyring(&keyring);
  keys::KongKeys kong(*store, keys, token);
  service.set_kong(&kong);
  if (keyring.strategy() == keys::KeyringStrategy::vault) {
    // Before the listener starts; a Vault that cannot be read does not stop the server: the
    // keyring stays as stored (empty on a first start) until POST /keyring/vault/sync succeeds.
    try {
      keyring.sync(keys::Keyring::kVaultNamespace);
    } catch (const std::exception& e) {
      auto v = keyring.view(keys::Keyring::kVaultNamespace);
      log::warn(std::string("keyring: start-up sync from Vault failed, the keyring stays as stored (") +
                std::to_string(v.ids.size()) + " keys); retry with POST /keyring/vault/sync: " + e.what());
    }
  }
  std::unique_ptr<audit::AuditLog> audit_log;
  if (!config.audit.path.empty()) {
    try {
      audit_log = std::make_unique<audit::AuditLog>(
          audit::AuditOptions{config.audit.path, config.audit.chain, config.audit.fail_closed, config.audit.max_bytes,
                              keys.instance_id(), 3 * static_cast<int64_t>(config.cluster.heartbeat_s)},
          token, *store);
    } catch (const std::exception& e) {
      std::cerr << "p11kms: cannot start: audit log: " << e.what() << std::endl;
      return 1;
    }
    service.set_audit(audit_log.get());
    log::info("audit log: " + config.audit.path + (config.audit.fail_closed ? " (fail closed)" : " (fail open)"));
  }
  api::http::ServerOptions so;
  so.address = config.listen_address;
  so.max_body_bytes = config.limits.max_body_bytes;
  so.max_header_bytes = config.limits.max_header_bytes;
  so.read_timeout_s = config.read_timeout_s;
  // One thread per core by default: SoftHSM work is CPU-bound and serialized per process, and
  // measured on 2 cores, 40 threads served a third of what 2 did at c16 (docs/PERFORMANCE.md).
  so.threads = config.http_threads ? config.http_threads
                                   : std::max<size_t>(2, std::thread::hardware_concurrency());
  // As many handler threads as listener threads: under load the listener threads then only read
  // and write while as many handlers run as there are cores (docs/PERFORMANCE.md section 15).
  so.handler_threads = config.http_handler_threads.value_or(so.threads);
  if (!config.tls.cert_file.empty()) {
    try {
      api::http::TlsOptions tls;
      tls.cert_pem = read_text_file(config.tls.cert_file);
      tls.key_pem = read_text_file(config.tls.key_file);
      if (!config.tls.client_ca_file.empty()) tls.client_ca_pem = read_text_file(config.tls.client_ca_file);
      so.tls = std::move(tls);
    } catch (const std::exception& e) {
      std::cerr << "p11kms: cannot start: " << e.what() << std::endl;
      return 1;
    }
  }
  std::unique_ptr<api::http::Server> server;
  try {
    server = api::http::start_server(so, [&service](const api::http::Request& r) { return service.handle(r); });
  } catch (const std::exception& e) {
    std::cerr << "p11kms: " << e.what() << std::endl;
    return 1;
  }
  std::cout << banner << "==> p11kms server started! Log data will stream in below:" << std::endl;
  log::info("listening on " + config.listen_address + " (token '" + config.hsm.token_label + "', store " +
            describe_store(config.store) + ")");

  // Due rotations are found within a second in dev mode (short periods can be watched there),
  // within 30 s otherwise.
  // Background jobs run on one instance at a time: each holds its job's lease under the
  // instance id, renewed with the heartbeat, and loses it after three missed heartbeats.
  const int64_t job_lease_s = 3 * static_cast<int64_t>(config.cluster.heartbeat_s);
  keys::RotationWorker rotation(keys, *store, config.source_file.empty() ? std::chrono::seconds(1) : std::chrono::seconds(30),
                                keys.instance_id(), job_lease_s);
  // BYOK: every P11kmsKey is validated in the token each byok.validation_interval.
  keys::ByokValidationWorker byok_validation(byok, *store, std::chrono::seconds(config.byok.validation_interval_s),
                                             keys.instance_id(), job_lease_s);
  // Scale-out: heartbeats (which renew the leases of intents in flight) and the sweeper.
  auto heartbeat = std::make_unique<keys::PeriodicJob>(std::chrono::seconds(config.cluster.heartbeat_s), [&keys, &audit_log, &rotation, &byok_validation] {
    try {
      keys.heartbeat();
      rotation.renew_lease();
      byok_validation.renew_lease();
      if (audit_log) audit_log->renew_chain();
    } catch (const std::exception& e) {
      log::warn(std::string("heartbeat: ") + e.what());
    }
  });
  auto sweeper = std::make_unique<keys::PeriodicJob>(std::chrono::seconds(config.cluster.sweep_interval_s), [&keys] {
    try {
      auto r = keys.sweep();
      if (r.intents_settled || r.orphans_destroyed || !r.missing.empty())
        log::info("sweep: " + std::to_string(r.intents_settled) + " intents settled, " +
                  std::to_string(r.orphans_destroyed) + " orphan objects destroyed, " +
                  std::to_string(r.missing.size()) + " versions missing their object");
    } catch (const std::exception& e) {
      log::warn(std::string("sweep: ") + e.what());
    }
  });

  for (;;) {
    int sig = 0;
    sigwait(&signals, &sig);
    if (sig == SIGHUP) {
      reload_access(config, access);
      continue;
    }
    log::info(std::string("shutting down on ") + (sig == SIGINT ? "SIGINT" : "SIGTERM"));
    break;
  }
  server->stop();
  // Requests already inside the service finish before the pool and store they use are torn
  // down (a sanitized run under load caught a use-after-free here).
  if (!service.drain(std::chrono::seconds(10)))
    log::warn("shutdown: requests still running after 10 s; exiting anyway");
  sweeper.reset();
  heartbeat.reset();  // stopped first, so the row removed below stays removed
  keys.retire();
  log::flush();
  return 0;
}

}  // namespace p11kms::app
