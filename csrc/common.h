// Shared helpers for the hpctrain._C kernels: typed views of numpy integer arrays (validated,
// never a crash on bad input) and zero-copy hand-off of std::vector results to numpy.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace hpctrain {

// Moves `values` to the heap and returns a numpy array that owns it through a capsule:
// no copy, and the memory is freed when the last numpy reference goes away.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values, std::vector<py::ssize_t> shape) {
    auto* heap = new std::vector<T>(std::move(values));
    if (heap->capacity() == 0) heap->reserve(1);  // a non-null data pointer even when empty
    py::capsule owner(heap, [](void* p) { delete reinterpret_cast<std::vector<T>*>(p); });
    std::vector<py::ssize_t> strides(shape.size());
    py::ssize_t step = sizeof(T);
    for (size_t d = shape.size(); d-- > 0;) {
        strides[d] = step;
        step *= shape[d];
    }
    return py::array_t<T>(shape, strides, heap->data(), owner);
}

// A read-only 1-D integer array (int32 or int64), C-contiguous. Checks happen with the GIL held;
// the pointer stays valid while the caller holds the numpy array.
struct IntArray {
    const void* data = nullptr;
    int64_t size = 0;
    bool is64 = true;

    int64_t operator[](int64_t i) const {
        return is64 ? static_cast<const int64_t*>(data)[i]
                    : static_cast<const int32_t*>(data)[i];
    }
};

inline IntArray int_array(const py::array& a, const char* name) {
    const py::dtype dt = a.dtype();
    if (dt.kind() != 'i' || (dt.itemsize() != 4 && dt.itemsize() != 8)) {
        throw py::type_error(std::string(name) + " must be an int32 or int64 array, got dtype " +
                             std::string(py::str(dt)));
    }
    if (a.ndim() != 1) {
        throw std::invalid_argument(std::string(name) + " must be 1-D, got " +
                                    std::to_string(a.ndim()) + " dimensions");
    }
    if (!(a.flags() & py::array::c_style)) {
        throw std::invalid_argument(std::string(name) +
                                    " must be C-contiguous; pass np.ascontiguousarray(...)");
    }
    return IntArray{a.data(), static_cast<int64_t>(a.size()), dt.itemsize() == 8};
}

// Calls f(typed_pointer) with the array's element type, so hot loops are not branching per element.
template <typename F>
auto with_int_type(const IntArray& a, F&& f) {
    if (a.is64) return f(static_cast<const int64_t*>(a.data));
    return f(static_cast<const int32_t*>(a.data));
}

void register_packing(py::module_& m);
void register_batch_index(py::module_& m);
void register_pt_index(py::module_& m);
void register_relayout(py::module_& m);

}  // namespace hpctrain
