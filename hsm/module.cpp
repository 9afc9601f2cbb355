#include "hsm/module.hpp"

#include <dlfcn.h>
#include <p11-kit/p11-kit.h>

#include <stdexcept>

#include "hsm/errors.hpp"

namespace p11kms::hsm {

std::string trim_padded(const unsigned char* p, size_t n) {
  std::string s(reinterpret_cast<const char*>(p), n);
  auto end = s.find_last_not_of(" \0", std::string::npos, 2);
  return end == std::string::npos ? std::string() : s.substr(0, end + 1);
}

std::string Module::resolve(const std::string& name_or_path) {
  if (name_or_path.find('/') != std::string::npos) return name_or_path;
  // A bare name is a p11-kit registered module (e.g. "softhsm2"); let p11-kit read its
  // configuration rather than parsing .module files ourselves.
  CK_FUNCTION_LIST** modules = p11_kit_modules_load(nullptr, P11_KIT_MODULE_UNMANAGED);
  if (!modules) throw std::runtime_error("p11-kit could not list its registered modules");
  std::string path;
  if (CK_FUNCTION_LIST* m = p11_kit_module_for_name(modules, name_or_path.c_str())) {
    if (char* f = p11_kit_module_get_filename(m)) {
      path = f;
      free(f);
    }
  }
  p11_kit_modules_release(modules);
  if (path.empty())
    throw std::runtime_error("no PKCS#11 module named '" + name_or_path +
                             "' is registered with p11-kit (give a path to the .so instead)");
  return path;
}

Module::Module(const std::string& name_or_path) : path_(resolve(name_or_path)) {
  handle_ = dlopen(path_.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle_) {
    const char* e = dlerror();
    throw std::runtime_error("cannot load PKCS#11 module " + path_ + ": " + (e ? e : "?"));
  }
  auto get = reinterpret_cast<CK_C_GetFunctionList>(dlsym(handle_, "C_GetFunctionList"));
  if (!get || get(&fn_) != CKR_OK || !fn_) {
    dlclose(handle_);
    throw std::runtime_error(path_ + " is not a PKCS#11 module (no C_GetFunctionList)");
  }
}

Module::~Module() {
  finalize();
  if (handle_) dlclose(handle_);
}

void Module::initialize() {
  if (initialized_) return;
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  CK_RV rv = fn_->C_Initialize(&args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) throw Pkcs11Error("C_Initialize", rv);
  initialized_ = true;
}

void Module::finalize() {
  if (!initialized_) return;
  fn_->C_Finalize(nullptr);
  initialized_ = false;
}

std::vector<TokenSlot> Module::tokens() const {
  CK_ULONG n = 0;
  CK_RV rv = fn_->C_GetSlotList(CK_TRUE, nullptr, &n);
  if (rv != CKR_OK) throw Pkcs11Error("C_GetSlotList", rv);
  std::vector<CK_SLOT_ID> slots(n);
  rv = fn_->C_GetSlotList(CK_TRUE, slots.data(), &n);
  if (rv != CKR_OK) throw Pkcs11Error("C_GetSlotList", rv);
  slots.resize(n);
  std::vector<TokenSlot> out;
  for (CK_SLOT_ID s : slots) {
    CK_TOKEN_INFO info{};
    if (fn_->C_GetTokenInfo(s, &info) != CKR_OK) continue;
    out.push_back(TokenSlot{s, trim_padded(info.label, sizeof info.label),
                            trim_padded(info.serialNumber, sizeof info.serialNumber),
                            (info.flags & CKF_TOKEN_INITIALIZED) != 0});
  }
  return out;
}

std::optional<TokenSlot> Module::find_token(const std::string& label) const {
  for (auto& t : tokens())
    if (t.initialized && t.label == label) return t;
  return std::nullopt;
}

std::set<CK_MECHANISM_TYPE> Module::mechanisms(CK_SLOT_ID slot) const {
  CK_ULONG n = 0;
  CK_RV rv = fn_->C_GetMechanismList(slot, nullptr, &n);
  if (rv != CKR_OK) throw Pkcs11Error("C_GetMechanismList", rv);
  std::vector<CK_MECHANISM_TYPE> m(n);
  rv = fn_->C_GetMechanismList(slot, m.data(), &n);
  if (rv != CKR_OK) throw Pkcs11Error("C_GetMechanismList", rv);
  m.resize(n);
  return {m.begin(), m.end()};
}

}  // namespace p11kms::hsm
