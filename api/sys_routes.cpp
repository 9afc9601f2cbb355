// Vault's sys and auth routes that clients call around transit: health (no token) and
// token lookup-self (what hvac's is_authenticated() asks).
#include <chrono>
#include <ctime>

#include "api/api_service.hpp"
#include "common/time.hpp"

namespace p11kms::api {
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
                           {"store", {{"missing_objects", missing}}}};
                 // Vault answers 503 while sealed; here "sealed" means the token does not answer.
                 return Reply{h.token.reachable ? 200 : 503, body, {}, true};
               }};
  health.authenticated = false;
  router.add(health);

  router.add({"GET", "auth/token/lookup-self", {}, "Describe the calling token (never the token itself).",
              [](Context& ctx) {
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
              },
              0});
}

}  // namespace p11kms::api
