#include "support/temp_postgres.hpp"

#include <libpq-fe.h>

#include <cstdio>
#include <memory>
#include <stdexcept>

#include "support/temp_token.hpp"

namespace p11kms::test_support {
namespace {

std::string run(const std::string& cmd) {
  std::unique_ptr<FILE, int (*)(FILE*)> pipe(popen(cmd.c_str(), "r"), pclose);
  if (!pipe) throw std::runtime_error("cannot run " + cmd);
  std::string out;
  char buf[256];
  while (fgets(buf, sizeof buf, pipe.get())) out += buf;
  while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
  return out;
}

std::string script() { return std::string(P11KMS_SOURCE_DIR) + "/scripts/pg-scratch"; }

}  // namespace

TempPostgres& TempPostgres::shared() {
  static TempPostgres instance;
  return instance;
}

TempPostgres::TempPostgres() {
  dir_ = make_temp_dir("p11kms-pg");
  dsn_ = run(script() + " start '" + dir_ + "/pg'");
  if (dsn_.find("host=") != 0) throw std::runtime_error("scripts/pg-scratch did not start PostgreSQL in " + dir_);
}

TempPostgres::~TempPostgres() {
  run(script() + " stop '" + dir_ + "/pg'");
  remove_tree(dir_);
}

std::string TempPostgres::new_database() {
  std::string name = "t" + std::to_string(++next_);
  PGconn* c = PQconnectdb(dsn_.c_str());
  if (PQstatus(c) != CONNECTION_OK) {
    std::string msg = PQerrorMessage(c);
    PQfinish(c);
    throw std::runtime_error("cannot connect to the test PostgreSQL: " + msg);
  }
  PGresult* r = PQexec(c, ("CREATE DATABASE " + name).c_str());
  bool ok = PQresultStatus(r) == PGRES_COMMAND_OK;
  std::string msg = PQresultErrorMessage(r);
  PQclear(r);
  PQfinish(c);
  if (!ok) throw std::runtime_error("CREATE DATABASE failed: " + msg);
  std::string dsn = dsn_;
  dsn.replace(dsn.find("dbname=postgres"), std::string("dbname=postgres").size(), "dbname=" + name);
  return dsn;
}

}  // namespace p11kms::test_support
