// Assertion helpers shared by the unit and integration tests.
#pragma once

#include <gtest/gtest.h>

#include <string>

#include "keys/errors.hpp"

namespace p11kms::test_support {

// Runs f, expects a KeyError of the given kind, returns its message ("" after a failure).
template <typename F>
std::string expect_key_error(F&& f, keys::ErrorKind kind = keys::ErrorKind::invalid_argument) {
  try {
    f();
  } catch (const keys::KeyError& e) {
    EXPECT_EQ(static_cast<int>(e.kind()), static_cast<int>(kind)) << e.what();
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "threw something other than KeyError: " << e.what();
    return {};
  }
  ADD_FAILURE() << "did not throw";
  return {};
}

inline bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace p11kms::test_support
