// A throwaway PostgreSQL server for integration tests (scripts/pg-scratch): one per test
// process, started on first use and stopped at exit; each test takes a fresh database.
#pragma once

#include <string>

namespace p11kms::test_support {

class TempPostgres {
 public:
  static TempPostgres& shared();
  // A libpq connection string to a new, empty database on the shared server.
  std::string new_database();
  const std::string& admin_dsn() const { return dsn_; }
  ~TempPostgres();

 private:
  TempPostgres();
  std::string dir_;
  std::string dsn_;
  int next_ = 0;
};

}  // namespace p11kms::test_support
