#include "hsm/session_pool.hpp"

#include <algorithm>

#include "common/log.hpp"

namespace p11kms::hsm {
namespace {
constexpr std::chrono::milliseconds kMinBackoff{100};
constexpr std::chrono::milliseconds kMaxBackoff{5000};
// How long refresh_view() waits for the leases in flight to come back before giving up.
constexpr std::chrono::milliseconds kDrainTimeout{3000};
// Leases held by this thread (of any pool): a thread that already holds one is never made to
// wait for a refresh, which waits for it (a nested lease, e.g. unsealing inside an operation).
thread_local int held_leases = 0;
}  // namespace

SessionPool::SessionPool(PoolConfig config) : config_(std::move(config)) {
  if (config_.sessions == 0) config_.sessions = 1;
  module_ = std::make_unique<Module>(config_.module);
  connect();
  CK_INFO info{};
  if (module_->fn()->C_GetInfo(&info) == CKR_OK)
    library_manufacturer_ = trim_padded(info.manufacturerID, sizeof info.manufacturerID);
  std::lock_guard<std::mutex> lk(mu_);
  free_ = opened_;
  connected_ = true;
  generation_ = 1;
}

SessionPool::~SessionPool() {
  std::lock_guard<std::mutex> lk(mu_);
  if (connected_) {
    for (auto s : opened_) module_->fn()->C_CloseSession(s);
  }
  module_->finalize();
}

void SessionPool::connect() {
  // Called with no lease outstanding: finalizing drops every old session and handle.
  module_->finalize();
  module_->initialize();
  auto token = module_->find_token(config_.token_label);
  if (!token) {
    module_->finalize();
    throw TokenUnavailable("no initialized token labelled '" + config_.token_label + "' in " + module_->path());
  }
  auto* fn = module_->fn();
  std::vector<CK_SESSION_HANDLE> sessions;
  auto close_all = [&] {
    for (auto s : sessions) fn->C_CloseSession(s);
    module_->finalize();
  };
  for (size_t i = 0; i < config_.sessions; ++i) {
    CK_SESSION_HANDLE s = 0;
    CK_RV rv = fn->C_OpenSession(token->slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &s);
    if (rv != CKR_OK) {
      close_all();
      throw TokenUnavailable(std::string("cannot open a session on token '") + config_.token_label +
                             "': " + rv_name(rv));
    }
    sessions.push_back(s);
  }
  const std::string& pin = config_.user_pin.reveal();
  CK_RV rv = fn->C_Login(sessions.front(), CKU_USER,
                         reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(pin.data())), pin.size());
  if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
    close_all();
    if (rv == CKR_PIN_INCORRECT || rv == CKR_PIN_LOCKED || rv == CKR_PIN_LEN_RANGE)
      throw std::runtime_error("token '" + config_.token_label + "' refused the user PIN: " + rv_name(rv));
    throw TokenUnavailable("cannot log in to token '" + config_.token_label + "': " + rv_name(rv));
  }
  std::shared_ptr<const Capabilities> caps;
  try {
    caps = std::make_shared<const Capabilities>(read_mechanisms(fn, token->slot));
  } catch (const Pkcs11Error& e) {
    close_all();
    throw TokenUnavailable(std::string("cannot read the mechanism list: ") + e.what());
  }
  {
    std::lock_guard<std::mutex> ck(caps_mu_);
    bool changed = capabilities_ && capabilities_->unavailable() != caps->unavailable();
    capabilities_ = caps;
    if (changed) log::warn("hsm: the module's capabilities changed on reconnect");
  }
  std::lock_guard<std::mutex> lk(mu_);
  opened_ = std::move(sessions);
  slot_ = token->slot;
}

std::shared_ptr<const Capabilities> SessionPool::capabilities() const {
  std::lock_guard<std::mutex> lk(caps_mu_);
  if (!capabilities_) return std::make_shared<const Capabilities>();
  return capabilities_;
}

SessionPool::Lease SessionPool::lease() { return take(nullptr); }

SessionPool::Lease SessionPool::lease_stream(const std::string& tag) { return take(&tag); }

