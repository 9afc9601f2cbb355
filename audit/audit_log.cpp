#include "audit/audit_log.hpp"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/digest.hpp"
#include "common/encoding.hpp"
#include "common/log.hpp"
#include "common/time.hpp"

namespace p11kms::audit {
namespace {

using ordered = nlohmann::ordered_json;

constexpr const char* kKeySetting = "audit.key_id";
// The chain head, one setting "seq sha256hex mac" so it costs one store write per line.
constexpr const char* kLegacyHeadSetting = "audit.head";

std::string head_setting(const std::string& chain) {
  return chain.empty() ? kLegacyHeadSetting : std::string(kLegacyHeadSetting) + "/" + chain;
}

struct Head {
  uint64_t seq = 0;
  std::string sha256, mac;
};

// A chain without a head of its own yet continues the single head of earlier releases, so an
// upgraded instance's file still verifies as one chain.
Head read_head(store::MetadataStore& store, const std::string& chain) {
  Head h;
  auto v = store.get_setting(head_setting(chain));
  if (!v && !chain.empty()) v = store.get_setting(kLegacyHeadSetting);
  if (v) {
    auto a = v->find(' '), b = v->rfind(' ');
    if (a != std::string::npos && b != a) {
      h.seq = std::stoull(v->substr(0, a));
      h.sha256 = v->substr(a + 1, b - a - 1);
      h.mac = v->substr(b + 1);
    }
  }
  return h;
}

std::string sha256_hex(const std::string& s) {
  auto h = digest::sha256(s.data(), s.size());
  return encoding::hex_encode(h.data(), h.size());
}

std::string now_rfc3339() {
  auto now = std::chrono::system_clock::now();
  std::time_t t = std::chrono::system_clock::to_time_t(now);
  auto us = std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() % 1000000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  char out[64];
  std::snprintf(out, sizeof out, "%s.%06ldZ", buf, static_cast<long>(us));
  return out;
}

}  // namespace

std::string audit_hmac_hex(hsm::Token& token, const hsm::ObjectId& key, const std::string& data) {
  auto mac = token.hmac_sha256(key, reinterpret_cast<const uint8_t*>(data.data()), data.size());
  return encoding::hex_encode(mac);
}

hsm::ObjectId audit_key(hsm::Token& token, store::MetadataStore& store, bool create_if_missing) {
  if (auto hex = store.get_setting(kKeySetting)) {
    if (auto id = encoding::hex_decode(*hex)) return *id;
  }
  if (!create_if_missing) throw std::runtime_error("no audit key is recorded in the store (nothing was ever audited)");
  auto id = token.new_object_id();
  // Not labelled p11kms/<ns>/...: it is no key version, and the sweep must not touch it.
  token.generate_hmac_key(id, 32, "p11kms-system/audit-hmac");
  store.put_setting(kKeySetting, encoding::hex_encode(id));
  return id;
}

AuditLog::AuditLog(AuditOptions options, hsm::Token& token, store::MetadataStore& store)
    : options_(std::move(options)), token_(token), store_(store) {
  key_ = audit_key(token_, store_, true);
  claim_chain();  // before reading the head: the previous writer's last line comes first
  Head head = read_head(store_, options_.chain);
  seq_ = head.seq;
  prev_ = head.sha256;
  open_file();
}

AuditLog::~AuditLog() {
  if (fd_ >= 0) ::close(fd_);
  if (options_.lease_s > 0 && holds_chain_) {
    try {
      // Held until now: the next writer of the chain (this instance restarted) need not wait.
      store_.take_lease(lease_name(), options_.holder, timefmt::now_unix(), 0);
    } catch (const std::exception&) {
      // The store is away: the lease runs out by itself.
    }
  }
}

std::string AuditLog::lease_name() const {
  return "audit.chain/" + (options_.chain.empty() ? std::string("default") : options_.chain);
}

void AuditLog::claim_chain() {
  if (options_.lease_s <= 0) return;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(options_.lease_s + 1);
  bool waiting = false;
  while (!store_.take_lease(lease_name(), options_.holder, timefmt::now_unix(), options_.lease_s)) {
    if (std::chrono::steady_clock::now() >= deadline)
      throw std::runtime_error("audit chain '" + options_.chain +
                               "' is being written by another running instance (its lease in the store is still "
                               "renewed); give each instance its own audit.chain or audit.path");
    if (!waiting)
      log::info("audit: waiting up to " + std::to_string(options_.lease_s) + " s for the previous writer of chain '" +
                options_.chain + "' to let it go");
    waiting = true;
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
}

void AuditLog::renew_chain() {
  if (options_.lease_s <= 0) return;
  bool held = store_.take_lease(lease_name(), options_.holder, timefmt::now_unix(), options_.lease_s);
  std::lock_guard<std::mutex> lk(mu_);
  if (held && !holds_chain_) {
    Head head = read_head(store_, options_.chain);  // another writer may have moved it meanwhile
    seq_ = head.seq;
    prev_ = head.sha256;
    log::warn("audit: chain '" + options_.chain + "' taken back; continuing after seq " + std::to_string(seq_));
  } else if (!held && holds_chain_) {
    log::error("audit: chain '" + options_.chain +
               "' is now held by another instance; this one stops writing it (requests are refused while "
               "audit.fail_closed)");
  }
  holds_chain_ = held;
}

void AuditLog::open_file() {
  fd_ = ::open(options_.path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
  if (fd_ < 0)
    throw std::runtime_error("cannot open audit log " + options_.path + ": " + std::strerror(errno));
  struct stat st{};
  size_ = ::fstat(fd_, &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
  regular_file_ = S_ISREG(st.st_mode);
  reserved_until_ = size_;
  healthy_ = reserve_ahead();
}

// Disk blocks for the next lines are allocated ahead of time, so a full disk is noticed
// before a request runs, not after it changed something. Devices and pipes cannot be
// reserved; for them only a failed write marks the log broken.
bool AuditLog::reserve_ahead() {
  constexpr uint64_t kHeadroom = 16 * 1024, kChunk = 64 * 1024;
  if (!regular_file_ || reserved_until_ >= size_ + kHeadroom) return true;
  int rc = ::fallocate(fd_, FALLOC_FL_KEEP_SIZE, static_cast<off_t>(size_), static_cast<off_t>(kChunk));
  if (rc == 0) {
    reserved_until_ = size_ + kChunk;
    return true;
  }
  if (errno == EOPNOTSUPP) {  // the file system cannot reserve: rely on write errors
    reserved_until_ = UINT64_MAX;
    return true;
  }
  log::error(std::string("audit: cannot reserve space in ") + options_.path + ": " + std::strerror(errno));
  return false;
}

bool AuditLog::ready() {
  std::lock_guard<std::mutex> lk(mu_);
  if (!holds_chain_) return !options_.fail_closed;
  try {
    if (fd_ < 0) open_file();
    if (!healthy_ || reserved_until_ < size_ + 16 * 1024) healthy_ = reserve_ahead();
  } catch (const std::exception& e) {
    log::error(std::string("audit: ") + e.what());
    healthy_ = false;
  }
  return healthy_ || !options_.fail_closed;
}

// audit.log -> audit.log.1, audit.log.1 -> audit.log.2, ...: the newest rotated file is .1.
void AuditLog::rotate() {
  namespace fs = std::filesystem;
  ::close(fd_);
  fd_ = -1;
  int highest = 0;
  while (fs::exists(options_.path + "." + std::to_string(highest + 1))) ++highest;
  for (int i = highest; i >= 1; --i)
    fs::rename(options_.path + "." + std::to_string(i), options_.path + "." + std::to_string(i + 1));
  fs::rename(options_.path, options_.path + ".1");
  open_file();
}

std::string AuditLog::format(const AuditRecord& r, uint64_t seq, const std::string& prev, const std::string& time) {
  ordered line;
  line["time"] = time;
  line["seq"] = seq;
  line["request_id"] = r.request_id;
  line["token"] = r.token ? ordered(*r.token) : ordered(nullptr);
  line["namespace"] = r.ns;
  line["method"] = r.method;
  line["path"] = r.path;
  line["capability"] = r.capability ? ordered(*r.capability) : ordered(nullptr);
  if (r.key) {
    line["key"] = *r.key;
    line["key_version"] = r.key_version ? ordered(*r.key_version) : ordered(nullptr);
  }
  line["status"] = r.status;
  line["latency_ms"] = static_cast<double>(static_cast<int64_t>(r.latency_ms * 1000)) / 1000.0;
  auto hashed = [&](const std::vector<std::pair<std::string, std::string>>& fields) {
    ordered out = ordered::object();
    for (const auto& [name, value] : fields) out[name] = "hmac-sha256:" + audit_hmac_hex(token_, key_, value);
    return out;
  };
  if (!r.request_secrets.empty()) line["request"] = hashed(r.request_secrets);
  if (!r.response_secrets.empty()) line["response"] = hashed(r.response_secrets);
  line["prev"] = prev;
  std::string body = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  std::string mac = audit_hmac_hex(token_, key_, body);
  body.pop_back();  // the closing brace; the MAC covers everything before it
  return body + ",\"mac\":\"" + mac + "\"}";
}

void AuditLog::write(const AuditRecord& record) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!holds_chain_) throw std::runtime_error("audit chain '" + options_.chain + "' is held by another instance");
  if (fd_ < 0) open_file();
  uint64_t seq = seq_ + 1;
  std::string line = format(record, seq, prev_, now_rfc3339());
  std::string data = line + "\n";
  if (size_ > 0 && size_ + data.size() > options_.max_bytes) rotate();
  ssize_t n = ::write(fd_, data.data(), data.size());
  if (n != static_cast<ssize_t>(data.size())) {
    std::string why = n < 0 ? std::strerror(errno) : "short write";
    ::close(fd_);
    fd_ = -1;  // reopened by the next ready()
    healthy_ = false;
    throw std::runtime_error("cannot write audit log " + options_.path + ": " + why);
  }
  size_ += data.size();
  healthy_ = true;
  std::string hash = sha256_hex(line);
  std::string mac = line.substr(line.size() - 66, 64);
  store_.put_setting(head_setting(options_.chain), std::to_string(seq) + " " + hash + " " + mac);
  seq_ = seq;
  prev_ = hash;
}

namespace {

struct Line {
  std::string file;
  size_t lineno = 0;
  std::string text;
  uint64_t seq = 0;
  std::string prev;
};

std::string where(const Line& l) { return l.file + ":" + std::to_string(l.lineno); }

}  // namespace

VerifyResult verify_audit_files(const std::vector<std::string>& files, hsm::Token& token,
                                store::MetadataStore& store, const std::string& chain) {
  VerifyResult result;
  auto fail = [&](const std::string& problem) {
    result.intact = false;
    result.problem = problem;
    return result;
  };
  auto key = audit_key(token, store, false);
  std::vector<std::vector<Line>> per_file;
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) throw std::runtime_error("cannot read " + f);
    std::vector<Line> lines;
    std::string text;
    size_t n = 0;
    while (std::getline(in, text)) {
      ++n;
      Line l{f, n, text};
      nlohmann::json j;
      try {
        j = nlohmann::json::parse(text);
        l.seq = j.at("seq").get<uint64_t>();
        l.prev = j.at("prev").get<std::string>();
        std::string mac = j.at("mac").get<std::string>();
        std::string suffix = ",\"mac\":\"" + mac + "\"}";
        if (mac.size() != 64 || text.size() < suffix.size() || text.compare(text.size() - suffix.size(), suffix.size(), suffix) != 0)
          return fail(where(l) + ": not an audit line as p11kms writes it (edited or inserted)");
        std::string body = text.substr(0, text.size() - suffix.size()) + "}";
        if (audit_hmac_hex(token, key, body) != mac)
          return fail(where(l) + ": MAC does not match: the line was edited or inserted");
      } catch (const nlohmann::json::exception&) {
        return fail(where(l) + ": not an audit line (unreadable JSON or missing seq/prev/mac)");
      }
      if (!lines.empty()) {
        const Line& before = lines.back();
        if (l.seq != before.seq + 1)
          return fail(where(l) + ": seq " + std::to_string(l.seq) + " follows seq " + std::to_string(before.seq) +
                      ": lines were dropped, inserted or reordered here");
        if (l.prev != sha256_hex(before.text))
          return fail(where(l) + ": prev does not match the line before: the chain is broken here");
      }
      lines.push_back(std::move(l));
      ++result.lines;
    }
    if (!lines.empty()) per_file.push_back(std::move(lines));
  }
  // Files in any order: one chain ordered by seq.
  std::sort(per_file.begin(), per_file.end(), [](const auto& a, const auto& b) { return a.front().seq < b.front().seq; });
  for (size_t i = 1; i < per_file.size(); ++i) {
    const Line& last = per_file[i - 1].back();
    const Line& first = per_file[i].front();
    if (first.seq != last.seq + 1 || first.prev != sha256_hex(last.text))
      return fail(where(first) + ": seq " + std::to_string(first.seq) + " does not continue " + where(last) +
                  " (seq " + std::to_string(last.seq) + "): lines or a rotated file are missing");
  }
  if (!per_file.empty() && per_file.front().front().seq == 1 && !per_file.front().front().prev.empty())
    return fail(where(per_file.front().front()) + ": the first line of the chain names a previous line");
  Head head = read_head(store, chain);
  if (per_file.empty()) {
    if (head.seq > 0) return fail("the files hold no audit lines but the store's chain head is seq " + std::to_string(head.seq));
    return result;
  }
  const Line& tail = per_file.back().back();
  if (tail.seq < head.seq)
    return fail("tail cut off after " + where(tail) + ": the files end at seq " + std::to_string(tail.seq) +
                " but the store's chain head is seq " + std::to_string(head.seq));
  if (tail.seq > head.seq || sha256_hex(tail.text) != head.sha256)
    return fail(where(tail) + ": the last line does not match the store's chain head (seq " +
                std::to_string(head.seq) + ")");
  return result;
}

}  // namespace p11kms::audit
