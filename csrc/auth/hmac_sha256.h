// HMAC-SHA256 (RFC 2104 over FIPS 180-4) for the handshake's challenge-response, so the core
// needs no crypto library at build or run time.
#pragma once

#include <string>
#include <string_view>

namespace kvt::auth {

std::string sha256(std::string_view data);                       // 32 raw bytes
std::string hmac_sha256(std::string_view key, std::string_view message);  // 32 raw bytes
bool constant_time_equal(std::string_view a, std::string_view b);
std::string random_bytes(size_t n);                              // from getrandom(2)

}  // namespace kvt::auth
