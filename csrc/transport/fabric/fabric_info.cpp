#include "transport/fabric/fabric_info.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "transport/fabric/fabric_loader.h"

namespace kvt::fabric {
namespace {

bool ip_format(uint32_t f) {
  return f == FI_SOCKADDR || f == FI_SOCKADDR_IN || f == FI_SOCKADDR_IN6;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    size_t end = s.find(sep, start);
    if (end == std::string::npos) end = s.size();
    std::string part = s.substr(start, end - start);
    if (!part.empty()) out.push_back(part);
    start = end + 1;
  }
  return out;
}

// Device memory: asked for when the user says so or when the CUDA driver is already in the
// process (torch initialised CUDA); a provider without FI_HMEM is then still usable for host
// memory.
bool want_hmem() {
  const char* env = std::getenv("KVTRANSFER_FABRIC_HMEM");
  if (env && *env) return std::strcmp(env, "0") != 0;
  void* h = ::dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (h) ::dlclose(h);
  return h != nullptr;
}

// Writes complete at the initiator only once the target placed (and so checked) them, so a
// refused key is an error there rather than a silent drop. The software providers otherwise
// report a write complete when it left, before the target verified its key. Not on EFA: its
// device RDMA write already reports remote access errors, and delivery-complete would push it
// onto the slower emulated protocol. KVTRANSFER_FABRIC_DELIVERY_COMPLETE=0/1 overrides.
bool want_delivery_complete(const std::string& provider) {
  const char* env = std::getenv("KVTRANSFER_FABRIC_DELIVERY_COMPLETE");
  if (env && *env) return std::strcmp(env, "0") != 0;
  return provider != "efa";
}

// What the transport uses, and every mode / mr_mode bit it honours (see fabric_mr.cpp and
// fabric_rail.cpp for how each one is honoured).
InfoPtr make_hints(const std::string& provider, bool read, bool hmem, bool dc) {
  InfoPtr h(fi_allocinfo());
  if (!h) fail(ErrorCode::kTransport, "fi_allocinfo failed (out of memory?)");
  h->caps = FI_MSG | FI_RMA | FI_SEND | FI_RECV | FI_WRITE | FI_REMOTE_WRITE;
  if (read) h->caps |= FI_READ | FI_REMOTE_READ;
  if (hmem) h->caps |= FI_HMEM;
  h->mode = FI_CONTEXT | FI_CONTEXT2 | FI_RX_CQ_DATA | FI_ASYNC_IOV;
  h->ep_attr->type = FI_EP_RDM;
  if (dc) h->tx_attr->op_flags = FI_DELIVERY_COMPLETE;
  h->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY |
                            FI_MR_ENDPOINT | (hmem ? FI_MR_HMEM : 0);
  h->domain_attr->threading = FI_THREAD_SAFE;
  h->domain_attr->cq_data_size = 4;  // the 32-bit immediate (EFA offers exactly 4 bytes)
  h->addr_format = FI_FORMAT_UNSPEC;
  if (!provider.empty()) h->fabric_attr->prov_name = ::strdup(provider.c_str());
  return h;
}

// One fi_getinfo; entries copied out one by one (each with next == nullptr).
std::vector<InfoPtr> query(const std::string& provider, bool read, bool hmem, bool dc,
                           const char* node) {
  InfoPtr hints = make_hints(provider, read, hmem, dc);
  fi_info* list = nullptr;
  int rc = fi_getinfo(load_library().api_version, node, nullptr, node ? FI_SOURCE : 0,
                      hints.get(), &list);
  std::vector<InfoPtr> out;
  if (rc != 0 || list == nullptr) return out;
  for (fi_info* i = list; i; i = i->next) out.emplace_back(fi_dupinfo(i));  // one entry each
  fi_freeinfo(list);
  return out;
}

bool usable(const fi_info* i, bool bound) {
  if (!i->fabric_attr || !i->fabric_attr->prov_name || !i->domain_attr) return false;
  // Bound queries keep only IP-addressed providers (others would take the host name as their
  // own address); unbound ones only the rest, so tcp never quietly leaves the listen interface.
  return bound == ip_format(i->addr_format);
}

// The entries for `provider` (empty: all), IP providers bound to listen_host.
std::vector<InfoPtr> candidates(const std::string& provider, bool read, bool hmem, bool dc,
                                const std::string& listen_host) {
  const bool bind = !listen_host.empty() && listen_host != "0.0.0.0" && listen_host != "*";
  std::vector<InfoPtr> out;
  if (bind) {
    for (auto& i : query(provider, read, hmem, dc, listen_host.c_str())) {
      if (usable(i.get(), true)) out.push_back(std::move(i));
    }
  }
  for (auto& i : query(provider, read, hmem, dc, nullptr)) {
    if (!bind || usable(i.get(), false)) out.push_back(std::move(i));
  }
  // EFA 2.x lists two fabrics under one provider: "efa" (full protocol) and "efa-direct" (the
  // bare device path, no emulation). Prefer "efa" unless only the other exists.
  std::stable_partition(out.begin(), out.end(), [](const InfoPtr& i) {
    return !(i->fabric_attr->name && std::strcmp(i->fabric_attr->name, "efa-direct") == 0);
  });
  return out;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s.empty() ? "none" : s;
}

}  // namespace

