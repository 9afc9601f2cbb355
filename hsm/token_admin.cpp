#include "hsm/token_admin.hpp"

#include <cstring>
#include <stdexcept>

#include "hsm/errors.hpp"
#include "hsm/module.hpp"

namespace p11kms::hsm {
namespace {

CK_UTF8CHAR* pin_ptr(const SecretString& s) {
  return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(s.reveal().data()));
}

void check(CK_RV rv, const char* what) {
  if (rv != CKR_OK) throw std::runtime_error(std::string(what) + " failed: " + rv_name(rv));
}

// A session that logs out and closes on every path out.
class AdminSession {
 public:
  AdminSession(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot) : fn_(fn) {
    check(fn_->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s_), "C_OpenSession");
  }
  ~AdminSession() {
    fn_->C_Logout(s_);
    fn_->C_CloseSession(s_);
  }
  CK_SESSION_HANDLE get() const { return s_; }
 private:
  CK_FUNCTION_LIST* fn_;
  CK_SESSION_HANDLE s_ = 0;
};

void set_user_pin(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, const InitTokenRequest& r) {
  AdminSession s(fn, slot);
  CK_RV rv = fn->C_Login(s.get(), CKU_SO, pin_ptr(r.so_pin), r.so_pin.reveal().size());
  if (rv == CKR_PIN_INCORRECT) throw std::runtime_error("the SO PIN was rejected by the token");
  check(rv, "C_Login(SO)");
  check(fn->C_InitPIN(s.get(), pin_ptr(r.user_pin), r.user_pin.reveal().size()), "C_InitPIN");
}

void write_label(CK_UTF8CHAR out[32], const std::string& label) {
  std::memset(out, ' ', 32);
  std::memcpy(out, label.data(), label.size());
}

}  // namespace

InitResult init_token(const InitTokenRequest& r) {
  if (r.label.empty() || r.label.size() > 32)
    throw std::runtime_error("the token label must be 1 to 32 characters");
  if (r.so_pin.empty() || r.user_pin.empty()) throw std::runtime_error("the SO PIN and the user PIN must not be empty");
  Module module(r.module);
  module.initialize();
  CK_FUNCTION_LIST* fn = module.fn();

  if (auto existing = module.find_token(r.label)) {
    if (!r.force) {
      AdminSession s(fn, existing->slot);
      CK_RV rv = fn->C_Login(s.get(), CKU_USER, pin_ptr(r.user_pin), r.user_pin.reveal().size());
      if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED)
        throw std::runtime_error("token '" + r.label + "' exists but the given user PIN does not match it");
      if (rv != CKR_USER_ALREADY_LOGGED_IN) check(rv, "C_Login(USER)");
      return InitResult::already_initialized;
    }
    CK_UTF8CHAR label[32];
    write_label(label, r.label);
    CK_RV rv = fn->C_InitToken(existing->slot, pin_ptr(r.so_pin), r.so_pin.reveal().size(), label);
    if (rv == CKR_PIN_INCORRECT) throw std::runtime_error("the SO PIN was rejected by token '" + r.label + "'");
    check(rv, "C_InitToken");
    set_user_pin(fn, existing->slot, r);
    return InitResult::reinitialized;
  }

  // A free slot: present token that is not initialized (SoftHSM always offers one).
  CK_ULONG n = 0;
  check(fn->C_GetSlotList(CK_FALSE, nullptr, &n), "C_GetSlotList");
  std::vector<CK_SLOT_ID> slots(n);
  check(fn->C_GetSlotList(CK_FALSE, slots.data(), &n), "C_GetSlotList");
  slots.resize(n);
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info{};
    if (fn->C_GetTokenInfo(slot, &info) != CKR_OK || (info.flags & CKF_TOKEN_INITIALIZED)) continue;
    CK_UTF8CHAR label[32];
    write_label(label, r.label);
    check(fn->C_InitToken(slot, pin_ptr(r.so_pin), r.so_pin.reveal().size(), label), "C_InitToken");
    // SoftHSM moves a freshly initialized token to a new slot id: look it up by label again.
    module.finalize();
    module.initialize();
    auto created = module.find_token(r.label);
    if (!created) throw std::runtime_error("token '" + r.label + "' was initialized but cannot be found again");
    set_user_pin(fn, created->slot, r);
    return InitResult::initialized;
  }
  throw std::runtime_error("no free slot to initialize a token in " + module.path());
}

}  // namespace p11kms::hsm