CK_SESSION_HANDLE SessionPool::pick_free(const std::string* stream, bool& active, bool& ending) {
  // The most recently released session that fits: the stream asked for, else one keeping no
  // stream (streams of other keys stay for their next use), else the last one.
  auto keeps = [&](CK_SESSION_HANDLE h) { return streams_.count(h) != 0; };
  auto pick = free_.rend();
  if (stream)
    pick = std::find_if(free_.rbegin(), free_.rend(), [&](CK_SESSION_HANDLE h) {
      auto it = streams_.find(h);
      return it != streams_.end() && !it->second.ended && it->second.tag == *stream;
    });
  active = pick != free_.rend();
  if (!active) pick = std::find_if(free_.rbegin(), free_.rend(), [&](CK_SESSION_HANDLE h) { return !keeps(h); });
  if (pick == free_.rend()) pick = free_.rbegin();
  CK_SESSION_HANDLE s = *pick;
  free_.erase(std::next(pick).base());
  ending = !active && streams_.erase(s) != 0;
  return s;
}

SessionPool::Lease SessionPool::take(const std::string* stream) {
  for (;;) {
    CK_SESSION_HANDLE s = 0;
    uint64_t gen = 0;
    bool active = false, ending = false;
    uint64_t epoch = 0;
    {
      std::unique_lock<std::mutex> lk(mu_);
      for (;;) {
        if (refreshing_ && held_leases == 0) {
          cv_.wait(lk, [&] { return !refreshing_; });
          continue;
        }
        if (!connected_) {
          if (!reconnecting_ && in_use_ == 0 && std::chrono::steady_clock::now() >= next_attempt_) {
            try_reconnect(lk);
            continue;
          }
          throw TokenUnavailable("HSM token '" + config_.token_label + "' is unavailable (" + last_error_ +
                                 "); reconnecting");
        }
        if (!free_.empty()) break;
        cv_.wait(lk, [&] { return !connected_ || !free_.empty(); });
      }
      s = pick_free(stream, active, ending);
      ++in_use_;
      ++held_leases;
      gen = generation_;
      epoch = stream_epoch_;
    }
    Lease l(this, s, gen);
    l.stream_active_ = active;
    l.stream_epoch_ = epoch;
    if (!ending || end_stream(l)) return l;
    // The stream would not end: the session is replaced when `l` goes; take another.
  }
}

CK_RV SessionPool::finish_stream(CK_SESSION_HANDLE s) {
  // ECB holds no partial block here (every update is whole blocks), so this returns nothing.
  uint8_t rest[16];
  CK_ULONG n = sizeof rest;
  return module_->fn()->C_EncryptFinal(s, rest, &n);
}

bool SessionPool::end_stream(Lease& l) {
  CK_RV rv = finish_stream(l.session());
  if (rv == CKR_OK) return true;
  l.discard();
  if (is_connection_failure(rv)) l.lost(rv, "C_EncryptFinal");
  log::warn(std::string("hsm: C_EncryptFinal of a kept AES-ECB stream failed: ") + rv_name(rv) + "; session replaced");
  return false;
}

void SessionPool::Lease::keep_stream(const std::string& tag) {
  std::lock_guard<std::mutex> lk(pool_->mu_);
  // An end_streams since this lease was taken may have been for this key (destroyed while its
  // stream was being started): the stream then serves this lease only and ends at release.
  if (pool_->connected_ && generation_ == pool_->generation_)
    pool_->streams_[session_] = KeptStream{tag, stream_epoch_ != pool_->stream_epoch_};
  stream_active_ = true;
}

void SessionPool::end_streams(const std::string& prefix) {
  std::vector<CK_SESSION_HANDLE> taken;
  uint64_t gen = 0;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (auto& [session, kept] : streams_) {
      if (kept.tag.compare(0, prefix.size(), prefix) != 0) continue;
      auto f = std::find(free_.begin(), free_.end(), session);
      if (f == free_.end()) {
        kept.ended = true;  // leased now: ended when its lease is released
        continue;
      }
      free_.erase(f);
      taken.push_back(session);
      ++in_use_;
      ++held_leases;
    }
    for (auto session : taken) streams_.erase(session);
    ++stream_epoch_;
    gen = generation_;
  }
  for (auto session : taken) {
    Lease l(this, session, gen);
    try {
      end_stream(l);
    } catch (const std::exception&) {
      // The pool is disconnected now; the reconnect drops every session and stream.
    }
  }
}

