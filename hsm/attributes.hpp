// Typed construction of CK_ATTRIBUTE arrays: each value is owned by the template, so call
// sites never juggle raw pointers and lengths, and every boolean is set explicitly.
#pragma once

#include <algorithm>
#include <deque>
#include <string>
#include <vector>

#include <openssl/crypto.h>

#include "hsm/pkcs11.hpp"

namespace p11kms::hsm {

class AttributeTemplate {
 public:
  AttributeTemplate() = default;
  AttributeTemplate(AttributeTemplate&&) = default;
  AttributeTemplate(const AttributeTemplate&) = delete;
  AttributeTemplate& operator=(const AttributeTemplate&) = delete;
  // A template may carry CKA_VALUE of an imported key: every stored value is wiped.
  ~AttributeTemplate() {
    for (auto& v : storage_)
      if (!v.empty()) OPENSSL_cleanse(v.data(), v.size());
  }

  AttributeTemplate& set(CK_ATTRIBUTE_TYPE type, bool value) {
    auto& v = storage_.emplace_back(1, static_cast<unsigned char>(value ? CK_TRUE : CK_FALSE));
    return push(type, v);
  }
  AttributeTemplate& set_ulong(CK_ATTRIBUTE_TYPE type, CK_ULONG value) {
    auto& v = storage_.emplace_back(sizeof value);
    std::copy_n(reinterpret_cast<const unsigned char*>(&value), sizeof value, v.begin());
    return push(type, v);
  }
  AttributeTemplate& set_bytes(CK_ATTRIBUTE_TYPE type, const std::vector<unsigned char>& value) {
    return push(type, storage_.emplace_back(value));
  }
  AttributeTemplate& set_bytes(CK_ATTRIBUTE_TYPE type, const unsigned char* p, size_t n) {
    return push(type, storage_.emplace_back(p, p + n));
  }
  AttributeTemplate& set_string(CK_ATTRIBUTE_TYPE type, const std::string& value) {
    return push(type, storage_.emplace_back(value.begin(), value.end()));
  }

  CK_ATTRIBUTE* data() { return attrs_.data(); }
  CK_ULONG size() const { return static_cast<CK_ULONG>(attrs_.size()); }

 private:
  AttributeTemplate& push(CK_ATTRIBUTE_TYPE type, std::vector<unsigned char>& v) {
    attrs_.push_back(CK_ATTRIBUTE{type, v.empty() ? nullptr : v.data(),
                                  static_cast<CK_ULONG>(v.size())});
    return *this;
  }

  std::deque<std::vector<unsigned char>> storage_;  // deque: pushes never move old values
  std::vector<CK_ATTRIBUTE> attrs_;
};

}  // namespace p11kms::hsm
