// Opens the metadata store the configuration names (SQLite file or PostgreSQL).
#pragma once

#include <memory>

#include "app/config.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::app {

// Throws store::StoreError (unreachable database, bad file) or ConfigError (unreadable
// password file) with a clear message that never carries the password.
std::unique_ptr<store::MetadataStore> open_store(const Config::Store& config);
// "sqlite /path/p11kms.db" or "postgres host=... dbname=...", for logs.
std::string describe_store(const Config::Store& config);

}  // namespace p11kms::app
