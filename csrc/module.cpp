// hpctrain._C: the native kernels. Each kernel lives in its own file and registers itself
// here; every one has a pure-Python twin in hpctrain/native/ that the tests hold it equal to.
#include <pybind11/pybind11.h>

#include "common.h"

namespace py = pybind11;

#ifndef HPCTRAIN_VERSION
#define HPCTRAIN_VERSION "0.0.0"
#endif

PYBIND11_MODULE(_C, m) {
    m.doc() = "hpctrain native kernels (C++17)";
    m.attr("__version__") = HPCTRAIN_VERSION;
    hpctrain::register_packing(m);
    hpctrain::register_batch_index(m);
    hpctrain::register_pt_index(m);
    hpctrain::register_relayout(m);
}
