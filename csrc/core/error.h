// One error type for the whole core: a code that maps to one Python exception class, and a
// message that says what happened, to what, and what to do about it.
#pragma once

#include <stdexcept>
#include <string>

namespace kvt {

enum class ErrorCode : int {
  kInvalidRequest = 1,  // bad segments, unknown region, layout mismatch  -> InvalidRequestError
  kTransport = 2,       // peer gone or unreachable, transfer failed       -> TransportError
  kTimeout = 3,         // a wait or a deadline ran out                      -> TimeoutError
  kAuthentication = 4,  // wrong or missing auth token                       -> AuthenticationError
  kProtocol = 5,        // malformed frame, bad key, version mismatch        -> ProtocolError
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

[[noreturn]] inline void fail(ErrorCode code, const std::string& message) {
  throw Error(code, message);
}

}  // namespace kvt
