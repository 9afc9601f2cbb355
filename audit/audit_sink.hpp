// What the HTTP edge hands to the audit log: one record per request. The interface knows
// nothing of files, chains or the token, so api/ depends on it and not on them.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace p11kms::audit {

struct AuditRecord {
  std::string request_id;
  std::optional<std::string> token;  // the token's *name*; absent when none was valid
  std::string ns;
  std::string method;
  std::string path;
  std::optional<std::string> capability;
  std::optional<std::string> key;  // only when the request names a key
  std::optional<int> key_version;
  int status = 0;
  double latency_ms = 0;
  // Values that must never appear in clear (plaintext, ciphertext, AAD, ...): written as
  // hmac-sha256:<hex> under the token-resident audit key, by field name.
  std::vector<std::pair<std::string, std::string>> request_secrets;
  std::vector<std::pair<std::string, std::string>> response_secrets;
};

class AuditSink {
 public:
  virtual ~AuditSink() = default;
  // Whether a request may proceed: false when the log cannot be written and it fails closed.
  virtual bool ready() = 0;
  // Appends the record before the response is sent; throws std::runtime_error if it cannot.
  virtual void write(const AuditRecord& record) = 0;
  virtual bool fail_closed() const = 0;
};

}  // namespace p11kms::audit
