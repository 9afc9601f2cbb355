// A loaded PKCS#11 module: dlopen + C_GetFunctionList, resolved from a path or a p11-kit
// module name. Initialization is separate so the pool can finalize and re-initialize the
// module on reconnect without unloading it.
#pragma once

#include <optional>
#include <set>
#include <string>
#include <vector>

#include "hsm/pkcs11.hpp"

namespace p11kms::hsm {

struct TokenSlot {
  CK_SLOT_ID slot = 0;
  std::string label;
  std::string serial;
  bool initialized = false;
};

class Module {
 public:
  // name_or_path: "/usr/lib/softhsm/libsofthsm2.so" or a p11-kit module name ("softhsm2").
  explicit Module(const std::string& name_or_path);
  ~Module();
  Module(const Module&) = delete;
  Module& operator=(const Module&) = delete;

  const std::string& path() const { return path_; }
  CK_FUNCTION_LIST* fn() const { return fn_; }

  // C_Initialize with CKF_OS_LOCKING_OK; C_Finalize. Both idempotent.
  void initialize();
  void finalize();
  bool initialized() const { return initialized_; }

  // Slots that hold a token (present), with their labels (trailing blanks trimmed).
  std::vector<TokenSlot> tokens() const;
  std::optional<TokenSlot> find_token(const std::string& label) const;
  std::set<CK_MECHANISM_TYPE> mechanisms(CK_SLOT_ID slot) const;

  // Resolves a p11-kit module name to its file through p11-kit's own registry.
  static std::string resolve(const std::string& name_or_path);

 private:
  std::string path_;
  void* handle_ = nullptr;
  CK_FUNCTION_LIST* fn_ = nullptr;
  bool initialized_ = false;
};

std::string trim_padded(const unsigned char* p, size_t n);

}  // namespace p11kms::hsm
