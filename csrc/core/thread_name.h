// Names the calling thread (at most 15 characters), so that `top -H`, `ps -L`, a stack dump or
// /proc/PID/task tell kvtransfer's threads apart, and from the host process's own.
#pragma once

#include <pthread.h>

namespace kvt {

inline void name_this_thread(const char* name) { ::pthread_setname_np(::pthread_self(), name); }

}  // namespace kvt