size_t SessionPool::streams_kept() {
  std::lock_guard<std::mutex> lk(mu_);
  return streams_.size();
}

void SessionPool::try_reconnect(std::unique_lock<std::mutex>& lk) {
  reconnecting_ = true;
  lk.unlock();
  std::string error;
  try {
    connect();
  } catch (const std::exception& e) {
    error = e.what();
  }
  lk.lock();
  reconnecting_ = false;
  if (error.empty()) {
    free_ = opened_;
    streams_.clear();
    connected_ = true;
    ++generation_;
    backoff_ = kMinBackoff;
    last_error_.clear();
    log::info("hsm: reconnected to token '" + config_.token_label + "'");
  } else {
    last_error_ = error;
    next_attempt_ = std::chrono::steady_clock::now() + backoff_;
    backoff_ = std::min(backoff_ * 2, kMaxBackoff);
    log::warn("hsm: reconnect failed: " + error);
  }
  cv_.notify_all();
}

void SessionPool::release(CK_SESSION_HANDLE s, uint64_t gen, bool broken, bool discard) {
  --held_leases;
  if (!discard && !broken) {
    std::unique_lock<std::mutex> lk(mu_);
    auto it = streams_.find(s);
    if (it == streams_.end() || !it->second.ended) {
      --in_use_;
      if (connected_ && gen == generation_) free_.push_back(s);
      cv_.notify_all();
      return;
    }
    // A stream whose key went while the session was out: ended before anyone else gets it.
    streams_.erase(it);
    lk.unlock();
    if (finish_stream(s) == CKR_OK) {
      lk.lock();
      --in_use_;
      if (connected_ && gen == generation_) free_.push_back(s);
      cv_.notify_all();
      return;
    }
    discard = true;
  }
  if (discard && !broken) {
    // Open the replacement before closing the old one: closing a process's last session
    // would log it out.
    CK_SESSION_HANDLE fresh = 0;
    CK_RV rv = module_->fn()->C_OpenSession(slot(), CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &fresh);
    module_->fn()->C_CloseSession(s);
    std::lock_guard<std::mutex> lk(mu_);
    --in_use_;
    streams_.erase(s);
    std::replace(opened_.begin(), opened_.end(), s, rv == CKR_OK ? fresh : s);
    if (rv != CKR_OK) {
      opened_.erase(std::remove(opened_.begin(), opened_.end(), s), opened_.end());
      if (connected_ && gen == generation_) {  // a smaller pool could starve: reconnect instead
        connected_ = false;
        free_.clear();
        last_error_ = std::string("C_OpenSession: ") + rv_name(rv);
        next_attempt_ = std::chrono::steady_clock::now();
      }
    } else if (connected_ && gen == generation_) {
      free_.push_back(fresh);
    }
    cv_.notify_all();
    return;
  }
  std::lock_guard<std::mutex> lk(mu_);
  --in_use_;
  if (connected_ && gen == generation_ && !broken) free_.push_back(s);
  cv_.notify_all();
}

