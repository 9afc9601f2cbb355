// Errors of the PKCS#11 layer. Messages name the function and the CKR_ code, never a PIN or
// key material.
#pragma once

#include <stdexcept>
#include <string>

#include "hsm/pkcs11.hpp"

namespace p11kms::hsm {

const char* rv_name(CK_RV rv);

// True for return values that mean the session, the token or the module connection is gone,
// so the pool must reconnect rather than blame the request.
bool is_connection_failure(CK_RV rv);

class Pkcs11Error : public std::runtime_error {
 public:
  Pkcs11Error(const char* function, CK_RV rv);
  CK_RV rv() const { return rv_; }
  const char* function() const { return function_; }

 private:
  const char* function_;
  CK_RV rv_;
};

// The token cannot be reached right now (down, removed, reconnecting). Maps to HTTP 503.
class TokenUnavailable : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A token object the store refers to is not on the token.
class ObjectMissing : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

}  // namespace p11kms::hsm
