// Byte buffers that hold secrets (PINs, plaintexts, data keys) and wipe themselves.
#pragma once

#include <openssl/crypto.h>

#include <cstdint>
#include <string>
#include <vector>

namespace p11kms::hsm {

using Bytes = std::vector<uint8_t>;

// A std::vector<uint8_t> that is cleansed before its memory is released.
class SecureBytes {
 public:
  SecureBytes() = default;
  explicit SecureBytes(size_t n) : bytes_(n) {}
  SecureBytes(const uint8_t* p, size_t n) : bytes_(p, p + n) {}
  SecureBytes(const SecureBytes&) = default;
  SecureBytes(SecureBytes&& o) noexcept : bytes_(std::move(o.bytes_)) {}
  SecureBytes& operator=(SecureBytes&& o) noexcept {
    wipe();
    bytes_ = std::move(o.bytes_);
    return *this;
  }
  SecureBytes& operator=(const SecureBytes& o) {
    if (this != &o) { wipe(); bytes_ = o.bytes_; }
    return *this;
  }
  ~SecureBytes() { wipe(); }

  uint8_t* data() { return bytes_.data(); }
  const uint8_t* data() const { return bytes_.data(); }
  size_t size() const { return bytes_.size(); }
  bool empty() const { return bytes_.empty(); }
  // Shrinking keeps capacity, so wiping the whole capacity later still covers the tail.
  void shrink(size_t n) {
    if (n < bytes_.size()) {
      OPENSSL_cleanse(bytes_.data() + n, bytes_.size() - n);
      bytes_.resize(n);
    }
  }
  void wipe() {
    if (bytes_.capacity() > 0) OPENSSL_cleanse(bytes_.data(), bytes_.capacity());
    bytes_.clear();
  }

 private:
  std::vector<uint8_t> bytes_;
};

// A string secret (a PIN): wiped on destruction.
class SecretString {
 public:
  SecretString() = default;
  explicit SecretString(std::string s) : s_(std::move(s)) {}
  SecretString(const SecretString&) = default;
  SecretString& operator=(const SecretString& o) {
    if (this != &o) { wipe(); s_ = o.s_; }
    return *this;
  }
  ~SecretString() { wipe(); }
  const std::string& reveal() const { return s_; }
  bool empty() const { return s_.empty(); }
  void wipe() {
    if (!s_.empty()) OPENSSL_cleanse(&s_[0], s_.size());
    s_.clear();
  }

 private:
  std::string s_;
};

}  // namespace p11kms::hsm
