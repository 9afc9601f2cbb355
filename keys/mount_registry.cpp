#include "keys/mount_registry.hpp"

#include <nlohmann/json.hpp>

#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/time.hpp"
#include "common/uuid.hpp"

namespace p11kms::keys {
namespace {

using json = nlohmann::json;

bool is_reserved(const std::string& path) {
  for (const char* r : {"sys", "auth", "identity", "cubbyhole"})
    if (path == r) return true;
  return false;
}

// A stable id derived from the namespace, so transit/ looks the same on every instance.
std::string default_uuid(const std::string& ns) {
  auto h = encoding::hex_encode(std::vector<uint8_t>(ns.begin(), ns.end()));
  h.resize(32, '0');
  return h.substr(0, 8) + "-" + h.substr(8, 4) + "-" + h.substr(12, 4) + "-" + h.substr(16, 4) + "-" + h.substr(20, 12);
}

}  // namespace

std::string MountRegistry::keyspace(const std::string& ns, const std::string& path) {
  return path == kDefaultPath ? ns : ns + "/" + path;
}

std::string MountRegistry::normalize_path(const std::string& raw) {
  std::string path = raw;
  while (!path.empty() && path.back() == '/') path.pop_back();
  bool ok = !path.empty() && path.size() <= 64;
  for (char c : path)
    ok = ok && ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
                c == '-');
  if (!ok) throw invalid("invalid mount path \"" + raw + "\": 1 to 64 characters of [A-Za-z0-9._-]", "invalid_path");
  return path;
}

std::string MountRegistry::setting_name(const std::string& ns, const std::string& path) {
  return "mounts/" + ns + "/" + path;
}

Mount MountRegistry::default_mount(const std::string& ns) {
  Mount m;
  m.path = kDefaultPath;
  m.description = "transit secrets engine";
  m.uuid = default_uuid(ns);
  m.accessor = "transit_" + m.uuid.substr(0, 8);
  return m;
}

Mount MountRegistry::enable(const std::string& ns, const std::string& raw_path, const std::string& type,
                            const std::string& description) {
  std::string path = normalize_path(raw_path);
  if (type != "transit")
    throw invalid("unsupported secrets engine type \"" + type + "\": p11kms serves only \"transit\"", "invalid_type");
  if (is_reserved(path)) throw invalid("cannot mount at \"" + path + "/\": the path is reserved", "path_in_use");
  if (find(ns, path)) throw invalid("path is already in use at " + path + "/", "path_in_use");
  Mount m;
  m.path = path;
  m.type = type;
  m.description = description;
  m.uuid = uuid::new_v4();
  m.accessor = "transit_" + m.uuid.substr(0, 8);
  m.created_at = timefmt::now_unix();
  json value = {{"type", m.type}, {"description", m.description}, {"uuid", m.uuid}, {"accessor", m.accessor},
                {"created_at", m.created_at}};
  try {
    store_.put_setting(setting_name(ns, path), value.dump());
  } catch (const store::StoreError&) {
    throw unavailable("the metadata store is unavailable");
  }
  log::info("mounts: enabled transit at " + ns + "/" + path + "/");
  return m;
}

std::optional<Mount> MountRegistry::find(const std::string& ns, const std::string& path) {
  if (path == kDefaultPath) return default_mount(ns);
  std::optional<std::string> value;
  try {
    value = store_.get_setting(setting_name(ns, path));
  } catch (const store::StoreError&) {
    throw unavailable("the metadata store is unavailable");
  }
  if (!value) return std::nullopt;
  auto j = json::parse(*value, nullptr, false);
  if (j.is_discarded() || !j.is_object())
    throw KeyError(ErrorKind::internal, "internal", "corrupt mount record for " + path);
  Mount m;
  m.path = path;
  m.type = j.value("type", "transit");
  m.description = j.value("description", "");
  m.uuid = j.value("uuid", "");
  m.accessor = j.value("accessor", "");
  m.created_at = j.value("created_at", int64_t{0});
  return m;
}

std::vector<Mount> MountRegistry::list(const std::string& ns) {
  std::vector<Mount> out{default_mount(ns)};
  std::vector<std::pair<std::string, std::string>> rows;
  try {
    rows = store_.list_settings("mounts/" + ns + "/");
  } catch (const store::StoreError&) {
    throw unavailable("the metadata store is unavailable");
  }
  for (const auto& row : rows) {
    std::string path = row.first.substr(("mounts/" + ns + "/").size());
    if (auto m = find(ns, path)) out.push_back(*m);
  }
  return out;
}

size_t MountRegistry::disable(const std::string& ns, const std::string& raw_path) {
  std::string path = normalize_path(raw_path);
  if (path == kDefaultPath) throw invalid("cannot unmount \"transit/\": it is the built-in transit engine", "protected_mount");
  if (!find(ns, path)) return 0;  // as Vault: disabling what is not mounted succeeds
  // Keys first, then the mount: a crash in between leaves a mount with fewer keys, and running
  // the unmount again finishes it; never keys without a mount that a new mount would inherit.
  std::string space = keyspace(ns, path);
  size_t destroyed = 0;
  for (const auto& name : keys_.list_keys(space)) {
    keys_.delete_key(KeyRef{space, name}, /*require_deletion_allowed=*/false);
    ++destroyed;
  }
  try {
    store_.delete_setting(setting_name(ns, path));
  } catch (const store::StoreError&) {
    throw unavailable("the metadata store is unavailable");
  }
  log::info("mounts: disabled " + ns + "/" + path + "/ and destroyed its " + std::to_string(destroyed) + " keys");
  return destroyed;
}

}  // namespace p11kms::keys
