// The one error type of the service core: a kind (which each dialect maps to its HTTP status
// and shape), a stable code and a message for the client. Messages name the field or key at
// fault and never carry key material, PINs or tokens.
#pragma once

#include <stdexcept>
#include <string>

namespace p11kms::keys {

enum class ErrorKind {
  invalid_argument,  // 400
  not_found,         // 404
  conflict,          // 409
  forbidden,         // 403
  gone,              // 410: the key was deleted; its id is never reused
  payload_too_large, // 413
  unavailable,       // 503: the token (or store) cannot serve right now
  bad_gateway,       // 502: an upstream p11kms reads from (Vault, for the keyring) answered unusably
  not_implemented,   // 501: a route of the modelled API that p11kms does not offer
  internal,          // 500
};

class KeyError : public std::runtime_error {
 public:
  KeyError(ErrorKind kind, std::string code, const std::string& message)
      : std::runtime_error(message), kind_(kind), code_(std::move(code)) {}
  ErrorKind kind() const { return kind_; }
  const std::string& code() const { return code_; }

 private:
  ErrorKind kind_;
  std::string code_;
};

inline KeyError invalid(const std::string& message, std::string code = "invalid_argument") {
  return KeyError(ErrorKind::invalid_argument, std::move(code), message);
}
inline KeyError not_found(const std::string& message) {
  return KeyError(ErrorKind::not_found, "not_found", message);
}
inline KeyError conflict(const std::string& message, std::string code = "conflict") {
  return KeyError(ErrorKind::conflict, std::move(code), message);
}
inline KeyError gone(const std::string& message) { return KeyError(ErrorKind::gone, "gone", message); }
inline KeyError unavailable(const std::string& message) {
  return KeyError(ErrorKind::unavailable, "unavailable", message);
}
inline KeyError bad_gateway(const std::string& message, std::string code = "bad_gateway") {
  return KeyError(ErrorKind::bad_gateway, std::move(code), message);
}

}  // namespace p11kms::keys
