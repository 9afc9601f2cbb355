// Vault's sys and auth routes that clients call around transit: health (no token) and
// token lookup-self (what hvac's is_authenticated() asks).
#include <chrono>
#include <ctime>

#include "api/api_service.hpp"
#include "keys/mount_registry.hpp"
#include "common/time.hpp"

namespace p11kms::api {
namespace {

keys::MountRegistry& mounts_of(const Context& ctx) {
  if (!ctx.mounts) throw keys::KeyError(keys::ErrorKind::not_implemented, "not_implemented", "mounts are not enabled");
  return *ctx.mounts;
}

// A mount as Vault's sys/mounts shows it.
json mount_entry(const keys::Mount& m) {
  return json{{"type", m.type},
              {"description", m.description},
              {"accessor", m.accessor},
              {"uuid", m.uuid},
              {"config", {{"default_lease_ttl", 0}, {"max_lease_ttl", 0}, {"force_no_cache", false}}},
              {"options", nullptr},
              {"local", false},
              {"seal_wrap", false},
              {"external_entropy_access", false},
              {"plugin_version", ""},
              {"running_plugin_version", ""},
              {"running_sha256", ""}};
}

// Vault answers sys/mounts with the mounts both under "data" and at the top level (older
// clients read the latter).
Reply vault_raw(const Context& ctx, const json& data) {
  json body = data;
  body["request_id"] = ctx.request_id;
  body["lease_id"] = "";
  body["renewable"] = false;
  body["lease_duration"] = 0;
  body["data"] = data;
  body["wrap_info"] = nullptr;
  body["warnings"] = nullptr;
  body["auth"] = nullptr;
  return Reply{200, body, {}, true};
}

void add_mount_routes(Router& router) {
  const Field path{"path", FieldType::string, "Where the engine is mounted, e.g. payments (1 to 64 of [A-Za-z0-9._-])."};
  router.add({"GET", "sys/mounts", {}, "The namespace's secrets engines: transit/ always, then the mounted ones.",
              [](Context& ctx) {
                json data = json::object();
                for (const auto& m : mounts_of(ctx).list(ctx.tenant)) data[m.path + "/"] = mount_entry(m);
                data["sys/"] = json{{"type", "system"}, {"description", "system endpoints"}, {"accessor", "system"},
                                    {"uuid", ""}, {"config", json::object()}, {"options", nullptr},
                                    {"local", false}, {"seal_wrap", true}, {"external_entropy_access", false}};
                return vault_raw(ctx, data);
              },
              policy::kRead});
  router.add({"POST", "sys/mounts/:path",
              {path,
               {"type", FieldType::string, "Engine type: only transit."},
               {"description", FieldType::string, "Free text."},
               {"config", FieldType::object, "Accepted and ignored (lease settings do not apply to transit)."},
               {"options", FieldType::object, "Accepted and ignored."},
               {"local", FieldType::boolean, "Accepted and ignored."},
               {"seal_wrap", FieldType::boolean, "Accepted and ignored."},
               {"external_entropy_access", FieldType::boolean, "Accepted and ignored."},
               {"plugin_name", FieldType::string, "Accepted and ignored."}},
              "Mount a transit engine at the path; its keys are separate from every other mount's. 204.",
              [](Context& ctx) {
                if (!ctx.fields.has("type")) throw keys::invalid("type is required: the engine type, \"transit\"");
                mounts_of(ctx).enable(ctx.tenant, ctx.params.at("path"), ctx.fields.get_string("type"),
                                      ctx.fields.get_string("description"));
                return Reply{204};
              },
              policy::kSudo});
  router.add({"GET", "sys/mounts/:path", {path}, "One mounted engine.",
              [](Context& ctx) {
                auto path = keys::MountRegistry::normalize_path(ctx.params.at("path"));
                auto m = mounts_of(ctx).find(ctx.tenant, path);
                if (!m) throw keys::not_found("no secrets engine is mounted at " + path + "/");
                return vault_raw(ctx, mount_entry(*m));
              },
              policy::kRead});
  router.add({"GET", "sys/mounts/:path/tune", {path}, "A mounted engine's tunables (leases do not apply to transit).",
              [](Context& ctx) {
                auto path = keys::MountRegistry::normalize_path(ctx.params.at("path"));
                auto m = mounts_of(ctx).find(ctx.tenant, path);
                if (!m) throw keys::not_found("no secrets engine is mounted at " + path + "/");
                return vault_raw(ctx, json{{"description", m->description},
                                           {"default_lease_ttl", 0},
                                           {"max_lease_ttl", 0},
                                           {"force_no_cache", false}});
              },
              policy::kRead});
  router.add({"DELETE", "sys/mounts/:path", {path},
              "Unmount: destroys every key of the engine and their token objects (refused for transit/). 204.",
              [](Context& ctx) {
                mounts_of(ctx).disable(ctx.tenant, ctx.params.at("path"));
                return Reply{204};
              },
              policy::kSudo});
}

// Vault's token lookup-self, as hvac's is_authenticated() reads it; also the benchmark's floor.
Reply lookup_self(Context& ctx) {
  const auto& t = *ctx.token;
  json data{{"display_name", "token-" + t.name},
            {"policies", t.policies},
            {"namespaces", t.namespaces},
            {"expire_time", t.expires ? json(timefmt::format_rfc3339(*t.expires)) : json(nullptr)},
            {"meta", nullptr},
            {"num_uses", 0},
            {"orphan", true},
            {"renewable", false},
            {"ttl", 0},
            {"type", "service"},
            {"path", "auth/token/root"}};
  return Reply{200, data};
}

}  // namespace

void add_sys_routes(Router& router, const std::string& version) {
  Route health{"GET", "sys/health", {}, "Health in Vault's shape plus the token's state; no token needed.",
               [version](Context& ctx) {
                 auto h = ctx.keys->health();
                 auto now = std::chrono::duration_cast<std::chrono::seconds>(
                                std::chrono::system_clock::now().time_since_epoch()).count();
                 json missing = json::array();
                 for (const auto& m : h.missing_objects)
                   missing.push_back({{"namespace", m.ns}, {"key", m.name}, {"version", m.version}});
                 json hsm{{"token_label", h.token.token_label},
                          {"reachable", h.token.reachable},
                          {"sessions_total", h.token.sessions_total},
                          {"sessions_in_use", h.token.sessions_in_use}};
                 if (!h.token.reachable) hsm["error"] = h.token.last_error;
                 // What the module cannot do (read at connect and on every reconnect): requests
                 // that need one of these get a 400 naming the missing mechanism.
                 json unavailable = json::array(), missing_mechs = json::object();
                 for (const auto& [op, mechs] : h.unavailable_operations) {
                   unavailable.push_back(op);
                   missing_mechs[op] = mechs;
                 }
                 hsm["unavailable_operations"] = unavailable;
                 hsm["missing_mechanisms"] = missing_mechs;
                 json body{{"initialized", true},
                           {"sealed", !h.token.reachable},
                           {"standby", false},
                           {"performance_standby", false},
                           {"replication_performance_mode", "disabled"},
                           {"replication_dr_mode", "disabled"},
                           {"server_time_utc", now},
                           {"version", version},
                           {"cluster_name", "p11kms"},
                           {"hsm", hsm},
                           {"store", {{"reachable", h.store_reachable}, {"missing_objects", missing}}}};
                 if (!h.store_reachable) body["store"]["error"] = h.store_error;
                 // Vault answers 503 while sealed; here "sealed" means the token does not answer.
                 return Reply{h.token.reachable && h.store_reachable ? 200 : 503, body, {}, true};
               }};
  health.authenticated = false;
  router.add(health);

  router.add({"GET", "auth/token/lookup-self", {}, "Describe the calling token (never the token itself).",
              lookup_self, 0});
#ifdef P11KMS_BENCH_ROUTES
  // Compiled in only by scripts/bench's build (-DP11KMS_BENCH=ON), never in a release or test
  // build: the floor's work (lookup-self, the same answer) plus the token's signature as the
  // token benchmark makes R's, nothing else. The roofline assumes such a service reaches
  // 1/(1/R + 1/F); this route measures what it reaches (docs/PERFORMANCE.md, section 20).
  router.add({"GET", "sys/bench/floor-sign/:name", {}, "Benchmark only: lookup-self plus one token signature.",
              [](Context& ctx) {
                ctx.keys->sign_as_token_benchmark(keys::KeyRef{ctx.ns, ctx.params.at("name")});
                return lookup_self(ctx);
              },
              0});
#endif
  add_mount_routes(router);
}

}  // namespace p11kms::api
