// The audit log: one JSON line per request, append-only and tamper-evident. Each line carries
// `seq`, `prev` (SHA-256 of the previous line) and `mac` (HMAC-SHA256 of the line, computed in
// the token with a non-extractable key); the chain head is also kept in the store, so editing,
// inserting, dropping, reordering or cutting lines is detected by `p11kms audit verify`.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "audit/audit_sink.hpp"
#include "hsm/token.hpp"
#include "store/metadata_store.hpp"

namespace p11kms::audit {

struct AuditOptions {
  std::string path;
  // The chain this log continues: each chain has its own head in the store ("audit.head/<chain>"),
  // so several instances sharing one store keep separate, verifiable chains. Empty: the
  // single head of earlier releases ("audit.head").
  std::string chain;
  bool fail_closed = true;
  uint64_t max_bytes = 100ull * 1024 * 1024;  // rotate to path.1, path.2, ... above this
  // The chain's writer role as a store lease ("audit.chain/<chain>"), so one instance at a time
  // writes a chain (two would fork it) and another may continue it once the holder stops
  // renewing. lease_s == 0: no lease (a single process, tests).
  std::string holder;   // this instance's id
  int64_t lease_s = 0;  // a holder that stops renewing loses the chain after this
};

// The token-resident audit key: created on first use, its CKA_ID kept in the store.
hsm::ObjectId audit_key(hsm::Token& token, store::MetadataStore& store, bool create_if_missing);

class AuditLog : public AuditSink {
 public:
  // Opens (creating) the file; throws std::runtime_error with a clear message if it cannot.
  AuditLog(AuditOptions options, hsm::Token& token, store::MetadataStore& store);
  ~AuditLog() override;

  bool ready() override;
  void write(const AuditRecord& record) override;
  // Renews this instance's lease on its chain (with the instance heartbeat). A lease lost (the
  // store away for a whole lease period and another writer took over) stops the writing; one
  // taken back continues from the store's head. Throws when the store cannot be reached.
  void renew_chain();
  bool fail_closed() const override { return options_.fail_closed; }

  // The line as written (without newline), for tests of the format.
  std::string format(const AuditRecord& record, uint64_t seq, const std::string& prev, const std::string& time);

 private:
  void open_file();
  void claim_chain();  // at start: waits up to a lease period for a dead holder's lease to end
  std::string lease_name() const;
  void rotate();
  bool reserve_ahead();  // mu_ held

  AuditOptions options_;
  hsm::Token& token_;
  store::MetadataStore& store_;
  hsm::ObjectId key_;
  std::mutex mu_;
  int fd_ = -1;
  uint64_t size_ = 0;
  bool regular_file_ = false;
  uint64_t reserved_until_ = 0;  // file offset up to which disk blocks are allocated
  bool healthy_ = true;          // false after a failed write or reservation
  bool holds_chain_ = true;      // false while another instance holds the chain's lease
  uint64_t seq_ = 0;
  std::string prev_;  // hex SHA-256 of the last line written
};

// Verification of audit files against the token's key and the store's chain head.
struct VerifyResult {
  bool intact = true;
  std::string problem;  // "FILE:LINE: what is wrong" or a tail message
  uint64_t lines = 0;
};
// chain: as in AuditOptions, the chain whose head the files must end at.
VerifyResult verify_audit_files(const std::vector<std::string>& files, hsm::Token& token,
                                store::MetadataStore& store, const std::string& chain = "");

// hex(HMAC-SHA256) in the token, as written for secret fields and line MACs.
std::string audit_hmac_hex(hsm::Token& token, const hsm::ObjectId& key, const std::string& data);

}  // namespace p11kms::audit
