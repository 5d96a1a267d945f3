#include <mutex>

#include "transport/transport.h"

namespace kvt {
namespace {

std::map<std::string, TransportFactory>& factories() {
  static std::map<std::string, TransportFactory> f;
  return f;
}
std::mutex& factories_mu() {
  static std::mutex mu;
  return mu;
}

}  // namespace

void register_transport(const std::string& name, TransportFactory factory) {
  std::lock_guard<std::mutex> lock(factories_mu());
  factories()[name] = std::move(factory);
}

std::unique_ptr<Transport> make_transport(const std::string& name, TransportContext ctx) {
  TransportFactory f;
  {
    std::lock_guard<std::mutex> lock(factories_mu());
    auto it = factories().find(name);
    if (it == factories().end()) {
      std::string known;
      for (const auto& [n, _] : factories()) known += (known.empty() ? "" : ", ") + n;
      fail(ErrorCode::kInvalidRequest,
           "unknown transport '" + name + "' (this build has: " + known + ")");
    }
    f = it->second;
  }
  return f(std::move(ctx));
}

std::vector<std::string> transport_names() {
  std::lock_guard<std::mutex> lock(factories_mu());
  std::vector<std::string> out;
  for (const auto& [n, _] : factories()) out.push_back(n);
  return out;
}

}  // namespace kvt
