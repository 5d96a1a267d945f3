#include "transport/fabric/fabric_loader.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/stat.h>

#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#include "core/error.h"
#include "transport/fabric/fabric_api.h"

namespace kvt::fabric {
namespace {

// The library's real exports; the headers' inline helpers reach everything else through the
// ops tables of the objects these return. Default (newest) symbol versions: struct fi_info
// only ever grows at the end, and we read no field younger than FABRIC_1.3 (libfabric 1.9).
struct Symbols {
  decltype(&::fi_getinfo) getinfo = nullptr;
  decltype(&::fi_freeinfo) freeinfo = nullptr;
  decltype(&::fi_dupinfo) dupinfo = nullptr;
  decltype(&::fi_fabric) fabric = nullptr;
  decltype(&::fi_strerror) strerror = nullptr;
  decltype(&::fi_version) version = nullptr;
  decltype(&::fi_tostr) tostr = nullptr;
};

Symbols g_sym;
Library g_lib;
std::string g_error;
std::once_flag g_once;

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa{}, sb{};
  if (::stat(a.c_str(), &sa) != 0 || ::stat(b.c_str(), &sb) != 0) return a == b;
  return sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

bool exists(const std::string& p) {
  struct stat s{};
  return ::stat(p.c_str(), &s) == 0;
}

int find_mapped(struct dl_phdr_info* info, size_t, void* out) {
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libfabric.so", 12) == 0) {
    *static_cast<std::string*>(out) = name;
    return 1;
  }
  return 0;
}

template <typename T>
void resolve(void* h, const char* name, T& slot, bool required) {
  slot = reinterpret_cast<T>(::dlsym(h, name));
  if (slot == nullptr && required) {
    throw Error(ErrorCode::kInvalidRequest,
                std::string("libfabric at ") + g_lib.path + " lacks the symbol " + name);
  }
}

void load_once() {
  const char* env = std::getenv("KVTRANSFER_LIBFABRIC");
  std::string wanted = env && *env ? env : "";
  std::string mapped;
  ::dl_iterate_phdr(find_mapped, &mapped);
  std::vector<std::string> candidates;
  if (!mapped.empty()) {
    if (!wanted.empty() && !same_file(wanted, mapped)) {
      throw Error(ErrorCode::kInvalidRequest,
                  "KVTRANSFER_LIBFABRIC=" + wanted + " but this process already has libfabric "
                  "loaded from " + mapped + "; two copies of libfabric in one process cannot "
                  "share the NICs. Point KVTRANSFER_LIBFABRIC at " + mapped + " or unset it");
    }
    candidates.push_back(mapped);
    g_lib.was_loaded = true;
  } else if (!wanted.empty()) {
    candidates.push_back(wanted);
  } else {
    for (const char* p : {"/opt/amazon/efa/lib/libfabric.so.1", "/opt/amazon/efa/lib64/libfabric.so.1"}) {
      if (exists(p)) candidates.push_back(p);
    }
    candidates.push_back("libfabric.so.1");
  }
  std::string why;
  void* h = nullptr;
  for (const auto& c : candidates) {
    h = ::dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h) {
      g_lib.path = c;
      break;
    }
    const char* e = ::dlerror();
    why += (why.empty() ? "" : "; ") + std::string(e ? e : c + ": not loadable");
  }
  if (!h) {
    throw Error(ErrorCode::kInvalidRequest,
                "the fabric transport needs libfabric, which could not be loaded (" + why +
                    "); install libfabric1 (Debian) or the AWS EFA installer, or set "
                    "KVTRANSFER_LIBFABRIC=/path/to/libfabric.so.1");
  }
  // Never dlclose: providers keep threads and fork handlers inside it.
  struct link_map* lm = nullptr;
  if (::dlinfo(h, RTLD_DI_LINKMAP, &lm) == 0 && lm && lm->l_name && *lm->l_name) {
    g_lib.path = lm->l_name;
  }
  resolve(h, "fi_getinfo", g_sym.getinfo, true);
  resolve(h, "fi_freeinfo", g_sym.freeinfo, true);
  resolve(h, "fi_dupinfo", g_sym.dupinfo, true);
  resolve(h, "fi_fabric", g_sym.fabric, true);
  resolve(h, "fi_strerror", g_sym.strerror, true);
  resolve(h, "fi_version", g_sym.version, true);
  resolve(h, "fi_tostr", g_sym.tostr, false);
  g_lib.version = g_sym.version();
  const uint32_t headers = FI_VERSION(FI_MAJOR_VERSION, FI_MINOR_VERSION);
  g_lib.api_version = std::min(headers, g_lib.version);
  if (g_lib.version < FI_VERSION(1, 9)) {
    throw Error(ErrorCode::kInvalidRequest,
                "libfabric " + version_string(g_lib.version) + " at " + g_lib.path +
                    " is too old; the fabric transport needs 1.9 or newer");
  }
}

}  // namespace

std::string version_string(uint32_t v) {
  return std::to_string(FI_MAJOR(v)) + "." + std::to_string(FI_MINOR(v));
}

const Library& load_library() {
  std::call_once(g_once, [] {
    try {
      load_once();
    } catch (const Error& e) {
      g_error = e.what();
      g_sym = Symbols{};
    }
  });
  if (!g_error.empty()) throw Error(ErrorCode::kInvalidRequest, g_error);
  return g_lib;
}

}  // namespace kvt::fabric

// Trampolines: the names the libfabric headers declare, hidden inside _core so they never
// interpose on (or get interposed by) a libfabric another library loaded. Until load_library()
// succeeded they fail the way libfabric does for a missing feature.
#define KVT_HIDDEN __attribute__((visibility("hidden")))
using kvt::fabric::g_sym;

extern "C" {

KVT_HIDDEN int fi_getinfo(uint32_t version, const char* node, const char* service, uint64_t flags,
                          const struct fi_info* hints, struct fi_info** info) {
  return g_sym.getinfo ? g_sym.getinfo(version, node, service, flags, hints, info) : -FI_ENOSYS;
}

KVT_HIDDEN void fi_freeinfo(struct fi_info* info) {
  if (g_sym.freeinfo) g_sym.freeinfo(info);
}

KVT_HIDDEN struct fi_info* fi_dupinfo(const struct fi_info* info) {
  return g_sym.dupinfo ? g_sym.dupinfo(info) : nullptr;
}

KVT_HIDDEN int fi_fabric(struct fi_fabric_attr* attr, struct fid_fabric** fabric, void* context) {
  return g_sym.fabric ? g_sym.fabric(attr, fabric, context) : -FI_ENOSYS;
}

KVT_HIDDEN const char* fi_strerror(int errnum) {
  return g_sym.strerror ? g_sym.strerror(errnum) : "libfabric is not loaded";
}

KVT_HIDDEN uint32_t fi_version(void) { return g_sym.version ? g_sym.version() : 0; }

KVT_HIDDEN char* fi_tostr(const void* data, enum fi_type datatype) {
  return g_sym.tostr ? g_sym.tostr(data, datatype) : nullptr;
}

}  // extern "C"
