#include "app/hsm_info.hpp"

#include <iomanip>
#include <iostream>

namespace p11kms::app {

void print_hsm_info(std::ostream& out, const hsm::TokenDescription& d) {
  out << "module:   " << d.module_path << "\n";
  if (!d.library_description.empty())
    out << "library:  " << d.library_description << " " << d.library_version << " (" << d.library_manufacturer
        << ", Cryptoki " << d.cryptoki_version << ")\n";
  out << "token:    label " << d.label << ", serial " << d.serial << ", model " << d.model << ", manufacturer "
      << d.manufacturer << " (slot " << d.slot << ")\n\n";
  out << "mechanisms (" << d.mechanisms.size() << "):\n";
  for (const auto& m : d.mechanisms) {
    out << "  " << std::left << std::setw(30) << hsm::mechanism_name(m.type) << " " << std::setw(40)
        << hsm::mechanism_flag_names(m.flags);
    if (m.min_key_size || m.max_key_size) out << " key size " << m.min_key_size << ".." << m.max_key_size;
    out << "\n";
  }
  hsm::Capabilities caps(d.mechanisms);
  for (auto kind : {hsm::CapabilityKind::key_type, hsm::CapabilityKind::operation}) {
    out << "\n" << (kind == hsm::CapabilityKind::key_type ? "key types" : "operations") << " in the token:\n";
    for (const auto& c : caps.table()) {
      if (c.kind != kind) continue;
      out << "  " << std::left << std::setw(24) << c.name << " " << (c.available() ? "available  " : "UNAVAILABLE")
          << "  " << c.description << "\n";
      std::string needs;
      for (const auto& n : c.needs) needs += (needs.empty() ? "" : ", ") + n.describe();
      out << "  " << std::setw(24) << "" << "   needs " << needs << "\n";
      for (const auto& alt : c.alternatives) {
        std::string other;
        for (const auto& n : alt) other += (other.empty() ? "" : ", ") + n.describe();
        out << "  " << std::setw(24) << "" << "   or else " << other << "\n";
      }
      if (!c.available()) {
        std::string missing;
        for (const auto& n : c.missing) missing += (missing.empty() ? "" : ", ") + n.describe();
        out << "  " << std::setw(24) << "" << "   missing " << missing << "\n";
      }
    }
  }
  auto unavailable = caps.unavailable();
  out << "\nunavailable (" << unavailable.size() << "):";
  if (unavailable.empty()) out << " none";
  out << "\n";
  for (const auto& u : unavailable) out << "  " << u << "\n";
}

int run_hsm_info(const Config& config) {
  hsm::TokenDescription d;
  try {
    d = hsm::describe_token(config.hsm.module, config.hsm.token_label);
  } catch (const std::exception& e) {
    std::cerr << "p11kms: hsm info: " << e.what() << std::endl;
    return 1;
  }
  print_hsm_info(std::cout, d);
  return 0;
}

}  // namespace p11kms::app
