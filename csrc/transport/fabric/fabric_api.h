// The libfabric headers, included in one place. Nothing here links against libfabric: the
// handful of real exported functions the headers declare (fi_getinfo, fi_dupinfo, fi_fabric...)
// are defined by fabric_loader.cpp as hidden trampolines into the library dlopen()ed at run
// time; everything else (fi_writemsg, fi_cq_sread, fi_mr_regattr...) is a static inline call
// through the ops tables of the objects the library returns.
#pragma once

// Headers from a non-system prefix (AWS's /opt/amazon/efa/include) are not exempt from our
// -Wall -Wextra; their inline helpers are not ours to fix.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
#pragma GCC diagnostic ignored "-Wsign-compare"
#pragma GCC diagnostic ignored "-Wmissing-field-initializers"
#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_eq.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#if __has_include(<rdma/fi_ext.h>)
#include <rdma/fi_ext.h>
#endif
#pragma GCC diagnostic pop