void SessionPool::refresh_view(Lease& lease) {
  std::unique_lock<std::mutex> lk(mu_);
  const uint64_t seen = lease.generation_;
  bool ending = false;
  // Park the lease: its session is given back to no one, since a re-open invalidates it.
  --in_use_;
  --held_leases;
  if (connected_ && generation_ == seen) {
    if (!refreshing_) {
      refreshing_ = true;
      bool drained = cv_.wait_for(lk, kDrainTimeout, [&] { return in_use_ == 0 || !connected_; });
      if (drained && connected_ && generation_ == seen) {
        log::info("hsm: re-opening the module to see objects other processes made on token '" +
                  config_.token_label + "'");
        connected_ = false;
        free_.clear();
        try_reconnect(lk);  // on failure the pool is disconnected, as after a lost connection
      } else if (!drained) {
        log::warn("hsm: token view not refreshed: operations still in flight after " +
                  std::to_string(kDrainTimeout.count()) + " ms");
      }
      refreshing_ = false;
      cv_.notify_all();
    } else {
      cv_.wait_for(lk, kDrainTimeout * 2, [&] { return !refreshing_; });
    }
  }
  // Take a session again: the old one if nothing was re-opened, else a new one.
  for (;;) {
    if (generation_ == seen && connected_) break;
    if (!connected_) {
      lease.pool_ = nullptr;  // nothing to give back
      throw TokenUnavailable("HSM token '" + config_.token_label + "' is unavailable (" + last_error_ +
                             "); reconnecting");
    }
    if (!free_.empty()) {
      bool active = false;
      lease.session_ = pick_free(nullptr, active, ending);  // another lease may have kept a stream on it
      lease.generation_ = generation_;
      lease.broken_ = false;
      lease.discard_ = false;
      lease.stream_active_ = false;
      lease.stream_epoch_ = stream_epoch_;
      break;
    }
    cv_.wait(lk, [&] { return !connected_ || !free_.empty() || generation_ == seen; });
  }
  ++in_use_;
  ++held_leases;
  lk.unlock();
  if (ending && !end_stream(lease))
    throw Pkcs11Error("C_EncryptFinal (ending a kept AES-ECB stream; the session is replaced)", CKR_GENERAL_ERROR);
}

void SessionPool::Lease::refresh_view() { pool_->refresh_view(*this); }

void SessionPool::mark_broken(uint64_t gen, const std::string& why) {
  std::lock_guard<std::mutex> lk(mu_);
  if (!connected_ || gen != generation_) return;
  connected_ = false;
  free_.clear();
  last_error_ = why;
  next_attempt_ = std::chrono::steady_clock::now();
  backoff_ = kMinBackoff;
  log::error("hsm: token '" + config_.token_label + "' connection lost: " + why);
  cv_.notify_all();
}

PoolStatus SessionPool::probe() {
  try {
    Lease l = lease();
    l.require_token_present();
  } catch (const std::exception&) {
    // status() below reports the failure.
  }
  return status();
}

PoolStatus SessionPool::status() {
  std::lock_guard<std::mutex> lk(mu_);
  return PoolStatus{config_.token_label, connected_, config_.sessions, in_use_, last_error_};
}

uint64_t SessionPool::generation() {
  std::lock_guard<std::mutex> lk(mu_);
  return generation_;
}

CK_SLOT_ID SessionPool::slot() {
  std::lock_guard<std::mutex> lk(mu_);
  return slot_;
}

SessionPool::Lease::Lease(Lease&& o) noexcept
    : pool_(o.pool_), session_(o.session_), generation_(o.generation_), broken_(o.broken_), discard_(o.discard_),
      stream_active_(o.stream_active_), stream_epoch_(o.stream_epoch_) {
  o.pool_ = nullptr;
}

SessionPool::Lease::~Lease() {
  if (pool_) pool_->release(session_, generation_, broken_, discard_);
}

void SessionPool::Lease::check(CK_RV rv, const char* function) {
  if (rv == CKR_OK) return;
  if (is_connection_failure(rv)) lost(rv, function);
  throw Pkcs11Error(function, rv);
}

void SessionPool::Lease::require_token_present() {
  CK_SESSION_INFO session_info{};
  CK_RV rv = fn()->C_GetSessionInfo(session_, &session_info);
  if (rv != CKR_OK) lost(rv, "C_GetSessionInfo");
  CK_TOKEN_INFO token_info{};
  rv = fn()->C_GetTokenInfo(session_info.slotID, &token_info);
  if (rv != CKR_OK) lost(rv, "C_GetTokenInfo");
}

void SessionPool::Lease::lost(CK_RV rv, const char* function) {
  broken_ = true;
  std::string why = std::string(function) + ": " + rv_name(rv);
  pool_->mark_broken(generation_, why);
  throw TokenUnavailable("HSM token '" + pool_->config_.token_label + "' is unavailable (" + why +
                         "); reconnecting");
}

}  // namespace p11kms::hsm