std::string canonical_provider(const std::string& name) {
  if (name == "tcp") return "tcp;ofi_rxm";
  if (name == "udp") return "udp;ofi_rxd";
  if (name == "verbs") return "verbs;ofi_rxm";
  return name;
}

const std::vector<std::string>& provider_preference() {
  static const std::vector<std::string> order = {"efa", "verbs;ofi_rxm", "cxi", "psm3",
                                                 "tcp;ofi_rxm", "udp;ofi_rxd", "shm"};
  return order;
}

ProviderSpec parse_provider_spec(const std::string& spec) {
  ProviderSpec out;
  std::string name = spec, domains;
  size_t colon = spec.find(':');
  if (colon != std::string::npos) {
    name = spec.substr(0, colon);
    domains = spec.substr(colon + 1);
  } else if (const char* env = std::getenv("KVTRANSFER_FABRIC_DOMAINS")) {
    domains = env;
  }
  out.provider = canonical_provider(name);
  out.domains = split(domains, ',');
  return out;
}

std::vector<std::string> available_providers() {
  std::vector<std::string> names;
  for (bool read : {true, false}) {
    for (auto& i : query("", read, false, false, nullptr)) {
      std::string n = i->fabric_attr->prov_name;
      if (std::find(names.begin(), names.end(), n) == names.end()) names.push_back(n);
    }
  }
  return names;
}

Selection select_rails(const ProviderSpec& spec, const std::string& listen_host) {
  load_library();
  const bool hmem_wanted = want_hmem();
  // KVTRANSFER_FABRIC_READ=0: push only, even where the provider could read (an emulated
  // read on EFA is slower than having the data's owner write it; also how tests see push-only).
  const char* read_env = std::getenv("KVTRANSFER_FABRIC_READ");
  const bool read_allowed = !(read_env && std::strcmp(read_env, "0") == 0);
  std::vector<std::string> order;
  if (!spec.provider.empty()) {
    order.push_back(spec.provider);
  } else {
    order = provider_preference();
  }
  for (const auto& prov : order) {
    const bool dc_wanted = want_delivery_complete(prov);
    // Strongest first: read + hmem + delivery-complete writes, down to write-only (push).
    for (int attempt = 0; attempt < 8; ++attempt) {
      bool read = attempt < 4, hmem = attempt % 4 < 2, dc = attempt % 2 == 0;
      if ((hmem && !hmem_wanted) || (read && !read_allowed) || (dc && !dc_wanted)) continue;
      auto found = candidates(prov, read, hmem, dc, listen_host);
      if (found.empty()) continue;
      Selection sel;
      sel.provider = prov;
      sel.rdma_read = read;
      sel.hmem = hmem;
      sel.delivery_complete = dc;
      std::vector<std::string> names;  // distinct domains, in the provider's order
      for (const auto& i : found) {
        std::string d = i->domain_attr->name ? i->domain_attr->name : "";
        if (std::find(names.begin(), names.end(), d) == names.end()) names.push_back(d);
      }
      auto entry_for = [&](const std::string& d) -> const fi_info* {
        for (const auto& i : found) {
          if ((i->domain_attr->name ? i->domain_attr->name : "") == d) return i.get();
        }
        return nullptr;
      };
      std::vector<std::string> wanted = spec.domains;
      if (wanted.empty()) wanted = {names.front()};
      if (wanted.size() == 1 && wanted[0] == "*") wanted = names;
      for (const auto& d : wanted) {
        const fi_info* e = entry_for(d);
        if (!e) {
          fail(ErrorCode::kInvalidRequest,
               "fabric provider '" + prov + "' has no domain '" + d + "' here (it has: " +
                   join(names) + (listen_host.empty() ? "" : " usable from " + listen_host) + ")");
        }
        sel.rails.emplace_back(fi_dupinfo(e));
      }
      return sel;
    }
  }
  if (!spec.provider.empty()) {
    fail(ErrorCode::kInvalidRequest,
         "fabric provider '" + spec.provider + "' is not available here with reliable datagram "
         "endpoints and RMA" + (listen_host.empty() ? "" : " on " + listen_host) +
             " (available: " + join(available_providers()) + "); not falling back to another");
  }
  fail(ErrorCode::kInvalidRequest, "no usable fabric provider here (available: " +
                                       join(available_providers()) + ")");
}

}  // namespace kvt::fabric
