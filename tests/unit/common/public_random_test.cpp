// Unit tests for common/public_random.hpp: per-thread blocks of DRBG output for nonces and ids.
#include "common/public_random.hpp"

#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <set>
#include <thread>
#include <vector>

namespace pr = p11kms::public_random;

namespace {

using Nonce = std::array<uint8_t, 12>;

Nonce nonce() {
  Nonce n{};
  pr::fill(n.data(), n.size());
  return n;
}

}  // namespace

// Many draws, several blocks' worth, never repeat (a repeated GCM nonce would be a break).
TEST(PublicRandom, NoncesDoNotRepeatAcrossBlocks) {
  std::set<Nonce> seen;
  for (int i = 0; i < 20000; ++i) ASSERT_TRUE(seen.insert(nonce()).second) << "repeat at draw " << i;
}

// Sizes that use up a block part-way and force a refill, and sizes larger than the block path
// takes (over 1 KiB). At least 7 bytes, so two equal draws (2^-56) cannot happen by chance.
TEST(PublicRandom, OddAndLargeSizesAreFilled) {
  for (size_t n : {7u, 1000u, 1024u, 1025u, 4096u, 100000u}) {
    std::vector<uint8_t> a(n, 0), b(n, 0);
    pr::fill(a.data(), n);
    pr::fill(b.data(), n);
    EXPECT_NE(a, b) << n << " bytes";
    if (n >= 64) {
      std::set<uint8_t> distinct(a.begin(), a.end());
      EXPECT_GT(distinct.size(), 16u) << n << " bytes look constant";
    }
  }
}

// Threads draw from their own blocks; none hands out what another did.
TEST(PublicRandom, ThreadsDrawDistinctValues) {
  std::vector<std::vector<Nonce>> drawn(4);
  std::vector<std::thread> threads;
  for (auto& d : drawn)
    threads.emplace_back([&d] {
      for (int i = 0; i < 5000; ++i) d.push_back(nonce());
    });
  for (auto& t : threads) t.join();
  std::set<Nonce> all;
  for (auto& d : drawn)
    for (auto& n : d) ASSERT_TRUE(all.insert(n).second);
}

// A forked child must not hand out the values left in its parent's block: the parent draws
// after the fork too, and the two would repeat each other.
TEST(PublicRandom, ForkedChildDoesNotReuseParentsBlock) {
  nonce();  // the parent now holds a partly used block
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    Nonce n = nonce();
    ssize_t w = write(fds[1], n.data(), n.size());
    _exit(w == static_cast<ssize_t>(n.size()) ? 0 : 1);
  }
  close(fds[1]);
  Nonce from_child{};
  ASSERT_EQ(read(fds[0], from_child.data(), from_child.size()), static_cast<ssize_t>(from_child.size()));
  close(fds[0]);
  int status = 0;
  ASSERT_EQ(waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  Nonce from_parent = nonce();
  EXPECT_NE(from_child, from_parent);
}
