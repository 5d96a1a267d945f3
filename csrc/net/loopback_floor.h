// What one message over loopback TCP costs on this host with nothing else in the way: two
// threads, two sockets, no library, no Python. The bench measures it in the same run as the
// latency rows, so that a row can be read against what the kernel alone took at that moment
// (on a shared VM this floor itself moves by 2x over an hour).
#pragma once

#include <cstddef>
#include <vector>

namespace kvt::net {

// One-way times, in seconds, of `reps` messages of `nbytes`: from just before the sender's
// send() until the receiver, spinning on a non-blocking recv(), holds the last byte. Before
// each, the receiver writes over its buffer (as the bench poisons its destination) and the
// sender waits `gap_us`: asleep, as the bench's idle prefill, or `busy`, spinning.
std::vector<double> tcp_oneway_seconds(size_t nbytes, int reps, int gap_us, bool busy);

}  // namespace kvt::net
